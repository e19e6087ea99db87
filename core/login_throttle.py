"""Admin key guesses that get nowhere fast: failures from one address are slowed, then refused for a while.

Counted per address over WINDOW_SECONDS: the first FREE_FAILURES cost nothing extra; each
one after waits twice as long as the last (from FIRST_DELAY_SECONDS, up to MAX_DELAY_SECONDS)
before it is answered; from LOCK_AFTER failures on, a wrong key from the address is refused
(429 with Retry-After, after the longest wait) for LOCK_SECONDS. The right key is always
accepted, and its success clears the address's count: a guesser behind the same address
(a NAT, an office, a reverse proxy) can slow down only its own guesses, never lock the admin
out. The login form and the admin key sent as Bearer (the /api/ twin, /metrics) count alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FREE_FAILURES = 3
LOCK_AFTER = 6
FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 4.0
WINDOW_SECONDS = 900.0
LOCK_SECONDS = 900.0
MAX_ADDRESSES = 10_000  # beyond it the stalest are forgotten: memory stays bounded under a spray of addresses


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(self) -> None:
        self._by_address: dict[str, _Failures] = {}

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds this address must wait before it may try again; None: it may try now."""
        entry = self._by_address.get(address)
        if entry is None or entry.locked_until <= now:
            return None
        return max(1, math.ceil(entry.locked_until - now))

    def failed(self, address: str, now: float) -> float:
        """Count a failure; returns how long to hold the answer back (0: at once)."""
        entry = self._by_address.get(address)
        if entry is None:
            if len(self._by_address) >= MAX_ADDRESSES:
                stalest = min(self._by_address, key=lambda a: self._by_address[a].times[-1:] or [0])
                del self._by_address[stalest]
            entry = self._by_address[address] = _Failures()
        entry.times = [t for t in entry.times if t > now - WINDOW_SECONDS] + [now]
        count = len(entry.times)
        if count >= LOCK_AFTER:
            entry.locked_until = now + LOCK_SECONDS
        if count <= FREE_FAILURES:
            return 0.0
        return min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2.0 ** (count - FREE_FAILURES - 1))

    def succeeded(self, address: str) -> None:
        self._by_address.pop(address, None)
