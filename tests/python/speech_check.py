"""Checks a spoken answer as a person's tools would see it.

    speech_check.py WAV TRANSCRIPT   -> one JSON line

Opens WAV with Python's `wave`, and speaks TRANSCRIPT with Piper's own tools
(piper-phonemize for the ids, onnxruntime on the voice's .onnx, sentence by
sentence with Piper's 0.2 s of silence between sentences, the voice's default
scales) to compare durations. Prints sample rate, channels, sample width,
duration, RMS, and onnxruntime's duration for the same text.
"""
import io
import json
import os
import sys
import wave
from pathlib import Path

import numpy as np

wav_path, transcript = sys.argv[1], sys.argv[2]
with wave.open(wav_path, "rb") as w:
    rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
    pcm = np.frombuffer(w.readframes(n), dtype="<i2").astype(np.float64) / 32768.0
out = {"sample_rate": rate, "channels": channels, "sample_width": width,
       "duration": n / rate if rate else 0.0, "rms": float(np.sqrt(np.mean(pcm ** 2))) if n else 0.0}

import onnxruntime as ort
from piper_phonemize import phonemize_espeak

model_dir = Path(os.environ.get("OMNI_MODEL_DIR") or Path(os.environ.get(
    "OMNI_CACHE_DIR", Path.home() / ".cache/omni")) / "models")
voice = model_dir / "en_US-joe-medium.onnx"
config = json.loads(voice.with_suffix(".onnx.json").read_text(encoding="utf-8"))
id_map, inf = config["phoneme_id_map"], config["inference"]
so = ort.SessionOptions()
so.intra_op_num_threads = 1
session = ort.InferenceSession(str(voice), so, providers=["CPUExecutionProvider"])
samples = 0
sentences = phonemize_espeak(transcript, config["espeak"]["voice"])
for i, ph in enumerate(sentences):
    ids = list(id_map["^"]) + list(id_map["_"])
    for p in ph:
        if p in id_map:
            ids += id_map[p] + id_map["_"]
    ids += id_map["$"]
    x = np.array([ids], dtype=np.int64)
    y = session.run(None, {"input": x, "input_lengths": np.array([x.shape[1]], np.int64),
                           "scales": np.array([inf["noise_scale"], inf["length_scale"], inf["noise_w"]],
                                              np.float32)})[0]
    samples += y.size + (round(0.2 * config["audio"]["sample_rate"]) if i else 0)
out["onnxruntime_duration"] = samples / config["audio"]["sample_rate"]
print(json.dumps(out))
