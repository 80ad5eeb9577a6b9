from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from tests.wire.strategies import chunkings
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.multistream import (
    MULTISTREAM_PROTOCOL,
    Event,
    MultistreamDialer,
    MultistreamListener,
    NegotiationFailed,
    ProtocolAgreed,
    ProtocolRejected,
    encode_ls_response,
    encode_message,
)

HEADER = bytes.fromhex("13") + b"/multistream/1.0.0\n"
NOISE = bytes.fromhex("07") + b"/noise\n"
YAMUX = bytes.fromhex("0d") + b"/yamux/1.0.0\n"
NA = bytes.fromhex("03") + b"na\n"

Side = MultistreamDialer | MultistreamListener


def drain(side: Side) -> list[Event]:
    events: list[Event] = []
    while (event := side.next_event()) is not None:
        events.append(event)
    return events


def converse(
    dialer: MultistreamDialer, listener: MultistreamListener
) -> tuple[list[Event], list[Event]]:
    """Shuttle bytes both ways until neither side has anything to send."""
    dialer_events: list[Event] = []
    listener_events: list[Event] = []
    for _ in range(100):
        to_listener = dialer.data_to_send()
        to_dialer = listener.data_to_send()
        if not to_listener and not to_dialer:
            break
        if to_listener and not listener.finished:
            listener.receive_data(to_listener)
            listener_events += drain(listener)
        if to_dialer and not dialer.finished:
            dialer.receive_data(to_dialer)
            dialer_events += drain(dialer)
    return dialer_events, listener_events


@pytest.mark.parametrize(
    ("text", "hex_"),
    [
        (MULTISTREAM_PROTOCOL, "132f6d756c746973747265616d2f312e302e300a"),
        ("/noise", "072f6e6f6973650a"),
        ("/yamux/1.0.0", "0d2f79616d75782f312e302e300a"),
        ("na", "036e610a"),
        ("ls", "036c730a"),
        ("/ipfs/ping/1.0.0", "112f697066732f70696e672f312e302e300a"),
        ("/ipfs/id/1.0.0", "0f2f697066732f69642f312e302e300a"),
        ("/meshsub/1.1.0", "0f2f6d6573687375622f312e312e300a"),
    ],
)
def test_message_vectors(text: str, hex_: str) -> None:
    assert encode_message(text) == bytes.fromhex(hex_)


@pytest.mark.parametrize("text", ["", "a\nb", "x" * 1024])
def test_encode_invalid(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(text)


def test_dialer_pipelines_header_and_proposal() -> None:
    dialer = MultistreamDialer(["/noise"])
    assert dialer.data_to_send() == HEADER + NOISE
    assert dialer.data_to_send() == b""
    assert dialer.next_event() is None
    dialer.receive_data(HEADER + NOISE + b"\x00\x20rest")
    assert dialer.next_event() == ProtocolAgreed("/noise")
    assert dialer.next_event() is None
    assert dialer.agreed_protocol == "/noise"
    assert dialer.finished
    assert dialer.trailing_data == b"\x00\x20rest"
    with pytest.raises(LocalProtocolError):
        dialer.receive_data(b"more")


def test_dialer_without_pipelining_waits_for_header() -> None:
    dialer = MultistreamDialer(["/noise"], pipeline=False)
    assert dialer.data_to_send() == HEADER
    dialer.receive_data(HEADER[:5])
    assert dialer.next_event() is None
    assert dialer.data_to_send() == b""
    dialer.receive_data(HEADER[5:])
    assert dialer.next_event() is None
    assert dialer.data_to_send() == NOISE
    dialer.receive_data(NOISE)
    assert dialer.next_event() == ProtocolAgreed("/noise")


def test_listener_sends_header_at_once_and_keeps_trailing_data() -> None:
    listener = MultistreamListener(["/noise", "/yamux/1.0.0"])
    assert listener.data_to_send() == HEADER
    # js dialer: header + proposal + first protocol bytes in one segment
    listener.receive_data(HEADER + YAMUX + b"\x00\x00app")
    assert listener.next_event() == ProtocolAgreed("/yamux/1.0.0")
    assert listener.next_event() is None
    assert listener.data_to_send() == YAMUX
    assert listener.trailing_data == b"\x00\x00app"


@pytest.mark.parametrize("pipeline", [True, False])
def test_pair_agrees(pipeline: bool) -> None:
    dialer = MultistreamDialer(["/yamux/1.0.0"], pipeline=pipeline)
    listener = MultistreamListener(["/mplex/6.7.0", "/yamux/1.0.0"])
    dialer_events, listener_events = converse(dialer, listener)
    assert dialer_events == [ProtocolAgreed("/yamux/1.0.0")]
    assert listener_events == [ProtocolAgreed("/yamux/1.0.0")]
    assert dialer.trailing_data == listener.trailing_data == b""


def test_pair_rejection_then_agreement() -> None:
    dialer = MultistreamDialer(["/tls/1.0.0", "/noise"])
    listener = MultistreamListener(["/noise"])
    dialer_events, listener_events = converse(dialer, listener)
    assert dialer_events == [ProtocolRejected("/tls/1.0.0"), ProtocolAgreed("/noise")]
    assert listener_events == [ProtocolRejected("/tls/1.0.0"), ProtocolAgreed("/noise")]


def test_pair_all_rejected() -> None:
    dialer = MultistreamDialer(["/a", "/b"])
    listener = MultistreamListener(["/c"])
    dialer_events, listener_events = converse(dialer, listener)
    assert dialer_events == [
        ProtocolRejected("/a"),
        ProtocolRejected("/b"),
        NegotiationFailed(("/a", "/b")),
    ]
    assert listener_events == [ProtocolRejected("/a"), ProtocolRejected("/b")]
    assert dialer.finished
    assert dialer.agreed_protocol is None
    assert not listener.finished


def test_dialer_rejection_wire_bytes() -> None:
    dialer = MultistreamDialer(["/tls/1.0.0", "/noise"])
    dialer.data_to_send()
    dialer.receive_data(HEADER + NA)
    assert dialer.next_event() == ProtocolRejected("/tls/1.0.0")
    assert dialer.data_to_send() == NOISE
    assert dialer.proposed_protocol == "/noise"


def test_ls_refused_by_default() -> None:
    listener = MultistreamListener(["/noise"])
    listener.data_to_send()
    listener.receive_data(HEADER + encode_message("ls"))
    assert listener.next_event() is None
    assert listener.data_to_send() == NA


def test_ls_answered() -> None:
    listener = MultistreamListener(["/noise", "/tls/1.0.0"], answer_ls=True)
    listener.data_to_send()
    listener.receive_data(HEADER + encode_message("ls") + NOISE)
    assert listener.next_event() == ProtocolAgreed("/noise")
    reply = listener.data_to_send()
    assert reply == encode_ls_response(["/noise", "/tls/1.0.0"]) + NOISE
    inner = encode_message("/noise") + encode_message("/tls/1.0.0")
    assert reply.startswith(bytes([len(inner) + 1]) + inner + b"\n")


def test_listener_attempt_limit() -> None:
    listener = MultistreamListener(["/noise"], max_attempts=2)
    listener.receive_data(HEADER + encode_message("/a") + encode_message("/b"))
    assert drain(listener) == [ProtocolRejected("/a"), ProtocolRejected("/b")]
    listener.receive_data(encode_message("/c"))
    with pytest.raises(RemoteProtocolError, match="proposals"):
        listener.next_event()


@pytest.mark.parametrize(
    "wire",
    [
        NOISE,  # no header
        encode_message("/multistream/2.0.0"),
        b"\x02ab",  # missing newline
        b"\x01\n",  # empty message
        b"\x03\xff\xfe\n",  # not UTF-8
        b"\x82\x08",  # 1026 > 1024
        b"\x80\x00",  # non-minimal varint
    ],
)
def test_listener_rejects_malformed(wire: bytes) -> None:
    listener = MultistreamListener(["/noise"])
    listener.receive_data(wire)
    with pytest.raises(RemoteProtocolError):
        listener.next_event()


def test_max_length_message_is_accepted() -> None:
    listener = MultistreamListener(["/" + "x" * 1022])
    listener.receive_data(HEADER + b"\x80\x08")  # declares exactly 1024 bytes
    assert listener.next_event() is None
    listener.receive_data(b"/" + b"x" * 1022 + b"\n")
    assert listener.next_event() == ProtocolAgreed("/" + "x" * 1022)


def test_newline_inside_message_rejected() -> None:
    listener = MultistreamListener(["/noise"])
    listener.receive_data(HEADER + b"\x04a\nb\n")
    with pytest.raises(RemoteProtocolError, match="newline"):
        listener.next_event()


def test_dialer_rejects_unexpected_answer() -> None:
    dialer = MultistreamDialer(["/noise"])
    dialer.receive_data(HEADER + YAMUX)
    with pytest.raises(RemoteProtocolError, match="answered"):
        dialer.next_event()


def test_eof_during_negotiation() -> None:
    dialer = MultistreamDialer(["/noise"])
    dialer.receive_data(HEADER[:3])
    dialer.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        dialer.next_event()
    with pytest.raises(LocalProtocolError):
        dialer.receive_data(b"x")


def test_eof_after_complete_messages_still_yields_events() -> None:
    listener = MultistreamListener(["/noise"])
    listener.receive_data(HEADER + NOISE)
    listener.receive_data(b"")
    assert listener.next_event() == ProtocolAgreed("/noise")


@pytest.mark.parametrize("protocols", [[], ["na"], ["ls"], [""], ["a\n"]])
def test_dialer_invalid_proposals(protocols: list[str]) -> None:
    with pytest.raises(LocalProtocolError):
        MultistreamDialer(protocols)


def test_buffer_cap() -> None:
    listener = MultistreamListener(["/noise"], max_buffer_size=64)
    with pytest.raises(RemoteProtocolError):
        listener.receive_data(b"\x00" * 65)


@given(st.data(), st.binary(max_size=40))
def test_listener_under_arbitrary_chunking(data: st.DataObject, trailing: bytes) -> None:
    wire = HEADER + encode_message("/tls/1.0.0") + encode_message("ls") + YAMUX + trailing
    listener = MultistreamListener(["/yamux/1.0.0"])
    events: list[Event] = []
    fed = b""
    for chunk in data.draw(chunkings(wire)):
        if listener.finished:
            break
        listener.receive_data(chunk)
        fed += chunk
        events += drain(listener)
    assert events == [ProtocolRejected("/tls/1.0.0"), ProtocolAgreed("/yamux/1.0.0")]
    assert listener.trailing_data == fed[len(wire) - len(trailing) :]
    assert listener.data_to_send() == HEADER + NA + NA + YAMUX


@given(st.data(), st.binary(max_size=40))
def test_dialer_under_arbitrary_chunking(data: st.DataObject, trailing: bytes) -> None:
    wire = HEADER + NA + NOISE + trailing
    dialer = MultistreamDialer(["/tls/1.0.0", "/noise"])
    events: list[Event] = []
    fed = b""
    for chunk in data.draw(chunkings(wire)):
        if dialer.finished:
            break
        dialer.receive_data(chunk)
        fed += chunk
        events += drain(dialer)
    assert events == [ProtocolRejected("/tls/1.0.0"), ProtocolAgreed("/noise")]
    assert dialer.trailing_data == fed[len(HEADER + NA + NOISE) :]
    assert dialer.data_to_send() == HEADER + encode_message("/tls/1.0.0") + NOISE


@given(st.lists(st.binary(max_size=30), max_size=6), st.booleans())
def test_garbage_only_raises_remote_protocol_error(chunks: list[bytes], as_dialer: bool) -> None:
    side: Side = MultistreamDialer(["/noise"]) if as_dialer else MultistreamListener(["/noise"])
    try:
        for chunk in chunks:
            if side.finished:
                break
            side.receive_data(chunk)
            drain(side)
    except RemoteProtocolError:
        pass


@given(st.data())
def test_mutated_valid_conversation(data: st.DataObject) -> None:
    wire = bytearray(HEADER + encode_message("/tls/1.0.0") + NOISE)
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(st.integers(0, 255))
    listener = MultistreamListener(["/noise"])
    try:
        listener.receive_data(bytes(wire))
        drain(listener)
    except RemoteProtocolError:
        pass
