#!/usr/bin/env python3
"""Multi-turn conversations through the OpenAI API: how much prompt the cluster computes.

Usage: python3 bench/conversations.py HTTP_URL [CONVERSATIONS] [TURNS] [MAX_TOKENS]

Runs CONVERSATIONS (8) conversations of TURNS (4) turns each, interleaved turn by turn (every
conversation's turn 1, then every turn 2, ...), with no session id: each turn resends the
whole conversation so far, as OpenAI clients do, and only the prefix cache and cache-aware
routing can spare its recomputation. Greedy, MAX_TOKENS (48) a turn. Prints one JSON line:
prompt tokens sent, tokens the usage reports as cached, and the computed share
(prompt - cached) / prompt, which is 1.0 with caching off.
"""

import json
import sys
import time
import urllib.request

SYSTEM = (
    "You are a helpful assistant for a cooking school. Answer in two or three sentences, "
    "with one practical tip each time."
)
TOPICS = [
    "bread", "pasta", "curry", "soup", "salad", "cake", "rice", "omelette",
    "dumplings", "pancakes", "stew", "pie",
]
FOLLOW_UPS = [
    "How do I start with {t}?",
    "What goes wrong most often with {t}?",
    "How can I make my {t} healthier?",
    "Which tool matters most for {t}?",
    "How long does {t} keep?",
    "What should I serve with {t}?",
]


def chat(url, messages, max_tokens):
    body = json.dumps(
        {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    turns = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 48
    convs = [[{"role": "system", "content": SYSTEM}] for _ in range(n)]
    prompt = cached = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        for i, msgs in enumerate(convs):
            topic = TOPICS[i % len(TOPICS)]
            msgs.append(
                {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)].format(t=topic)}
            )
            out = chat(url, msgs, max_tokens)
            msgs.append(out["choices"][0]["message"])
            u = out["usage"]
            prompt += u["prompt_tokens"]
            cached += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    print(
        json.dumps(
            {
                "conversations": n,
                "turns": turns,
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "computed_share": round((prompt - cached) / prompt, 4),
                "wall_s": round(time.perf_counter() - t0, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
