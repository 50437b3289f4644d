"""HTTP header grammar (RFC 9110), checked alike wherever converge sends headers it was
given: the LLM providers' ``extra_headers`` and outbound webhook actions."""

from __future__ import annotations

import re

__all__ = ["HEADER_NAME", "HEADER_VALUE"]

#: A header name: a token.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A header value: visible ASCII, spaces and tabs. obs-text (Latin-1) is left out: the
#: HTTP clients and SDKs converge sends through encode header values as ASCII.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
