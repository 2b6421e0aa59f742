#!/usr/bin/env python3
"""The chat page at `/` (services/coordinator/src/http/page.html) in a real headless Chromium,
against a real local cluster: it loads nothing from elsewhere, streams an answer pass by pass
that equals the gRPC API's answer token for token, shows which tokens came in one target pass,
fills its figures, compares with plain decoding, keeps a multi-turn conversation, and shows the
server's error message for a refused request; on a cluster that requires API keys it says so
until a key is typed into its settings.

Run: tests/http/run.sh (installs the pinned packages), or python3 tests/http/test_browser.py
[NAME_SUBSTRING ...] (from anywhere; a picked test brings the ones it needs). Prints one line per test and
`N passed, M failed`; exits 1 on failure. Needs the release binaries (target/release: eagle,
eagle-coordinator, eagle-draft, eagle-worker) and the default model, Debian's `chromium` and
`chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver; EAGLE_CHROMIUM and
EAGLE_CHROMEDRIVER override the paths) and selenium (tests/http/requirements.txt).
A screenshot goes to $OUT_DIR/eagle-page.png (default /tmp/eagle-page.png), and the narrow
layout's to eagle-page-narrow.png next to it.

The tests run in order on one cluster and one browser; NEEDS says which ones a test builds on.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from urllib.parse import urlsplit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

PROMPT = "Write a Python function that checks whether a number is prime."
MAX_TOKENS = 48
FOLLOW_UP = "Now make it shorter."
FOLLOW_UP_TOKENS = 8
# A CPU-only machine and a small model: an answer of 48 tokens takes seconds, but the first
# request of a cluster may wait for its worker's warm-up.
ANSWER_TIMEOUT_S = 120
LAST_ANSWER = "#messages .message.assistant:last-of-type .content"


@dataclass
class Ctx:
    c: object  # cluster.Cluster: .http, .grpc_generate(*flags)
    d: webdriver.Chrome
    model: str = ""
    expected: dict = field(default_factory=dict)  # the gRPC API's answer to PROMPT
    answer: str = ""  # the page's answer to PROMPT


# ---- the browser ------------------------------------------------------------------------


def make_driver() -> webdriver.Chrome:
    chromium = os.environ.get("EAGLE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("EAGLE_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for p in (chromium, driver):
        if not os.access(p, os.X_OK):
            raise RuntimeError(f"{p} is missing: apt-get install -y chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
              "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: Selenium Manager has nothing to look up or download.
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def js(d, script: str, *args):
    return d.execute_script(script, *args)


def console_errors(d, allowed: tuple[str, ...] = ()) -> list[str]:
    """The console's SEVERE entries since the last call, less those containing an allowed string."""
    return [
        e["message"]
        for e in d.get_log("browser")
        if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)
    ]


def state(d) -> tuple[str, int]:
    return tuple(js(d, "return [document.body.dataset.state, Number(document.body.dataset.requests)]"))


def wait_for(d, what: str, cond, timeout: float = ANSWER_TIMEOUT_S, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; page state {state(d)}")
        time.sleep(poll)


def wait_finished(d, requests_before: int, timeout: float = ANSWER_TIMEOUT_S) -> str:
    """Waits until the request started after `requests_before` has ended; its final state."""

    def done():
        s, n = state(d)
        return s if n > requests_before and s in ("idle", "error") else None

    return wait_for(d, "the request to end", done, timeout)


def set_value(d, css: str, value: str):
    el = d.find_element(By.CSS_SELECTOR, css)
    el.clear()
    if value:
        el.send_keys(value)
    got = el.get_attribute("value")
    assert got == value, f"{css} holds {got!r} after typing {value!r}"


def number(d, css: str) -> float:
    text = d.find_element(By.CSS_SELECTOR, css).text.strip()
    try:
        return float(text)
    except ValueError:
        raise AssertionError(f"{css} shows {text!r}, not a number") from None


def passes(d, css: str) -> list[int]:
    return js(d, "return Array.from(document.querySelectorAll(arguments[0] + ' span.pass'),"
                 " s => Number(s.dataset.tokens))", css)


def text_of(d, css: str) -> str:
    # textContent, not WebDriver's rendered .text (which folds whitespace).
    return js(d, "return document.querySelector(arguments[0]).textContent", css)


# ---- the tests --------------------------------------------------------------------------

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def page_loads_from_one_origin(x: Ctx):
    """The page loads, reads the model and health, and loads nothing from another origin."""
    x.d.get(x.c.http + "/")
    wait_for(x.d, "the page to be ready", lambda: state(x.d)[0] in ("idle", "error"), timeout=30)
    assert state(x.d)[0] == "idle", f"the page is not idle after loading: {text_of(x.d, '#error')!r}"
    x.model = x.d.find_element(By.ID, "model").get_attribute("value")
    models = x.c.get_json("/v1/models")
    assert x.model == models["data"][0]["id"], f"the page's model {x.model!r}, /v1/models: {models}"
    wait_for(x.d, "the health check", lambda: "healthy" == x.d.find_element(By.CSS_SELECTOR, "#health .txt").text, 10)
    origin = urlsplit(x.c.http)[:2]
    entries = js(x.d, "return performance.getEntriesByType('resource').map(e => e.name)")
    foreign = [u for u in entries if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u)[:2] != origin]
    assert not foreign, f"resources from another origin: {foreign}"
    assert {"/v1/models", "/health"} <= {urlsplit(u).path for u in entries}, f"resources: {entries}"
    for css in ("#prompt", "#send", "#temperature", "#max-tokens", "#speculation", "#tree-size", "#compare"):
        el = x.d.find_element(By.CSS_SELECTOR, css)
        label = js(x.d, "return arguments[0].labels && arguments[0].labels.length", el)
        assert css in ("#send", "#compare") or label, f"{css} has no <label>"
    assert not x.d.find_element(By.ID, "error").is_displayed(), "the error box shows with no error"
    assert x.d.find_element(By.ID, "temperature").get_attribute("value") == "0"
    assert x.d.find_element(By.ID, "max-tokens").get_attribute("value") == "128"
    assert x.d.find_element(By.ID, "speculation").is_selected(), "speculation is off by default"
    assert x.d.find_element(By.ID, "tree-size").get_attribute("value") == ""
    errors = console_errors(x.d)
    assert not errors, f"console errors: {errors}"
    # Record every request body the page sends (the later tests check them).
    js(x.d, """
        window.__bodies = [];
        const f = window.fetch;
        window.fetch = function (url, opts) {
          if (opts && opts.body) window.__bodies.push({url: String(url), body: JSON.parse(opts.body)});
          return f.apply(this, arguments);
        };""")


@test
def answer_streams_like_grpc(x: Ctx):
    """The streamed answer equals the gRPC API's, in several passes, some with 2+ tokens."""
    x.expected = x.c.grpc_generate("--prompt", PROMPT, "--chat", "--max-new-tokens", str(MAX_TOKENS), "--temperature", "0")
    d = x.d
    set_value(d, "#temperature", "0")
    set_value(d, "#max-tokens", str(MAX_TOKENS))
    set_value(d, "#prompt", PROMPT)
    before = state(d)[1]
    t0 = time.monotonic()
    d.find_element(By.ID, "send").click()
    # Watch the answer grow: the pass counts seen while the page says it is streaming.
    seen = set()
    deadline = t0 + ANSWER_TIMEOUT_S
    while time.monotonic() < deadline:
        s, n, spans = js(d, "return [document.body.dataset.state, Number(document.body.dataset.requests),"
                            " document.querySelectorAll(arguments[0] + ' span.pass').length]", LAST_ANSWER)
        if n > before and s != "streaming":
            break
        if s == "streaming":
            seen.add(spans)
        time.sleep(0.02)
    final = wait_finished(d, before, timeout=1)
    took = time.monotonic() - t0
    assert final == "idle", f"the request ended in {final!r}: {text_of(d, '#error')!r}"

    sent = js(d, "return window.__bodies")[-1]
    assert sent["url"].endswith("/v1/chat/completions"), sent
    b = sent["body"]
    assert b["messages"] == [{"role": "user", "content": PROMPT}], b
    assert (b["model"], b["max_tokens"], b["temperature"], b["stream"]) == (x.model, MAX_TOKENS, 0, True), b
    assert b["eagle"] == {"speculation": True}, f"the tree size is automatic when empty: {b['eagle']}"
    assert b["stream_options"] == {"include_usage": True}, b

    x.answer = text_of(d, LAST_ANSWER)
    assert x.answer == x.expected["text"], (
        f"the page's answer differs from the gRPC API's:\n page: {x.answer!r}\n gRPC: {x.expected['text']!r}")
    tokens = passes(d, LAST_ANSWER)
    generated = x.expected["usage"]["generated_tokens"]
    assert sum(tokens) == generated, f"the passes' tokens {tokens} sum to {sum(tokens)}, not {generated}"
    assert len(tokens) >= 3, f"only {len(tokens)} passes: {tokens}"
    assert all(t >= 1 for t in tokens), f"a pass without tokens: {tokens}"
    assert max(tokens) >= 2, f"no pass brought 2+ tokens (is speculation on?): {tokens}"
    multi = d.find_elements(By.CSS_SELECTOR, LAST_ANSWER + " span.pass.n2, " + LAST_ANSWER + " span.pass.n4")
    assert len(multi) == sum(t >= 2 for t in tokens), "the 2+ token passes are not all tinted"
    title = d.find_element(By.CSS_SELECTOR, LAST_ANSWER + " span.pass").get_attribute("title")
    assert re.match(rf"pass 1: {tokens[0]} tokens?\b", title), f"the first pass's tooltip: {title!r}"

    partial = sorted(n for n in seen if 0 < n < len(tokens))
    assert partial, f"never saw a partial answer while streaming (pass counts seen: {sorted(seen)})"
    reads = int(d.find_element(By.CSS_SELECTOR, "#messages .message.assistant:last-of-type").get_attribute("data-reads"))
    assert reads >= 2, f"the passes came in {reads} network read(s)"

    tps, tpp, ttft, n = (number(d, c) for c in ("#fig-tps", "#fig-tpp", "#fig-ttft", "#fig-passes"))
    assert tps > 0 and tpp > 0 and ttft > 0 and n > 0, f"figures: {tps} tok/s, {tpp} tok/pass, {ttft} ms, {n} passes"
    assert n == len(tokens), f"#fig-passes shows {n}, the page drew {len(tokens)} passes"
    assert abs(tpp - generated / len(tokens)) < 0.01, f"#fig-tpp {tpp} vs {generated}/{len(tokens)}"
    assert ttft < took * 1000, f"time to first token {ttft} ms is longer than the whole request ({took:.1f} s)"
    assert not console_errors(d), "console errors"
    print(f"     {generated} tokens in {len(tokens)} passes ({tpp:.2f}/pass, largest {max(tokens)}), "
          f"{tps:.1f} tok/s, first token {ttft:.0f} ms, {reads} reads, {took:.1f} s; pass counts seen {sorted(seen)}")


@test
def compare_with_plain(x: Ctx):
    """Compare reruns the prompt without speculation: the same text, one token a pass."""
    assert x.answer, "needs answer_streams_like_grpc"
    d = x.d
    before = state(d)[1]
    d.find_element(By.ID, "compare").click()
    final = wait_finished(d, before)
    assert final == "idle", f"the comparison ended in {final!r}: {text_of(d, '#error')!r}"
    assert d.find_element(By.ID, "comparison").is_displayed(), "#comparison is hidden"
    b = js(d, "return window.__bodies")[-1]["body"]
    assert b["eagle"] == {"speculation": False}, b
    assert b["messages"] == [{"role": "user", "content": PROMPT}], b
    assert (b["max_tokens"], b["temperature"]) == (MAX_TOKENS, 0), b
    plain = text_of(d, "#cmp-plain-text")
    assert plain == x.answer, f"plain decoding's text differs:\n plain: {plain!r}\n eagle: {x.answer!r}"
    assert text_of(d, "#cmp-eagle-text") == x.answer, "the EAGLE column does not show the answer"
    tokens = passes(d, "#cmp-plain-text")
    assert tokens and set(tokens) == {1}, f"plain passes with other than 1 token: {tokens}"
    assert len(tokens) == x.expected["usage"]["generated_tokens"], f"{len(tokens)} plain passes"
    eagle_tps, plain_tps, ratio = (number(d, c) for c in ("#cmp-eagle-tps", "#cmp-plain-tps", "#cmp-ratio"))
    assert eagle_tps > 0 and plain_tps > 0 and ratio > 0, (eagle_tps, plain_tps, ratio)
    assert abs(ratio - eagle_tps / plain_tps) <= 0.02 * ratio + 0.01, f"ratio {ratio} vs {eagle_tps}/{plain_tps}"
    assert "identical" in d.find_element(By.ID, "cmp-same").text, d.find_element(By.ID, "cmp-same").text
    assert not console_errors(d), "console errors"
    print(f"     EAGLE {eagle_tps} tok/s, plain {plain_tps} tok/s, ratio {ratio}")
    screenshot(d, "eagle-page.png")


@test
def conversation_is_sent_back(x: Ctx):
    """A second message sends the conversation so far, the first answer included."""
    assert x.answer, "needs answer_streams_like_grpc"
    d = x.d
    set_value(d, "#max-tokens", str(FOLLOW_UP_TOKENS))
    set_value(d, "#prompt", FOLLOW_UP)
    before = state(d)[1]
    d.find_element(By.ID, "prompt").send_keys("\n")  # Enter sends
    final = wait_finished(d, before)
    assert final == "idle", f"the second turn ended in {final!r}: {text_of(d, '#error')!r}"
    b = js(d, "return window.__bodies")[-1]["body"]
    want = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": x.answer},
        {"role": "user", "content": FOLLOW_UP},
    ]
    assert b["messages"] == want, f"the second turn sent {json.dumps(b['messages'])[:600]}"
    roles = js(d, "return Array.from(document.querySelectorAll('#messages .message'), m => m.className)")
    assert roles == ["message user", "message assistant"] * 2, roles
    tokens = passes(d, LAST_ANSWER)
    assert 1 <= sum(tokens) <= FOLLOW_UP_TOKENS, f"second answer's passes: {tokens}"
    assert not console_errors(d), "console errors"


@test
def server_error_is_shown(x: Ctx):
    """A refused request shows the server's message; the turn is taken back, not kept."""
    d = x.d
    n_messages = len(d.find_elements(By.CSS_SELECTOR, "#messages .message"))
    for bad in ("0", "100000"):
        set_value(d, "#max-tokens", bad)
        set_value(d, "#prompt", "Hello")
        before = state(d)[1]
        d.find_element(By.ID, "send").click()
        final = wait_finished(d, before, timeout=30)
        assert final == "error", f"max tokens {bad}: the request ended in {final!r}"
        box = d.find_element(By.ID, "error")
        assert box.is_displayed(), f"max tokens {bad}: #error is not visible"
        message = d.find_element(By.ID, "error-message").text
        assert "max_tokens" in message, f"max tokens {bad}: the message does not name max_tokens: {box.text!r}"
        assert "400" in box.text, f"max tokens {bad}: no HTTP status shown: {box.text!r}"
        assert len(d.find_elements(By.CSS_SELECTOR, "#messages .message")) == n_messages, "the refused turn stayed"
        assert d.find_element(By.ID, "prompt").get_attribute("value") == "Hello", "the prompt was not given back"
        print(f"     max tokens {bad}: {box.text!r}")
    # The browser logs each refused fetch's status; nothing else may show up.
    errors = console_errors(d, allowed=("status of 400",))
    assert not errors, f"console errors: {errors}"
    # A good request clears the error.
    set_value(d, "#max-tokens", "4")
    before = state(d)[1]
    d.find_element(By.ID, "send").click()
    assert wait_finished(d, before) == "idle", text_of(d, "#error")
    assert not d.find_element(By.ID, "error").is_displayed(), "#error still shows after a good request"


@test
def narrow_window(x: Ctx):
    """At phone width nothing overflows sideways and the controls stay on screen."""
    d = x.d
    d.set_window_size(400, 900)
    try:
        time.sleep(0.3)
        over = js(d, "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert over <= 0, f"the page is {over} px wider than a 400 px window"
        for css in ("#prompt", "#send", "#max-tokens"):
            r = js(d, "return arguments[0].getBoundingClientRect().toJSON()", d.find_element(By.CSS_SELECTOR, css))
            assert r["left"] >= 0 and r["right"] <= 400 and r["width"] > 0, f"{css} is off screen: {r}"
        screenshot(d, "eagle-page-narrow.png")
    finally:
        d.set_window_size(1280, 1000)


def screenshot(d, name: str):
    """For the README; failing to write one does not fail a test."""
    out = pathlib.Path(os.environ.get("OUT_DIR") or "/tmp")
    size = d.get_window_size()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # The whole page, not just the window.
        js(d, "window.scrollTo(0, 0)")
        h = js(d, "return Math.min(3000, document.documentElement.scrollHeight)")
        w = js(d, "return window.innerWidth")
        d.set_window_size(max(w, 400), h + 120)
        d.save_screenshot(str(out / name))
        print(f"     screenshot: {out / name}")
    except Exception as e:  # noqa: BLE001
        print(f"     (no screenshot: {e})")
    finally:
        d.set_window_size(size["width"], size["height"])


# The tests a test needs run first (they leave the page in the state it starts from).
NEEDS = {
    "answer_streams_like_grpc": ["page_loads_from_one_origin"],
    "compare_with_plain": ["page_loads_from_one_origin", "answer_streams_like_grpc"],
    "conversation_is_sent_back": ["page_loads_from_one_origin", "answer_streams_like_grpc"],
    "server_error_is_shown": ["page_loads_from_one_origin"],
    "narrow_window": ["page_loads_from_one_origin"],
}


def selected(names: list[str]) -> list:
    """The tests whose name contains one of `names` (all when none), with what they need."""
    if not names:
        return list(TESTS)
    picked = {fn.__name__ for fn in TESTS if any(n in fn.__name__ for n in names)}
    picked |= {need for name in picked for need in NEEDS.get(name, [])}
    return [fn for fn in TESTS if fn.__name__ in picked]


def run_tests(c, names: list[str] = ()) -> int:
    """Runs the picked tests (all by default) on cluster `c` with one browser; how many failed."""
    tests = selected(list(names))
    failed = 0
    d = make_driver()
    try:
        x = Ctx(c=c, d=d)
        for fn in tests:
            t0 = time.monotonic()
            try:
                fn(x)
                print(f"ok   {fn.__name__} ({time.monotonic() - t0:.1f} s)")
            except Exception:  # noqa: BLE001
                failed += 1
                print(f"FAIL {fn.__name__} ({time.monotonic() - t0:.1f} s)")
                traceback.print_exc()
    finally:
        d.quit()
    print(f"{len(tests) - failed} passed, {failed} failed")
    return failed


def api_key_field(c) -> None:
    """On a cluster that requires API keys the page says so (the model list is refused with
    401), and once a key is typed in its settings it lists the model and answers."""
    d = make_driver()
    try:
        d.get(c.http + "/")
        wait_for(d, "the page to load", lambda: state(d)[0] in ("idle", "error"), timeout=30)
        wait_for(d, "the refused model list", lambda: d.find_element(By.ID, "error").is_displayed(), timeout=30)
        assert "API key" in text_of(d, "#error"), text_of(d, "#error")
        set_value(d, "#api-key", "key-alpha")
        js(d, "document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait_for(d, "the model list", lambda: not d.find_element(By.ID, "error").is_displayed(), timeout=30)
        set_value(d, "#max-tokens", "4")
        set_value(d, "#temperature", "0")
        set_value(d, "#prompt", PROMPT)
        before = state(d)[1]
        d.find_element(By.ID, "send").click()
        assert wait_finished(d, before) == "idle", text_of(d, "#error")
        assert sum(passes(d, LAST_ANSWER)) == 4, passes(d, LAST_ANSWER)
        errors = console_errors(d, allowed=("status of 401",))
        assert not errors, f"console errors: {errors}"
    finally:
        d.quit()


def main():
    import tempfile

    from cluster import cluster_up

    sys.stdout.reconfigure(line_buffering=True)
    names = sys.argv[1:]
    keyed = not names or any(n in "api_key_field" for n in names)
    if not selected(names) and not keyed:
        print(f"browser: no test matches {names}")
        sys.exit(0)
    failed = 0
    if selected(names):
        t0 = time.monotonic()
        with cluster_up() as c:
            print(f"cluster up in {time.monotonic() - t0:.0f} s: http {c.http}, gRPC {c.grpc}")
            failed += run_tests(c, names)
    if keyed:
        with tempfile.NamedTemporaryFile("w", suffix=".keys") as keys:
            keys.write("key-alpha\n")
            keys.flush()
            with cluster_up("--api-keys-file", keys.name) as c:
                t0 = time.monotonic()
                try:
                    api_key_field(c)
                    print(f"ok   api_key_field ({time.monotonic() - t0:.1f} s)")
                except Exception:  # noqa: BLE001
                    failed += 1
                    print(f"FAIL api_key_field ({time.monotonic() - t0:.1f} s)")
                    traceback.print_exc()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
