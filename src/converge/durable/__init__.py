"""Durable queues: records with a status, a lease, attempts and a retention, in a Store.

One mechanism serves the webhook inbox, the outbox, the dead letters and the event log:
a :class:`DurableQueue` of :class:`Record` items. The state transitions are pure
functions (:class:`~converge.durable.core.Transitions`); the queue runs each as one
atomic store update. This package sits below ``converge.runtime`` and the connectors,
and imports only ``converge.core``, ``converge._sync`` and ``converge.errors``.
"""

from converge.core.store import WithTTL
from converge.durable.core import QueueKeys, Transitions
from converge.durable.queue import DurableQueue
from converge.durable.records import DONE_STATUSES, OPEN_STATUSES, STATUSES, Attempt, Record

__all__ = [
    "DONE_STATUSES",
    "OPEN_STATUSES",
    "STATUSES",
    "Attempt",
    "DurableQueue",
    "QueueKeys",
    "Record",
    "Transitions",
    "WithTTL",
]
