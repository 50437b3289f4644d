"""``python -m converge``: the same as the ``converge`` command."""

from __future__ import annotations

import sys

from converge.cli import main

sys.exit(main())
