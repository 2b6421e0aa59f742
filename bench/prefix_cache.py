#!/usr/bin/env python3
"""Time to first token with and without a cached shared prefix, through the OpenAI API.

Usage: python3 bench/prefix_cache.py HTTP_URL [PREFIX_TOKENS] [REPEATS]

Against a running cluster (`eagle cluster up`, which prints `http URL`). A system prompt of
about PREFIX_TOKENS tokens (1500 by default) is made unique per trial by a nonce at its start,
so a cold request shares nothing with earlier ones. Each trial sends it cold with one question,
then warm with other questions (the same system prompt): each request asks for one token, so
its wall time is its time to first token. Prints one JSON line: median cold and warm times,
their ratio, the prompt tokens and the cached tokens the usage reported.
"""

import json
import statistics
import sys
import time
import urllib.request

QUESTIONS = [
    "What are the opening hours on Saturday?",
    "How many items may a member borrow?",
    "How much does colour printing cost?",
    "When is the story hour?",
]


def document(tokens):
    """About `tokens` tokens of varied text (SmolLM2's tokenizer: ~21 tokens per line)."""
    lines = []
    for i in range(tokens // 21 + 1):
        lines.append(f"Rule {i}: shelf {i * 7 % 97} holds volume {i * 13 % 211} of series {i % 17}.")
    return "\n".join(lines)


def ask(url, system, question):
    body = json.dumps(
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "max_tokens": 1,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    dt = time.perf_counter() - t0
    usage = out["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return dt, usage["prompt_tokens"], cached


def main():
    url = sys.argv[1]
    prefix = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    doc = document(prefix)
    cold, warm, cached_warm, prompt_tokens = [], [], [], 0
    for trial in range(repeats):
        system = f"Session {time.time_ns()}-{trial}. You answer from these rules.\n{doc}"
        dt, prompt_tokens, cached = ask(url, system, QUESTIONS[0])
        cold.append(dt)
        if cached:
            print(f"warning: a cold request reused {cached} tokens", file=sys.stderr)
        for q in QUESTIONS[1:]:
            dt, _, cached = ask(url, system, q)
            warm.append(dt)
            cached_warm.append(cached)
    c, w = statistics.median(cold), statistics.median(warm)
    print(
        json.dumps(
            {
                "prompt_tokens": prompt_tokens,
                "cold_s": round(c, 4),
                "warm_s": round(w, 4),
                "warm_over_cold": round(w / c, 4),
                "cached_tokens_warm": statistics.median(cached_warm),
                "trials": repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
