"""The HTTP API through the official `openai` Python client, against a cluster started by
`eagle cluster up`: chat and completions, unary and streamed, give the gRPC API's tokens and
text for the same request at T = 0 with the right usage; speculation off gives the same text;
every error case has its documented HTTP status and OpenAI error object; a cluster with API
keys answers 401 without a good key and serves the client's `api_key`.

Run through tests/http/run.sh (which installs the pinned client); needs the release binaries.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import traceback

import openai

from cluster import Cluster, cluster_up

PROMPT = "Write a Python function that checks whether a number is prime."
RAW = "def fibonacci(n):"
N = 48


def client(c: Cluster) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test as it came.
    return openai.OpenAI(base_url=c.http + "/v1", api_key="unused", max_retries=0, timeout=300)


def model_id(c: Cluster) -> str:
    models = client(c).models.list().data
    assert len(models) == 1, models
    assert models[0].owned_by == "eagle-serve"
    return models[0].id


def eagle(obj) -> dict:
    """Our `eagle` extension of a response or chunk."""
    return (obj.model_extra or {}).get("eagle") or {}


def test_chat_unary_equals_grpc(c: Cluster) -> None:
    want = c.grpc_generate("--prompt", PROMPT, "--chat", "--max-new-tokens", str(N))
    r = client(c).chat.completions.create(
        model=model_id(c),
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=N,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r
    ch = r.choices[0]
    assert ch.message.role == "assistant"
    assert ch.message.content == want["text"], (ch.message.content, want["text"])
    assert eagle(r)["token_ids"] == want["token_ids"]
    assert ch.finish_reason == "length"
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == want["usage"]["generated_tokens"] == N
    assert r.usage.total_tokens == r.usage.prompt_tokens + N
    e = eagle(r)
    assert e["speculation"] is True and e["steps"] >= 1
    assert abs(e["mean_accepted"] - N / e["steps"]) < 1e-6, e


def test_cached_tokens_in_usage(c: Cluster) -> None:
    """A second request that shares a long system prompt with the first reports the tokens it
    took from the prefix cache in usage.prompt_tokens_details.cached_tokens, in whole 32-token
    blocks, and answers as the first request with the same messages would."""
    system = "You answer questions about a small lighthouse museum, briefly. " * 12
    ask = lambda q: client(c).chat.completions.create(  # noqa: E731
        model=model_id(c),
        messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
        max_tokens=8,
        temperature=0,
    )
    first = ask("When does it open?")
    assert first.usage.prompt_tokens > 100, first.usage
    details = first.usage.prompt_tokens_details
    assert details is None or not details.cached_tokens, first.usage
    second = ask("Is there a cafe?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 32 == 0, second.usage
    assert cached < second.usage.prompt_tokens
    again = ask("When does it open?")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= cached


def test_chat_stream_equals_grpc(c: Cluster) -> None:
    want = c.grpc_generate("--prompt", PROMPT, "--chat", "--max-new-tokens", str(N))
    stream = client(c).chat.completions.create(
        model=model_id(c),
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, ids, passes, finish, usage, roles = "", [], 0, None, None, 0
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == [], "the usage chunk has no choices"
            usage = chunk.usage
            continue
        d = chunk.choices[0].delta
        roles += d.role == "assistant"
        text += d.content or ""
        step = eagle(chunk).get("token_ids")
        if step:
            ids += step
            passes += 1
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
            stats = eagle(chunk)
    assert roles == 1, "the first chunk, and only it, names the role"
    assert text == want["text"], (text, want["text"])
    assert ids == want["token_ids"]
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == N
    assert usage.prompt_tokens == want["usage"]["prompt_tokens"]
    # One chunk per target pass after the prefill (which brings the first token).
    assert passes == stats["steps"], (passes, stats)
    assert passes < N, f"speculation took {passes} passes for {N} tokens"


def test_completions_equal_grpc(c: Cluster) -> None:
    want = c.grpc_generate("--prompt", RAW, "--max-new-tokens", "24")
    cl = client(c)
    r = cl.completions.create(model=model_id(c), prompt=RAW, max_tokens=24, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == want["text"]
    assert eagle(r)["token_ids"] == want["token_ids"]
    assert r.usage.completion_tokens == 24
    text = "".join(
        ch.choices[0].text
        for ch in cl.completions.create(
            model=model_id(c), prompt=RAW, max_tokens=24, temperature=0, stream=True
        )
        if ch.choices
    )
    assert text == want["text"], (text, want["text"])
    # OpenAI's default for completions: 16 tokens.
    r = cl.completions.create(model=model_id(c), prompt=RAW, temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_stop_seed_and_speculation_off(c: Cluster) -> None:
    cl = client(c)
    want = c.grpc_generate("--prompt", PROMPT, "--chat", "--max-new-tokens", str(N), "--stop", "\n")
    r = cl.chat.completions.create(
        model=model_id(c),
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=N,
        temperature=0,
        stop="\n",
    )
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].finish_reason == "stop" and "\n" not in r.choices[0].message.content
    plain = cl.chat.completions.create(
        model=model_id(c),
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=N,
        temperature=0,
        extra_body={"eagle": {"speculation": False}},
    )
    spec = cl.chat.completions.create(
        model=model_id(c),
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=N,
        temperature=0,
    )
    assert plain.choices[0].message.content == spec.choices[0].message.content
    assert eagle(plain)["speculation"] is False and eagle(plain)["mean_accepted"] == 1.0
    # T > 0 with a seed is reproducible, as through gRPC.
    want = c.grpc_generate(
        "--prompt", PROMPT, "--chat", "--max-new-tokens", "24", "--temperature", "0.8", "--seed", "7"
    )
    r = cl.chat.completions.create(
        model=model_id(c),
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=24,
        temperature=0.8,
        seed=7,
    )
    assert eagle(r)["token_ids"] == want["token_ids"]


def expect_error(call, status: int, param: str | None, needle: str) -> None:
    try:
        call()
    except openai.APIStatusError as e:
        assert e.status_code == status, (e.status_code, e.body)
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body)
        assert needle in err.get("message", ""), err
        assert err.get("type"), err
        if param is not None:
            assert err.get("param") == param, err
        return
    raise AssertionError(f"expected HTTP {status} ({needle})")


def test_errors(c: Cluster) -> None:
    cl = client(c)
    m = [{"role": "user", "content": "Hi"}]
    chat = cl.chat.completions.create
    expect_error(lambda: chat(model=model_id(c), messages=m, max_tokens=0), 400, "max_tokens", "at least 1")
    expect_error(
        lambda: chat(model=model_id(c), messages=m, max_tokens=100_000),
        400,
        "max_tokens",
        "context",
    )
    expect_error(lambda: chat(model=model_id(c), messages=m, n=2), 400, "n", "n = 1")
    expect_error(lambda: chat(model=model_id(c), messages=m, temperature=-1), 400, "temperature", "temperature")
    expect_error(lambda: chat(model=model_id(c), messages=m, top_p=0), 400, "top_p", "top_p")
    expect_error(
        lambda: chat(model=model_id(c), messages=m, extra_body={"temperature": "hot"}),
        400,
        "temperature",
        "invalid type",
    )
    expect_error(lambda: chat(model=model_id(c), messages=[]), 400, "messages", "empty")
    expect_error(
        lambda: chat(model=model_id(c), messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages",
        "role",
    )
    expect_error(lambda: chat(model=model_id(c), messages=m, logprobs=True), 400, "logprobs", "not supported")
    expect_error(
        lambda: chat(model=model_id(c), messages=m, extra_body={"eagle": {"tree": 4}}),
        400,
        None,
        "tree",
    )
    expect_error(lambda: chat(model="gpt-4o", messages=m), 404, "model", "does not exist")
    expect_error(lambda: cl.models.retrieve("gpt-4o"), 404, "model", "does not exist")
    expect_error(
        lambda: cl.completions.create(model=model_id(c), prompt=[1, 2, 3]),
        400,
        "prompt",
        "token-id",
    )
    expect_error(
        lambda: cl.completions.create(model=model_id(c), prompt="x" * (5 << 20)),
        413,
        None,
        "limit",
    )


def hold_stream(c: Cluster, session: str | None, started: threading.Event, release: threading.Event):
    """A long streamed answer that stays open until `release`."""
    extra = {"eagle": {"session_id": session}} if session else {}
    s = client(c).completions.create(
        model=model_id(c),
        prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body=extra,
    )
    next(iter(s))
    started.set()
    release.wait(120)
    s.close()


def wait_idle(c: Cluster) -> None:
    t0 = time.monotonic()
    while c.get_json("/health")["running"] != 0:
        assert time.monotonic() - t0 < 30, "closed streams still running after 30 s"
        time.sleep(0.1)


def test_busy_session_and_full_queue(c: Cluster) -> None:
    """The cluster runs 2 requests at once and queues none (see main)."""
    cl = client(c)
    m = [{"role": "user", "content": "Hi"}]
    release = threading.Event()
    a = threading.Event()
    t = threading.Thread(target=hold_stream, args=(c, "conv-1", a, release))
    t.start()
    try:
        assert a.wait(120), "the first stream did not start"
        expect_error(
            lambda: cl.chat.completions.create(
                model=model_id(c), messages=m, max_tokens=4, extra_body={"eagle": {"session_id": "conv-1"}}
            ),
            409,
            None,
            "has a request running",
        )
        b = threading.Event()
        t2 = threading.Thread(target=hold_stream, args=(c, None, b, release))
        t2.start()
        assert b.wait(120), "the second stream did not start"
        assert c.get_json("/health")["running"] == 2
        expect_error(
            lambda: cl.chat.completions.create(model=model_id(c), messages=m, max_tokens=4),
            429,
            None,
            "",
        )
    finally:
        release.set()
        t.join()
    t2.join()
    # Closing the streams ended their requests.
    wait_idle(c)


def check_api_keys(c: Cluster) -> None:
    """A cluster started with --api-keys-file: the client's api_key is the bearer token."""
    m = [{"role": "user", "content": PROMPT}]
    for key in ("unused", "key-gamma"):
        bad = openai.OpenAI(base_url=c.http + "/v1", api_key=key, max_retries=0)
        expect_error(lambda: bad.chat.completions.create(model="", messages=m, max_tokens=4), 401, None, "API key")
        expect_error(lambda: bad.models.list(), 401, None, "API key")
    good = openai.OpenAI(base_url=c.http + "/v1", api_key="key-alpha", max_retries=0)
    want = c.grpc_generate("--api-key", "key-beta", "--prompt", PROMPT, "--chat", "--max-new-tokens", "16")
    r = good.chat.completions.create(model=good.models.list().data[0].id, messages=m, max_tokens=16, temperature=0)
    assert eagle(r)["token_ids"] == want["token_ids"]
    assert c.get_json("/health")["status"] == "ok", "health needs no key"


def run(name: str, fn, *args) -> bool:
    t0 = time.monotonic()
    try:
        fn(*args)
        print(f"ok   {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        return True
    except Exception:
        print(f"FAIL {name}", flush=True)
        traceback.print_exc()
        return False


def main() -> int:
    wanted = sys.argv[1:]
    picked = lambda name: not wanted or any(w in name for w in wanted)  # noqa: E731
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_") and picked(k)]
    results = []
    if tests:
        # Two requests at once, none queued: test_busy_session_and_full_queue relies on it.
        with cluster_up("--max-running", "2", "--max-waiting", "0") as c:
            results += [run(name, t, c) for name, t in tests]
    if picked("check_api_keys"):
        with tempfile.NamedTemporaryFile("w", suffix=".keys") as keys:
            keys.write("# test keys\nkey-alpha\nkey-beta\n")
            keys.flush()
            with cluster_up("--api-keys-file", keys.name) as c:
                results.append(run("check_api_keys", check_api_keys, c))
    print(f"{results.count(True)} passed, {results.count(False)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
