"""Multiaddr handling with the `multiaddr` package (``trionode/wire/multiaddr.py``).

Three rows, each beside the package's own call on the same input in the same run:

- decoding one binary address the first time (our checks on top of the package's splitter
  and codecs) beside the package's ``bytes_to_string``, which checks less;
- decoding the addresses of a kad FIND_NODE answer (20 peers, 2 addresses each) the way a
  running node does, where nearly every address was seen before and the decode cache
  answers, beside the same answer decoded cold;
- parsing the text form (config, invitations, mDNS) beside ``multiaddr.Multiaddr(text)``.

A kad lookup in the 50-node bench decodes about 400 addresses, of which about 3 % are new.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from multiaddr import Multiaddr as PackageMultiaddr
from multiaddr.transforms import bytes_to_string

from benchmarks.harness import Row
from trionode.wire import multiaddr as ours
from trionode.wire.keys import PrivateKey


def _per_call_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def _answer(peers: int) -> list[bytes]:
    """The address bytes of one FIND_NODE answer: each peer has an ip4 and an ip6 address."""
    out: list[bytes] = []
    for i in range(peers):
        peer = PrivateKey.generate().peer_id()
        out.append(ours.Multiaddr.from_tcp(f"10.0.{i}.1", 4001).with_peer_id(peer).to_bytes())
        out.append(ours.Multiaddr.from_tcp(f"fd00::{i + 1}", 4001).to_bytes())
    return out


async def run(*, quick: bool) -> list[Row]:
    number = 500 if quick else 5000
    peer = PrivateKey.generate().peer_id()
    text = f"/ip4/198.18.0.7/tcp/4001/p2p/{peer}"
    binary = ours.Multiaddr.from_string(text).to_bytes()

    def cold_decode() -> object:
        ours._decode.cache_clear()  # noqa: SLF001 - the first sight of an address
        return ours.Multiaddr.from_bytes(binary)

    clear_cost = _per_call_us(ours._decode.cache_clear, number)  # noqa: SLF001
    decode = _per_call_us(cold_decode, number) - clear_cost
    package_decode = _per_call_us(lambda: bytes_to_string(binary), number)

    answer = _answer(20)

    def decode_answer() -> object:
        return [ours.Multiaddr.from_bytes(raw) for raw in answer]

    def decode_answer_cold() -> object:
        ours._decode.cache_clear()  # noqa: SLF001
        return [ours.Multiaddr.from_bytes(raw) for raw in answer]

    decode_answer()  # a running node has seen these peers before
    warm = _per_call_us(decode_answer, number // 10) / len(answer)
    cold = (_per_call_us(decode_answer_cold, number // 10) - clear_cost) / len(answer)

    parse = _per_call_us(lambda: ours.Multiaddr.from_string(text), number)
    package_parse = _per_call_us(lambda: PackageMultiaddr(text), number)
    return [
        Row(
            "multiaddr: decode ip4/tcp/p2p, first sight (us)",
            decode,
            "us",
            "package bytes_to_string",
            package_decode,
            higher_is_better=False,
        ),
        Row(
            "multiaddr: decode a kad answer's addresses (us/addr)",
            warm,
            "us",
            "same answer, cache cleared",
            cold,
            higher_is_better=False,
        ),
        Row(
            "multiaddr: parse ip4/tcp/p2p text (us)",
            parse,
            "us",
            "package Multiaddr(text)",
            package_parse,
            higher_is_better=False,
        ),
    ]
