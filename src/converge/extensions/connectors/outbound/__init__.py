"""Outbound: an action in the outbox becomes a delivery to its target.

In the order an action takes:

* :mod:`.outbox`: :class:`Outbox`, the durable queue of actions (leased, fenced,
  dead letters);
* :mod:`.schedule`: which waiting action goes next, per target and in all;
* :mod:`.dispatcher`: the workers that lease, attempt and settle actions;
* :mod:`.transport`: one attempt: the signed request, its answer, its verdict;
* :mod:`.connections`: the kept HTTP connections the attempts go out on;
* :mod:`.retry` and :mod:`.breaker`: when to try again, and when a target rests.
"""

from __future__ import annotations

__all__: list[str] = []  # the public names are exported by converge.extensions.connectors
