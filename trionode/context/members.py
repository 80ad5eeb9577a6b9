"""Roles (the membership rules themselves are `trionode.auth.model`).

Membership is not part of the context's CRDT state any more: it is the resolution of the
context's signed membership operations (DESIGN §7.1), which every node computes alike.
"""

from __future__ import annotations

from trionode.auth.model import ROLES, WRITERS

__all__ = ["ROLES", "WRITERS"]
