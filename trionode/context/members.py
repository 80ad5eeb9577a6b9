"""The member set, kept in the replicated context state itself.

Members live in a reserved top-level field of every context's state tree,
`__members__: UnorderedMap[str, LwwRegister[str]]` (base58 member key → role), so the set
replicates, merges and hashes like any other state, and every node can check a delta's
author against it. Only admins may change it: a delta that touches the field is rejected by
every receiver unless its author is an admin.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import base58

from trionode.crdt import ROOT_ID, Entity, StateTree, Transaction, register, unordered_map
from trionode.crdt.entity import child_id

FIELD: Final = "__members__"
ROLES: Final = ("admin", "member", "read-only")
WRITERS: Final = frozenset({"admin", "member"})
MEMBERS_ID: Final = child_id(ROOT_ID, FIELD.encode())
_SPEC = unordered_map(str, register(str))


def _key(member: bytes) -> str:
    return base58.b58encode(member).decode("ascii")


# Receivers must all decide the same about a delta, whenever it reaches them. "Is the
# author a member *now*" is not that: a delta written just before its author was removed
# would be applied by nodes that got it first and refused by the rest. What every receiver
# agrees on is the author's grants, which are always in the delta's causal past: so write
# rights are checked against grow-only records of who was ever granted writing (and admin)
# rights. Removal still revokes reading: the key rotates away from the removed member.
WRITERS_FIELD: Final = "__writers__"
ADMINS_FIELD: Final = "__admins__"
_GRANTS = (FIELD, WRITERS_FIELD, ADMINS_FIELD)
_GRANT_IDS = frozenset(child_id(ROOT_ID, name.encode()) for name in _GRANTS)


def grant(tx: Transaction, member: bytes, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    tx.field(FIELD, _SPEC)[_key(member)].set(role)
    if role in WRITERS:
        tx.field(WRITERS_FIELD, _SPEC)[_key(member)].set("writer")
    if role == "admin":
        tx.field(ADMINS_FIELD, _SPEC)[_key(member)].set("admin")


def ever_writer(tree: StateTree, member: bytes) -> bool:
    return tree.reader().field(WRITERS_FIELD, _SPEC)[_key(member)].get() is not None


def ever_admin(tree: StateTree, member: bytes) -> bool:
    return tree.reader().field(ADMINS_FIELD, _SPEC)[_key(member)].get() is not None


def revoke(tx: Transaction, member: bytes) -> None:
    tx.field(FIELD, _SPEC).remove(_key(member))


def read(tree: StateTree) -> dict[bytes, str]:
    """Every current member and its role."""
    tx = tree.reader()
    members = tx.field(FIELD, _SPEC)
    out: dict[bytes, str] = {}
    for key in members.keys():  # noqa: SIM118 - a CRDT map handle, not a dict
        role = members[key].get()
        if role in ROLES:
            out[base58.b58decode(key)] = role
    return out


def role_of(tree: StateTree, member: bytes) -> str | None:
    tx = tree.reader()
    role = tx.field(FIELD, _SPEC)[_key(member)].get()
    return role if role in ROLES else None


KEYS_FIELD: Final = "__keys__"
KEYS_ID: Final = child_id(ROOT_ID, KEYS_FIELD.encode())
_KEYS_SPEC = unordered_map(str, register(str))


def offer_key(tx: Transaction, key_id: int, member: bytes, sealed: bytes) -> None:
    """Publish a rotated context key, sealed to one member, in the replicated state."""
    entry = f"{key_id}/{_key(member)}"
    tx.field(KEYS_FIELD, _KEYS_SPEC)[entry].set(base58.b58encode(sealed).decode("ascii"))


def sealed_keys_for(tree: StateTree, member: bytes) -> dict[int, bytes]:
    """Every rotated key sealed to `member` (key id → sealed bytes)."""
    suffix = "/" + _key(member)
    handle = tree.reader().field(KEYS_FIELD, _KEYS_SPEC)
    out: dict[int, bytes] = {}
    for entry in handle.keys():  # noqa: SIM118 - a CRDT map handle, not a dict
        if entry.endswith(suffix):
            value = handle[entry].get()
            if value:
                out[int(entry.split("/", 1)[0])] = base58.b58decode(value)
    return out


def touches(records: Iterable[Entity]) -> bool:
    """Whether a delta changes the member set (the field itself or any entry of it)."""
    return any(
        r.id in _GRANT_IDS or r.parent in _GRANT_IDS or KEYS_ID in (r.id, r.parent) for r in records
    )
