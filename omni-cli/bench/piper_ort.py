"""The reference of `omni bench voice`: Piper's own Python path
(piper-phonemize + onnxruntime on the voice's .onnx), on the sentences given
as JSON on argv, at each concurrency (that many threads sharing one session,
each speaking its share), several rounds. Prints one JSON line per round and
concurrency: {"concurrency", "round", "wall_s", "audio_s"}.

Usage: python - VOICE.onnx SENTENCES_JSON --concurrency 1,8 --rounds 3 --threads 2
"""
import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from piper_phonemize import phonemize_espeak

p = argparse.ArgumentParser()
p.add_argument("voice")
p.add_argument("sentences")
p.add_argument("--concurrency", default="1,8")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

voice = Path(a.voice)
config = json.loads(Path(str(voice) + ".json").read_text(encoding="utf-8"))
id_map, inf, rate = config["phoneme_id_map"], config["inference"], config["audio"]["sample_rate"]
so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
session = ort.InferenceSession(str(voice), so, providers=["CPUExecutionProvider"])
scales = np.array([inf["noise_scale"], inf["length_scale"], inf["noise_w"]], np.float32)


def speak(text):
    samples = 0
    for i, ph in enumerate(phonemize_espeak(text, config["espeak"]["voice"])):
        ids = list(id_map["^"]) + list(id_map["_"])
        for q in ph:
            if q in id_map:
                ids += id_map[q] + id_map["_"]
        ids += id_map["$"]
        x = np.array([ids], dtype=np.int64)
        y = session.run(None, {"input": x, "input_lengths": np.array([x.shape[1]], np.int64), "scales": scales})[0]
        samples += y.size + (round(0.2 * rate) if i else 0)
    return samples


sentences = json.loads(a.sentences)
speak(sentences[0])  # warm-up
for c in [int(x) for x in a.concurrency.split(",")]:
    for r in range(a.rounds):
        t = time.perf_counter()
        texts = [sentences[i % len(sentences)] for i in range(c)]
        with ThreadPoolExecutor(max_workers=c) as pool:
            samples = sum(pool.map(speak, texts))
        wall = time.perf_counter() - t
        print(json.dumps({"concurrency": c, "round": r, "wall_s": wall, "audio_s": samples / rate}), flush=True)
