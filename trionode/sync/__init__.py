"""Sync protocols as sans-IO machines (DESIGN §8) and their one Trio driver.

* `machines` — heads exchange, delta fetch and the responder: messages and `now` in,
  messages and storage actions out; no trio, socket or time imports (`ruff.toml` here).
* `errors` — typed errors for protocol violations, refusals and deadlines.
* `driver` — runs one machine per sync stream over the shared framed-stream helper,
  fulfilling its actions against the node's contexts. `/trionode/sync/2` is `/1` plus
  delta answers that carry the ancestors the requester lacks (a chain in one round trip);
  nodes serve both and ask for /2 first.
"""
