"""The ``converge`` command line.

* ``converge gateway --config FILE.toml``: serve the webhook gateway (uvicorn).
* ``converge webhook sign ...``: print the headers of a correctly signed test request.
* ``converge webhook send ...``: send one and print the gateway's answer.

Every command takes ``--help``. Exit status: 0 on success, 1 when a sent request was not
answered 2xx, 2 for bad arguments or configuration.
"""

from __future__ import annotations

from converge.cli.commands import main

__all__ = ["main"]
