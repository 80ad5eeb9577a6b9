"""App bundles: load, hash, sign, verify and import them.

A bundle is a directory, a `.tar.gz`/`.tar` or a `.zip` holding `manifest.json` and the
app's Python files:

    kv_store/
      manifest.json   {"name": "kv_store", "version": "0.1.0", "entry": "kv_store:app",
                       "description": "…", "signer": "<base58 Ed25519 key>",
                       "signature": "<base58 Ed25519 signature>"}
      kv_store.py     defines `app = App("kv_store")`

An archive may also wrap everything in one top-level directory. `__pycache__`, `*.pyc` and
hidden files (`.name`) are ignored everywhere, so a directory and an archive of it are the
same bundle. Path components are limited to `[A-Za-z0-9._-]`; absolute paths, `..`,
symlinks and other special files are refused, as are bundles over the `BundleLimits`.

**Application id** = SHA-256 of the canonical msgpack (sorted map keys) of
`["trionode/bundle/v1", manifest without "signature" (defaults omitted),
[[path, sha256(content)], … sorted by path]]`. It covers the signer but not the signature,
so signing does not change the id, and reformatting `manifest.json` does not either.

**Signature** = Ed25519 by `signer` over `b"trionode/bundle-signature/v1\\0" + app_id`.

**Trust** (`verify_bundle`): a signature that is present must be valid, always. Then the
bundle is accepted if its signer is trusted, or if the operator installed it locally
(`installed_locally=True`: the CLI/admin install path, never a bundle fetched from a peer);
unsigned bundles are accepted only in the latter case. `load_app` takes only the
`VerifiedBundle` this returns.

**Import** (`load_app`): bundle files are served from memory by a meta-path finder under a
package unique to the application id (`_trionode_app_<hex id>`), so two versions of an app
coexist in one process and nothing is written to disk. Modules inside a bundle import each
other with relative imports (`from .models import Message`). The import machinery is
process-wide, so this registry is the one piece of process-global state here; loading the
same application id twice returns the same `App`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import io
import json
import re
import stat
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Annotated, Any, Final, Literal

import attrs
import base58
import msgspec

from trionode.errors import RemoteProtocolError, TrionodeError
from trionode.sdk.app import App
from trionode.sdk.errors import AppDefinitionError
from trionode.wire.keys import PrivateKey, PublicKey

MANIFEST: Final = "manifest.json"
BUNDLE_FORMAT: Final = "trionode/bundle/v1"
SIGNATURE_DOMAIN: Final = b"trionode/bundle-signature/v1\x00"
PACKAGE_PREFIX: Final = "_trionode_app_"
MAX_SIGNER_TEXT: Final = 96
"""Longest `signer` accepted (hex is 64 characters, base58 at most 44): decoding a longer
string would only waste time on a hostile manifest."""
MAX_SIGNATURE_TEXT: Final = 160
"""Longest `signature` accepted (hex is 128 characters, base58 at most 88)."""

_COMPONENT = re.compile(r"[A-Za-z0-9_.-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRY = re.compile(rf"(?P<module>{_IDENT}(?:\.{_IDENT})*):(?P<attr>{_IDENT})")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_HASH_ENCODER: Final = msgspec.msgpack.Encoder(order="deterministic")


# -- errors ----------------------------------------------------------------------------


class BundleError(TrionodeError):
    """A bundle cannot be used; the message says why."""


class InvalidBundleError(BundleError):
    """Malformed: bad manifest, unsafe path, special file, over a size limit."""


class BundleSignatureError(BundleError):
    """The signature is missing where required, malformed, or does not match the bundle."""


class UntrustedBundleError(BundleError):
    """Validly signed (or unsigned) but neither from a trusted signer nor installed locally."""


class AppLoadError(BundleError):
    """The verified bundle's code could not be imported or is not a valid app."""


# -- model -----------------------------------------------------------------------------


@attrs.frozen
class BundleLimits:
    """Size limits applied while reading a bundle (before anything is hashed or run)."""

    max_files: int = 256
    max_file_bytes: int = 4 * 1024 * 1024
    max_total_bytes: int = 16 * 1024 * 1024
    """Sum of all file sizes, including ignored files (they are read past, too)."""
    max_path_length: int = 255
    max_manifest_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024
    """Largest tar extension header (GNU long name/link, pax), checked before it is read."""
    max_archive_overhead: int = 4 * 1024 * 1024
    """Uncompressed archive bytes allowed beyond `max_total_bytes` (headers, padding)."""

    @property
    def max_entries(self) -> int:
        """Archive entries (headers) read at most: a file may take a name and a pax header."""
        return 4 * self.max_files + 16


DEFAULT_LIMITS: Final = BundleLimits()


class Manifest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """`manifest.json`."""

    name: str
    version: str
    entry: str
    """`module:attr` naming the `App` object; `module` is dotted, relative to the bundle."""
    description: str = ""
    signer: Annotated[str, msgspec.Meta(max_length=MAX_SIGNER_TEXT)] | None = None
    """Ed25519 public key of the signer, base58 (or hex)."""
    signature: Annotated[str, msgspec.Meta(max_length=MAX_SIGNATURE_TEXT)] | None = None
    """Ed25519 signature over the bundle hash, base58 (or hex)."""
    blobs: Literal["on-read", "eager"] = "on-read"
    """When a member node fetches blobs the state references: on a call's first read, or
    as soon as an applied delta references one (see `trionode.sdk.blobs`)."""

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    @property
    def attr(self) -> str:
        return self.entry.partition(":")[2]


@attrs.frozen
class Bundle:
    """A bundle read into memory (nothing of it has run)."""

    manifest: Manifest
    files: Mapping[str, bytes]
    """Every file but the manifest, by POSIX path."""
    app_id: bytes
    """The canonical bundle hash: the application id."""
    source: str
    """Where it was read from (for messages)."""

    @property
    def app_id_base58(self) -> str:
        return str(base58.b58encode(self.app_id).decode())

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def manifest_json(self) -> bytes:
        """The manifest as pretty JSON (what `pack_bundle` stores)."""
        return msgspec.json.format(msgspec.json.encode(self.manifest), indent=2) + b"\n"

    def __repr__(self) -> str:
        return f"Bundle({self.name}@{self.version}, {self.app_id_base58}, {len(self.files)} files)"


@attrs.frozen
class VerifiedBundle:
    """A bundle `verify_bundle` accepted for execution on this node."""

    bundle: Bundle
    signer: bytes | None
    """The verified signer's public key, or None for an unsigned local install."""
    trust: Literal["trusted-signer", "local-install"]


# -- reading ---------------------------------------------------------------------------


def load_bundle(path: str | Path, *, limits: BundleLimits = DEFAULT_LIMITS) -> Bundle:
    """Read a bundle from a directory or an archive (`.tar.gz`, `.tgz`, `.tar`, `.zip`).

    Raises:
        InvalidBundleError: unreadable, malformed, unsafe or too large.
    """
    if "\0" in str(path):
        raise InvalidBundleError("the bundle path contains a NUL character")
    path = Path(path)
    try:
        # `is_dir` swallows only "no such file"-like errors: a name past NAME_MAX or
        # PATH_MAX raises, and must be a refused bundle like any unreadable path.
        if path.is_symlink() and path.is_dir():
            path = path.resolve()  # the bundle root may be a link; its contents may not
        is_directory = path.is_dir()
    except OSError as exc:
        raise InvalidBundleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if is_directory:
        raw = _collect(_read_directory(path, limits), str(path))
        return _assemble(raw, str(path), limits, strip_root=False)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # /dev/zero would be read forever
            raise InvalidBundleError(f"{path}: not a directory or a regular file")
        size = info.st_size
        if size > limits.max_total_bytes:
            raise InvalidBundleError(f"{path}: archive is {size} bytes, over the limit")
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidBundleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return read_bundle(data, source=str(path), limits=limits)


def read_bundle(
    data: bytes, *, source: str = "<bytes>", limits: BundleLimits = DEFAULT_LIMITS
) -> Bundle:
    """Read a bundle from archive bytes (e.g. a stored blob)."""
    if len(data) > limits.max_total_bytes:
        raise InvalidBundleError(f"{source}: archive is {len(data)} bytes, over the limit")
    if data[:2] == b"\x1f\x8b" or _is_plain_tar(data):
        raw = _collect(_read_tar(data, source, limits), source)
    elif data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        raw = _collect(_read_zip(data, source, limits), source)
    else:
        raise InvalidBundleError(f"{source}: not a directory, tar(.gz) or zip bundle")
    return _assemble(raw, source, limits, strip_root=True)


def _collect(entries: Iterator[tuple[str, bytes]], source: str) -> dict[str, bytes]:
    """Entries by path; an archive naming one path twice is refused (tools disagree on
    which copy wins, so a reviewer could be shown different code than the node runs)."""
    raw: dict[str, bytes] = {}
    for path, data in entries:
        if path in raw:
            raise InvalidBundleError(f"{source}: {path} appears twice")
        raw[path] = data
    return raw


def _is_plain_tar(data: bytes) -> bool:
    return data[257:262] == b"ustar"


class _Budget:
    """Counts files and bytes against the limits while reading."""

    def __init__(self, source: str, limits: BundleLimits) -> None:
        self.source = source
        self.limits = limits
        self.files = 0
        self.total = 0

    def charge(self, path: str, size: int) -> None:
        limits = self.limits
        self.files += 1
        self.total += size
        if self.files > limits.max_files + 1:  # + the manifest
            raise InvalidBundleError(f"{self.source}: more than {limits.max_files} files")
        if size > limits.max_file_bytes:
            raise InvalidBundleError(
                f"{self.source}: {path} is {size} bytes (limit {limits.max_file_bytes})"
            )
        if self.total > limits.max_total_bytes:
            raise InvalidBundleError(
                f"{self.source}: more than {limits.max_total_bytes} bytes in total"
            )


def _clean_path(name: str, source: str, limits: BundleLimits) -> str | None:
    """The normalised POSIX path of an entry, or None if it is to be ignored.

    Raises:
        InvalidBundleError: absolute, traversing, or with unsupported characters.
    """
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise InvalidBundleError(f"{source}: unsafe path {name!r} (absolute or non-POSIX)")
    while name.startswith("./"):
        name = name[2:]
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidBundleError(f"{source}: unsafe path {name!r} (path traversal)")
    if any(part.startswith(".") or part == "__pycache__" for part in parts) or name.endswith(
        ".pyc"
    ):
        return None
    clean = "/".join(parts)
    if len(clean) > limits.max_path_length or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise InvalidBundleError(
            f"{source}: unsupported path {name!r} (use letters, digits, `.`, `_`, `-`)"
        )
    return clean


def _read_directory(root: Path, limits: BundleLimits) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(str(root), limits)
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = sorted(directory.iterdir())
        except OSError as exc:
            raise InvalidBundleError(f"{directory}: cannot list: {exc.strerror}") from None
        for entry in entries:
            rel = entry.relative_to(root).as_posix()
            clean = _clean_path(rel, str(root), limits)
            if clean is None:
                continue
            if entry.is_symlink():
                raise InvalidBundleError(f"{root}: {rel} is a symlink (not allowed in bundles)")
            if entry.is_dir():
                pending.append(entry)
                continue
            if not entry.is_file():
                raise InvalidBundleError(f"{root}: {rel} is not a regular file")
            budget.charge(clean, entry.stat().st_size)
            try:
                data = entry.read_bytes()
            except OSError as exc:
                raise InvalidBundleError(f"{root}: cannot read {rel}: {exc.strerror}") from None
            if len(data) > limits.max_file_bytes:  # grew while we looked
                budget.charge(clean, len(data))
            yield clean, data


# -- archive headers, checked before `tarfile` / `zipfile` read what they announce ------------
#
# tarfile reads a GNU long-name or pax header whole, however large its size field says it is,
# before returning the member, and zipfile builds an object for every central-directory entry
# before we can count them. So both formats are walked here first, header by header, and each
# announced size is checked before the bytes behind it are read. The walk must agree with
# tarfile on where every header starts, so anything that could make them disagree is refused:
# types other than files, directories, long names and pax headers; directories with data; pax
# records that change a size (`size`, `GNU.sparse.*`).

_TAR_BLOCK: Final = 512
_TAR_FILE_TYPES: Final = (b"0", b"\x00", b"7")
_TAR_EXTENSION_TYPES: Final = (b"L", b"K", b"x", b"g")
_TAR_LINK_TYPES: Final = (b"1", b"2", b"3", b"4", b"6")
_PAX_RECORD: Final = re.compile(rb"([0-9]{1,16}) ")


def _tar_number(field: bytes, source: str) -> int:
    """A numeric header field: NUL/space-padded octal, or GNU base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise InvalidBundleError(f"{source}: negative size in a tar header")
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise InvalidBundleError(f"{source}: bad number in a tar header") from None


def _check_pax(data: bytes, source: str) -> None:
    """Refuse malformed pax records ("<length> <key>=<value>\\n") and size-changing keys."""
    position = 0
    while position < len(data) and data[position] != 0:
        match = _PAX_RECORD.match(data, position)
        if match is None:
            raise InvalidBundleError(f"{source}: malformed pax header")
        length = int(match.group(1))
        record = data[match.end() : position + length]
        if not match.end() < position + length <= len(data) or not record.endswith(b"\n"):
            raise InvalidBundleError(f"{source}: malformed pax header")
        key = record.split(b"=", 1)[0]
        if key == b"size" or key.startswith(b"GNU.sparse"):
            raise InvalidBundleError(f"{source}: pax header sets {key.decode(errors='replace')}")
        position += length


def _unpack_tar(stream: io.BufferedIOBase, source: str, limits: BundleLimits) -> bytes:
    """Copy a (decompressing) tar stream into memory, each header checked before its data.

    Memory stays under `max_total_bytes + max_archive_overhead` whatever the headers claim.
    """
    cap = limits.max_total_bytes + limits.max_archive_overhead
    out = bytearray()
    headers = 0
    while len(header := stream.read(_TAR_BLOCK)) == _TAR_BLOCK:
        out += header
        if not header.strip(b"\x00"):
            break  # end of archive: tarfile stops at the first zero block too
        headers += 1
        if headers > limits.max_entries:
            raise InvalidBundleError(f"{source}: more than {limits.max_entries} archive entries")
        size = _tar_number(header[124:136], source)
        kind = header[156:157]
        name = header[:100].split(b"\x00", 1)[0]
        if kind in _TAR_LINK_TYPES:
            raise InvalidBundleError(f"{source}: {name!r} is a link or special file (not allowed)")
        if kind == b"5" or (kind == b"\x00" and name.endswith(b"/")):
            if size:
                raise InvalidBundleError(f"{source}: directory {name!r} claims {size} bytes")
            continue
        if kind in _TAR_EXTENSION_TYPES and size > limits.max_header_bytes:
            raise InvalidBundleError(
                f"{source}: a {size}-byte tar extension header (limit {limits.max_header_bytes})"
            )
        if kind not in _TAR_FILE_TYPES + _TAR_EXTENSION_TYPES:
            raise InvalidBundleError(f"{source}: unsupported tar entry type {kind!r}")
        padded = -(-size // _TAR_BLOCK) * _TAR_BLOCK
        if len(out) + padded > cap:
            raise InvalidBundleError(f"{source}: more than {cap} bytes uncompressed")
        body = stream.read(padded)
        if kind in (b"x", b"g"):
            _check_pax(body[:size], source)
        out += body
    return bytes(out)


def _check_zip_directory(data: bytes, source: str, limits: BundleLimits) -> None:
    """Count and bound the central directory's entries the way zipfile will find them."""
    end = len(data) - 22
    if not (data[end : end + 4] == b"PK\x05\x06" and data[-2:] == b"\x00\x00"):
        end = data.rfind(b"PK\x05\x06", max(len(data) - 22 - 0xFFFF, 0))
    if end < 0 or len(data) < end + 22:
        return  # zipfile will say it is not a zip file
    if data[max(end - 20, 0) : end - 16] == b"PK\x06\x07":
        raise InvalidBundleError(f"{source}: zip64 archives are not supported")
    directory_size = int.from_bytes(data[end + 12 : end + 16], "little")
    position, entries = end - directory_size, 0
    while position < end:
        if position < 0 or data[position : position + 4] != b"PK\x01\x02":
            return  # zipfile will refuse the directory
        entries += 1
        if entries > limits.max_entries:
            raise InvalidBundleError(f"{source}: more than {limits.max_entries} archive entries")
        name_length, extra_length, comment_length = (
            int.from_bytes(data[position + i : position + i + 2], "little") for i in (28, 30, 32)
        )
        if name_length > limits.max_path_length + 1:  # + a directory's trailing slash
            raise InvalidBundleError(f"{source}: a {name_length}-byte file name in the zip")
        position += 46 + name_length + extra_length + comment_length


def _read_tar(data: bytes, source: str, limits: BundleLimits) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(source, limits)
    try:
        if data[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                unpacked = _unpack_tar(stream, source, limits)
        else:
            unpacked = _unpack_tar(io.BytesIO(data), source, limits)
        with tarfile.open(fileobj=io.BytesIO(unpacked), mode="r:") as tar:
            while (member := tar.next()) is not None:
                clean = _clean_path(member.name, source, limits)
                if member.isdir():
                    continue
                if not member.isreg():
                    raise InvalidBundleError(
                        f"{source}: {member.name} is a link or special file (not allowed)"
                    )
                budget.charge(member.name, member.size)
                if clean is None:
                    continue
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - isreg() members always have data
                    raise InvalidBundleError(f"{source}: cannot read {member.name}")
                yield clean, handle.read(limits.max_file_bytes + 1)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise InvalidBundleError(f"{source}: not a readable tar archive: {exc}") from None


def _read_zip(data: bytes, source: str, limits: BundleLimits) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(source, limits)
    _check_zip_directory(data, source, limits)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                clean = _clean_path(info.filename, source, limits)
                if info.is_dir():
                    continue
                mode = info.external_attr >> 16
                if mode and (mode & 0o170000) not in (0, 0o100000):
                    raise InvalidBundleError(
                        f"{source}: {info.filename} is a link or special file (not allowed)"
                    )
                if info.flag_bits & 0x1:
                    raise InvalidBundleError(f"{source}: {info.filename} is encrypted")
                budget.charge(info.filename, info.file_size)
                if clean is None:
                    continue
                with archive.open(info) as handle:
                    content = handle.read(limits.max_file_bytes + 1)
                yield clean, content
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise InvalidBundleError(f"{source}: not a readable zip archive: {exc}") from None


def _assemble(
    raw: dict[str, bytes], source: str, limits: BundleLimits, *, strip_root: bool
) -> Bundle:
    if strip_root and MANIFEST not in raw and raw:
        roots = {path.split("/", 1)[0] for path in raw}
        if len(roots) == 1:
            (root,) = roots
            if f"{root}/{MANIFEST}" in raw:
                raw = {path[len(root) + 1 :]: data for path, data in raw.items()}
    folded: dict[str, str] = {}
    for path in raw:
        other = folded.setdefault(path.lower(), path)
        if other != path:
            raise InvalidBundleError(f"{source}: {other} and {path} differ only in case")
    manifest_bytes = raw.pop(MANIFEST, None)
    if manifest_bytes is None:
        raise InvalidBundleError(f"{source}: no {MANIFEST} at the bundle root")
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise InvalidBundleError(f"{source}: {MANIFEST} is too large")
    manifest = parse_manifest(manifest_bytes, source)
    module_path = manifest.module.replace(".", "/")
    if f"{module_path}.py" not in raw and f"{module_path}/__init__.py" not in raw:
        raise InvalidBundleError(
            f"{source}: entry module {manifest.module!r} has no {module_path}.py "
            f"or {module_path}/__init__.py"
        )
    files = {path: raw[path] for path in sorted(raw)}
    return Bundle(manifest, MappingProxyType(files), bundle_hash(manifest, files), source)


def parse_manifest(data: bytes, source: str = MANIFEST) -> Manifest:
    """Decode and validate `manifest.json`.

    Raises:
        InvalidBundleError: not valid JSON, unknown or missing fields, bad values.
    """
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidBundleError(f"{source}: {MANIFEST}: {exc}") from None
    if _NAME.fullmatch(manifest.name) is None:
        raise InvalidBundleError(f"{source}: {MANIFEST}: bad name {manifest.name!r}")
    if _VERSION.fullmatch(manifest.version) is None:
        raise InvalidBundleError(f"{source}: {MANIFEST}: bad version {manifest.version!r}")
    if _ENTRY.fullmatch(manifest.entry) is None:
        raise InvalidBundleError(
            f"{source}: {MANIFEST}: entry {manifest.entry!r} is not `module:attr`"
        )
    return manifest


def bundle_hash(manifest: Manifest, files: Mapping[str, bytes]) -> bytes:
    """The canonical bundle hash (the application id); see the module docstring."""
    unsigned = msgspec.structs.replace(manifest, signature=None)
    form = [
        BUNDLE_FORMAT,
        msgspec.to_builtins(unsigned),
        [[path, hashlib.sha256(files[path]).digest()] for path in sorted(files)],
    ]
    return hashlib.sha256(_HASH_ENCODER.encode(form)).digest()


def pack_bundle(bundle: Bundle) -> bytes:
    """A deterministic `.tar.gz` of the bundle (same bundle → same bytes)."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path, content in [(MANIFEST, bundle.manifest_json()), *bundle.files.items()]:
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


# -- keys, signing, verification ---------------------------------------------------------


def parse_public_key(key: str | bytes) -> bytes:
    """A 32-byte Ed25519 public key from raw bytes, hex (64 digits) or base58.

    Raises:
        ValueError: not a key in any of these forms.
    """
    if isinstance(key, bytes):
        raw = key
    else:
        text = key.strip()
        try:
            raw = bytes.fromhex(text) if _HEX_KEY.fullmatch(text) else base58.b58decode(text)
        except ValueError:
            raise ValueError(f"{key!r} is not a base58 or hex Ed25519 public key") from None
    if len(raw) != 32:
        raise ValueError(f"{key!r} is not an Ed25519 public key (32 bytes)")
    return raw


def _parse_signature(text: str) -> bytes:
    text = text.strip()
    try:
        raw = bytes.fromhex(text) if re.fullmatch(r"[0-9a-fA-F]{128}", text) else None
        if raw is None:
            raw = base58.b58decode(text)
    except ValueError:
        raise BundleSignatureError(f"signature {text[:16]!r}… is not base58 or hex") from None
    if len(raw) != 64:
        raise BundleSignatureError("signature is not a 64-byte Ed25519 signature")
    return raw


def signed_copy(bundle: Bundle, private_key: PrivateKey | bytes) -> Bundle:
    """`bundle` with `signer` and `signature` set in its manifest (nothing is written).

    `private_key` is a `PrivateKey` or a 32-byte Ed25519 seed. The application id of the
    result covers the signer, so it differs from an unsigned bundle's id.
    """
    key = private_key if isinstance(private_key, PrivateKey) else PrivateKey(private_key)
    signer = base58.b58encode(key.public_key.data).decode()
    unsigned = msgspec.structs.replace(bundle.manifest, signer=signer, signature=None)
    app_id = bundle_hash(unsigned, bundle.files)
    signature = base58.b58encode(key.sign(SIGNATURE_DOMAIN + app_id)).decode()
    manifest = msgspec.structs.replace(unsigned, signature=signature)
    return Bundle(manifest, bundle.files, app_id, bundle.source)


def sign_bundle(directory: str | Path, private_key: PrivateKey | bytes) -> Bundle:
    """Sign the bundle directory in place: write `signer` and `signature` into its manifest.

    Returns the signed bundle (see `signed_copy`). An archive is signed with `signed_copy`
    and `pack_bundle` instead.

    Raises:
        InvalidBundleError: `directory` is not a valid bundle directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidBundleError(f"{directory}: sign a bundle directory, then archive it")
    signed = signed_copy(load_bundle(directory), private_key)
    manifest_path = directory / MANIFEST
    document: dict[str, Any] = json.loads(manifest_path.read_bytes())
    document["signer"] = signed.manifest.signer
    document["signature"] = signed.manifest.signature
    manifest_path.write_text(
        json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    reread = load_bundle(directory)
    if reread.app_id != signed.app_id:  # pragma: no cover - the directory changed under us
        raise InvalidBundleError(f"{directory}: changed while signing")
    return reread


def verify_bundle(
    bundle: Bundle,
    trusted_signers: Iterable[str | bytes],
    *,
    installed_locally: bool = False,
) -> VerifiedBundle:
    """Decide whether this node may execute `bundle`.

    Args:
        trusted_signers: public keys (base58, hex or raw) from the node's configuration.
        installed_locally: the node's operator installed this bundle from a local path
            (never true for a bundle received from a peer).

    Raises:
        BundleSignatureError: a signature is present but invalid, or half of it is missing.
        UntrustedBundleError: valid but neither trusted nor installed locally.
        ValueError: an entry of `trusted_signers` is not a public key.
    """
    trusted = {parse_public_key(key) for key in trusted_signers}
    manifest = bundle.manifest
    where = f"{bundle.name}@{bundle.version} ({bundle.source})"
    if manifest.signer is None and manifest.signature is None:
        if installed_locally:
            return VerifiedBundle(bundle, None, "local-install")
        raise UntrustedBundleError(
            f"{where} is not signed; only bundles the operator installs locally may be unsigned"
        )
    if manifest.signer is None or manifest.signature is None:
        raise BundleSignatureError(f"{where}: manifest has a signer or a signature, not both")
    try:
        signer = parse_public_key(manifest.signer)
    except ValueError as exc:
        raise BundleSignatureError(f"{where}: signer: {exc}") from None
    signature = _parse_signature(manifest.signature)
    try:
        valid = PublicKey.from_ed25519_bytes(signer).verify(
            signature, SIGNATURE_DOMAIN + bundle.app_id
        )
    except RemoteProtocolError:  # pragma: no cover - parse_public_key checked the size
        valid = False
    if not valid:
        raise BundleSignatureError(
            f"{where}: the signature does not match the bundle (a file or the manifest "
            "changed after signing, or another key signed it)"
        )
    if signer in trusted:
        return VerifiedBundle(bundle, signer, "trusted-signer")
    if installed_locally:
        return VerifiedBundle(bundle, signer, "local-install")
    raise UntrustedBundleError(
        f"{where} is signed by {manifest.signer}, which is not a trusted signer of this node"
    )


# -- importing -------------------------------------------------------------------------


class _BundleFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Serves modules of loaded bundles from memory, under their unique package names."""

    def __init__(self) -> None:
        self._bundles: dict[str, Bundle] = {}
        self._lock = threading.Lock()

    def add(self, package: str, bundle: Bundle) -> None:
        with self._lock:
            self._bundles[package] = bundle

    def remove(self, package: str) -> None:
        with self._lock:
            self._bundles.pop(package, None)

    def _locate(self, fullname: str) -> tuple[Bundle, str | None, bool] | None:
        """(bundle, file path or None for a directory package, is_package)."""
        package, _, rest = fullname.partition(".")
        bundle = self._bundles.get(package)
        if bundle is None:
            return None
        if not rest:
            return bundle, None, True
        path = rest.replace(".", "/")
        if f"{path}.py" in bundle.files:
            return bundle, f"{path}.py", False
        if f"{path}/__init__.py" in bundle.files:
            return bundle, f"{path}/__init__.py", True
        if any(name.startswith(f"{path}/") for name in bundle.files):
            return bundle, None, True
        return None

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(PACKAGE_PREFIX):
            return None
        found = self._locate(fullname)
        if found is None:
            return None
        bundle, file_path, is_package = found
        origin = _origin(bundle, file_path or "")
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=origin, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = []
        return spec

    def get_source(self, fullname: str) -> str:
        found = self._locate(fullname)
        if found is None:
            raise ImportError(f"no bundle module {fullname}", name=fullname)
        bundle, file_path, _ = found
        if file_path is None:
            return ""
        return bundle.files[file_path].decode("utf-8")

    def is_package(self, fullname: str) -> bool:
        found = self._locate(fullname)
        return found is not None and found[2]

    def exec_module(self, module: ModuleType) -> None:
        source = self.get_source(module.__name__)
        origin = module.__spec__.origin if module.__spec__ is not None else module.__name__
        module.__file__ = origin
        code = compile(source, origin or module.__name__, "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102  # verified bundle code: that is the point


def _origin(bundle: Bundle, file_path: str) -> str:
    return f"bundle:{bundle.name}@{bundle.version}/{file_path}"


_FINDER: Final = _BundleFinder()
_LOADED: dict[bytes, App] = {}
_LOAD_LOCK: Final = threading.RLock()


def package_name(app_id: bytes) -> str:
    """The import package under which an application's modules live."""
    return f"{PACKAGE_PREFIX}{app_id.hex()}"


def load_app(verified: VerifiedBundle) -> App:
    """Import a verified bundle's entry module and return its `App`.

    Raises:
        TypeError: not a `VerifiedBundle` (unverified code is never imported).
        AppLoadError: importing failed, or the entry is not a valid `App` of that name.
    """
    if not isinstance(verified, VerifiedBundle):
        raise TypeError("load_app takes the VerifiedBundle returned by verify_bundle")
    bundle = verified.bundle
    with _LOAD_LOCK:
        loaded = _LOADED.get(bundle.app_id)
        if loaded is not None:
            return loaded
        if _FINDER not in sys.meta_path:
            sys.meta_path.append(_FINDER)
        package = package_name(bundle.app_id)
        _FINDER.add(package, bundle)
        try:
            app = _import_entry(bundle, package)
        except BaseException:
            _forget(package)
            raise
        _LOADED[bundle.app_id] = app
        return app


def _import_entry(bundle: Bundle, package: str) -> App:
    where = f"{bundle.name}@{bundle.version}"
    manifest = bundle.manifest
    try:
        module = importlib.import_module(f"{package}.{manifest.module}")
    except Exception as exc:
        raise AppLoadError(
            f"{where}: importing {manifest.module} failed: {type(exc).__name__}: {exc}"
        ) from exc
    app = getattr(module, manifest.attr, None)
    if not isinstance(app, App):
        raise AppLoadError(f"{where}: {manifest.entry} is not an App (got {type(app).__name__})")
    if app.name != manifest.name:
        raise AppLoadError(
            f"{where}: {manifest.entry} is App({app.name!r}); the manifest says {manifest.name!r}"
        )
    try:
        app.check()
    except AppDefinitionError as exc:
        raise AppLoadError(f"{where}: {exc}") from exc
    app.blob_policy = manifest.blobs
    return app


def unload_app(app_id: bytes) -> bool:
    """Forget a loaded application (its modules leave `sys.modules`). Returns whether it was
    loaded. Objects still referencing the app keep working."""
    with _LOAD_LOCK:
        if _LOADED.pop(app_id, None) is None:
            return False
        _forget(package_name(app_id))
        return True


def _forget(package: str) -> None:
    _FINDER.remove(package)
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        del sys.modules[name]


def loaded_apps() -> dict[bytes, App]:
    """Application ids currently imported in this process."""
    with _LOAD_LOCK:
        return dict(_LOADED)


__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_LIMITS",
    "MANIFEST",
    "SIGNATURE_DOMAIN",
    "AppLoadError",
    "Bundle",
    "BundleError",
    "BundleLimits",
    "BundleSignatureError",
    "InvalidBundleError",
    "Manifest",
    "UntrustedBundleError",
    "VerifiedBundle",
    "bundle_hash",
    "load_app",
    "load_bundle",
    "loaded_apps",
    "pack_bundle",
    "package_name",
    "parse_manifest",
    "parse_public_key",
    "read_bundle",
    "sign_bundle",
    "signed_copy",
    "unload_app",
    "verify_bundle",
]
