"""Inbound: a webhook request becomes an accepted event.

In the order an event takes:

* :mod:`.schemes`: the signature schemes (generic HMAC, Standard Webhooks/Svix, Stripe,
  GitHub, Slack), as pure functions over bytes and headers;
* :mod:`.security`: :class:`WebhookSecurity` checks a request (size, content type,
  client, timestamp, signature) and claims its event id once;
* :mod:`.inbox`: the hand-off into the inbox, the durable queue whose record and claim
  one atomic write makes before the ``202``.

The connector (:mod:`converge.extensions.connectors.connector`) ties these to the
outbound side.
"""

from __future__ import annotations

__all__: list[str] = []  # the public names are exported by converge.extensions.connectors
