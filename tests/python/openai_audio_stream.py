"""Asks `omni serve` for a spoken answer twice with the official `openai`
client, streamed and whole, and reports what the stream carried.

Usage: openai_audio_stream.py BASE_URL MODEL VOICE [long]

The streamed request (`stream: true`, modalities text and audio, format
pcm16) collects each chunk's `delta.audio.data` (base64 16-bit PCM pieces)
per choice in arrival order; the whole request decodes `message.audio.data`
(a WAV). Prints one JSON object: the kinds of deltas in arrival order
(`text`, `audio`), the number of audio pieces, their sample rate, whether
the pieces put together equal the whole answer's PCM, and both lengths.

With `long`, one streamed request whose answer is made 2000 tokens long
(`min_tokens`, a vLLM extension) and only the order of its deltas: the
audio must start while the text is still being written.
"""
import base64
import io
import json
import sys
import wave

import openai

base_url, model, voice = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
request = dict(
    model=model,
    messages=[{"role": "user", "content": "Why is the sky blue?"}],
    max_tokens=24,
    temperature=0,
    modalities=["text", "audio"],
)
if sys.argv[4:] == ["long"]:
    request.update(max_tokens=2000, extra_body={"min_tokens": 2000})
order, pieces, rates = [], [], set()
stream = client.chat.completions.create(
    stream=True, audio={"voice": voice, "format": "pcm16"}, **request
)
for chunk in stream:
    for c in chunk.choices:
        audio = getattr(c.delta, "audio", None)
        if audio:
            audio = audio if isinstance(audio, dict) else audio.model_dump()
            pieces.append(base64.b64decode(audio["data"]))
            rates.add(audio.get("sample_rate"))
            order.append("audio")
        elif c.delta.content:
            order.append("text")
if sys.argv[4:] == ["long"]:
    print(json.dumps({"order": order, "pieces": len(pieces)}))
    sys.exit(0)
whole = client.chat.completions.create(audio={"voice": voice, "format": "wav"}, **request)
wav = next(c.message.audio.data for c in whole.choices if c.message.audio is not None)
with wave.open(io.BytesIO(base64.b64decode(wav)), "rb") as w:
    pcm = w.readframes(w.getnframes())
streamed = b"".join(pieces)
print(json.dumps({
    "order": order,
    "pieces": len(pieces),
    "rates": sorted(r for r in rates if r is not None),
    "equal": streamed == pcm,
    "streamed_bytes": len(streamed),
    "whole_bytes": len(pcm),
}))
