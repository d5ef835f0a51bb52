"""Drives `omni serve` with the official `openai` Python client.

Usage: openai_client.py BASE_URL MODEL

Prints one JSON object with what the client saw; the Rust test asserts on it.
"""
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
report = {}

report["models"] = [m.id for m in client.models.list().data]

messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
report["chat"] = {
    "object": chat.object,
    "choices": [
        {"index": c.index, "content": c.message.content, "role": c.message.role, "finish_reason": c.finish_reason,
         "stage_id": getattr(c, "stage_id", None), "modality": getattr(c, "modality", None)}
        for c in chat.choices
    ],
    "usage": chat.usage.model_dump() if chat.usage else None,
}

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
texts, finish, roles, usage, chunks = {}, {}, {}, None, 0
for chunk in stream:
    chunks += 1
    assert chunk.object == "chat.completion.chunk", chunk.object
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.role:
            roles[c.index] = c.delta.role
        if c.delta.content:
            texts[c.index] = texts.get(c.index, "") + c.delta.content
        if c.finish_reason:
            finish[c.index] = c.finish_reason
report["chat_stream"] = {
    "texts": texts, "finish": finish, "roles": roles, "usage": usage, "chunks": chunks,
}

comp = client.completions.create(model=model, prompt="The sky is", max_tokens=6, temperature=0)
report["completion"] = {
    "object": comp.object,
    "texts": [c.text for c in comp.choices],
    "usage": comp.usage.model_dump() if comp.usage else None,
}
texts = {}
for chunk in client.completions.create(model=model, prompt="The sky is", max_tokens=6, temperature=0, stream=True):
    for c in chunk.choices:
        texts[c.index] = texts.get(c.index, "") + c.text
report["completion_stream"] = {"texts": texts}

# vLLM-Omni extras ride in extra_body.
extra = client.chat.completions.create(
    model=model, messages=messages, temperature=0,
    extra_body={"sampling_params_list": [{"max_tokens": 3}, {"max_tokens": 2}], "modalities": ["text"]},
)
report["extras"] = {"tokens": [None if extra.usage is None else extra.usage.completion_tokens],
                    "choices": len(extra.choices)}

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    report["unknown_model"] = None
except openai.NotFoundError as e:
    report["unknown_model"] = {"status": e.status_code, "message": e.body.get("message") if isinstance(e.body, dict) else str(e)}

print(json.dumps(report))
