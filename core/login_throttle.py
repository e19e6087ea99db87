"""Admin key guesses that get nowhere fast: failures from one address are slowed, then refused for a while.

Counted per address over WINDOW_SECONDS (an IPv6 address by its /64, which one machine
usually holds whole): the first FREE_FAILURES cost nothing extra; each one after is held
back twice as long as the last (from FIRST_DELAY_SECONDS, up to MAX_DELAY_SECONDS) before
it is answered; from LOCK_AFTER failures on, a wrong key from the address is refused (429
with Retry-After) for LOCK_SECONDS.

Other addresses are never affected: nothing of theirs is counted, held or locked, and a
held answer waits without occupying a worker the others need (the UI awaits it).

At the guessing address, the right key is accepted even while the address is locked, and a
login with it clears the count: a guesser behind the same address (a NAT, an office) cannot
lock the admin out. What bounds the guessing is that an address is answered one held attempt
at a time: while a wrong key's answer is held back, any other attempt from that address,
right key or wrong, is answered 429 at once without being checked (were the right key
checked at once, a guesser could fire guesses in parallel and read success from the first
quick 200, whatever the waits of its wrong ones). So the admin at a guessing address may be
asked to retry once, after at most MAX_DELAY_SECONDS; never refused for longer.
The login form and the admin key sent as Bearer (the /api/ twin, /metrics) count alike.
"""

from __future__ import annotations

import ipaddress
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
    held_until: float = 0.0  # a wrong key's answer is held back until then


def counted_as(address: str) -> str:
    """What the count is kept under: the address, or its /64 for IPv6 (one host may use the whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """In memory, for one UI process; its callers run on one event loop (no lock needed)."""

    def __init__(self) -> None:
        self._by_address: dict[str, _Failures] = {}

    def busy(self, address: str, now: float) -> int | None:
        """Seconds until the address's held attempt is answered; None: none is held, it may try now."""
        entry = self._by_address.get(counted_as(address))
        if entry is None or entry.held_until <= now:
            return None
        return max(1, math.ceil(entry.held_until - now))

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds the address's wrong keys stay refused; None: it is not locked."""
        entry = self._by_address.get(counted_as(address))
        if entry is None or entry.locked_until <= now:
            return None
        return max(1, math.ceil(entry.locked_until - now))

    def failed(self, address: str, now: float) -> float:
        """Count a wrong key; returns how long to hold its answer back (0: at once)."""
        bucket = counted_as(address)
        entry = self._by_address.get(bucket)
        if entry is None:
            if len(self._by_address) >= MAX_ADDRESSES:
                stalest = min(self._by_address, key=lambda a: self._by_address[a].times[-1:] or [0])
                del self._by_address[stalest]
            entry = self._by_address[bucket] = _Failures()
        entry.times = [t for t in entry.times if t > now - WINDOW_SECONDS] + [now]
        count = len(entry.times)
        if count >= LOCK_AFTER:
            entry.locked_until = max(entry.locked_until, now + LOCK_SECONDS)
        if entry.locked_until > now:
            delay = MAX_DELAY_SECONDS
        elif count <= FREE_FAILURES:
            delay = 0.0
        else:
            delay = min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2.0 ** (count - FREE_FAILURES - 1))
        entry.held_until = now + delay
        return delay

    def succeeded(self, address: str) -> None:
        self._by_address.pop(counted_as(address), None)
