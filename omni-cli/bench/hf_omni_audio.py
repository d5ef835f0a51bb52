"""The reference of `omni bench audio`: transformers running a Qwen2.5-Omni
folder (thinker, talker, token2wav one after the other, as its `generate`
does) on the same token-id prompts, with the same fixed lengths, at each
concurrency (c requests as one left-padded batch); and the HiFi-GAN
TorchScript vocoder on the same mel. Prints one JSON line per round.

Usage: python - MODEL_DIR PROMPTS_JSON --concurrency 1,8 --rounds 3 --threads 2
           --thinker-tokens N --talker-tokens M [--vocoder TS --mel-frames F]
"""
import argparse
import json
import time

import torch
from transformers import Qwen2_5OmniForConditionalGeneration

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("prompts")
p.add_argument("--concurrency", default="1,8")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--thinker-tokens", type=int, default=32)
p.add_argument("--talker-tokens", type=int, default=64)
p.add_argument("--vocoder")
p.add_argument("--mel-frames", type=int, default=500)
a = p.parse_args()
torch.set_num_threads(a.threads)

model = Qwen2_5OmniForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
cfg = model.config.talker_config
eos = [cfg.tts_codec_pad_token_id, cfg.tts_codec_end_token_id]
rate = 24000
prompts = json.loads(a.prompts)


def run(batch):
    width = max(len(x) for x in batch)
    ids = torch.tensor([[0] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    with torch.no_grad():
        _, wav = model.generate(
            input_ids=ids, attention_mask=mask, speaker="Chelsie",
            thinker_max_new_tokens=a.thinker_tokens, thinker_min_new_tokens=a.thinker_tokens,
            thinker_do_sample=False,
            talker_max_new_tokens=a.talker_tokens, talker_min_new_tokens=a.talker_tokens,
            talker_do_sample=False, talker_eos_token_id=eos,
        )
    if isinstance(wav, (list, tuple)):
        return sum(w.numel() for w in wav)
    return wav.numel()


run([prompts[0]])  # warm-up
for c in [int(x) for x in a.concurrency.split(",")]:
    for r in range(a.rounds):
        t = time.perf_counter()
        samples = run([prompts[i % len(prompts)] for i in range(c)])
        wall = time.perf_counter() - t
        # generate returns all audio at its end: each request's first audio
        # and its end are the round's wall time.
        print(json.dumps({"system": "transformers", "part": "pipeline", "concurrency": c,
                          "round": r, "wall_s": wall, "audio_s": samples / rate,
                          "first_audio_s": [wall] * c, "total_s": [wall] * c}), flush=True)

if a.vocoder:
    voc = torch.jit.load(a.vocoder).eval()
    torch.manual_seed(0)
    mel = torch.randn(1, 80, a.mel_frames) * 2.0 - 5.0
    with torch.no_grad():
        voc(mel)
        for r in range(a.rounds):
            t = time.perf_counter()
            n = voc(mel).numel()
            wall = time.perf_counter() - t
            print(json.dumps({"system": "torchscript", "part": "vocoder", "concurrency": 1,
                              "round": r, "wall_s": wall, "audio_s": n / 16000}), flush=True)
