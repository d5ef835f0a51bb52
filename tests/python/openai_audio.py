"""Asks `omni serve` for a spoken answer with the official `openai` client.

Usage: openai_audio.py BASE_URL MODEL OUT_WAV [VOICE [INPUT_WAV [INPUT_PNG [INPUT_GIF]]]]

Requests modalities text and audio (as OpenAI's audio chat does), with
INPUT_WAV sent as an `input_audio` content part, INPUT_PNG as an `image_url`
data URL and INPUT_GIF as a `video_url` data URL when given, decodes
`message.audio.data` (base64 WAV) into OUT_WAV, and prints one JSON object
with the choices the client saw.
"""
import base64
import json
import sys
import wave

import openai

base_url, model, out_wav = sys.argv[1], sys.argv[2], sys.argv[3]
voice = sys.argv[4] if len(sys.argv) > 4 else "joe"
content = "Why is the sky blue?"
if len(sys.argv) > 5:
    with open(sys.argv[5], "rb") as f:
        clip = base64.b64encode(f.read()).decode()
    content = [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]
    if len(sys.argv) > 6:
        with open(sys.argv[6], "rb") as f:
            png = base64.b64encode(f.read()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}})
    if len(sys.argv) > 7:
        with open(sys.argv[7], "rb") as f:
            gif = base64.b64encode(f.read()).decode()
        content.append({"type": "video_url", "video_url": {"url": f"data:image/gif;base64,{gif}"}})
    content.append({"type": "text", "text": "What is said in this clip?"})
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": content}],
    max_tokens=24,
    temperature=0,
    modalities=["text", "audio"],
    audio={"voice": voice, "format": "wav"},
)
report = {"choices": []}
with_audio = None
for c in chat.choices:
    entry = {"index": c.index, "content": c.message.content, "finish_reason": c.finish_reason}
    if c.message.audio is not None:
        with open(out_wav, "wb") as f:
            f.write(base64.b64decode(c.message.audio.data))
        entry["audio"] = {"id": c.message.audio.id, "transcript": c.message.audio.transcript,
                          "expires_at": c.message.audio.expires_at}
        with wave.open(out_wav, "rb") as w:
            entry["wav"] = {"sample_rate": w.getframerate(), "channels": w.getnchannels(),
                            "sample_width": w.getsampwidth(), "frames": w.getnframes()}
    report["choices"].append(entry)
print(json.dumps(report))
