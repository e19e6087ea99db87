"""Client-visible errors under attack and under provider faults: N requests each, through a real proxy.

    .venv/bin/python bench/failover_attacks.py [--requests 200] [--only NAME ...] [--checkout DIR]

Each attack gets a fresh keyrotor (run.py proxy on a temp database) in front of the fake
upstream (tests/fake_upstream.py with tests/fake_faults.py), clients from the official
`openai` package with max_retries=0, so every error the proxy lets through is counted.
`--checkout DIR` runs another checkout's keyrotor (its tests/conftest.py starts the proxy),
for a before/after in the same run; attacks that need settings an old checkout lacks fail
to start there and are reported as such.

Attacks (the bad traffic; what is counted):
- too_large: 2 requests upstream answers 429 "Request too large" (Retry-After: 20); errors
  among N other requests sent at once.
- request_5xx: 30 requests upstream answers 500 on every key; errors among N others.
- broken_streams: 30 streams upstream cuts after two chunks; errors among N others, and how
  the broken streams ended (an APIError from the error event, or "truncated": looked complete).
- one_key_500: on a one-key pool, one request answered 500 on every attempt; errors among N
  requests right after.
- rate_limited_burst: 3 keys at 4 requests / 2 s each, 60 requests at once (10 s of capacity),
  wait_max 15 s; errors.
- unproven_start: a key answering 500 beside 4 new keys, N concurrent streams at start; errors.
- model_429: one model's persistent 429 without Retry-After; errors among N requests for
  another model, and seconds until the model serves again once upstream does.
- provider_down: every request 503 for 5 s, from 4 clients; seconds until traffic is back.
- hanging_key: 1 of 3 keys never answers (attempt_timeout 2 s); errors among N, and the time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
KEYS = [f"sk-good-bench-{c * 24}{n:04d}" for n, c in enumerate("abcd", start=1)]
FLAKY = "sk-flaky-bench-" + "x" * 24
MODEL = "gpt-4o-mini"
BURST = 60


def ask(client: openai.OpenAI, text: str = "hello", stream: bool = False, model: str = MODEL) -> str:
    messages = [{"role": "user", "content": text}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True))
    if not chunks or chunks[-1].choices[0].finish_reason != "stop":
        return "truncated"  # a stream that ended without its last chunk, and no error said so
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def outcome(call) -> str:
    try:
        return "truncated" if call() == "truncated" else "ok"
    except openai.APIError as e:
        return type(e).__name__


def run_all(calls, workers: int = 32, judge=outcome) -> list[str]:
    """What each call came to (`judge`: "ok" or the error's name), the calls run `workers` at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(judge, calls))


def errors(seen: list[str]) -> str:
    bad = [s for s in seen if s != "ok"]
    kinds = {k: bad.count(k) for k in sorted(set(bad))}
    return f"{len(bad)}/{len(seen)}" + (f" {kinds}" if kinds else "")


def seconds_until_ok(call, limit: float = 90.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if outcome(call) == "ok":
            return round(time.monotonic() - start, 2)
        time.sleep(0.05)
    return float("inf")


class Harness:
    def __init__(self, conftest) -> None:
        self.conftest = conftest
        self.started: list = []  # stopped after each attack, whatever happened

    def proxy(self, tmp: Path, upstream, keys: list[str], *settings: str, clients: int = 1, prepare=None):
        """A started keyrotor with `keys` in its default group and `clients` clients (their openai
        clients); `prepare(kr)` puts what else the attack needs in place (routes, fallbacks) first."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
        env.update(
            KEYROTOR_STORAGE_PATH=str(tmp / "keyrotor.db"),
            KEYROTOR_ADMIN_KEY=self.conftest.ADMIN_KEY,
            KEYROTOR_CONFIG=str(self.conftest.ROOT / "config.toml"),
            PYTHONUNBUFFERED="1",
        )
        kr = self.conftest.Keyrotor(tmp=tmp, upstream_url=upstream.url, env=env)
        self.started.append(kr)
        kr.add_keys(*keys)
        client_keys = [kr.add_client(f"app{n}") for n in range(clients)]  # known to the proxy from its start
        if prepare is not None:
            prepare(kr)
        kr.start_proxy(*[item for s in settings for item in ("--set", s)])
        made = [openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=60) for key in client_keys]
        return kr, (made[0] if clients == 1 else made)


def attacks(n: int) -> dict:
    def too_large(h, up, tmp):
        kr, c = h.proxy(tmp, up, KEYS[:3])
        seen = run_all([lambda: ask(c, "#fault:too_large")] * 2 + [lambda: ask(c)] * n)
        return kr, f"other requests failed: {errors(seen[2:])}"

    def request_5xx(h, up, tmp):
        kr, c = h.proxy(tmp, up, KEYS[:3])
        seen = run_all([lambda: ask(c, "#fault:server_error")] * 30 + [lambda: ask(c)] * n)
        return kr, f"other requests failed: {errors(seen[30:])}"

    def broken_streams(h, up, tmp):
        kr, c = h.proxy(tmp, up, KEYS[:3])
        seen = run_all([lambda: ask(c, "#fault:stream_cut", stream=True)] * 30 + [lambda: ask(c)] * n)
        return kr, f"other requests failed: {errors(seen[30:])}; the broken streams: {errors(seen[:30])}"

    def one_key_500(h, up, tmp):
        kr, c = h.proxy(tmp, up, KEYS[:1])
        outcome(lambda: ask(c, "#fault:server_error"))
        return kr, f"requests right after failed: {errors(run_all([lambda: ask(c)] * n))}"

    def rate_limited_burst(h, up, tmp):
        for key in KEYS[:3]:
            up.faults.key_rpm[key] = (4, 2.0)
        kr, c = h.proxy(tmp, up, KEYS[:3], "keypool.wait_max_seconds=15")
        # 60 at once: 10 s of the pool's capacity, within the wait (more would be refused, rightly).
        return kr, f"failed: {errors(run_all([lambda: ask(c)] * BURST, workers=BURST))}"

    def unproven_start(h, up, tmp):
        up.stream_delay = 0.02
        kr, c = h.proxy(tmp, up, [FLAKY, *KEYS])
        return kr, f"failed: {errors(run_all([lambda: ask(c, stream=True)] * n, workers=min(n, 64)))}"

    def model_429(h, up, tmp):
        kr, c = h.proxy(tmp, up, KEYS[:2])
        up.faults.model_faults["gpt-4o"] = "ratelimit_nohint"
        run_all([lambda: ask(c, model="gpt-4o")] * 6)
        seen = run_all([lambda: ask(c)] * n)
        del up.faults.model_faults["gpt-4o"]
        back = seconds_until_ok(lambda: ask(c, model="gpt-4o"))
        return kr, f"other model failed: {errors(seen)}; the model serves again {back} s after upstream does"

    def provider_down(h, up, tmp):
        kr, clients = h.proxy(tmp, up, KEYS[:3], clients=4)
        up.faults.down = True
        stop = time.monotonic() + 5
        while time.monotonic() < stop:
            run_all([lambda c=cl: ask(c) for cl in clients])
        up.faults.down = False
        back = seconds_until_ok(lambda: [ask(cl) for cl in clients])
        return kr, f"traffic back {back} s after upstream answers again"

    def hanging_key(h, up, tmp):
        up.set_key(KEYS[0], "hang")
        kr, c = h.proxy(tmp, up, KEYS[:3], "keypool.attempt_timeout_seconds=2")
        started = time.monotonic()
        seen = run_all([lambda: ask(c)] * n)
        return kr, f"failed: {errors(seen)} in {time.monotonic() - started:.1f} s"

    return {f.__name__: f for f in (too_large, request_5xx, broken_streams, one_key_500, rate_limited_burst,
                                    unproven_start, model_429, provider_down, hanging_key)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="N: requests per attack (default 200)")
    parser.add_argument("--only", nargs="*", help="run only these attacks")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the keyrotor checkout to measure")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    conftest = importlib.import_module("tests.conftest")
    fake = importlib.import_module("tests.fake_upstream")
    harness = Harness(conftest)
    table = attacks(args.requests)
    print(f"checkout {args.checkout.resolve()}, N={args.requests}")
    for name, attack in table.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp, fake.FakeUpstream(stream_chunks=5).start() as up:
            try:
                _, result = attack(harness, up, Path(tmp))
            except Exception as e:  # an old checkout without a setting: it does not start
                result = f"did not run: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            finally:
                for kr in harness.started:
                    kr.stop()
                harness.started.clear()
        print(f"{name:20} {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
