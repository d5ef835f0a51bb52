"""The reference of `omni bench encoder`: transformers' Qwen2.5-Omni processor
(WhisperFeatureExtractor, as Qwen2_5OmniProcessor calls it: padded to
chunk_length with an attention mask) and the thinker's audio tower
(`get_audio_features`) on the same clip, tiled to each length; and its image
processor (Qwen2VLImageProcessor, torchvision backend) and vision tower
(`get_image_features`) on the same drawn pattern at each size. Prints one JSON
line per round.

Usage: python - MODEL_DIR WAV --seconds 4,30,120 --images 640x480 --rounds 3 --threads 2
"""
import argparse
import json
import time
import wave

import numpy as np
import torch
from transformers import AutoImageProcessor, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("wav")
p.add_argument("--seconds", default="4,30,120")
p.add_argument("--images", default="640x480,1280x720")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)

with wave.open(a.wav) as w:
    rate = w.getframerate()
    clip = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
fe = WhisperFeatureExtractor.from_pretrained(a.model)
model = Qwen2_5OmniForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
thinker = model.thinker.model

for seconds in [float(s) for s in a.seconds.split(",")]:
    n = int(seconds * rate)
    samples = np.tile(clip, n // len(clip) + 1)[:n]
    for r in range(-1, a.rounds):  # round -1 warms up and is not printed
        t0 = time.perf_counter()
        inputs = fe(samples, sampling_rate=rate, return_attention_mask=True, padding="max_length", return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            rows = thinker.get_audio_features(
                inputs["input_features"], feature_attention_mask=inputs["attention_mask"], return_dict=True
            ).last_hidden_state
        t2 = time.perf_counter()
        if r < 0:
            continue
        print(json.dumps({"system": "transformers", "kind": "audio", "input": str(int(seconds)) if seconds.is_integer() else repr(seconds), "round": r,
                          "features_s": t1 - t0, "encoder_s": t2 - t1, "rows": int(rows.shape[0])}), flush=True)

ip = AutoImageProcessor.from_pretrained(a.model)
for size in [s for s in a.images.split(",") if s]:
    w, h = (int(v) for v in size.split("x"))
    y, x = np.mgrid[0:h, 0:w].astype(np.uint64)
    picture = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (x + 2 * y) % 256], axis=-1).astype(np.uint8)
    for r in range(-1, a.rounds):
        t0 = time.perf_counter()
        px = ip(images=[picture], return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            rows = thinker.get_image_features(px["pixel_values"], px["image_grid_thw"], return_dict=True).pooler_output[0]
        t2 = time.perf_counter()
        if r < 0:
            continue
        print(json.dumps({"system": "transformers", "kind": "image", "input": size, "round": r,
                          "features_s": t1 - t0, "encoder_s": t2 - t1, "rows": int(rows.shape[0])}), flush=True)
