"""Checks `omni serve` against what vLLM's OpenAI server does, row by row,
with the official `openai` client (and httpx where the client cannot say
it), on SmolLM2 at fp32.

Usage: openai_parity.py BASE_URL MODEL FIXTURE

FIXTURE is omni-engine/tests/fixtures/smollm2-logprobs.json: transformers'
log-softmax on the same model. Prints one JSON object
{"rows": [names of the rows checked], "failures": ["row: what differed"]};
the Rust test asserts that every row ran and nothing failed.
"""
import json
import sys

import httpx
import openai

base_url, model, fixture = sys.argv[1], sys.argv[2], sys.argv[3]
fx = json.load(open(fixture, encoding="utf-8"))
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
TOL = 1e-3
rows, failures = [], []


def check(row, cond, detail):
    if row not in rows:
        rows.append(row)
    if not cond:
        failures.append(f"{row}: {detail}")


def close(a, b):
    return a is not None and b is not None and abs(a - b) <= TOL


def refused(call):
    """The openai error a call raised, or None."""
    try:
        call()
    except openai.APIStatusError as e:
        return e
    return None


def extra(obj, key):
    return (obj.model_extra or {}).get(key)


text_fx, chat_fx = fx["text"], fx["chat"]
prompt = text_fx["prompt"]
gen = text_fx["generated"]
max_model_len = next(m for m in client.models.list().data if m.id == model).model_extra["max_model_len"]


def complete(**kw):
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=kw.pop("prompt", prompt), **kw)


# Prompt + max_tokens beyond the context: 400 with vLLM's message.
e = refused(lambda: complete(prompt=[504] * (max_model_len - 41), max_tokens=100))
check("context_length", isinstance(e, openai.BadRequestError) and "maximum context length is" in e.message
      and f"{max_model_len - 41} input tokens" in e.message, repr(e))
e = refused(lambda: complete(prompt="hi", max_tokens=max_model_len))
check("context_length", isinstance(e, openai.BadRequestError) and "too large" in e.message, repr(e))

# stop_token_ids: the stop token's text is left out, unless asked.
dot = gen[1]["token_id"]
r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                              extra_body={"stop_token_ids": [dot]})
c = r.choices[0]
check("stop_token_ids", c.text == gen[0]["text"] and c.finish_reason == "stop", repr(c))
check("stop_reason", extra(c, "stop_reason") == dot, repr(c))
r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                              extra_body={"stop_token_ids": [dot], "include_stop_str_in_output": True})
check("include_stop_str_in_output", r.choices[0].text == gen[0]["text"] + ".", repr(r.choices[0]))

# A stop string, left out or included; stop_reason names it.
free = "".join(g["text"] for g in gen)
r = complete(max_tokens=8, stop=[" answer"])
c = r.choices[0]
check("stop_string", c.text == free[: free.index(" answer")] and extra(c, "stop_reason") == " answer", repr(c))
r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=[" answer"],
                              extra_body={"include_stop_str_in_output": True})
check("include_stop_str_in_output", r.choices[0].text == free[: free.index(" answer") + 7], repr(r.choices[0]))
# EOS ends the chat without showing it, even with special tokens kept.
messages = chat_fx["messages"]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                   extra_body={"skip_special_tokens": False})
c = r.choices[0]
want = "".join(g["text"] for g in chat_fx["generated"][:-1])
check("skip_special_tokens_false", c.message.content == want and c.finish_reason == "stop"
      and extra(c, "stop_reason") is None, repr(c))

# Streaming with a stop string: the deltas add up to the whole answer.
chunks = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=[" answer"],
                                   stream=True)
streamed, stop_reason = "", None
for ch in chunks:
    for cc in ch.choices:
        streamed += cc.text
        stop_reason = extra(cc, "stop_reason") or stop_reason
check("stream_stop_string", streamed == free[: free.index(" answer")] and stop_reason == " answer",
      repr((streamed, stop_reason)))

# Completion logprobs: transformers' log-softmax, tokens, offsets, top dicts.
r = complete(max_tokens=8, logprobs=5)
lp = r.choices[0].logprobs
check("logprobs_completion", lp.tokens == [g["text"] for g in gen], repr(lp.tokens))
check("logprobs_completion", all(close(a, g["logprob"]) for a, g in zip(lp.token_logprobs, gen)),
      repr((lp.token_logprobs, [g["logprob"] for g in gen])))
offsets = [sum(len(g["text"]) for g in gen[:i]) for i in range(len(gen))]
check("logprobs_completion", lp.text_offset == offsets, repr(lp.text_offset))
for top, g in zip(lp.top_logprobs, gen):
    texts = [t for _, _, t in g["top"]]
    for _, want_lp, t in g["top"]:
        if texts.count(t) == 1:
            check("logprobs_completion", close(top.get(t), want_lp), repr((t, top, g["top"])))
# Chat logprobs with top_logprobs.
r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                   logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
want = chat_fx["generated"][:-1]
check("logprobs_chat", [t.token for t in content[: len(want)]] == [g["text"] for g in want], repr(content))
for t, g in zip(content, want):
    check("logprobs_chat", close(t.logprob, g["logprob"]) and t.bytes == list(g["text"].encode()), repr((t, g)))
    check("logprobs_chat", len(t.top_logprobs) == 3
          and all(close(a.logprob, b[1]) for a, b in zip(t.top_logprobs, g["top"])), repr(t.top_logprobs))
# prompt_logprobs (vLLM's field), from the prefill.
r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                              extra_body={"prompt_logprobs": 2})
plp = extra(r.choices[0], "prompt_logprobs")
want = text_fx["prompt_logprobs"]
check("prompt_logprobs", plp is not None and len(plp) == len(want) and plp[0] is None, repr(plp))
for got, w in zip((plp or [])[1:], want[1:]):
    entry = (got or {}).get(str(w["token_id"]))
    check("prompt_logprobs", entry is not None and close(entry["logprob"], w["logprob"])
          and entry["decoded_token"] == w["text"], repr((got, w)))

# echo + logprobs + max_tokens 0: the prompt alone, with its logprobs.
r = complete(max_tokens=0, echo=True, logprobs=1)
c = r.choices[0]
check("echo", c.text == prompt, repr(c.text))
check("echo", c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == len(want)
      and "".join(c.logprobs.tokens) == prompt, repr(c.logprobs))
check("echo", all(close(a, w["logprob"]) for a, w in zip(c.logprobs.token_logprobs[1:], want[1:])),
      repr((c.logprobs.token_logprobs, [w and w["logprob"] for w in want])))
r = complete(max_tokens=2, echo=True)
check("echo", r.choices[0].text == prompt + gen[0]["text"] + gen[1]["text"], repr(r.choices[0].text))

# min_tokens holds EOS off; logit_bias forces a token.
k = len(chat_fx["generated"]) - 1
r = client.chat.completions.create(model=model, messages=messages, max_tokens=k + 6, temperature=0,
                                   extra_body={"min_tokens": k + 4})
check("min_tokens", r.usage.completion_tokens >= k + 4, repr(r.usage))
r = complete(max_tokens=4, logit_bias={str(dot): 100})
check("logit_bias", r.choices[0].text == "....", repr(r.choices[0].text))

# n samples, each the seeded single request with seed + index.
r = complete(max_tokens=6, temperature=1.0, n=4, seed=11)
texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
check("n", [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3], repr(r.choices))
singles = [complete(max_tokens=6, temperature=1.0, seed=11 + i).choices[0].text for i in range(4)]
check("n", texts == singles and len(set(texts)) > 1, repr((texts, singles)))
check("n", r.usage.prompt_tokens == len(text_fx["prompt_token_ids"]), repr(r.usage))
e = refused(lambda: complete(max_tokens=2, n=1, extra_body={"best_of": 2}))
check("best_of", isinstance(e, openai.BadRequestError) and "best_of" in e.message, repr(e))
# Streaming n: both choices arrive, each finished.
finish = {}
for ch in client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=1.0, n=2,
                                         seed=5, stream=True):
    for cc in ch.choices:
        if cc.finish_reason:
            finish[cc.index] = cc.finish_reason
check("n", sorted(finish) == [0, 1], repr(finish))

# A batch of prompts: one choice per prompt, as the single requests.
r = complete(prompt=[prompt, "The sky is"], max_tokens=3)
got = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
want = [complete(prompt=p, max_tokens=3).choices[0].text for p in (prompt, "The sky is")]
check("prompt_list", got == want, repr((got, want)))

# Any 64-bit seed; the same seed, the same tokens.
a = complete(max_tokens=5, temperature=1.0, seed=-1).choices[0].text
b = complete(max_tokens=5, temperature=1.0, seed=-1).choices[0].text
check("seed", a == b, repr((a, b)))

# Unknown model: vLLM's 404.
e = refused(lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=1))
check("unknown_model", isinstance(e, openai.NotFoundError)
      and (e.body or {}).get("message") == "The model `no-such-model` does not exist.", repr(e))

# A field Omni does not implement is refused by name; an unknown one is ignored.
body = {"model": model, "prompt": prompt, "max_tokens": 1, "suffix": "!"}
resp = httpx.post(f"{base_url}/completions", json=body, timeout=600)
check("not_implemented", resp.status_code == 400 and resp.json()["error"]["param"] == "suffix", resp.text)
body = {"model": model, "prompt": prompt, "max_tokens": 1, "no_such_field": 1}
resp = httpx.post(f"{base_url}/completions", json=body, timeout=600)
check("unknown_field", resp.status_code == 200, resp.text)

print(json.dumps({"rows": rows, "failures": failures}))
