#!/usr/bin/env python3
"""llama.cpp on the same GGUF, prompts (as token ids), thread count and token budget as
`eagle bench`, for a side-by-side figure in one run. Called by `eagle bench --compare-llamacpp
PYTHON`; PYTHON must import llama_cpp (PyPI llama-cpp-python: see bench/README.md).

Prints one JSON line: greedy decoding tokens/s (prompt evaluation included, as ours), prompt
evaluation tokens/s, and the cost of evaluating n tokens with logits for each (what verifying a
draft tree of n tokens would cost llama.cpp)."""

import argparse
import json
import sys
import time

import llama_cpp
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="the .gguf file")
    ap.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    prompts = json.load(open(a.prompts))
    longest = max(len(p) for p in prompts) + a.max_new_tokens + 8
    llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                n_ctx=max(512, longest), verbose=False)
    eos = llm.token_eos()
    new_tokens, wall, prompt_tokens, prompt_s = 0, 0.0, 0, 0.0
    outputs = []
    for ids in prompts:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        while len(out) < a.max_new_tokens:
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            if tok == eos:
                break
            out.append(tok)
            if len(out) == a.max_new_tokens:
                break
            llm.eval([tok])
        t2 = time.perf_counter()
        new_tokens += len(out)
        wall += t2 - t0
        prompt_tokens += len(ids)
        prompt_s += t1 - t0
        outputs.append(out)
    # n tokens with logits for each, after a 64-token prefix: best of 3.
    prefix = [(i * 7919 + 13) % llm.n_vocab() for i in range(64)]
    costs = []
    for n in [1, 2, 4, 8, 16, 32, 64]:
        best = float("inf")
        for _ in range(3):
            llm.reset()
            llm.eval(prefix)
            t = time.perf_counter()
            llm.eval(prefix[:n])
            best = min(best, time.perf_counter() - t)
        costs.append([n, best * 1e3])
    print(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "threads": a.threads,
        "tokens_per_s": new_tokens / wall,
        "new_tokens": new_tokens,
        "prompt_tokens_per_s": prompt_tokens / prompt_s,
        "eval_cost_ms": costs,
        "token_ids": outputs,
    }))


if __name__ == "__main__":
    sys.exit(main())
