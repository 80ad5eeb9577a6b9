from __future__ import annotations

import warnings

import pytest
from hypothesis import given, strategies as st
from noise.connection import Keypair, NoiseConnection

from tests.wire.strategies import chunkings
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import KeyType, PeerId, PrivateKey, PublicKey
from trionode.wire.noise import (
    FRAME_OVERHEAD,
    MAX_PLAINTEXT_LENGTH,
    PROTOCOL_NAME,
    SIGNATURE_PREFIX,
    CipherState,
    HandshakeComplete,
    HandshakePayload,
    NoiseHandshake,
    NoiseTransport,
    XXHandshakeState,
    frame_message,
    x25519_public_key,
)

INITIATOR_STATIC = bytes(range(1, 33))
INITIATOR_EPHEMERAL = bytes(range(33, 65))
RESPONDER_STATIC = bytes(range(65, 97))
RESPONDER_EPHEMERAL = bytes(range(97, 129))
INITIATOR_IDENTITY = PrivateKey(bytes(range(129, 161)))
RESPONDER_IDENTITY = PrivateKey(bytes(range(161, 193)))


def oracle(*, initiator: bool, static: bytes, ephemeral: bytes) -> NoiseConnection:
    """The `noiseprotocol` package, with fixed keys, as a reference implementation."""
    connection = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        connection.set_as_initiator()
    else:
        connection.set_as_responder()
    connection.set_keypair_from_private_bytes(Keypair.STATIC, static)
    connection.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    with warnings.catch_warnings():
        # it warns (rightly, for production) that a fixed ephemeral key is set
        warnings.filterwarnings("ignore", message="One of ephemeral keypairs")
        connection.start_handshake()
    return connection


def our_xx(*, initiator: bool) -> XXHandshakeState:
    if initiator:
        return XXHandshakeState(
            initiator=True, static_key=INITIATOR_STATIC, ephemeral_key=INITIATOR_EPHEMERAL
        )
    return XXHandshakeState(
        initiator=False, static_key=RESPONDER_STATIC, ephemeral_key=RESPONDER_EPHEMERAL
    )


def unframe(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    while data:
        length = int.from_bytes(data[:2], "big")
        out.append(data[2 : 2 + length])
        data = data[2 + length :]
    return out


# -- bare XX against the oracle ----------------------------------------------------------------


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64))
def test_xx_messages_match_oracle_byte_for_byte(p1: bytes, p2: bytes, p3: bytes) -> None:
    ours_i, ours_r = our_xx(initiator=True), our_xx(initiator=False)
    ref_i = oracle(initiator=True, static=INITIATOR_STATIC, ephemeral=INITIATOR_EPHEMERAL)
    ref_r = oracle(initiator=False, static=RESPONDER_STATIC, ephemeral=RESPONDER_EPHEMERAL)

    msg1 = ours_i.write_message(p1)
    assert msg1 == ref_i.write_message(p1)
    assert ours_r.read_message(msg1) == p1 == ref_r.read_message(msg1)
    msg2 = ours_r.write_message(p2)
    assert msg2 == ref_r.write_message(p2)
    assert ours_i.read_message(msg2) == p2 == ref_i.read_message(msg2)
    msg3 = ours_i.write_message(p3)
    assert msg3 == ref_i.write_message(p3)
    assert ours_r.read_message(msg3) == p3 == ref_r.read_message(msg3)

    assert ours_i.finished
    assert ours_r.finished
    assert ours_i.handshake_hash == ref_i.get_handshake_hash() == ref_r.get_handshake_hash()
    assert ours_r.handshake_hash == ours_i.handshake_hash
    assert ours_i.remote_static_public_key == x25519_public_key(RESPONDER_STATIC)
    assert ours_r.remote_static_public_key == x25519_public_key(INITIATOR_STATIC)

    i_send, i_recv = ours_i.split()
    r_send, r_recv = ours_r.split()
    for text in (b"", b"hello", b"x" * 1000):
        to_responder = ref_i.encrypt(text)
        assert i_send.encrypt_with_ad(None, text) == to_responder
        assert r_recv.decrypt_with_ad(None, to_responder) == text
        to_initiator = ref_r.encrypt(text)
        assert r_send.encrypt_with_ad(None, text) == to_initiator
        assert i_recv.decrypt_with_ad(None, to_initiator) == text


def test_our_initiator_against_oracle_responder() -> None:
    ours = our_xx(initiator=True)
    ref = oracle(initiator=False, static=RESPONDER_STATIC, ephemeral=RESPONDER_EPHEMERAL)
    ref.read_message(ours.write_message(b""))
    assert ours.read_message(ref.write_message(b"p2")) == b"p2"
    assert ref.read_message(ours.write_message(b"p3")) == b"p3"
    assert ref.handshake_finished
    assert ours.handshake_hash == ref.get_handshake_hash()
    send, receive = ours.split()
    assert ref.decrypt(send.encrypt_with_ad(None, b"ping")) == b"ping"
    assert receive.decrypt_with_ad(None, ref.encrypt(b"pong")) == b"pong"


def test_oracle_initiator_against_our_responder() -> None:
    ours = our_xx(initiator=False)
    ref = oracle(initiator=True, static=INITIATOR_STATIC, ephemeral=INITIATOR_EPHEMERAL)
    ours.read_message(ref.write_message())
    assert ref.read_message(ours.write_message(b"p2")) == b"p2"
    assert ours.read_message(ref.write_message(b"p3")) == b"p3"
    assert ours.handshake_hash == ref.get_handshake_hash()
    send, receive = ours.split()
    assert ref.decrypt(send.encrypt_with_ad(None, b"pong")) == b"pong"
    assert receive.decrypt_with_ad(None, ref.encrypt(b"ping")) == b"ping"


def test_xx_turn_order_is_enforced() -> None:
    initiator, responder = our_xx(initiator=True), our_xx(initiator=False)
    with pytest.raises(LocalProtocolError):
        responder.write_message(b"")
    with pytest.raises(LocalProtocolError):
        initiator.read_message(bytes(32))
    with pytest.raises(LocalProtocolError):
        initiator.split()


def test_cipher_state_nonce_layout_and_failure_does_not_advance() -> None:
    key = bytes(range(32))
    sender, receiver = CipherState(key), CipherState(key)
    assert not CipherState().has_key
    assert CipherState().encrypt_with_ad(b"ad", b"pt") == b"pt"
    first = sender.encrypt_with_ad(b"", b"a")
    second = sender.encrypt_with_ad(b"", b"b")
    assert sender.nonce == 2
    with pytest.raises(RemoteProtocolError, match="authentication"):
        receiver.decrypt_with_ad(b"", second)  # nonce 0 expected
    assert receiver.nonce == 0
    assert receiver.decrypt_with_ad(b"", first) == b"a"
    assert receiver.decrypt_with_ad(b"", second) == b"b"
    exhausted = CipherState(key)
    exhausted.nonce = (1 << 64) - 1
    with pytest.raises(LocalProtocolError):
        exhausted.encrypt_with_ad(None, b"")
    with pytest.raises(RemoteProtocolError):
        exhausted.decrypt_with_ad(None, bytes(16))


# -- libp2p handshake --------------------------------------------------------------------------


def make_pair(
    *,
    expected: PeerId | None = None,
    initiator_muxers: tuple[str, ...] = (),
    responder_muxers: tuple[str, ...] = (),
) -> tuple[NoiseHandshake, NoiseHandshake]:
    initiator = NoiseHandshake(
        INITIATOR_IDENTITY,
        initiator=True,
        expected_peer_id=expected,
        static_key=INITIATOR_STATIC,
        ephemeral_key=INITIATOR_EPHEMERAL,
        stream_muxers=initiator_muxers,
    )
    responder = NoiseHandshake(
        RESPONDER_IDENTITY,
        initiator=False,
        static_key=RESPONDER_STATIC,
        ephemeral_key=RESPONDER_EPHEMERAL,
        stream_muxers=responder_muxers,
    )
    return initiator, responder


def run_handshake(
    initiator: NoiseHandshake, responder: NoiseHandshake
) -> tuple[HandshakeComplete, HandshakeComplete, bytes]:
    """Run to completion; returns both events and the initiator's final bytes (msg3)."""
    msg1 = initiator.data_to_send()
    responder.receive_data(msg1)
    assert responder.next_event() is None
    msg2 = responder.data_to_send()
    initiator.receive_data(msg2)
    initiator_done = initiator.next_event()
    assert isinstance(initiator_done, HandshakeComplete)
    assert initiator.next_event() is None
    msg3 = initiator.data_to_send()
    responder.receive_data(msg3)
    responder_done = responder.next_event()
    assert isinstance(responder_done, HandshakeComplete)
    assert responder.next_event() is None
    return initiator_done, responder_done, msg3


def test_libp2p_handshake_between_our_roles() -> None:
    initiator, responder = make_pair(expected=RESPONDER_IDENTITY.peer_id())
    msg1 = initiator.data_to_send()
    assert msg1[:2] == b"\x00\x20"
    assert len(msg1) == 34
    responder.receive_data(msg1)
    assert responder.next_event() is None
    msg2 = responder.data_to_send()
    assert len(msg2) == 2 + 200  # the py-libp2p size: no extensions
    initiator.receive_data(msg2)
    done_i = initiator.next_event()
    msg3 = initiator.data_to_send()
    assert len(msg3) == 2 + 168
    responder.receive_data(msg3)
    done_r = responder.next_event()
    assert isinstance(done_i, HandshakeComplete)
    assert isinstance(done_r, HandshakeComplete)
    assert done_i.remote_peer_id == RESPONDER_IDENTITY.peer_id()
    assert done_r.remote_peer_id == INITIATOR_IDENTITY.peer_id()
    assert done_i.remote_public_key == RESPONDER_IDENTITY.public_key
    assert done_i.handshake_hash == done_r.handshake_hash
    assert done_i.remote_static_key == x25519_public_key(RESPONDER_STATIC)
    assert done_i.remote_stream_muxers == done_r.remote_stream_muxers == ()
    assert initiator.result == done_i

    t_i, t_r = initiator.into_transport(), responder.into_transport()
    t_r.receive_data(t_i.encrypt(b"hello"))
    assert t_r.next_message() == b"hello"
    assert t_r.next_message() is None
    t_i.receive_data(t_r.encrypt(b"world"))
    assert t_i.decrypt_available() == b"world"
    with pytest.raises(LocalProtocolError):
        initiator.into_transport()
    with pytest.raises(LocalProtocolError):
        initiator.receive_data(b"x")


def test_stream_muxer_extensions() -> None:
    initiator, responder = make_pair(
        initiator_muxers=("/yamux/1.0.0",), responder_muxers=("/yamux/1.0.0", "/mplex/6.7.0")
    )
    done_i, done_r, _ = run_handshake(initiator, responder)
    assert done_i.remote_stream_muxers == ("/yamux/1.0.0", "/mplex/6.7.0")
    assert done_r.remote_stream_muxers == ("/yamux/1.0.0",)


def test_msg3_pipelined_with_transport_data() -> None:
    initiator, responder = make_pair()
    responder.receive_data(initiator.data_to_send())
    responder.next_event()
    initiator.receive_data(responder.data_to_send())
    assert initiator.next_event() is not None
    transport_i = initiator.into_transport()
    # msg3 and the first transport frames (e.g. the muxer mss) go out in one write
    responder.receive_data(initiator.data_to_send() + transport_i.encrypt(b"first") + b"\x00")
    assert isinstance(responder.next_event(), HandshakeComplete)
    transport_r = responder.into_transport()
    assert transport_r.buffered_bytes == 2 + 5 + 16 + 1
    assert transport_r.next_message() == b"first"
    assert transport_r.next_message() is None  # one byte of the next frame
    assert transport_r.buffered_bytes == 1


def test_initiator_rejects_unexpected_peer() -> None:
    stranger = PrivateKey.generate().peer_id()
    initiator, responder = make_pair(expected=stranger)
    responder.receive_data(initiator.data_to_send())
    responder.next_event()
    initiator.receive_data(responder.data_to_send())
    with pytest.raises(RemoteProtocolError, match="dialled"):
        initiator.next_event()


def test_responder_cannot_expect_a_peer() -> None:
    with pytest.raises(LocalProtocolError):
        NoiseHandshake(
            RESPONDER_IDENTITY,
            initiator=False,
            expected_peer_id=PeerId.from_public_key(RESPONDER_IDENTITY.public_key),
        )


def _oracle_initiator_until_msg3(responder: NoiseHandshake) -> NoiseConnection:
    ref = oracle(initiator=True, static=INITIATOR_STATIC, ephemeral=INITIATOR_EPHEMERAL)
    responder.receive_data(frame_message(ref.write_message()))
    assert responder.next_event() is None
    (msg2,) = unframe(responder.data_to_send())
    payload = HandshakePayload.decode(ref.read_message(msg2))
    assert payload.verify(x25519_public_key(RESPONDER_STATIC)) == RESPONDER_IDENTITY.public_key
    return ref


def test_oracle_initiator_with_libp2p_payload() -> None:
    _, responder = make_pair()
    ref = _oracle_initiator_until_msg3(responder)
    payload = HandshakePayload.create(INITIATOR_IDENTITY, x25519_public_key(INITIATOR_STATIC))
    responder.receive_data(frame_message(ref.write_message(payload.encode())))
    done = responder.next_event()
    assert isinstance(done, HandshakeComplete)
    assert done.remote_peer_id == INITIATOR_IDENTITY.peer_id()
    assert done.handshake_hash == ref.get_handshake_hash()
    transport = responder.into_transport()
    # transport encryption matches the oracle frame for frame
    frames = unframe(transport.encrypt(b"to initiator"))
    assert frames == [oracle_twin_encrypt(b"to initiator", initiator=False)]
    assert ref.decrypt(frames[0]) == b"to initiator"
    transport.receive_data(frame_message(ref.encrypt(b"to responder")))
    assert transport.next_message() == b"to responder"
    assert ref.decrypt(unframe(transport.encrypt(b"back"))[0]) == b"back"


def oracle_twin_encrypt(plaintext: bytes, *, initiator: bool) -> bytes:
    """Encrypt the first transport message with an oracle pair using the same fixed keys."""
    ref_i = oracle(initiator=True, static=INITIATOR_STATIC, ephemeral=INITIATOR_EPHEMERAL)
    ref_r = oracle(initiator=False, static=RESPONDER_STATIC, ephemeral=RESPONDER_EPHEMERAL)
    p2 = HandshakePayload.create(RESPONDER_IDENTITY, x25519_public_key(RESPONDER_STATIC)).encode()
    p3 = HandshakePayload.create(INITIATOR_IDENTITY, x25519_public_key(INITIATOR_STATIC)).encode()
    ref_r.read_message(ref_i.write_message())
    ref_i.read_message(ref_r.write_message(p2))
    ref_r.read_message(ref_i.write_message(p3))
    return bytes(ref_i.encrypt(plaintext) if initiator else ref_r.encrypt(plaintext))


def test_our_initiator_against_oracle_responder_with_libp2p_payload() -> None:
    initiator, _ = make_pair(expected=RESPONDER_IDENTITY.peer_id())
    ref = oracle(initiator=False, static=RESPONDER_STATIC, ephemeral=RESPONDER_EPHEMERAL)
    (msg1,) = unframe(initiator.data_to_send())
    assert ref.read_message(msg1) == b""
    payload = HandshakePayload.create(RESPONDER_IDENTITY, x25519_public_key(RESPONDER_STATIC))
    initiator.receive_data(frame_message(ref.write_message(payload.encode())))
    done = initiator.next_event()
    assert isinstance(done, HandshakeComplete)
    (msg3,) = unframe(initiator.data_to_send())
    their_payload = HandshakePayload.decode(ref.read_message(msg3))
    assert (
        their_payload.verify(x25519_public_key(INITIATOR_STATIC)) == INITIATOR_IDENTITY.public_key
    )
    assert done.handshake_hash == ref.get_handshake_hash()
    transport = initiator.into_transport()
    frames = unframe(transport.encrypt(b"abc"))
    assert frames == [oracle_twin_encrypt(b"abc", initiator=True)]
    assert ref.decrypt(frames[0]) == b"abc"


def test_wrong_signature_rejected() -> None:
    _, responder = make_pair()
    ref = _oracle_initiator_until_msg3(responder)
    # signs a different static key than the one in the handshake
    bad = HandshakePayload.create(INITIATOR_IDENTITY, x25519_public_key(RESPONDER_STATIC))
    responder.receive_data(frame_message(ref.write_message(bad.encode())))
    with pytest.raises(RemoteProtocolError, match="signature"):
        responder.next_event()


def test_signature_by_other_identity_rejected() -> None:
    _, responder = make_pair()
    ref = _oracle_initiator_until_msg3(responder)
    honest = HandshakePayload.create(INITIATOR_IDENTITY, x25519_public_key(INITIATOR_STATIC))
    forged = HandshakePayload(
        identity_key=RESPONDER_IDENTITY.public_key.to_protobuf(),  # claims another identity
        identity_sig=honest.identity_sig,
    )
    responder.receive_data(frame_message(ref.write_message(forged.encode())))
    with pytest.raises(RemoteProtocolError, match="signature"):
        responder.next_event()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        HandshakePayload(b"", b"").encode()[:2],  # identity key but no signature
        b"\x0a\x01\xff\x12\x00",  # garbage key
        b"\xff",
    ],
)
def test_malformed_payload_rejected(payload: bytes) -> None:
    _, responder = make_pair()
    ref = _oracle_initiator_until_msg3(responder)
    responder.receive_data(frame_message(ref.write_message(payload)))
    with pytest.raises(RemoteProtocolError):
        responder.next_event()


def test_non_ed25519_identity_rejected() -> None:
    _, responder = make_pair()
    ref = _oracle_initiator_until_msg3(responder)
    payload = HandshakePayload(PublicKey(KeyType.SECP256K1, bytes(33)).to_protobuf(), bytes(64))
    responder.receive_data(frame_message(ref.write_message(payload.encode())))
    with pytest.raises(RemoteProtocolError, match="cannot verify"):
        responder.next_event()


def test_tampered_msg2_rejected() -> None:
    initiator, responder = make_pair()
    responder.receive_data(initiator.data_to_send())
    responder.next_event()
    msg2 = bytearray(responder.data_to_send())
    msg2[50] ^= 1
    initiator.receive_data(bytes(msg2))
    with pytest.raises(RemoteProtocolError, match="authentication"):
        initiator.next_event()


def test_low_order_ephemeral_rejected() -> None:
    _, responder = make_pair()
    responder.receive_data(frame_message(bytes(32)))
    with pytest.raises(RemoteProtocolError, match="X25519"):
        responder.next_event()


@pytest.mark.parametrize("length", [0, 31])
def test_short_msg1_rejected(length: int) -> None:
    _, responder = make_pair()
    responder.receive_data(frame_message(bytes(length)))
    with pytest.raises(RemoteProtocolError, match="short"):
        responder.next_event()


def test_short_msg2_rejected() -> None:
    initiator, _ = make_pair()
    initiator.receive_data(frame_message(bytes(95)))
    with pytest.raises(RemoteProtocolError, match="short"):
        initiator.next_event()


def test_eof_during_handshake() -> None:
    initiator, _ = make_pair()
    initiator.receive_data(b"\x00")
    initiator.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        initiator.next_event()
    with pytest.raises(LocalProtocolError):
        initiator.receive_data(b"x")


def test_into_transport_before_completion() -> None:
    initiator, _ = make_pair()
    with pytest.raises(LocalProtocolError):
        initiator.into_transport()


def test_random_keys_by_default() -> None:
    a = NoiseHandshake(INITIATOR_IDENTITY, initiator=True)
    b = NoiseHandshake(RESPONDER_IDENTITY, initiator=False)
    done_a, done_b, _ = run_handshake(a, b)
    assert done_a.remote_peer_id == RESPONDER_IDENTITY.peer_id()
    assert done_b.handshake_hash == done_a.handshake_hash
    calls: list[int] = []

    def rng(n: int) -> bytes:
        calls.append(n)
        return bytes([len(calls)]) * n

    NoiseHandshake(INITIATOR_IDENTITY, initiator=True, rng=rng)
    assert calls == [32, 32]


@given(st.data())
def test_handshake_under_arbitrary_chunking(data: st.DataObject) -> None:
    initiator, responder = make_pair()

    def deliver(wire: bytes, to: NoiseHandshake) -> list[HandshakeComplete]:
        events: list[HandshakeComplete] = []
        for chunk in data.draw(chunkings(wire)):
            to.receive_data(chunk)
            while (event := to.next_event()) is not None:
                events.append(event)
        return events

    assert deliver(initiator.data_to_send(), responder) == []
    (done_i,) = deliver(responder.data_to_send(), initiator)
    (done_r,) = deliver(initiator.data_to_send(), responder)
    assert done_i.handshake_hash == done_r.handshake_hash


# -- transport ---------------------------------------------------------------------------------


def transport_pair() -> tuple[NoiseTransport, NoiseTransport]:
    initiator, responder = make_pair()
    run_handshake(initiator, responder)
    return initiator.into_transport(), responder.into_transport()


@pytest.mark.parametrize(
    ("size", "frames"),
    [
        (0, 1),
        (1, 1),
        (MAX_PLAINTEXT_LENGTH, 1),
        (MAX_PLAINTEXT_LENGTH + 1, 2),
        (3 * MAX_PLAINTEXT_LENGTH, 3),
    ],
)
def test_encrypt_splits_into_max_size_frames(size: int, frames: int) -> None:
    sender, receiver = transport_pair()
    plaintext = bytes(i % 251 for i in range(size))
    wire = sender.encrypt(plaintext)
    assert len(wire) == size + frames * FRAME_OVERHEAD
    assert all(len(f) <= 65535 for f in unframe(wire))
    assert sender.send_nonce == frames
    receiver.receive_data(wire)
    messages = []
    while (message := receiver.next_message()) is not None:
        messages.append(message)
    assert len(messages) == frames
    assert b"".join(messages) == plaintext
    assert receiver.receive_nonce == frames


def test_transport_matches_oracle_for_multi_frame_writes() -> None:
    sender, _ = transport_pair()
    ref_i = oracle(initiator=True, static=INITIATOR_STATIC, ephemeral=INITIATOR_EPHEMERAL)
    ref_r = oracle(initiator=False, static=RESPONDER_STATIC, ephemeral=RESPONDER_EPHEMERAL)
    p2 = HandshakePayload.create(RESPONDER_IDENTITY, x25519_public_key(RESPONDER_STATIC)).encode()
    p3 = HandshakePayload.create(INITIATOR_IDENTITY, x25519_public_key(INITIATOR_STATIC)).encode()
    ref_r.read_message(ref_i.write_message())
    ref_i.read_message(ref_r.write_message(p2))
    ref_r.read_message(ref_i.write_message(p3))
    plaintext = b"z" * (MAX_PLAINTEXT_LENGTH + 10)
    frames = unframe(sender.encrypt(plaintext))
    assert frames == [
        ref_i.encrypt(plaintext[:MAX_PLAINTEXT_LENGTH]),
        ref_i.encrypt(plaintext[MAX_PLAINTEXT_LENGTH:]),
    ]
    assert [ref_r.decrypt(f) for f in frames] == [
        plaintext[:MAX_PLAINTEXT_LENGTH],
        plaintext[MAX_PLAINTEXT_LENGTH:],
    ]


def test_bad_mac_rejected() -> None:
    sender, receiver = transport_pair()
    wire = bytearray(sender.encrypt(b"payload"))
    wire[-1] ^= 0x80
    receiver.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="authentication"):
        receiver.next_message()


def test_frame_shorter_than_tag_rejected() -> None:
    _, receiver = transport_pair()
    receiver.receive_data(b"\x00\x0f" + bytes(15))
    with pytest.raises(RemoteProtocolError, match="tag"):
        receiver.next_message()


def test_transport_eof_mid_frame() -> None:
    sender, receiver = transport_pair()
    receiver.receive_data(sender.encrypt(b"abc")[:-1])
    receiver.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        receiver.next_message()


def test_transport_clean_eof() -> None:
    sender, receiver = transport_pair()
    receiver.receive_data(sender.encrypt(b"abc"))
    receiver.receive_data(b"")
    assert receiver.next_message() == b"abc"
    assert receiver.next_message() is None
    with pytest.raises(LocalProtocolError):
        receiver.receive_data(b"x")


def test_transport_buffer_cap() -> None:
    initiator, responder = make_pair()
    run_handshake(initiator, responder)
    with pytest.raises(LocalProtocolError):
        responder.into_transport(max_buffer_size=1000)
    transport = initiator.into_transport(max_buffer_size=70000)
    with pytest.raises(RemoteProtocolError, match="overflow"):
        transport.receive_data(bytes(70001))


def test_frame_message_limit() -> None:
    assert frame_message(b"ab") == b"\x00\x02ab"
    with pytest.raises(LocalProtocolError):
        frame_message(bytes(65536))


@given(st.data(), st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_transport_round_trip_under_arbitrary_chunking(
    data: st.DataObject, messages: list[bytes]
) -> None:
    sender, receiver = transport_pair()
    wire = b"".join(sender.encrypt(m) for m in messages)
    received: list[bytes] = []
    for chunk in data.draw(chunkings(wire)):
        receiver.receive_data(chunk)
        while (message := receiver.next_message()) is not None:
            received.append(message)
    assert received == messages


@given(st.data())
def test_mutated_transport_frames_only_raise_remote_protocol_error(data: st.DataObject) -> None:
    sender, receiver = transport_pair()
    wire = bytearray(sender.encrypt(b"first") + sender.encrypt(b"second"))
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    try:
        receiver.receive_data(bytes(wire))
        receiver.decrypt_available()
    except RemoteProtocolError:
        pass


@given(st.lists(st.binary(max_size=120), max_size=4))
def test_garbage_handshake_only_raises_remote_protocol_error(chunks: list[bytes]) -> None:
    for make in (_fresh_initiator, _fresh_responder):
        side = make()
        try:
            for chunk in chunks:
                side.receive_data(chunk)
                side.next_event()
        except RemoteProtocolError:
            pass


def _fresh_initiator() -> NoiseHandshake:
    return make_pair()[0]


def _fresh_responder() -> NoiseHandshake:
    return make_pair()[1]


@given(st.data())
def test_mutated_handshake_only_raises_remote_protocol_error(data: st.DataObject) -> None:
    initiator, responder = make_pair()
    responder.receive_data(initiator.data_to_send())
    responder.next_event()
    msg2 = bytearray(responder.data_to_send())
    index = data.draw(st.integers(0, len(msg2) - 1))
    msg2[index] ^= data.draw(st.integers(1, 255))
    try:
        initiator.receive_data(bytes(msg2))
        initiator.next_event()
    except RemoteProtocolError:
        pass


def test_signature_prefix() -> None:
    assert SIGNATURE_PREFIX == b"noise-libp2p-static-key:"
    assert len(SIGNATURE_PREFIX) == 24
    assert MAX_PLAINTEXT_LENGTH == 65519
