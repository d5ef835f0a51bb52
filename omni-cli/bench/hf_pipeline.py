"""The reference side of `omni bench pipeline`: HF transformers running the
default pipeline's two stages one after the other, as vLLM-Omni's own
comparison does.

Stage 0 answers each prompt (chat template, greedy); stage 1 gets the
summarize prompt built from stage 0's answer (the same text as omni-runtime's
`summarize` input processor) and answers it. Each stage is one batched
`generate` over all prompts (left padding), fp32 on CPU, with
`min_new_tokens == max_new_tokens` so both systems generate the same number
of tokens (omni runs with `ignore_eos`).

`omni bench pipeline` embeds this file and runs it as `python - GGUF_PATH
--prompts 16,64 --max-tokens 32 --threads 2` (the script on stdin); it also
runs on its own. Prints one JSON object per batch size.
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TOPICS = ["the ocean", "volcanoes", "honey bees", "the moon", "bicycles", "rainbows", "coffee",
          "penguins", "libraries", "thunderstorms", "chess", "bread", "glaciers", "owls", "trains",
          "gardens"]


FORMS = [("Tell me one interesting fact about ", "."),
         ("What would surprise most people about ", "?"),
         ("Explain briefly why people care about ", "."),
         ("Describe ", " to a curious child.")]


def bench_prompt(i):
    # Same as omni-cli's bench_prompt.
    head, tail = FORMS[(i // len(TOPICS)) % len(FORMS)]
    return f"{head}{TOPICS[i % len(TOPICS)]}{tail}"


def generate(model, tok, messages_list, max_tokens):
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_list]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    answers = tok.batch_decode(new, skip_special_tokens=True)
    return answers, int(new.numel())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompts", default="16,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    # Warm-up.
    generate(model, tok, [[{"role": "user", "content": bench_prompt(0)}]], 4)
    for n in [int(x) for x in a.prompts.split(",")]:
        start = time.perf_counter()
        s0 = [[{"role": "user", "content": bench_prompt(i)}] for i in range(n)]
        answers, t0 = generate(model, tok, s0, a.max_tokens)
        s1 = [[{"role": "user", "content":
                f"Summarize the following text in one sentence.\n\nText: {ans.strip() or '.'}"}]
              for ans in answers]
        _, t1 = generate(model, tok, s1, a.max_tokens)
        wall = time.perf_counter() - start
        tokens = t0 + t1
        print(json.dumps({"system": "hf", "prompts": n, "wall_s": wall, "prompts_per_s": n / wall,
                          "tok_per_s": tokens / wall, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
