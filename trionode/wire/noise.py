"""Noise_XX_25519_ChaChaPoly_SHA256 with libp2p handshake payloads, sans-IO.

Theory of operation
-------------------
Three layers, each usable (and tested) on its own:

1. :class:`CipherState`, :class:`SymmetricState` and :class:`XXHandshakeState` are the Noise
   spec (rev 34) objects for the XX pattern, with no framing and no libp2p payload logic::

       -> e                   msg1 = e.pub(32) || payload (plaintext; libp2p sends none)
       <- e, ee, s, es        msg2 = e.pub(32) || enc(s)(48) || enc(payload)
       -> s, se               msg3 = enc(s)(48) || enc(payload)

   The protocol name is exactly 32 bytes, so it *is* the initial ``h``; the empty prologue is
   still mixed in. Nonces are 4 zero bytes then a little-endian 64-bit counter.

2. :class:`NoiseHandshake` is the libp2p handshake as an h11-style machine
   (``receive_data`` / ``next_event`` / ``data_to_send``). Every handshake message is framed as
   ``uint16 BE length || message``. The responder puts its ``NoiseHandshakePayload`` (identity
   public key + signature over ``"noise-libp2p-static-key:" || noise static pub``) in msg2,
   the initiator in msg3. Each side verifies the other's signature against the static key
   received in the *same* handshake and derives the remote PeerId; the initiator also checks
   it against the PeerId it dialled. The single event is :class:`HandshakeComplete`.

3. :class:`NoiseTransport` is the post-handshake channel: ``encrypt`` turns plaintext into
   length-framed ChaCha20-Poly1305 frames of at most :data:`MAX_PLAINTEXT_LENGTH` plaintext
   bytes each; ``receive_data`` + ``next_message`` parse and decrypt incoming frames.

Randomness (static and ephemeral X25519 keys) is injectable so tests are deterministic.
Anything the peer gets wrong — bad MAC, bad signature, short or oversized frames, low-order
points — raises :class:`~trionode.errors.RemoteProtocolError`; the connection must then be
closed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.buffer import ReceiveBuffer
from trionode.wire.keys import PeerId, PrivateKey, PublicKey
from trionode.wire.varint import BytesLike

NOISE_PROTOCOL_ID = "/noise"
"""The multistream-select id of this security protocol."""

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"

DH_LENGTH = 32
HASH_LENGTH = 32
TAG_LENGTH = 16

MAX_MESSAGE_LENGTH = 65535
"""Largest Noise message (handshake or transport), set by the 2-byte length prefix."""

MAX_PLAINTEXT_LENGTH = MAX_MESSAGE_LENGTH - TAG_LENGTH
"""Most plaintext bytes one transport frame carries (65519); size yamux bodies to fit."""

FRAME_HEADER_LENGTH = 2
"""The ``uint16 BE`` length before every Noise message."""

FRAME_OVERHEAD = FRAME_HEADER_LENGTH + TAG_LENGTH
"""Bytes one transport frame adds to its plaintext (length prefix + tag)."""

SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
"""Prefix of the data the identity key signs (followed by the Noise static public key)."""

DEFAULT_MAX_BUFFER_SIZE = 1 << 20
"""Default cap on received-but-unparsed bytes (must exceed one frame plus one read)."""

MAX_STREAM_MUXERS = 32
"""Most ``stream_muxers`` extension entries accepted from a peer."""

_MAX_NONCE = (1 << 64) - 1  # reserved by the Noise spec: a cipher must stop before it
_NONCE = struct.Struct("<4xQ")
_FRAME_LENGTH = struct.Struct(">H")


# -- Noise primitives ---------------------------------------------------------------------------


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hkdf2(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    temp = hmac.digest(chaining_key, input_key_material, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    out2 = hmac.digest(temp, out1 + b"\x02", "sha256")
    return out1, out2


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # cryptography refuses all-zero shared secrets (low-order points).
        raise RemoteProtocolError("invalid X25519 public key from peer") from None


def x25519_public_key(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) for a 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


class CipherState:
    """A ChaCha20-Poly1305 key with its nonce counter (Noise ``CipherState``)."""

    __slots__ = ("_aead", "nonce")

    def __init__(self, key: bytes | None = None) -> None:
        """Create with ``key`` (32 bytes) or, with ``None``, no key (pass-through)."""
        self._aead = None if key is None else ChaCha20Poly1305(key)
        self.nonce = 0
        """The counter for the next encryption/decryption."""

    @property
    def has_key(self) -> bool:
        """Whether a key is set (otherwise data passes through unencrypted)."""
        return self._aead is not None

    def encrypt_with_ad(self, ad: bytes | None, plaintext: BytesLike) -> bytes:
        """Encrypt ``plaintext`` with associated data ``ad`` and advance the nonce.

        Raises:
            LocalProtocolError: the nonce space is exhausted.
        """
        if self._aead is None:
            return bytes(plaintext)
        if self.nonce >= _MAX_NONCE:
            raise LocalProtocolError("Noise nonce exhausted")
        ciphertext = self._aead.encrypt(_NONCE.pack(self.nonce), plaintext, ad)
        self.nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes | None, ciphertext: BytesLike) -> bytes:
        """Decrypt and authenticate ``ciphertext``; the nonce advances only on success.

        Raises:
            RemoteProtocolError: authentication failed, or the nonce space is exhausted.
        """
        if self._aead is None:
            return bytes(ciphertext)
        if self.nonce >= _MAX_NONCE:
            raise RemoteProtocolError("Noise nonce exhausted")
        try:
            plaintext = self._aead.decrypt(_NONCE.pack(self.nonce), ciphertext, ad)
        except InvalidTag:
            raise RemoteProtocolError("Noise message failed authentication") from None
        self.nonce += 1
        return plaintext


class SymmetricState:
    """Noise ``SymmetricState``: chaining key, handshake hash and the handshake cipher."""

    __slots__ = ("_chaining_key", "_cipher", "_hash")

    def __init__(self, protocol_name: bytes = PROTOCOL_NAME) -> None:
        """Initialise from the protocol name (used as-is when exactly 32 bytes)."""
        if len(protocol_name) <= HASH_LENGTH:
            self._hash = protocol_name.ljust(HASH_LENGTH, b"\x00")
        else:
            self._hash = _hash(protocol_name)
        self._chaining_key = self._hash
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        """The current ``h`` (after the last message: the channel-binding handshake hash)."""
        return self._hash

    def mix_key(self, input_key_material: bytes) -> None:
        """``ck, k = HKDF(ck, ikm)``; the handshake cipher restarts at nonce 0 with ``k``."""
        self._chaining_key, key = _hkdf2(self._chaining_key, input_key_material)
        self._cipher = CipherState(key)

    def mix_hash(self, data: BytesLike) -> None:
        """``h = SHA256(h || data)``."""
        self._hash = _hash(self._hash + bytes(data))

    def encrypt_and_hash(self, plaintext: BytesLike) -> bytes:
        """Encrypt with ``ad = h`` (if a key is set), then mix the ciphertext into ``h``."""
        ciphertext = self._cipher.encrypt_with_ad(self._hash, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: BytesLike) -> bytes:
        """Decrypt with ``ad = h`` (if a key is set), then mix the ciphertext into ``h``."""
        plaintext = self._cipher.decrypt_with_ad(self._hash, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport ciphers: (initiator→responder, responder→initiator)."""
        key1, key2 = _hkdf2(self._chaining_key, b"")
        return CipherState(key1), CipherState(key2)


class XXHandshakeState:
    """The bare XX handshake (Noise ``HandshakeState``): payload bytes in, messages out.

    The initiator calls ``write_message``, ``read_message``, ``write_message``; the responder
    ``read_message``, ``write_message``, ``read_message``. Messages are unframed.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static_key: bytes,
        ephemeral_key: bytes,
        prologue: bytes = b"",
    ) -> None:
        """Prepare a handshake.

        Args:
            initiator: our role.
            static_key: our 32-byte X25519 static private key.
            ephemeral_key: our 32-byte X25519 ephemeral private key (random in production).
            prologue: data both sides must agree on (libp2p uses none).
        """
        self._initiator = initiator
        self._static = X25519PrivateKey.from_private_bytes(static_key)
        self._static_public = self._static.public_key().public_bytes_raw()
        self._ephemeral = X25519PrivateKey.from_private_bytes(ephemeral_key)
        self._ephemeral_public = self._ephemeral.public_key().public_bytes_raw()
        self._remote_ephemeral: bytes | None = None
        self._remote_static: bytes | None = None
        self._symmetric = SymmetricState()
        self._symmetric.mix_hash(prologue)
        self._message_index = 0

    @property
    def initiator(self) -> bool:
        """Whether we are the initiator."""
        return self._initiator

    @property
    def static_public_key(self) -> bytes:
        """Our static X25519 public key."""
        return self._static_public

    @property
    def remote_static_public_key(self) -> bytes | None:
        """The peer's static X25519 public key, once received (msg2 or msg3)."""
        return self._remote_static

    @property
    def handshake_hash(self) -> bytes:
        """The handshake hash ``h``; final once :attr:`finished`."""
        return self._symmetric.handshake_hash

    @property
    def finished(self) -> bool:
        """Whether all three messages have been processed."""
        return self._message_index >= 3

    def _our_turn(self) -> bool:
        # Messages 0 and 2 go initiator -> responder; message 1 the other way.
        return (self._message_index % 2 == 0) == self._initiator

    def write_message(self, payload: BytesLike = b"") -> bytes:
        """Produce our next handshake message carrying ``payload``.

        Raises:
            LocalProtocolError: it is not our turn or the handshake is finished.
        """
        if self.finished or not self._our_turn():
            raise LocalProtocolError("not our turn to write a handshake message")
        sym = self._symmetric
        out = bytearray()
        index = self._message_index
        if index == 0:  # -> e
            out += self._ephemeral_public
            sym.mix_hash(self._ephemeral_public)
        elif index == 1:  # <- e, ee, s, es
            assert self._remote_ephemeral is not None
            out += self._ephemeral_public
            sym.mix_hash(self._ephemeral_public)
            sym.mix_key(_dh(self._ephemeral, self._remote_ephemeral))
            out += sym.encrypt_and_hash(self._static_public)
            sym.mix_key(_dh(self._static, self._remote_ephemeral))
        else:  # -> s, se
            assert self._remote_ephemeral is not None
            out += sym.encrypt_and_hash(self._static_public)
            sym.mix_key(_dh(self._static, self._remote_ephemeral))
        out += sym.encrypt_and_hash(payload)
        self._message_index += 1
        return bytes(out)

    def read_message(self, message: BytesLike) -> bytes:
        """Process the peer's next handshake message and return its payload.

        Raises:
            LocalProtocolError: it is not the peer's turn.
            RemoteProtocolError: the message is too short, fails authentication, or holds
                an invalid public key.
        """
        if self.finished or self._our_turn():
            raise LocalProtocolError("not the peer's turn to send a handshake message")
        sym = self._symmetric
        data = memoryview(bytes(message))
        index = self._message_index
        encrypted_key_length = DH_LENGTH + TAG_LENGTH
        if index == 0:  # -> e
            if len(data) < DH_LENGTH:
                raise RemoteProtocolError("Noise msg1 is too short")
            self._remote_ephemeral = bytes(data[:DH_LENGTH])
            sym.mix_hash(self._remote_ephemeral)
            rest = data[DH_LENGTH:]
        elif index == 1:  # <- e, ee, s, es
            if len(data) < DH_LENGTH + encrypted_key_length + TAG_LENGTH:
                raise RemoteProtocolError("Noise msg2 is too short")
            self._remote_ephemeral = bytes(data[:DH_LENGTH])
            sym.mix_hash(self._remote_ephemeral)
            sym.mix_key(_dh(self._ephemeral, self._remote_ephemeral))
            end = DH_LENGTH + encrypted_key_length
            self._remote_static = sym.decrypt_and_hash(data[DH_LENGTH:end])
            sym.mix_key(_dh(self._ephemeral, self._remote_static))
            rest = data[end:]
        else:  # -> s, se
            if len(data) < encrypted_key_length + TAG_LENGTH:
                raise RemoteProtocolError("Noise msg3 is too short")
            assert self._remote_ephemeral is not None
            self._remote_static = sym.decrypt_and_hash(data[:encrypted_key_length])
            sym.mix_key(_dh(self._ephemeral, self._remote_static))
            rest = data[encrypted_key_length:]
        payload = sym.decrypt_and_hash(rest)
        self._message_index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """Our transport ciphers as ``(send, receive)``.

        Raises:
            LocalProtocolError: the handshake is not finished.
        """
        if not self.finished:
            raise LocalProtocolError("handshake is not finished")
        initiator_to_responder, responder_to_initiator = self._symmetric.split()
        if self._initiator:
            return initiator_to_responder, responder_to_initiator
        return responder_to_initiator, initiator_to_responder


# -- libp2p handshake payload -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakePayload:
    """The libp2p ``NoiseHandshakePayload`` protobuf."""

    identity_key: bytes
    """The sender's serialized ``PublicKey`` protobuf."""
    identity_sig: bytes
    """Signature of ``SIGNATURE_PREFIX || noise static public key`` by the identity key."""
    stream_muxers: tuple[str, ...] = ()
    """``extensions.stream_muxers`` (inlined muxer negotiation); empty when absent."""

    def encode(self) -> bytes:
        """Serialize (fields 1, 2 and, if there are muxers, 4)."""
        out = protobuf.encode_bytes_field(1, self.identity_key) + protobuf.encode_bytes_field(
            2, self.identity_sig
        )
        if self.stream_muxers:
            extensions = b"".join(protobuf.encode_string_field(2, m) for m in self.stream_muxers)
            out += protobuf.encode_bytes_field(4, extensions)
        return out

    @classmethod
    def decode(cls, data: BytesLike) -> HandshakePayload:
        """Parse; unknown fields and unknown extensions are ignored.

        Raises:
            RemoteProtocolError: malformed, or identity key / signature missing.
        """
        message = protobuf.decode_message(data, max_size=MAX_MESSAGE_LENGTH)
        identity_key = message.get_bytes(1)
        identity_sig = message.get_bytes(2)
        if identity_key is None or identity_sig is None:
            raise RemoteProtocolError("Noise handshake payload lacks identity key or signature")
        muxers: tuple[str, ...] = ()
        extensions = message.get_bytes(4)
        if extensions is not None:
            decoded = protobuf.decode_message(extensions, max_size=MAX_MESSAGE_LENGTH)
            muxers = tuple(decoded.get_repeated_str(2, max_count=MAX_STREAM_MUXERS))
        return cls(identity_key, identity_sig, muxers)

    @classmethod
    def create(
        cls, identity: PrivateKey, static_public_key: bytes, stream_muxers: Sequence[str] = ()
    ) -> HandshakePayload:
        """Sign ``static_public_key`` with ``identity``."""
        return cls(
            identity.public_key.to_protobuf(),
            identity.sign(SIGNATURE_PREFIX + static_public_key),
            tuple(stream_muxers),
        )

    def verify(self, remote_static_public_key: bytes) -> PublicKey:
        """Check the signature over the peer's Noise static key; return its identity key.

        Raises:
            RemoteProtocolError: the key is malformed or unsupported, or the signature is bad.
        """
        public_key = PublicKey.from_protobuf(self.identity_key)
        if not public_key.verify(self.identity_sig, SIGNATURE_PREFIX + remote_static_public_key):
            raise RemoteProtocolError("Noise handshake signature is invalid")
        return public_key


# -- libp2p handshake machine -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The handshake succeeded; call :meth:`NoiseHandshake.into_transport` next."""

    remote_peer_id: PeerId
    remote_public_key: PublicKey
    remote_static_key: bytes
    """The peer's Noise static X25519 public key."""
    handshake_hash: bytes
    """The final handshake hash (usable as a channel binding)."""
    remote_stream_muxers: tuple[str, ...]
    """Muxers the peer offered in its payload extensions (empty if none: use mss)."""


def frame_message(message: BytesLike) -> bytes:
    """Prefix a Noise message with its ``uint16 BE`` length.

    Raises:
        LocalProtocolError: the message is longer than 65535 bytes.
    """
    if len(message) > MAX_MESSAGE_LENGTH:
        raise LocalProtocolError(f"Noise message of {len(message)} bytes is too long")
    return _FRAME_LENGTH.pack(len(message)) + bytes(message)


def _consume_frame(buffer: ReceiveBuffer) -> memoryview | None:
    if len(buffer) < FRAME_HEADER_LENGTH:
        return None
    (length,) = _FRAME_LENGTH.unpack(buffer.peek(FRAME_HEADER_LENGTH))
    whole = buffer.consume_exactly(FRAME_HEADER_LENGTH + length)
    if whole is None:
        return None
    return memoryview(whole)[FRAME_HEADER_LENGTH:]  # the body, without copying it again


class NoiseHandshake:
    """The libp2p Noise handshake for one connection, in either role.

    The initiator's msg1 is ready in :meth:`data_to_send` right after construction. Feed
    received bytes to :meth:`receive_data`, then call :meth:`next_event` until it returns
    ``None``; after each call, write :meth:`data_to_send`. On :class:`HandshakeComplete`
    (after the initiator has written msg3), switch to :meth:`into_transport`.
    """

    def __init__(
        self,
        identity: PrivateKey,
        *,
        initiator: bool,
        expected_peer_id: PeerId | None = None,
        static_key: bytes | None = None,
        ephemeral_key: bytes | None = None,
        stream_muxers: Sequence[str] = (),
        rng: Callable[[int], bytes] = os.urandom,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
    ) -> None:
        """Start a handshake.

        Args:
            identity: our libp2p identity key, which signs our Noise static key.
            initiator: True on the dialing side.
            expected_peer_id: the PeerId we dialled (initiator); a different remote identity
                is rejected.
            static_key: our X25519 static private key; fresh from ``rng`` if omitted. Never
                store it on disk.
            ephemeral_key: our X25519 ephemeral private key; fresh from ``rng`` if omitted
                (pass one only in tests).
            stream_muxers: muxers to offer in the payload extensions; empty (the default)
                sends no extensions, so the muxer is negotiated with mss afterwards.
            rng: source of random bytes for keys that were not given.
            max_buffer_size: cap on received-but-unparsed bytes.
        """
        if expected_peer_id is not None and not initiator:
            raise LocalProtocolError("only the initiator knows whom it expects")
        self._identity = identity
        self._expected_peer_id = expected_peer_id
        self._state = XXHandshakeState(
            initiator=initiator,
            static_key=rng(DH_LENGTH) if static_key is None else static_key,
            ephemeral_key=rng(DH_LENGTH) if ephemeral_key is None else ephemeral_key,
        )
        self._payload = HandshakePayload.create(
            identity, self._state.static_public_key, stream_muxers
        ).encode()
        self._buffer = ReceiveBuffer(max_buffer_size)
        self._outgoing = bytearray()
        self._result: HandshakeComplete | None = None
        self._event_pending = False
        self._eof = False
        self._transport_taken = False
        if initiator:
            self._outgoing += frame_message(self._state.write_message(b""))

    @property
    def initiator(self) -> bool:
        """Whether we are the initiator."""
        return self._state.initiator

    @property
    def result(self) -> HandshakeComplete | None:
        """The completion event once the handshake has succeeded, else ``None``."""
        return self._result

    def receive_data(self, data: BytesLike) -> None:
        """Feed bytes from the peer; ``b""`` signals end of file.

        Raises:
            LocalProtocolError: the handshake is complete (feed the transport instead), or
                data follows EOF.
            RemoteProtocolError: the buffer cap was exceeded.
        """
        if self._result is not None:
            raise LocalProtocolError("handshake complete: feed the transport")
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """Return (and forget) the handshake bytes to write to the peer."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def next_event(self) -> HandshakeComplete | None:
        """Process buffered handshake messages.

        Returns:
            :class:`HandshakeComplete` exactly once, when the handshake succeeds; otherwise
            ``None`` (more data needed, or already reported).

        Raises:
            RemoteProtocolError: a malformed message, failed authentication, a bad identity
                signature, an unexpected PeerId, or EOF before completion.
        """
        while self._result is None:
            message = _consume_frame(self._buffer)
            if message is None:
                if self._eof:
                    raise RemoteProtocolError("peer closed the connection during Noise handshake")
                return None
            self._on_message(message)
        if self._event_pending:
            self._event_pending = False
            return self._result
        return None

    def _on_message(self, message: memoryview) -> None:
        state = self._state
        payload = state.read_message(message)
        if state.initiator:
            # msg2 received: verify the responder, then answer with msg3 and our payload.
            remote = self._verify(payload)
            self._outgoing += frame_message(state.write_message(self._payload))
            self._complete(*remote)
        elif state.finished:
            # msg3 received.
            self._complete(*self._verify(payload))
        else:
            # msg1 received (its payload is ignored): answer with msg2.
            self._outgoing += frame_message(state.write_message(self._payload))

    def _verify(self, payload_bytes: bytes) -> tuple[PublicKey, PeerId, tuple[str, ...]]:
        remote_static = self._state.remote_static_public_key
        assert remote_static is not None
        payload = HandshakePayload.decode(payload_bytes)
        remote_key = payload.verify(remote_static)
        remote_peer_id = remote_key.peer_id()
        if self._expected_peer_id is not None and remote_peer_id != self._expected_peer_id:
            raise RemoteProtocolError(
                f"dialled {self._expected_peer_id} but the peer is {remote_peer_id}"
            )
        return remote_key, remote_peer_id, payload.stream_muxers

    def _complete(
        self, remote_key: PublicKey, remote_peer_id: PeerId, stream_muxers: tuple[str, ...]
    ) -> None:
        # Called once the last handshake message is processed, so `h` is final.
        remote_static = self._state.remote_static_public_key
        assert remote_static is not None
        assert self._state.finished
        self._result = HandshakeComplete(
            remote_peer_id=remote_peer_id,
            remote_public_key=remote_key,
            remote_static_key=remote_static,
            handshake_hash=self._state.handshake_hash,
            remote_stream_muxers=stream_muxers,
        )
        self._event_pending = True

    def into_transport(self, *, max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE) -> NoiseTransport:
        """The transport for the rest of the connection; can be called once.

        Bytes already received past the last handshake message (the initiator may pipeline
        transport frames with msg3) are moved into the transport. The initiator must still
        write :meth:`data_to_send` (msg3) before any transport frame.

        Raises:
            LocalProtocolError: the handshake is not complete, or the transport was taken.
        """
        if self._result is None:
            raise LocalProtocolError("Noise handshake is not complete")
        if self._transport_taken:
            raise LocalProtocolError("transport already taken")
        self._transport_taken = True
        send, receive = self._state.split()
        transport = NoiseTransport(send, receive, max_buffer_size=max_buffer_size)
        leftover = self._buffer.consume_all()
        if leftover:
            transport.receive_data(leftover)
        return transport


# -- transport ----------------------------------------------------------------------------------


class NoiseTransport:
    """The encrypted channel after the handshake: plaintext <-> length-framed AEAD frames."""

    __slots__ = ("_buffer", "_eof", "_receive", "_send")

    def __init__(
        self,
        send_cipher: CipherState,
        receive_cipher: CipherState,
        *,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
    ) -> None:
        """Wrap the two transport ciphers from :meth:`XXHandshakeState.split`."""
        if max_buffer_size < FRAME_HEADER_LENGTH + MAX_MESSAGE_LENGTH:
            raise LocalProtocolError("buffer must hold at least one full frame")
        self._send = send_cipher
        self._receive = receive_cipher
        self._buffer = ReceiveBuffer(max_buffer_size)
        self._eof = False

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet decrypted (an incomplete frame, or frames not yet read)."""
        return len(self._buffer)

    @property
    def send_nonce(self) -> int:
        """Frames encrypted so far."""
        return self._send.nonce

    @property
    def receive_nonce(self) -> int:
        """Frames decrypted so far."""
        return self._receive.nonce

    def encrypt(self, plaintext: BytesLike) -> bytes:
        """Encrypt ``plaintext`` into as many frames as needed, ready to write in one go.

        Each frame carries at most :data:`MAX_PLAINTEXT_LENGTH` bytes; empty plaintext
        yields one empty (tag-only) frame.
        """
        view = memoryview(plaintext)
        total = len(view)
        if total <= MAX_PLAINTEXT_LENGTH:
            ciphertext = self._send.encrypt_with_ad(None, view)
            return _FRAME_LENGTH.pack(len(ciphertext)) + ciphertext
        parts: list[bytes] = []
        for start in range(0, total, MAX_PLAINTEXT_LENGTH):
            ciphertext = self._send.encrypt_with_ad(
                None, view[start : start + MAX_PLAINTEXT_LENGTH]
            )
            parts.append(_FRAME_LENGTH.pack(len(ciphertext)))
            parts.append(ciphertext)
        return b"".join(parts)

    def receive_data(self, data: BytesLike) -> None:
        """Feed ciphertext bytes from the peer (any chunking); ``b""`` signals EOF.

        Drain :meth:`next_message` before feeding more: the buffer is capped.

        Raises:
            LocalProtocolError: data follows EOF.
            RemoteProtocolError: the buffer cap was exceeded.
        """
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        self._buffer.feed(data)

    def next_message(self) -> bytes | None:
        """Decrypt the next complete frame.

        Returns:
            Its plaintext (``b""`` for an empty frame), or ``None`` if no complete frame is
            buffered.

        Raises:
            RemoteProtocolError: the frame fails authentication or is shorter than a tag, or
                EOF arrived in the middle of a frame.
        """
        message = _consume_frame(self._buffer)
        if message is None:
            if self._eof and self._buffer:
                raise RemoteProtocolError("connection closed in the middle of a Noise frame")
            return None
        if len(message) < TAG_LENGTH:
            raise RemoteProtocolError("Noise transport frame is shorter than its tag")
        return self._receive.decrypt_with_ad(None, message)

    def decrypt_available(self) -> bytes:
        """Decrypt every complete buffered frame and return the joined plaintext."""
        chunks: list[bytes] = []
        while (message := self.next_message()) is not None:
            chunks.append(message)
        return b"".join(chunks)
