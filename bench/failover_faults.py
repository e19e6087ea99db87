"""Client-visible errors under provider faults (issue 20), through a real proxy, before and after in one run.

    .venv/bin/python bench/failover_faults.py [--requests 24] [--outage 20] [--only NAME ...] [--checkout DIR ...]

Like bench/failover_attacks.py, whose harness it uses: each fault gets a fresh keyrotor (run.py
proxy on a temp database) in front of the fake upstream (tests/fake_upstream.py, faults from
tests/fake_faults.py), and clients of the official `openai` package with max_retries=0, so every
error the proxy lets through is counted. For each fault it prints the requests sent and what the
clients got (errors/sent, by exception class, status and error code; "truncated": a stream that
ended without its last chunk and without an error), and where it matters the diversions, the
attempts upstream received and the time.

`--checkout DIR` may be given several times (a "before" tree, then this one): each checkout runs
in a process of its own (its own proxy, CLI and tests/conftest.py), one after the other, and a
table sets them side by side. Another checkout needs this tree's fakes: copy tests/fake_upstream.py
and tests/fake_faults.py into it first. A setting a checkout does not have (keypool.first_token_seconds
before issue 20) is left out there, and its row says "setting absent".

Faults. N is --requests; PRIMARY is gpt-4o, and "a fallback" is `models fallback gpt-4o gpt-4o-mini`,
served by the same (default) group on the same keys; 3 good keys unless said; OUTAGE is --outage
(seconds; "a minute" in the issue, shortened so a run stays short; the shape is the same).
- ratelimit_retry_after: PRIMARY answers 429 with Retry-After: 1 on every key for 3 s; N requests at once.
- ratelimit_no_retry_after: PRIMARY answers 429 without Retry-After or reset headers on every key, no
  fallback; one request alone (what it got, its attempts, its time), then N-1, 4 at a time; the
  attempts upstream got and how long each client waited.
- ratelimit_no_retry_after_fallback: the same with a fallback.
- server_error_once: each of N requests, at once right after the start, is answered 500 on its first attempt.
- provider_503: each of 4 clients is served once; then every request is answered 503 for OUTAGE s
  while the 4 send one request every 0.2 s each; then the seconds until the 4 are all served again.
- provider_503_at_start: the same, the outage from the start (no key has been served yet).
- model_503_fallback: each of 4 clients is served once; then PRIMARY answers 503 on every key for
  OUTAGE s, with a fallback; the 4 clients as above; how many the fallback answered, then the
  seconds until PRIMARY itself answers again.
- reset_once: each of N requests has its first attempt's connection reset (RST before any answer).
- silent_keys: 2 of the 3 keys never answer (attempt_timeout_seconds=3, header_timeout_seconds=4:
  a retry chain over two silent keys is longer than keyrotor's own header deadline); N requests.
- silent_model_fallback: PRIMARY never answers on any key (attempt_timeout_seconds=3), with a fallback.
- slow_first_token: PRIMARY's streams send their first token after 20 s (headers at once), with a
  fallback and keypool.first_token_seconds=5; N streams at once; the seconds to the first token.
- streams_cut: N streams upstream breaks off after two events (no fallback can help once bytes went out).
- streams_stalled: N streams upstream leaves silent after two events (stream_idle_seconds=3).
- context_length_fallback: PRIMARY answers 400 context_length_exceeded (a short context), with a
  (longer-context) fallback; N requests.
- content_filter: N requests upstream answers 400 content_filter, with a fallback: the client's own
  content, never to be retried or sent to the fallback; the attempts upstream got.
- default_diversion: a relay group lists gpt-4o-mini and holds 2 keys the relay refuses (401); the
  catch-all default/default holds a good key at another upstream; N requests for gpt-4o-mini, 4 at
  a time: each must get 503 no_upstream_key_available, none may reach the default's upstream
  (a diversion).
- cold_start_burst: 40 concurrent streams right after the start over 8 keys, in this order: 2 that
  answer 500 to everything, 2 invalid, 4 good (issue 20 §4).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import openai
from failover_attacks import FLAKY, KEYS, Harness, errors, run_all

ROOT = Path(__file__).resolve().parent.parent
PRIMARY, FALLBACK = "gpt-4o", "gpt-4o-mini"
FAKES = ("tests/fake_upstream.py", "tests/fake_faults.py")
FLAKY_2 = "sk-flaky-bench-" + "w" * 24
INVALID = [f"sk-invalid-bench-{c * 24}{n:04d}" for n, c in enumerate("yz", start=1)]  # the fake answers 401
RELAY_KEYS = [f"sk-relay-bench-{c * 24}{n:04d}" for n, c in enumerate("uv", start=1)]  # the relay answers 401
DEFAULT_KEY = "sk-good-default-" + "d" * 24
COLD_START_KEYS = [FLAKY, FLAKY_2, *INVALID, *KEYS]  # the bad ones first, as tests/test_failover_faults.py has them
COLD_START_STREAMS = 40
SLOW_FIRST_TOKEN = 20.0


def client_saw(call: Callable[[], str]) -> str:
    """ "ok", "truncated", or the error the client got: its class, with the status and code it has."""
    try:
        return "truncated" if call() == "truncated" else "ok"
    except openai.APIStatusError as e:
        return " ".join(str(part) for part in (type(e).__name__, e.status_code, e.code) if part)
    except openai.APIError as e:  # no status: a connection error, a timeout, an error event in a stream
        return type(e).__name__


def chat(
    client: openai.OpenAI,
    text: str = "hello",
    model: str = PRIMARY,
    stream: bool = False,
    answered: list[str] | None = None,
    first_token: list[float] | None = None,
) -> str:
    """One chat completion: the model that answered (also added to `answered`), or "truncated";
    a stream's seconds to its first content are added to `first_token`."""
    messages = [{"role": "user", "content": text}]
    began = time.monotonic()
    if not stream:
        model_seen = client.chat.completions.create(model=model, messages=messages).model
    else:
        finished, model_seen = False, ""
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
            choice = chunk.choices[0] if chunk.choices else None
            if choice and choice.delta.content and first_token is not None and not model_seen:
                first_token.append(time.monotonic() - began)
            if choice and choice.delta.content:
                model_seen = chunk.model
            finished = finished or bool(choice and choice.finish_reason == "stop")
        if not finished:
            return "truncated"
    if answered is not None:
        answered.append(model_seen)
    return model_seen


def timed(call: Callable[[], str], into: list[float]) -> Callable[[], str]:
    """`call`, its seconds added to `into` however it ends."""

    def run() -> str:
        began = time.monotonic()
        try:
            return call()
        finally:
            into.append(time.monotonic() - began)

    return run


def seconds(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s"


def steady(clients: list[openai.OpenAI], duration: float, call: Callable[[openai.OpenAI], str]) -> list[str]:
    """Each client sends a request, then another 0.2 s after its answer, for `duration` seconds."""
    seen: list[str] = []
    stop = time.monotonic() + duration

    def one(client: openai.OpenAI) -> None:
        while time.monotonic() < stop:
            seen.append(client_saw(lambda: call(client)))
            time.sleep(0.2)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def seconds_until(check: Callable[[], bool], limit: float = 60.0) -> float:
    """Seconds until `check()` holds (an error counts as not yet), inf past `limit`."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        try:
            if check():
                return round(time.monotonic() - began, 2)
        except openai.APIError:
            pass
        time.sleep(0.05)
    return float("inf")


def later(delay: float, action: Callable[[], object]) -> None:
    timer = threading.Timer(delay, action)
    timer.daemon = True
    timer.start()


def chats(upstream, model: str | None = None) -> int:
    """Chat attempts `upstream` received (for `model` only, when given)."""
    found = [r for r in upstream.received if r.path == "/v1/chat/completions"]
    return len([r for r in found if model is None or json.loads(r.body).get("model") == model])


def known(checkout: Path, setting: str) -> bool:
    """Whether `checkout`'s config.toml has `setting` ("section.name=value")."""
    section, _, name = setting.partition("=")[0].partition(".")
    with (checkout / "config.toml").open("rb") as f:
        return name in tomllib.load(f).get(section, {})


class FaultHarness(Harness):
    """The attacks' harness, leaving out (and noting) the settings its checkout does not have."""

    def __init__(self, conftest) -> None:
        super().__init__(conftest)
        self.absent: list[str] = []

    def proxy(self, tmp: Path, upstream, keys: list[str], *settings: str, **kwargs):
        kept = [s for s in settings if known(Path(self.conftest.ROOT), s)]
        self.absent += [s.partition("=")[0] for s in settings if s not in kept]
        return super().proxy(tmp, upstream, keys, *kept, **kwargs)


def faults(n: int, outage: float, fake) -> dict[str, Callable]:
    def with_fallback(kr) -> None:
        kr.setup("models", "fallback", PRIMARY, FALLBACK)

    def at_once(calls: list[Callable[[], str]], workers: int | None = None) -> list[str]:
        return run_all(calls, workers=workers or len(calls), judge=client_saw)

    def ratelimit_retry_after(h, up, tmp):
        _, c = h.proxy(tmp, up, KEYS[:3])
        up.faults.model_faults[PRIMARY] = "ratelimit"
        later(3.0, lambda: up.faults.model_faults.pop(PRIMARY, None))
        waited: list[float] = []
        seen = at_once([timed(lambda: chat(c), waited)] * n)
        return f"errors {errors(seen)}; {chats(up)} attempts upstream; each took {seconds(waited)}"

    def ratelimit_no_retry_after(h, up, tmp, fallback: bool = False):
        _, c = h.proxy(tmp, up, KEYS[:3], prepare=with_fallback if fallback else None)
        up.faults.model_faults[PRIMARY] = "ratelimit_nohint"
        answered: list[str] = []
        alone: list[float] = []
        first = client_saw(timed(lambda: chat(c, answered=answered), alone))
        lone = f"a lone request: {first}, {chats(up, PRIMARY)} attempts, {alone[0]:.1f} s"
        waited: list[float] = []
        seen = at_once([timed(lambda: chat(c, answered=answered), waited)] * (n - 1), workers=4)
        by_fallback = f", {answered.count(FALLBACK)} answered by the fallback" if fallback else ""
        attempts = f"{chats(up, PRIMARY)} attempts upstream for {PRIMARY} in all"
        return f"{lone}; then errors {errors(seen)}{by_fallback}; {attempts}; each took {seconds(waited)}"

    def ratelimit_no_retry_after_fallback(h, up, tmp):
        return ratelimit_no_retry_after(h, up, tmp, fallback=True)

    def server_error_once(h, up, tmp):
        _, c = h.proxy(tmp, up, KEYS[:3])
        seen = at_once([lambda i=i: chat(c, f"#fault:server_error_once/{i}") for i in range(n)])
        return f"errors {errors(seen)}; {chats(up)} attempts upstream"

    def provider_503(h, up, tmp, warm: bool = True):
        _, clients = h.proxy(tmp, up, KEYS[:3], clients=4)
        for cl in clients if warm else ():
            chat(cl)  # served before the outage: the keys have proven themselves
        up.faults.down = True
        waited: list[float] = []
        seen = steady(clients, outage, lambda cl: timed(lambda: chat(cl), waited)())
        attempts = chats(up)
        up.faults.down = False
        back = seconds_until(lambda: all(chat(cl) for cl in clients))
        return (
            f"during the outage errors {errors(seen)}, each took {seconds(waited)}, {attempts} attempts upstream;"
            f" all 4 clients served again {back} s after upstream is back"
        )

    def provider_503_at_start(h, up, tmp):
        return provider_503(h, up, tmp, warm=False)

    def model_503_fallback(h, up, tmp):
        _, clients = h.proxy(tmp, up, KEYS[:3], clients=4, prepare=with_fallback)
        for cl in clients:
            chat(cl)
        up.faults.model_faults[PRIMARY] = "unavailable"
        answered: list[str] = []
        waited: list[float] = []
        seen = steady(clients, outage, lambda cl: timed(lambda: chat(cl, answered=answered), waited)())
        del up.faults.model_faults[PRIMARY]
        back = seconds_until(lambda: chat(clients[0]) == PRIMARY)
        return (
            f"during the outage errors {errors(seen)}, {answered.count(FALLBACK)} answered by the fallback,"
            f" each took {seconds(waited)};"
            f" {PRIMARY} itself answers again {back} s after upstream is back"
        )

    def reset_once(h, up, tmp):
        _, c = h.proxy(tmp, up, KEYS[:3])
        seen = at_once([lambda i=i: chat(c, f"#fault:reset_once/{i}") for i in range(n)])
        return f"errors {errors(seen)}; {chats(up)} attempts upstream"

    def silent_keys(h, up, tmp):
        for key in KEYS[:2]:
            up.set_key(key, "hang")
        settings = ("keypool.attempt_timeout_seconds=3", "proxy.header_timeout_seconds=4")
        _, c = h.proxy(tmp, up, KEYS[:3], *settings)
        waited: list[float] = []
        seen = at_once([timed(lambda: chat(c), waited)] * n, workers=min(n, 16))
        return f"errors {errors(seen)}; each took {seconds(waited)}"

    def silent_model_fallback(h, up, tmp):
        up.faults.model_faults[PRIMARY] = "hang"
        _, c = h.proxy(tmp, up, KEYS[:3], "keypool.attempt_timeout_seconds=3", prepare=with_fallback)
        answered: list[str] = []
        waited: list[float] = []
        seen = at_once([timed(lambda: chat(c, answered=answered), waited)] * n)
        by_fallback = f"{answered.count(FALLBACK)} answered by the fallback"
        return f"errors {errors(seen)}, {by_fallback}; each took {seconds(waited)}"

    def slow_first_token(h, up, tmp):
        up.faults.model_faults[PRIMARY] = "slow_first"
        up.faults.first_token_seconds = SLOW_FIRST_TOKEN
        _, c = h.proxy(tmp, up, KEYS[:3], "keypool.first_token_seconds=5", prepare=with_fallback)
        answered: list[str] = []
        first: list[float] = []
        seen = at_once([lambda: chat(c, stream=True, answered=answered, first_token=first)] * n)
        by_fallback = f"{answered.count(FALLBACK)} answered by the fallback"
        return f"errors {errors(seen)}, {by_fallback}; first token after {seconds(first)}"

    def streams_cut(h, up, tmp):
        _, c = h.proxy(tmp, up, KEYS[:3])
        seen = at_once([lambda: chat(c, "#fault:stream_cut", stream=True)] * n)
        return f"errors {errors(seen)}"

    def streams_stalled(h, up, tmp):
        _, c = h.proxy(tmp, up, KEYS[:3], "keypool.stream_idle_seconds=3")
        waited: list[float] = []
        seen = at_once([timed(lambda: chat(c, "#fault:stream_stall", stream=True), waited)] * n)
        return f"errors {errors(seen)}; each took {seconds(waited)}"

    def context_length_fallback(h, up, tmp):
        up.faults.model_faults[PRIMARY] = "context_length"
        _, c = h.proxy(tmp, up, KEYS[:3], prepare=with_fallback)
        answered: list[str] = []
        seen = at_once([lambda: chat(c, answered=answered)] * n)
        attempts = f"{chats(up, PRIMARY)} + {chats(up, FALLBACK)} attempts upstream ({PRIMARY} + fallback)"
        return f"errors {errors(seen)}, {answered.count(FALLBACK)} answered by the fallback; {attempts}"

    def content_filter(h, up, tmp):
        _, c = h.proxy(tmp, up, KEYS[:3], prepare=with_fallback)
        seen = at_once([lambda: chat(c, "#fault:content_filter")] * n)
        attempts = f"{chats(up, PRIMARY)} + {chats(up, FALLBACK)} attempts upstream ({PRIMARY} + fallback)"
        return f"the clients got {errors(seen)}; {attempts}"

    def default_diversion(h, up, tmp):
        with fake.FakeUpstream(models={FALLBACK}).start() as relay:

            def routes(kr) -> None:
                kr.setup("upstreams", "add", "relay", relay.url + "/v1")
                kr.setup("groups", "add", "relay/cheap", "--priority", "10")
                kr.setup("models", "add", "relay/cheap", FALLBACK)
                kr.setup("keys", "add", "--group", "relay/cheap", input="\n".join(RELAY_KEYS) + "\n")

            _, c = h.proxy(tmp, up, [DEFAULT_KEY], prepare=routes)
            seen = at_once([lambda: chat(c, model=FALLBACK)] * n, workers=4)
            relayed = chats(relay)
        diverted = chats(up)
        return f"the clients got {errors(seen)}; diversions {diverted}/{n}; {relayed} attempts at the relay"

    def cold_start_burst(h, up, tmp):
        up.stream_delay = 0.02
        _, c = h.proxy(tmp, up, COLD_START_KEYS)
        seen = at_once([lambda: chat(c, model=FALLBACK, stream=True)] * COLD_START_STREAMS)
        return f"errors {errors(seen)}; {chats(up)} attempts upstream"

    return {f.__name__: f for f in (
        ratelimit_retry_after, ratelimit_no_retry_after, ratelimit_no_retry_after_fallback, server_error_once,
        provider_503, provider_503_at_start, model_503_fallback, reset_once, silent_keys, silent_model_fallback,
        slow_first_token, streams_cut, streams_stalled, context_length_fallback, content_filter, default_diversion,
        cold_start_burst,
    )}  # fmt: skip


def run_here(checkout: Path, n: int, outage: float, only: list[str] | None) -> None:
    """Every fault (or `only` these) against `checkout`'s keyrotor, one line each."""
    sys.path.insert(0, str(checkout))
    # The fake upstream's own complaints about the connections its faults break, on every line.
    logging.getLogger("uvicorn.error").addFilter(lambda record: False)
    conftest = importlib.import_module("tests.conftest")
    fake = importlib.import_module("tests.fake_upstream")
    harness = FaultHarness(conftest)
    print(f"checkout {checkout}, N={n}, outage {outage:g} s", flush=True)
    for name, fault in faults(n, outage, fake).items():
        if only and name not in only:
            continue
        began = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp, fake.FakeUpstream(stream_chunks=5).start() as up:
            try:
                result = fault(harness, up, Path(tmp))
            except Exception as e:
                result = f"did not run: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            finally:
                for kr in harness.started:
                    kr.stop()
                harness.started.clear()
        if harness.absent:
            result += f" [setting absent: {', '.join(harness.absent)}; run without it]"
            harness.absent.clear()
        print(f"{name} {result} ({time.monotonic() - began:.0f} s in all)", flush=True)


def run_each(checkouts: list[Path], argv: list[str], names: list[str]) -> None:
    """Each checkout in a process of its own, one after the other; then a table, one column each."""
    for checkout in (c for c in checkouts if c != ROOT):
        stale = [f for f in FAKES if not filecmp.cmp(ROOT / f, checkout / f, shallow=False)]
        if stale:
            raise SystemExit(f"{checkout} has other fakes than this tree: cp {' '.join(stale)} {checkout}/tests/")
    results: dict[Path, dict[str, str]] = {}
    for checkout in checkouts:
        child = subprocess.Popen(
            [sys.executable, __file__, "--checkout", str(checkout), *argv], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        found = results.setdefault(checkout, {})
        for line in child.stdout:
            print(line, end="", flush=True)
            name, _, result = line.rstrip("\n").partition(" ")
            if name in names:
                found[name] = result
        child.wait()
    print("\n| fault | " + " | ".join(str(c) for c in checkouts) + " |")
    print("|---" * (len(checkouts) + 1) + "|")
    for name in names:
        if any(name in results[c] for c in checkouts):
            print(f"| {name} | " + " | ".join(results[c].get(name, "") for c in checkouts) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="N: requests per fault (default 24)")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the 503 outages last (default 20)")
    parser.add_argument("--only", nargs="*", help="run only these faults")
    parser.add_argument(
        "--checkout", type=Path, action="append", help="a keyrotor checkout to measure (repeat: side by side)"
    )
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    names = list(faults(args.requests, args.outage, None))
    unknown = set(args.only or ()) - set(names)
    if unknown:
        parser.error(f"no such fault: {', '.join(sorted(unknown))} (faults: {', '.join(names)})")
    if len(checkouts) == 1:
        run_here(checkouts[0], args.requests, args.outage, args.only)
        return 0
    argv = ["--requests", str(args.requests), "--outage", str(args.outage)]
    argv += ["--only", *args.only] if args.only else []
    run_each(checkouts, argv, [n for n in names if not args.only or n in args.only])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
