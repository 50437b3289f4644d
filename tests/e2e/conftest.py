"""The edge tests' receiver: an outside service over real HTTP that records every request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from edge_helpers import Receiver
from webhook_helpers import ServerThread


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    with ServerThread(rec) as server:
        yield rec, server.url
