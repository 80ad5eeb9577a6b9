"""Bundles: canonical hash, signatures, trust, unsafe archives and isolated imports."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path

import base58
import pytest

from trionode.crdt import HybridClock, StateTree, ntp64_from_unix
from trionode.sdk.bundle import (
    AppLoadError,
    Bundle,
    BundleLimits,
    BundleSignatureError,
    InvalidBundleError,
    UntrustedBundleError,
    VerifiedBundle,
    load_app,
    load_bundle,
    loaded_apps,
    pack_bundle,
    package_name,
    read_bundle,
    sign_bundle,
    unload_app,
    verify_bundle,
)
from trionode.sdk.errors import MethodFailedError
from trionode.sdk.runtime import execute
from trionode.wire.keys import PrivateKey

MEMBER = hashlib.sha256(b"member").digest()
CONTEXT = hashlib.sha256(b"context").digest()

DEMO = """\
from trionode.sdk import App, Counter

from .helpers import VERSION

app = App("demo")


@app.state
class Demo:
    hits: Counter

    @app.method
    def hit(self) -> int:
        self.hits.increment()
        return self.hits.value()

    @app.view
    def version(self) -> str:
        return VERSION

    @app.method
    def crash(self) -> None:
        raise ValueError("crashed in the bundle")
"""


def _manifest(**overrides: object) -> dict[str, object]:
    return {"name": "demo", "version": "1.0.0", "entry": "demo:app", **overrides}


def write_bundle(
    root: Path, files: dict[str, str | bytes] | None = None, **manifest: object
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    contents: dict[str, str | bytes] = {
        "manifest.json": json.dumps(_manifest(**manifest)),
        "demo.py": DEMO,
        "helpers.py": 'VERSION = "1.0.0"\n',
    }
    contents.update(files or {})
    for path, data in contents.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            target.write_text(data)
        else:
            target.write_bytes(data)
    return root


def tar_of(entries: list[tuple[str, bytes]], *, links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def zip_of(entries: list[tuple[str, bytes]], *, links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def entries_of(root: Path, prefix: str = "") -> list[tuple[str, bytes]]:
    return [
        (prefix + p.relative_to(root).as_posix(), p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


@pytest.fixture(autouse=True)
def _unload_test_apps() -> Iterator[None]:
    before = set(loaded_apps())
    yield
    for app_id in set(loaded_apps()) - before:
        unload_app(app_id)


# -- the canonical hash ----------------------------------------------------------------


def test_the_hash_is_the_same_for_every_form_of_a_bundle(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "demo")
    bundle = load_bundle(root)
    assert len(bundle.app_id) == 32
    entries = entries_of(root)
    forms: list[Bundle] = [
        read_bundle(tar_of(entries)),
        read_bundle(tar_of(entries_of(root, "demo/"))),  # wrapped in one directory
        read_bundle(tar_of(entries_of(root, "./"))),
        read_bundle(zip_of(entries)),
        read_bundle(zip_of(entries_of(root, "demo-1.0.0/"))),
        read_bundle(pack_bundle(bundle)),
    ]
    archive = tmp_path / "demo.tar.gz"
    archive.write_bytes(pack_bundle(bundle))
    forms.append(load_bundle(archive))
    # noise that is never part of a bundle, and a reformatted manifest
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "demo.cpython-311.pyc").write_bytes(b"\x00junk")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / ".DS_Store").write_bytes(b"junk")
    manifest = _manifest()
    reordered = dict(reversed(list(manifest.items())))
    (root / "manifest.json").write_text(json.dumps(reordered, indent=4) + "\n")
    forms.append(load_bundle(root))
    assert {form.app_id for form in forms} == {bundle.app_id}
    assert all(dict(form.files) == dict(bundle.files) for form in forms)
    assert pack_bundle(bundle) == pack_bundle(forms[-1])  # deterministic archive bytes
    assert sorted(bundle.files) == ["demo.py", "helpers.py"]


@pytest.mark.parametrize(
    "change",
    [
        {"files": {"helpers.py": 'VERSION = "1.0.1"\n'}},
        {"files": {"extra.txt": "new file"}},
        {"version": "1.0.1"},
        {"description": "now described"},
        {"signer": base58.b58encode(b"\x01" * 32).decode()},
    ],
)
def test_any_change_changes_the_hash(tmp_path: Path, change: dict[str, object]) -> None:
    base = load_bundle(write_bundle(tmp_path / "a"))
    files = change.pop("files", None)
    assert isinstance(files, dict | None)
    changed = load_bundle(write_bundle(tmp_path / "b", files, **change))
    assert changed.app_id != base.app_id


def test_renaming_a_file_changes_the_hash(tmp_path: Path) -> None:
    a = load_bundle(write_bundle(tmp_path / "a", {"data/x.txt": "1"}))
    b = load_bundle(write_bundle(tmp_path / "b", {"data/y.txt": "1"}))
    assert a.app_id != b.app_id


# -- signatures and trust --------------------------------------------------------------


def test_signed_bundles_from_trusted_signers_verify(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "demo")
    unsigned = load_bundle(root)
    key = PrivateKey.generate()
    signed = sign_bundle(root, key)
    assert signed.manifest.signer == base58.b58encode(key.public_key.data).decode()
    assert signed.app_id != unsigned.app_id  # the signer is part of the identity ...
    assert load_bundle(root).app_id == signed.app_id  # ... the signature is not
    assert read_bundle(pack_bundle(signed)).app_id == signed.app_id
    for trusted in (signed.manifest.signer, key.public_key.data.hex(), key.public_key.data):
        assert trusted is not None
        verified = verify_bundle(signed, [trusted])
        assert verified.trust == "trusted-signer"
        assert verified.signer == key.public_key.data
    # re-signing with the same key gives the same id; the manifest keeps its other fields
    again = sign_bundle(root, key.seed)
    assert again.app_id == signed.app_id
    assert json.loads((root / "manifest.json").read_text())["entry"] == "demo:app"


def test_untrusted_and_unsigned_bundles_need_a_local_install(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "demo")
    unsigned = load_bundle(root)
    with pytest.raises(UntrustedBundleError, match="not signed"):
        verify_bundle(unsigned, [])
    local = verify_bundle(unsigned, [], installed_locally=True)
    assert local.trust == "local-install"
    assert local.signer is None
    signed = sign_bundle(root, PrivateKey.generate())
    other = PrivateKey.generate().public_key.data
    with pytest.raises(UntrustedBundleError, match="not a trusted signer"):
        verify_bundle(signed, [other])
    assert verify_bundle(signed, [other], installed_locally=True).trust == "local-install"
    with pytest.raises(ValueError, match="not a base58 or hex"):
        verify_bundle(signed, ["0OIl not base58"])


@pytest.mark.parametrize(
    "tamper",
    ["file", "new file", "manifest", "signature from another key", "signer swapped"],
)
def test_tampering_breaks_the_signature_even_for_local_installs(
    tmp_path: Path, tamper: str
) -> None:
    root = write_bundle(tmp_path / "demo")
    key = PrivateKey.generate()
    signed = sign_bundle(root, key)
    manifest = json.loads((root / "manifest.json").read_text())
    if tamper == "file":
        (root / "helpers.py").write_text('VERSION = "evil"\n')
    elif tamper == "new file":
        (root / "sneaky.py").write_text("import os\n")
    elif tamper == "manifest":
        manifest["entry"] = "helpers:VERSION"
    elif tamper == "signature from another key":
        manifest["signature"] = base58.b58encode(PrivateKey.generate().sign(signed.app_id)).decode()
    else:
        manifest["signer"] = base58.b58encode(PrivateKey.generate().public_key.data).decode()
    (root / "manifest.json").write_text(json.dumps(manifest))
    tampered = load_bundle(root)
    for installed_locally in (False, True):
        with pytest.raises(BundleSignatureError, match="does not match"):
            verify_bundle(tampered, [key.public_key.data], installed_locally=installed_locally)


def test_half_signed_and_malformed_signatures(tmp_path: Path) -> None:
    signer = base58.b58encode(PrivateKey.generate().public_key.data).decode()
    only_signer = load_bundle(write_bundle(tmp_path / "a", signer=signer))
    with pytest.raises(BundleSignatureError, match="not both"):
        verify_bundle(only_signer, [], installed_locally=True)
    garbage = load_bundle(write_bundle(tmp_path / "b", signer=signer, signature="0OIl"))
    with pytest.raises(BundleSignatureError, match="base58 or hex"):
        verify_bundle(garbage, [], installed_locally=True)
    short = load_bundle(write_bundle(tmp_path / "c", signer=signer, signature="abcd"))
    with pytest.raises(BundleSignatureError, match="64-byte"):
        verify_bundle(short, [], installed_locally=True)
    bad_key = load_bundle(write_bundle(tmp_path / "d", signer="abc", signature="abcd"))
    with pytest.raises(BundleSignatureError, match="signer"):
        verify_bundle(bad_key, [], installed_locally=True)


# -- unsafe and malformed bundles ------------------------------------------------------

GOOD = [
    ("manifest.json", json.dumps(_manifest()).encode()),
    ("demo.py", DEMO.encode()),
    ("helpers.py", b"VERSION = '1'\n"),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tar_of([*GOOD, ("../evil.py", b"x")]), "path traversal"),
        (lambda: tar_of([*GOOD, ("lib/../../evil.py", b"x")]), "path traversal"),
        (lambda: tar_of([*GOOD, ("/etc/evil.py", b"x")]), "absolute"),
        (lambda: tar_of([*GOOD, ("C:/evil.py", b"x")]), "absolute"),
        (lambda: tar_of(GOOD, links=("link.py",)), "link or special file"),
        (lambda: zip_of([*GOOD, ("../evil.py", b"x")]), "path traversal"),
        (lambda: zip_of([*GOOD, ("a\\..\\evil.py", b"x")]), "non-POSIX"),
        (lambda: zip_of(GOOD, links=("link.py",)), "link or special file"),
        (lambda: zip_of([*GOOD, ("sp ace.py", b"x")]), "unsupported path"),
        (lambda: zip_of([*GOOD, ("Demo.py", b"x")]), "differ only in case"),
        (lambda: zip_of(GOOD[1:]), "no manifest.json"),
        (lambda: tar_of([*GOOD, ("demo.py", b"app = None")]), "demo.py appears twice"),
        (lambda: b"not an archive", "not a directory, tar"),
        (lambda: b"\x1f\x8b" + b"\x00" * 40, "not a readable tar"),
        (lambda: b"PK\x03\x04" + b"\x00" * 40, "not a readable zip"),
    ],
)
def test_unsafe_or_malformed_archives_are_refused(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(InvalidBundleError, match=message):
        read_bundle(make())


def test_unsafe_directories_are_refused(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "demo")
    (root / "link.py").symlink_to(tmp_path / "elsewhere.py")
    with pytest.raises(InvalidBundleError, match="symlink"):
        load_bundle(root)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{,}", "manifest.json: JSON is malformed"),
        (json.dumps({**_manifest(), "runtime": "wasm"}), "unknown field `runtime`"),
        (json.dumps({"name": "demo", "version": "1"}), "missing required field `entry`"),
        (json.dumps(_manifest(entry="demo")), "is not `module:attr`"),
        (json.dumps(_manifest(entry="nothere:app")), "entry module 'nothere' has no"),
        (json.dumps(_manifest(name="../demo")), "bad name"),
        (json.dumps(_manifest(version="")), "bad version"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, manifest: str, message: str) -> None:
    root = write_bundle(tmp_path / "demo", {"manifest.json": manifest})
    with pytest.raises(InvalidBundleError, match=message):
        load_bundle(root)


def test_size_limits(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "demo", {"big.bin": b"x" * 5000})
    load_bundle(root)
    with pytest.raises(InvalidBundleError, match="more than 2 files"):
        load_bundle(root, limits=BundleLimits(max_files=2))
    with pytest.raises(InvalidBundleError, match=r"big\.bin is 5000 bytes"):
        load_bundle(root, limits=BundleLimits(max_file_bytes=4096))
    with pytest.raises(InvalidBundleError, match="in total"):
        load_bundle(root, limits=BundleLimits(max_total_bytes=5100))
    archive = tar_of(entries_of(root))
    with pytest.raises(InvalidBundleError, match=r"big\.bin is 5000 bytes"):
        read_bundle(archive, limits=BundleLimits(max_file_bytes=4096))
    ignored = tar_of([*GOOD, ("__pycache__/huge.pyc", b"x" * 5000)])
    with pytest.raises(InvalidBundleError, match="in total"):  # ignored files still count
        read_bundle(ignored, limits=BundleLimits(max_total_bytes=5000))
    with pytest.raises(InvalidBundleError, match="unsupported path"):
        load_bundle(write_bundle(tmp_path / "long", {"d" * 100 + "/" + "x" * 200 + ".py": ""}))


# -- importing -------------------------------------------------------------------------


def _run(verified: VerifiedBundle, method: str) -> object:
    app = load_app(verified)
    tree = StateTree()
    clock = HybridClock(MEMBER)
    outcome = execute(
        app,
        tree,
        clock,
        ntp64_from_unix(1_700_000_000.0),
        method,
        b"",
        executor=MEMBER,
        context_id=CONTEXT,
    )
    return outcome.result


def test_load_app_needs_a_verified_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "demo"))
    with pytest.raises(TypeError, match="VerifiedBundle"):
        load_app(bundle)  # type: ignore[arg-type]
    assert package_name(bundle.app_id) not in sys.modules


def test_two_versions_of_an_app_coexist(tmp_path: Path) -> None:
    one = verify_bundle(load_bundle(write_bundle(tmp_path / "v1")), [], installed_locally=True)
    two = verify_bundle(
        load_bundle(
            write_bundle(tmp_path / "v2", {"helpers.py": 'VERSION = "2.0.0"\n'}, version="2.0.0")
        ),
        [],
        installed_locally=True,
    )
    app_one, app_two = load_app(one), load_app(two)
    assert app_one is not app_two
    assert load_app(one) is app_one  # loaded once per application id
    assert _run(one, "version") == "1.0.0"
    assert _run(two, "version") == "2.0.0"
    assert _run(two, "hit") == 1
    assert f"{package_name(one.bundle.app_id)}.demo" in sys.modules
    assert f"{package_name(two.bundle.app_id)}.helpers" in sys.modules
    assert "demo" not in sys.modules  # nothing leaks into the top-level namespace
    assert "helpers" not in sys.modules
    assert unload_app(one.bundle.app_id)
    assert not unload_app(one.bundle.app_id)
    assert f"{package_name(one.bundle.app_id)}.demo" not in sys.modules
    assert _run(two, "version") == "2.0.0"


def test_tracebacks_show_bundle_source(tmp_path: Path) -> None:
    verified = verify_bundle(
        load_bundle(write_bundle(tmp_path / "demo")), [], installed_locally=True
    )
    with pytest.raises(MethodFailedError) as info:
        _run(verified, "crash")
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    rendered = "".join(traceback.format_exception(cause))
    assert "bundle:demo@1.0.0/demo.py" in rendered
    assert 'raise ValueError("crashed in the bundle")' in rendered


@pytest.mark.parametrize(
    ("files", "manifest", "message"),
    [
        ({"demo.py": "raise RuntimeError('at import')\n"}, {}, "RuntimeError: at import"),
        ({"demo.py": "import helpers\n"}, {}, "ModuleNotFoundError"),  # absolute: not found
        ({"demo.py": "app = 1\n"}, {}, "is not an App"),
        ({}, {"name": "other"}, "the manifest says 'other'"),
        (
            {"demo.py": DEMO.replace("hits: Counter", "hits: int")},
            {},
            "Demo.hits: `int` is not a replicated type",
        ),
    ],
)
def test_bad_app_code_fails_to_load_and_leaves_nothing_behind(
    tmp_path: Path, files: dict[str, str | bytes], manifest: dict[str, object], message: str
) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "demo", files, **manifest))
    verified = verify_bundle(bundle, [], installed_locally=True)
    with pytest.raises(AppLoadError, match=message):
        load_app(verified)
    package = package_name(bundle.app_id)
    assert not [name for name in sys.modules if name.startswith(package)]
    assert bundle.app_id not in loaded_apps()


def test_packages_inside_bundles(tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {
        "demo.py": "from .pkg.sub import app\n",
        "pkg/__init__.py": "",
        "pkg/sub.py": DEMO.replace("from .helpers", "from ..helpers"),
        "ns/data.py": "X = 1\n",  # a directory without __init__ is a namespace package
        "ns/use.py": "from .data import X\n",
    }
    verified = verify_bundle(
        load_bundle(write_bundle(tmp_path / "demo", files)), [], installed_locally=True
    )
    assert _run(verified, "version") == "1.0.0"
    package = package_name(verified.bundle.app_id)
    used = __import__(f"{package}.ns.use", fromlist=["X"])
    assert used.X == 1
