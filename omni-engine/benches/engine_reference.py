#!/usr/bin/env python3
"""Reference runs for `cargo bench -p omni-engine --bench engine`.

Reads a workload (JSON from the Rust bench: prompts as token ids, so every
engine sees the same tokens) and runs it with one reference:

  hf        transformers `generate`, fp32, weights dequantized from the same GGUF
  llamacpp  llama.cpp (llama-cpp-python) on the same GGUF, requests one after another

Prints one JSON object with the same metrics the Rust side measures. Install:
`OMNI_BENCH_DEPS=1 scripts/setup` (llama-cpp-python builds from source).
"""
import argparse
import json
import os
import resource
import sys
import time


# Runs of llama.cpp's single request (engine.rs's SINGLE_RUNS); HF's runs
# once (a run takes seconds there).
SINGLE_RUNS = 5


def median(values):
    """The middle value (the upper middle of an even count), as engine.rs."""
    return sorted(values)[len(values) // 2]


def peak_rss_mb():
    # VmHWM is this process's own peak. ru_maxrss is not: Linux carries it
    # through exec, so it reported the bench process's peak when larger.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_hf(w, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    gguf = w["gguf"]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), torch_dtype=torch.float32
    )
    model.eval()
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    if isinstance(pad, list):
        pad = pad[0]
    gen_kwargs = dict(do_sample=False, pad_token_id=pad)

    def batch_generate(prompts, max_new):
        # Left padding: HF's static batching.
        n = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                min_new_tokens=max_new, **gen_kwargs)
        return out[:, n:]

    res = {}
    # Single request: TTFT = one-token generate; decode rate from the rest.
    p = w["single"]["prompt"]
    n_new = w["single"]["max_tokens"]
    batch_generate([p], 2)  # warm-up
    t0 = time.perf_counter()
    batch_generate([p], 1)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = batch_generate([p], n_new)
    total = time.perf_counter() - t0
    res["single_ttft_ms"] = ttft * 1000
    res["single_decode_tok_s"] = (n_new - 1) / max(total - ttft, 1e-9)
    res["single_tokens"] = out[0].tolist()

    b = w["batch16"]
    t0 = time.perf_counter()
    batch_generate(b["prompts"], b["max_tokens"])
    dt = time.perf_counter() - t0
    res["batch16_tok_s"] = len(b["prompts"]) * b["max_tokens"] / dt

    # Mixed: static batches of 16 in arrival order; each batch runs to its
    # longest request (that waste is what continuous batching removes).
    m = w["mixed"]
    t0 = time.perf_counter()
    useful = 0
    for i in range(0, len(m["prompts"]), 16):
        ps = m["prompts"][i:i + 16]
        ls = m["max_tokens"][i:i + 16]
        batch_generate(ps, max(ls))
        useful += sum(ls)
    dt = time.perf_counter() - t0
    res["mixed_tok_s"] = useful / dt
    res["mixed_wall_s"] = dt
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def run_llamacpp(w, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=w["gguf"], n_threads=threads, n_threads_batch=threads,
                n_ctx=2048, n_batch=512, logits_all=False, verbose=False, seed=0)

    def generate(prompt, max_new, first_token_time=None):
        llm.reset()
        out = []
        t0 = time.perf_counter()
        ttft = None
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
            if ttft is None:
                ttft = time.perf_counter() - t0
            out.append(tok)
            if len(out) >= max_new:
                break
        return out, ttft, time.perf_counter() - t0

    res = {}
    p = w["single"]["prompt"]
    n_new = w["single"]["max_tokens"]
    generate(p, 4)  # warm-up
    # The median of SINGLE_RUNS runs, as engine.rs measures omni.
    ttfts, rates = [], []
    for run in range(SINGLE_RUNS):
        out, ttft, total = generate(p, n_new)
        ttfts.append(ttft * 1000)
        rates.append((len(out) - 1) / max(total - ttft, 1e-9))
        if run == 0:
            res["single_tokens"] = out
    res["single_ttft_ms"] = median(ttfts)
    res["single_decode_tok_s"] = median(rates)

    b = w["batch16"]
    t0 = time.perf_counter()
    n = 0
    for prompt in b["prompts"]:
        n += len(generate(prompt, b["max_tokens"])[0])
    res["batch16_tok_s"] = n / (time.perf_counter() - t0)

    m = w["mixed"]
    t0 = time.perf_counter()
    n = 0
    for prompt, mt in zip(m["prompts"], m["max_tokens"]):
        n += len(generate(prompt, mt)[0])
    dt = time.perf_counter() - t0
    res["mixed_tok_s"] = n / dt
    res["mixed_wall_s"] = dt
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["hf", "llamacpp"])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with open(a.workload) as f:
        w = json.load(f)
    try:
        res = run_hf(w, a.threads) if a.which == "hf" else run_llamacpp(w, a.threads)
    except ImportError as e:
        res = {"error": f"{e}; install with OMNI_BENCH_DEPS=1 scripts/setup"}
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
