"""Which address a request came from, when a reverse proxy may stand in front: the peer, unless it is trusted.

A client can write anything into `X-Forwarded-For`; only the proxies the admin lists
(`ui.trusted_proxies`) are believed, and only about the hop before them. Reading the
header from the right, every trusted hop is skipped: the first address that is not a
trusted proxy is the client's (what a proxy in front appends cannot be forged by the
client; what the client wrote itself stands further left, and is never reached).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: object) -> tuple[Network, ...]:
    """Addresses and networks (`10.0.0.1`, `10.0.0.0/8`, `::1`), comma- or space-separated or as a list.

    ValueError names the first one that is neither."""
    if isinstance(value, str):
        items: Iterable[object] = value.replace(",", " ").split()
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValueError('must be a list of IP addresses or networks, like "127.0.0.1, 10.0.0.0/8"')
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"must list IP addresses or networks; {str(item)!r} is neither") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in trusted)


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the rightmost address of
    its `X-Forwarded-For` headers (in the order received) that is not a trusted proxy itself."""
    if peer is None or not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        if _address(hop) is None:
            return address  # a hop that is no address: the last one believed is the answer
        address = hop
        if not is_trusted(hop, trusted):
            return str(_address(hop))
    return address
