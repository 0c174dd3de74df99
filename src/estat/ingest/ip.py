"""Client IP selection: first public address in X-Forwarded-For, then
CloudFront-Viewer-Address, then the TCP peer.

"Public" means globally routable (``ipaddress``'s ``is_global``): private,
loopback, link-local, shared (100.64/10), documentation and reserved ranges
are skipped, so an address injected by an internal proxy never wins over the
real client. Malformed entries are skipped, never an error. Results are
cached per header value (bounded) because parsing addresses costs more than
the rest of the request.
"""

from __future__ import annotations

import ipaddress

_CACHE_MAX = 8192
forwarded_cache: dict[bytes, str | None] = {}


def _public(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr) if addr.is_global else None


def first_public_forwarded(value: bytes) -> str | None:
    """First public address of an X-Forwarded-For value, or None."""
    hit = forwarded_cache.get(value, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    result = None
    for part in value.decode("latin-1").split(","):
        result = _public(part)
        if result is not None:
            break
    if len(forwarded_cache) >= _CACHE_MAX:
        forwarded_cache.clear()
    forwarded_cache[value] = result
    return result


def cloudfront_viewer(value: bytes) -> str | None:
    """Address of a CloudFront-Viewer-Address value (``ip:port``; IPv6 unbracketed)."""
    text = value.decode("latin-1").strip()
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        text = host
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    return str(addr)


def client_ip(xff: bytes | None, cf_viewer: bytes | None, peer: str) -> str:
    if xff:
        ip = first_public_forwarded(xff)
        if ip is not None:
            return ip
    if cf_viewer:
        ip = cloudfront_viewer(cf_viewer)
        if ip is not None:
            return ip
    return peer
