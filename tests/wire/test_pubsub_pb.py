"""Pubsub RPC codec: round trips, limits, garbage, StrictSign, and py-libp2p cross-checks."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
from hypothesis import given, strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import signature_validator

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.keys import KeyType, PeerId, PrivateKey, PublicKey
from trionode.wire.pubsub_pb import (
    PUBSUB_SIGNING_PREFIX,
    RPC,
    ControlGraft,
    ControlIDontWant,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    MessageRejectedError,
    PeerInfo,
    PubsubMessage,
    RejectReason,
    RpcLimits,
    SubOpts,
    decode_rpc,
    default_message_id,
    encode_rpc,
    encode_rpc_split,
    sign_message,
    verify_message,
)
from trionode.wire.varint import encode_uvarint

KEY = PrivateKey(bytes(range(32)))
OTHER = PrivateKey(bytes(range(1, 33)))

# -- strategies -------------------------------------------------------------------------------

topics = st.text(max_size=24)
message_ids = st.binary(min_size=0, max_size=48)
id_lists = st.lists(message_ids, max_size=6).map(tuple)
optional_bytes = st.none() | st.binary(max_size=40)

messages = st.builds(
    PubsubMessage,
    from_peer=optional_bytes,
    data=optional_bytes,
    seqno=optional_bytes,
    topic=st.none() | topics,
    signature=optional_bytes,
    key=optional_bytes,
)
prunes = st.builds(
    ControlPrune,
    topic=topics,
    peers=st.lists(st.builds(PeerInfo, optional_bytes, optional_bytes), max_size=3).map(tuple),
    backoff=st.none() | st.integers(0, 2**64 - 1),
)
controls = st.builds(
    ControlMessage,
    ihave=st.lists(st.builds(ControlIHave, topics, id_lists), max_size=3).map(tuple),
    iwant=st.lists(st.builds(ControlIWant, id_lists), max_size=3).map(tuple),
    graft=st.lists(st.builds(ControlGraft, topics), max_size=3).map(tuple),
    prune=st.lists(prunes, max_size=3).map(tuple),
    idontwant=st.lists(st.builds(ControlIDontWant, id_lists), max_size=2).map(tuple),
)
rpcs = st.builds(
    RPC,
    subscriptions=st.lists(st.builds(SubOpts, st.booleans(), topics), max_size=4).map(tuple),
    publish=st.lists(messages, max_size=4).map(tuple),
    control=st.none() | controls,
)


def _signed(topic: str = "t", data: bytes = b"hello", seqno: int = 1) -> PubsubMessage:
    unsigned = PubsubMessage(
        from_peer=KEY.peer_id().multihash,
        data=data,
        seqno=seqno.to_bytes(8, "big"),
        topic=topic,
    )
    return sign_message(KEY, unsigned)


def _reparse(message: PubsubMessage) -> PubsubMessage:
    return decode_rpc(RPC(publish=(message,)).encode()).publish[0]


# -- round trips ------------------------------------------------------------------------------


@given(rpcs)
def test_round_trip(rpc: RPC) -> None:
    encoded = encode_rpc(rpc)
    decoded = decode_rpc(encoded)
    assert decoded == rpc
    assert decoded.encode() == encoded  # messages keep their wire bytes


def _flatten(rpcs_: list[RPC]) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {k: [] for k in ("subs", "msgs", "ihave", "iwant", "rest")}
    for rpc in rpcs_:
        out["subs"].extend(rpc.subscriptions)
        out["msgs"].extend(rpc.publish)
        if rpc.control is not None:
            out["ihave"].extend((e.topic, i) for e in rpc.control.ihave for i in e.message_ids)
            out["iwant"].extend(i for e in rpc.control.iwant for i in e.message_ids)
            out["rest"].extend(rpc.control.graft)
            out["rest"].extend(rpc.control.prune)
            out["rest"].extend(i for e in rpc.control.idontwant for i in e.message_ids)
    return out


@given(rpcs, st.integers(300, 2000), st.integers(1, 4), st.integers(2, 8))
def test_split_respects_limits_and_keeps_content(
    rpc: RPC, max_size: int, max_count: int, max_ids: int
) -> None:
    limits = RpcLimits(
        max_rpc_size=max_size,
        max_subscriptions=max_count,
        max_messages=max_count,
        max_control_entries=max_count,
        max_message_ids=max_ids,
    )
    bodies = encode_rpc_split(rpc, limits)
    assert all(len(body) <= max_size for body in bodies)
    decoded = [decode_rpc(body, limits) for body in bodies]
    # Control entries with no ids survive only as entries; compare what carries content.
    assert _flatten(decoded) == _flatten([rpc])
    if rpc == RPC():
        assert bodies == []


def test_split_of_a_single_big_ihave() -> None:
    ids = tuple(i.to_bytes(4, "big") for i in range(30_000))
    rpc = RPC(control=ControlMessage(ihave=(ControlIHave("t", ids),)))
    bodies = encode_rpc_split(rpc)
    assert len(bodies) == 3
    decoded = [decode_rpc(body) for body in bodies]
    assert _flatten(decoded)["ihave"] == [("t", i) for i in ids]


def test_split_refuses_a_field_that_cannot_fit() -> None:
    huge = PubsubMessage(data=b"x" * 2000)
    with pytest.raises(LocalProtocolError):
        encode_rpc_split(RPC(publish=(huge,)), RpcLimits(max_rpc_size=1000))


def test_known_encoding() -> None:
    rpc = RPC(
        subscriptions=(SubOpts(subscribe=True, topic="a"),),
        control=ControlMessage(graft=(ControlGraft("a"),)),
    )
    # 0a 05 {08 01 12 01 'a'}   1a 05 {1a 03 {0a 01 'a'}}
    assert rpc.encode() == bytes.fromhex("0a05 0801 120161 1a05 1a03 0a0161")


def test_unknown_fields_are_ignored_kept_and_signed() -> None:
    signed = _signed()
    unsigned_wire = PubsubMessage(signed.from_peer, signed.data, signed.seqno, "t").encode()
    unsigned_wire += protobuf.encode_bytes_field(9, b"future")
    signature = KEY.sign(PUBSUB_SIGNING_PREFIX + unsigned_wire)
    inner = unsigned_wire + protobuf.encode_bytes_field(5, signature)
    body = (
        protobuf.encode_bytes_field(2, inner)
        + protobuf.encode_varint_field(42, 7)
        + protobuf.encode_bytes_field(3, protobuf.encode_bytes_field(6, b"extensions"))
    )
    rpc = decode_rpc(body)
    assert rpc.publish[0].encode() == inner  # forwarded unchanged
    assert rpc.control == ControlMessage()
    assert rpc.control.is_empty()
    assert verify_message(rpc.publish[0]) == KEY.peer_id()
    # An unknown field added after signing breaks the signature: it is covered too.
    added = protobuf.encode_bytes_field(2, signed.encode() + protobuf.encode_varint_field(9, 1))
    with pytest.raises(MessageRejectedError, match="bad_signature"):
        verify_message(decode_rpc(added).publish[0])


def test_replace_drops_cached_wire() -> None:
    message = _reparse(_signed())
    changed = dataclasses.replace(message, data=b"other")
    assert _reparse(changed).data == b"other"


# -- garbage and limits -----------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_garbage_raises_only_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_rpc(data)


@given(rpcs, st.data())
def test_mutated_rpcs_raise_only_remote_protocol_error(rpc: RPC, data: st.DataObject) -> None:
    encoded = bytearray(encode_rpc(rpc))
    if not encoded:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    for candidate in (bytes(encoded), bytes(encoded[:cut])):
        try:
            decoded = decode_rpc(candidate)
        except RemoteProtocolError:
            continue
        for message in decoded.publish:
            with contextlib.suppress(MessageRejectedError):
                verify_message(message)


def _reference_decode(body: bytes) -> RPC | None:
    """The RPC as the generic protobuf decoder (`protobuf.decode_message`, typed getters, the
    last occurrence of a field wins) reads it, without limits; None if that refuses it.
    The one-pass decoder in `pubsub_pb` must agree with it on every small input."""

    def fields(raw: bytes) -> protobuf.Message:
        return protobuf.decode_message(raw)

    def ids(raw: bytes, number: int) -> tuple[bytes, ...]:
        return tuple(fields(raw).get_repeated_bytes(number))

    try:
        top = fields(body)
        subscriptions = tuple(
            SubOpts(bool(m.get_uint(1)), m.get_str(2) or "")
            for m in map(fields, top.get_repeated_bytes(1))
        )
        publish = []
        for raw in top.get_repeated_bytes(2):
            m = fields(raw)
            values = [m.get_bytes(n) for n in range(1, 7)]
            publish.append(
                PubsubMessage(
                    from_peer=values[0],
                    data=values[1],
                    seqno=values[2],
                    topic=m.get_str(4),
                    signature=values[4],
                    key=values[5],
                )
            )
        control = None
        raw_control = top.get_bytes(3)
        if raw_control is not None:
            c = fields(raw_control)
            prunes = []
            for raw in c.get_repeated_bytes(4):
                p = fields(raw)
                peers = tuple(
                    PeerInfo(i.get_bytes(1), i.get_bytes(2))
                    for i in map(fields, p.get_repeated_bytes(2))
                )
                prunes.append(ControlPrune(p.get_str(1) or "", peers, p.get_uint(3)))
            control = ControlMessage(
                ihave=tuple(
                    ControlIHave(fields(raw).get_str(1) or "", ids(raw, 2))
                    for raw in c.get_repeated_bytes(1)
                ),
                iwant=tuple(ControlIWant(ids(raw, 1)) for raw in c.get_repeated_bytes(2)),
                graft=tuple(
                    ControlGraft(fields(raw).get_str(1) or "") for raw in c.get_repeated_bytes(3)
                ),
                prune=tuple(prunes),
                idontwant=tuple(ControlIDontWant(ids(raw, 1)) for raw in c.get_repeated_bytes(5)),
            )
    except RemoteProtocolError:
        return None
    return RPC(subscriptions, tuple(publish), control)


def _reference_signing_payload(wire: bytes) -> bytes:
    kept = bytearray(PUBSUB_SIGNING_PREFIX)
    position = 0
    for item in protobuf.iter_fields(wire):
        if item.number in {5, 6}:
            kept += wire[position : item.start]
            position = item.end
    return bytes(kept + wire[position:])


def _field(number: int, wire_type: int, value: int, body: bytes) -> bytes:
    if wire_type == protobuf.WIRE_VARINT:
        return protobuf.encode_varint_field(number, value)
    if wire_type == protobuf.WIRE_LEN:
        return protobuf.encode_bytes_field(number, body)
    width = 8 if wire_type == protobuf.WIRE_FIXED64 else 4
    return encode_uvarint((number << 3) | wire_type) + value.to_bytes(8, "big")[:width]


def _soup(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Messages of fields 1 to 7 of any wire type (repeats, unknown numbers, wrong types)
    whose length-delimited values are drawn from ``inner``."""
    one = st.builds(
        _field,
        st.integers(1, 7),
        st.sampled_from([0, 1, 2, 2, 2, 5]),
        st.integers(0, 2**64 - 1),
        inner,
    )
    return st.lists(one, max_size=5).map(b"".join)


_leaves = st.binary(max_size=10) | st.sampled_from([b"t", b"\xff", b""])
_nested = _soup(_soup(_soup(_soup(_leaves) | _leaves) | _leaves) | _leaves)
"""RPC-shaped soup: an RPC's fields hold messages and control entries, which hold fields
of their own, down to a PRUNE's PeerInfo."""


_repeats = st.lists(
    st.builds(
        _field,
        st.integers(1, 7),
        st.just(2),
        st.just(0),
        st.binary(max_size=6).map(bytes.hex).map(str.encode),
    ),
    max_size=4,
).map(b"".join)


def _with_repeats(rpc: RPC, extra: bytes) -> bytes:
    """``rpc`` with ``extra`` fields appended to each message (the last occurrence wins)."""
    return encode_rpc(RPC(rpc.subscriptions, (), rpc.control)) + b"".join(
        protobuf.encode_bytes_field(2, message.encode() + extra) for message in rpc.publish
    )


@given(rpcs, _nested | st.builds(_with_repeats, rpcs, _repeats), st.data())
def test_the_one_pass_decoder_reads_what_the_generic_decoder_reads(
    rpc: RPC, soup: bytes, data: st.DataObject
) -> None:
    """Valid, mutated and cut RPCs, and field soup (repeated fields, wrong wire types,
    unknown fields at every level): the same RPC and signing payloads as the generic
    decoder, or a RemoteProtocolError from both."""
    encoded = bytearray(encode_rpc(rpc) if data.draw(st.booleans()) else soup)
    if encoded and data.draw(st.booleans()):  # damaged: bytes changed, the end cut off
        for _ in range(data.draw(st.integers(0, 2))):
            position = data.draw(st.integers(0, len(encoded) - 1))
            encoded[position] = data.draw(st.integers(0, 255))
        del encoded[data.draw(st.integers(0, len(encoded))) :]
    candidate = bytes(encoded)
    expected = _reference_decode(candidate)
    decoded: RPC | str
    try:
        decoded = decode_rpc(candidate)
    except RemoteProtocolError as exc:
        decoded = str(exc)
    if isinstance(decoded, str):
        # (or a field budget, which the generic decoder does not have)
        assert expected is None or "more than" in decoded
        return
    assert decoded == expected
    for message in decoded.publish:
        assert message.signing_payload() == _reference_signing_payload(message.encode())


@pytest.mark.parametrize(
    ("rpc", "limits", "match"),
    [
        (RPC(publish=(PubsubMessage(),) * 5), RpcLimits(max_messages=4), "repeated more"),
        (
            RPC(subscriptions=(SubOpts(subscribe=True, topic="t"),) * 5),
            RpcLimits(max_subscriptions=4),
            "SubOpts|repeated more|RPC has more",
        ),
        (
            RPC(control=ControlMessage(iwant=(ControlIWant((b"a",) * 6),))),
            RpcLimits(max_message_ids=5),
            "IWANT|message ids",
        ),
        (
            RPC(control=ControlMessage(ihave=(ControlIHave("t", (b"a",) * 3),) * 2)),
            RpcLimits(max_message_ids=5),
            "message ids",
        ),
        (
            RPC(control=ControlMessage(iwant=(ControlIWant((b"a" * 9,)),))),
            RpcLimits(max_message_id_length=8),
            "message id of 9",
        ),
        (
            RPC(subscriptions=(SubOpts(subscribe=True, topic="x" * 9),)),
            RpcLimits(max_topic_length=8),
            "topic",
        ),
        (RPC(publish=(PubsubMessage(topic="x" * 9),)), RpcLimits(max_topic_length=8), "topic"),
        (
            RPC(control=ControlMessage(graft=(ControlGraft("g"),) * 5)),
            RpcLimits(max_control_entries=4),
            "control message",
        ),
        (
            RPC(control=ControlMessage(prune=(ControlPrune("p", (PeerInfo(),) * 5),))),
            RpcLimits(max_prune_peers=4),
            "PRUNE|repeated more",
        ),
        (RPC(publish=(PubsubMessage(data=b"x" * 100),)), RpcLimits(max_rpc_size=64), "exceeds"),
    ],
)
def test_limits(rpc: RPC, limits: RpcLimits, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_rpc(rpc.encode(), limits)


def test_invalid_utf8_topic() -> None:
    body = protobuf.encode_bytes_field(1, protobuf.encode_bytes_field(2, b"\xff"))
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        decode_rpc(body)


def test_wrong_wire_type() -> None:
    with pytest.raises(RemoteProtocolError, match="wire type"):
        decode_rpc(protobuf.encode_varint_field(2, 5))


@pytest.mark.parametrize(
    "bomb",
    [
        b"\x12\x00" * (1 << 19),  # a million empty top-level messages
        b"\x38\x00" * (1 << 19),  # unknown varint fields
        protobuf.encode_bytes_field(3, protobuf.encode_bytes_field(2, b"\x0a\x00" * 300_000)),
        protobuf.encode_bytes_field(2, b"\x38\x00" * 300_000),  # unknown fields in a message
    ],
)
def test_field_bombs_are_refused_at_a_field_limit_not_after_reading_them_all(
    bomb: bytes,
) -> None:
    """Quick by construction, not by a clock: the refusal names the field limit it hit,
    and that limit is a small part of the fields the bomb holds (two bytes each)."""
    with pytest.raises(RemoteProtocolError, match=r"has more than \d+ fields") as refused:
        decode_rpc(bomb)
    hit = re.search(r"more than (\d+) fields", str(refused.value))
    assert hit is not None
    assert int(hit.group(1)) * 10 < len(bomb) // 2


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_messages"):
        RpcLimits(max_messages=0)


# -- StrictSign -------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    message = _signed()
    assert message.key is None  # extractable from an Ed25519 PeerId
    assert message.signature is not None
    assert KEY.public_key.verify(
        message.signature,
        PUBSUB_SIGNING_PREFIX
        + PubsubMessage(message.from_peer, b"hello", message.seqno, "t").encode(),
    )
    assert verify_message(message) == KEY.peer_id()
    assert verify_message(_reparse(message)) == KEY.peer_id()
    assert message.seqno_int == 1
    assert default_message_id(message) == KEY.peer_id().multihash + (1).to_bytes(8, "big")


def test_sign_with_inlined_key() -> None:
    message = sign_message(KEY, _signed(), include_key=True)
    assert message.key == KEY.public_key.to_protobuf()
    assert verify_message(_reparse(message)) == KEY.peer_id()


def test_sign_requires_matching_author() -> None:
    with pytest.raises(LocalProtocolError):
        sign_message(OTHER, _signed())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"data": b"tampered"}, RejectReason.BAD_SIGNATURE),
        ({"topic": "other"}, RejectReason.BAD_SIGNATURE),
        ({"seqno": (2).to_bytes(8, "big")}, RejectReason.BAD_SIGNATURE),
        ({"signature": None}, RejectReason.MISSING_SIGNATURE),
        ({"signature": b"short"}, RejectReason.BAD_SIGNATURE),
        ({"from_peer": None}, RejectReason.MISSING_FROM),
        ({"from_peer": b"\x00\x05garbage"}, RejectReason.INVALID_FROM),
        ({"from_peer": OTHER.peer_id().multihash}, RejectReason.BAD_SIGNATURE),
        ({"seqno": None}, RejectReason.MISSING_SEQNO),
        ({"seqno": b"\x01"}, RejectReason.INVALID_SEQNO),
        ({"key": OTHER.public_key.to_protobuf()}, RejectReason.KEY_MISMATCH),
        ({"key": b"\xff"}, RejectReason.INVALID_KEY),
    ],
)
def test_tampered_messages_are_rejected(change: dict[str, object], reason: RejectReason) -> None:
    tampered = dataclasses.replace(_signed(), **change)  # type: ignore[arg-type]
    for candidate in (tampered, _reparse(tampered)):
        with pytest.raises(MessageRejectedError) as info:
            verify_message(candidate)
        assert info.value.reason is reason


def test_hashed_peer_id_needs_key() -> None:
    hashed = PeerId(bytes((0x12, 32)) + bytes(32))
    message = dataclasses.replace(_signed(), from_peer=hashed.multihash)
    with pytest.raises(MessageRejectedError) as info:
        verify_message(message)
    assert info.value.reason is RejectReason.INVALID_KEY


def test_non_ed25519_key_is_unsupported() -> None:
    rsa = PublicKey(KeyType.RSA, b"\x01" * 300)
    message = dataclasses.replace(
        _signed(), from_peer=rsa.peer_id().multihash, key=rsa.to_protobuf()
    )
    with pytest.raises(MessageRejectedError) as info:
        verify_message(message)
    assert info.value.reason is RejectReason.UNSUPPORTED_KEY


def test_tampered_wire_bytes_are_rejected() -> None:
    wire = bytearray(_signed(data=b"A" * 32).encode())
    index = wire.index(b"A" * 32)
    wire[index] = ord("B")
    body = protobuf.encode_bytes_field(2, bytes(wire))
    with pytest.raises(MessageRejectedError, match="bad_signature"):
        verify_message(decode_rpc(body).publish[0])


def test_default_message_id_needs_from_and_seqno() -> None:
    with pytest.raises(MessageRejectedError):
        default_message_id(PubsubMessage(seqno=b"1"))
    with pytest.raises(MessageRejectedError):
        default_message_id(PubsubMessage(from_peer=b"1"))


# -- py-libp2p cross-checks (google.protobuf and its StrictSign validator) ----------------------


def test_py_libp2p_parses_our_rpc_and_accepts_our_signature() -> None:

    message = _signed(topic="trionode/context/x", data=b"\x00\xffdata")
    rpc = RPC(
        subscriptions=(SubOpts(subscribe=True, topic="a"),),
        publish=(message,),
        control=ControlMessage(
            ihave=(ControlIHave("a", (b"\x00\xff", b"id2")),),
            iwant=(ControlIWant((b"\x80",)),),
            graft=(ControlGraft("a"),),
            prune=(ControlPrune("b", (PeerInfo(b"peer"),), 60),),
        ),
    )
    theirs = rpc_pb2.RPC.FromString(rpc.encode())
    assert theirs.subscriptions[0].subscribe
    assert theirs.subscriptions[0].topicid == "a"
    parsed = theirs.publish[0]
    assert parsed.from_id == KEY.peer_id().multihash
    assert list(parsed.topicIDs) == ["trionode/context/x"]
    assert parsed.data == b"\x00\xffdata"
    assert signature_validator(parsed)
    assert list(theirs.control.ihave[0].messageIDs) == [b"\x00\xff", b"id2"]
    assert theirs.control.prune[0].backoff == 60
    assert theirs.control.prune[0].peers[0].peerID == b"peer"
    parsed.data = b"tampered"
    assert not signature_validator(parsed)


def test_we_accept_py_libp2p_signed_messages() -> None:

    pair = create_new_key_pair(bytes(range(7, 39)))
    author = ID.from_pubkey(pair.public_key)
    theirs = rpc_pb2.Message(
        from_id=author.to_bytes(),
        data=b"from python",
        seqno=(12345).to_bytes(8, "big"),
        topicIDs=["topic"],
    )
    theirs.signature = pair.private_key.sign(PUBSUB_SIGNING_PREFIX + theirs.SerializeToString())
    theirs.key = pair.public_key.serialize()  # py-libp2p always sets key
    rpc = rpc_pb2.RPC(publish=[theirs])
    ours = decode_rpc(rpc.SerializeToString()).publish[0]
    assert ours.topic == "topic"
    assert ours.key is not None
    assert verify_message(ours).multihash == author.to_bytes()
