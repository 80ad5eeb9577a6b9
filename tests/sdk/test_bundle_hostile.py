"""Hostile archives: every header is bounded before what it announces is read.

A 3 MB `.tar.gz` whose GNU long-name header claims 3 GB drove the node to 12 GB on
`app install`: tarfile reads such a header whole before returning the member. Memory is
measured with tracemalloc (by construction, not by timing).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import tarfile
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from trionode.sdk.bundle import BundleLimits, InvalidBundleError, load_bundle, read_bundle

GiB = 1 << 30
MiB = 1 << 20
MANIFEST = json.dumps({"name": "demo", "version": "1.0.0", "entry": "demo:app"}).encode()
DEMO = b"from trionode.sdk import App\napp = App('demo')\n"


def tar_header(name: bytes, size: int, kind: bytes) -> bytes:
    """A ustar header with a valid checksum, so tarfile takes it at its word."""
    header = bytearray(512)
    header[: len(name)] = name
    header[100:108] = b"0000644\x00"
    header[124:136] = b"%011o\x00" % size
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def tar_file(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return tar_header(name, len(data), kind) + data + b"\x00" * (-len(data) % 512)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" %s=%s\n" % (key, value)
    length = len(body) + 2  # two digits for these short records
    return b"%d%s" % (length, body)


def good_entries() -> bytes:
    return tar_file(b"manifest.json", MANIFEST) + tar_file(b"demo.py", DEMO)


def gzip_stream(*parts: bytes, zeros: int = 0) -> bytes:
    """gzip of `parts` followed by `zeros` zero bytes, built without holding the zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [compressor.compress(part) for part in parts]
    chunk = bytes(MiB)
    out.extend(compressor.compress(chunk) for _ in range(zeros // MiB))
    out.append(compressor.flush())
    return b"".join(out)


def peak_bytes_while(action: Callable[[], object]) -> int:
    tracemalloc.start()
    with contextlib.suppress(InvalidBundleError):
        action()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("kind", [b"L", b"K", b"x", b"g"])
def test_a_huge_extension_header_is_refused_before_it_is_read(kind: bytes) -> None:
    # The header claims 3 GiB; 64 MiB of zeros really follow (64 KiB compressed).
    archive = gzip_stream(tar_header(b"././@LongLink", 3 * GiB, kind), zeros=64 * MiB)
    assert len(archive) < MiB
    with pytest.raises(InvalidBundleError, match="3221225472-byte tar extension header"):
        read_bundle(archive)
    assert peak_bytes_while(lambda: read_bundle(archive)) < 2 * MiB


def test_a_file_larger_than_the_archive_may_unpack_is_refused_before_it_is_read() -> None:
    archive = gzip_stream(good_entries(), tar_header(b"big.bin", 2 * GiB, b"0"), zeros=MiB)
    with pytest.raises(InvalidBundleError, match="bytes uncompressed"):
        read_bundle(archive)
    assert peak_bytes_while(lambda: read_bundle(archive)) < 2 * MiB


def test_the_uncompressed_total_is_bounded() -> None:
    limits = BundleLimits(max_total_bytes=4096, max_archive_overhead=4096)
    files = b"".join(tar_file(b"f%d.py" % i, b"#" * 1000) for i in range(8))
    with pytest.raises(InvalidBundleError, match="more than 8192 bytes uncompressed"):
        read_bundle(gzip_stream(good_entries(), files), limits=limits)


def test_the_entry_count_is_bounded() -> None:
    limits = BundleLimits(max_files=2)
    directories = b"".join(tar_header(b"d%d/" % i, 0, b"5") for i in range(limits.max_entries))
    with pytest.raises(InvalidBundleError, match=f"more than {limits.max_entries} archive"):
        read_bundle(gzip_stream(good_entries(), directories), limits=limits)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        # A directory with data: tarfile would not skip it, the walk would; refuse.
        (tar_header(b"lib", 1024, b"5") + bytes(1024), "directory b'lib' claims 1024 bytes"),
        (tar_header(b"lib/", 512, b"\x00") + bytes(512), "directory b'lib/' claims 512"),
        # pax records that move where tarfile looks for the next header.
        (tar_file(b"pax", pax_record(b"size", b"1000000000"), b"x"), "pax header sets size"),
        (tar_file(b"pax", pax_record(b"GNU.sparse.major", b"1"), b"g"), "sets GNU.sparse"),
        (tar_file(b"pax", b"99 path=x\n", b"x"), "malformed pax header"),
        (tar_header(b"sparse", 0, b"S"), "unsupported tar entry type b'S'"),
        (tar_header(b"vol", 0, b"V"), "unsupported tar entry type"),
        (tar_header(b"link.py", 0, b"2"), "link or special file"),
    ],
)
def test_headers_that_could_desynchronise_the_walk_are_refused(entry: bytes, message: str) -> None:
    with pytest.raises(InvalidBundleError, match=message):
        read_bundle(gzip_stream(good_entries(), entry))


def test_base256_sizes_are_read_like_tarfile_reads_them() -> None:
    header = bytearray(tar_header(b"././@LongLink", 0, b"L"))
    header[124:136] = b"\x80" + (5 * GiB).to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    with pytest.raises(InvalidBundleError, match="5368709120-byte tar extension header"):
        read_bundle(gzip_stream(bytes(header)))


def test_well_formed_pax_and_long_names_still_work() -> None:
    long_dir = "d" * 120
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb") as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        for name, data in [
            ("manifest.json", MANIFEST),
            ("demo.py", DEMO),
            (f"{long_dir}/x.py", b"X = 1\n"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bundle = read_bundle(buffer.getvalue())
    assert bundle.files[f"{long_dir}/x.py"] == b"X = 1\n"


def test_zip_directory_is_counted_before_zipfile_reads_it() -> None:
    limits = BundleLimits(max_files=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", MANIFEST)
        archive.writestr("demo.py", DEMO)
        for i in range(limits.max_entries):
            archive.writestr(f"d{i}/", b"")
    with pytest.raises(InvalidBundleError, match=f"more than {limits.max_entries} archive"):
        read_bundle(buffer.getvalue(), limits=limits)


def test_zip_names_are_bounded() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", MANIFEST)
        archive.writestr("demo.py", DEMO)
        archive.writestr("n" * 5000, b"")
    with pytest.raises(InvalidBundleError, match="5000-byte file name"):
        read_bundle(buffer.getvalue())


@pytest.mark.parametrize(
    "name",
    [
        "x" * 300,  # one component past NAME_MAX: stat raises ENAMETOOLONG, not ENOENT
        "T\u033a\u0315o\u035e i\u0332\u032c" * 40,  # what the API fuzzer sent: 300+ UTF-8 bytes
        "/".join(["d"] * 3000),  # past PATH_MAX
    ],
)
def test_a_path_the_system_refuses_is_an_invalid_bundle_not_an_os_error(
    tmp_path: Path, name: str
) -> None:
    # `Path.is_dir()` swallows only "no such file"-like errors; an over-long name raised
    # OSError out of `load_bundle` and the admin API answered 500 (found by the slow
    # schemathesis run).
    with pytest.raises(InvalidBundleError, match="cannot read"):
        load_bundle(tmp_path / name)
