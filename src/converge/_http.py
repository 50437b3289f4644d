"""HTTP header grammar (RFC 9110), checked alike wherever converge sends headers it was
given: the LLM providers' ``extra_headers`` and outbound webhook actions; and IP literals
as HTTP carries them (a peer, an ``X-Forwarded-For`` entry, a URL's host)."""

from __future__ import annotations

import ipaddress
import re

__all__ = ["HEADER_NAME", "HEADER_VALUE", "ip_literal"]

#: A header name: a token.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A header value: visible ASCII, spaces and tabs. obs-text (Latin-1) is left out: the
#: HTTP clients and SDKs converge sends through encode header values as ASCII.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` spells (IPv6 with or without brackets; an IPv4-mapped IPv6
    address as its IPv4 address), or None when it is not an IP literal (a name)."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
