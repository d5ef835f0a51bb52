#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/) from
files already in the repository and a few hand-made inputs. The wire
decoder's seeds come from its encoder instead: see
omni-runtime/tests/wire_fuzz_seeds.rs. Run from anywhere; stdlib only."""
import io
import json
import pathlib
import shutil
import struct
import wave

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
FIX = ROOT / "omni-engine" / "tests" / "fixtures"
MEDIA = FIX / "qwen2_5_omni" / "media"


def put(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors):
    """A safetensors file: 8-byte header length, JSON header, data."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    for p in sorted((ROOT / "pipelines").glob("*.yaml")):
        put("pipeline_config", p.name, p.read_bytes())
    put("pipeline_config", "inline.json", json.dumps({
        "name": "x", "runtime": {"transport": "tcp", "edges": [{"from": 0, "to": 1, "window_size": 2}]},
        "stage_args": [{"stage_id": 0}, {"stage_id": 1, "engine_input_source": [0], "final_output": True,
                                         "custom_process_input_func": "thinker2talker",
                                         "engine_args": {"model_stage": "talker"}}]}))

    put("gguf_reader", "tiny-quants.gguf", (FIX / "tiny-quants.gguf").read_bytes())

    f32 = struct.pack("<6f", 0.5, -1.0, 2.0, 0.0, 3.5, -0.25)
    put("safetensors_reader", "two-tensors.safetensors", safetensors({
        "model.embed_tokens.weight": ("F32", [2, 3], f32),
        "model.norm.weight": ("BF16", [3], b"\x80\x3f\x00\x40\x40\x40"),
    }))
    put("safetensors_reader", "f16-i64.safetensors", safetensors({
        "a": ("F16", [2], b"\x00\x3c\x00\xc0"),
        "b": ("I64", [1], struct.pack("<q", 7)),
    }))

    for i, text in enumerate([
        "Hello, how are you?",
        "Ünïcödé — 中文字符 and emoji 🎉🙂",
        "<|im_start|>user\nHi<|im_end|>",
        "  leading spaces\n\ttabs\r\nand lines  ",
        "a" * 300,
    ]):
        put("tokenizer_input", f"text-{i}", text)

    put("media_decode", "picture.png", b"\x00" + (MEDIA / "picture.png").read_bytes())
    put("media_decode", "video.gif", b"\x01" + (MEDIA / "video.gif").read_bytes())
    # The first 0.1 s of the speech clip, as a whole WAV file.
    with wave.open(str(MEDIA / "speech_16k.wav"), "rb") as w:
        params, frames = w.getparams(), w.readframes(w.getframerate() // 10)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
    put("media_decode", "speech.wav", b"\x02" + buf.getvalue())
    # The same file stating 0 Hz: once a panic inside symphonia's WAV reader.
    zero_hz = bytearray(buf.getvalue())
    zero_hz[24:28] = bytes(4)
    put("media_decode", "speech-0hz.wav", b"\x02" + bytes(zero_hz))
    put("media_decode", "junk-speech-0hz.wav", b"\x02'" + bytes(zero_hz))

    put("http_body", "completion", b"\x00" + json.dumps({
        "model": "default", "prompt": "One plus one is", "max_tokens": 8,
        "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "logprobs": 2, "echo": True}).encode())
    put("http_body", "completion-tokens", b"\x00" + json.dumps({
        "model": "default", "prompt": [[1, 2, 3], [4, 5]], "n": 2, "seed": 3}).encode())
    put("http_body", "chat", b"\x01" + json.dumps({
        "model": "default", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]}],
        "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "logprobs": True, "top_logprobs": 2}).encode())


if __name__ == "__main__":
    shutil.rmtree(SEEDS / "pipeline_config", ignore_errors=True)
    main()
