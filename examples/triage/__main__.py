"""``python -m examples.triage``: see :mod:`examples.triage.app`."""

from examples.triage.app import main

raise SystemExit(main())
