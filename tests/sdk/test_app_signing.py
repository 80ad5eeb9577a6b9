"""`trionode app keygen` / `app sign`: signer key files and signed bundles (offline)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from trionode.cli import main
from trionode.config import parse_config
from trionode.errors import ConfigError
from trionode.sdk.bundle import (
    BundleSignatureError,
    InvalidBundleError,
    UntrustedBundleError,
    load_bundle,
    pack_bundle,
    read_bundle,
    verify_bundle,
)
from trionode.sdk.signer import (
    MAX_KEY_FILE,
    SignerKeyError,
    decode_signer_key,
    encode_signer_key,
    read_signer_key,
    signer_id,
)
from trionode.wire.keys import PrivateKey

APPS = Path(__file__).resolve().parents[2] / "apps"


def _keygen(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["app", "keygen", "--key", str(path)]) == 0
    return capsys.readouterr().out.strip()


def test_keygen_writes_a_private_key_file_and_prints_its_signer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "apps.key"
    signer = _keygen(path, capsys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signer_id(read_signer_key(path)) == signer
    # The printed id is what config accepts as a trusted signer.
    parse_config({"apps": {"trusted_signers": [signer]}}, source="config.toml")


def test_keygen_never_replaces_a_key_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "apps.key"
    first = _keygen(path, capsys)
    assert main(["app", "keygen", "--key", str(path)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert signer_id(read_signer_key(path)) == first
    assert main(["app", "keygen", "--key", str(path), "--force", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)["signer"]
    assert second != first
    assert signer_id(read_signer_key(path)) == second


def test_sign_a_directory_in_place_then_it_verifies_for_that_signer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = shutil.copytree(APPS / "kv_store", tmp_path / "kv_store")
    signer = _keygen(tmp_path / "apps.key", capsys)
    args = ["app", "sign", str(bundle), "--key", str(tmp_path / "apps.key"), "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["signer"] == signer
    assert doc["bundle"] == str(bundle)
    signed = load_bundle(bundle)
    assert signed.app_id_base58 == doc["applicationId"]
    assert verify_bundle(signed, [signer]).trust == "trusted-signer"
    with pytest.raises(UntrustedBundleError, match="not a trusted signer"):
        verify_bundle(signed, [])


def test_sign_an_archive_writes_a_signed_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "kv.tar.gz"
    archive.write_bytes(pack_bundle(load_bundle(APPS / "kv_store")))
    signer = _keygen(tmp_path / "apps.key", capsys)
    assert main(["app", "sign", str(archive), "--key", str(tmp_path / "apps.key")]) == 0
    out = capsys.readouterr().out
    signed_path = tmp_path / "kv.signed.tar.gz"
    assert str(signed_path) in out
    assert signer in out
    signed = read_bundle(signed_path.read_bytes())
    assert verify_bundle(signed, [signer]).signer is not None
    # The original is untouched: still unsigned.
    assert load_bundle(archive).manifest.signer is None


def test_bytes_changed_after_signing_break_the_signature(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    bundle = shutil.copytree(APPS / "kv_store", tmp_path / "kv_store")
    (tmp_path / "apps.key").write_bytes(encode_signer_key(key))
    assert main(["app", "sign", str(bundle), "--key", str(tmp_path / "apps.key")]) == 0
    module = bundle / "kv_store.py"
    module.write_text(module.read_text() + "\n# changed after signing\n")
    with pytest.raises(BundleSignatureError, match="does not match the bundle"):
        verify_bundle(load_bundle(bundle), [signer_id(key)])


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a trionode signer key file"),
        (b"{" * 5000, "under 4 KiB"),
        (b'{"format": "trionode/app-signer-key/v9", "signer": "x", "seed": "y"}', "v9"),
        (b'{"format": "trionode/app-signer-key/v1", "signer": "x", "seed": "0OIl"}', "seed"),
        (b'{"format": "trionode/app-signer-key/v1", "signer": "x", "seed": "zz"}', "32-byte"),
    ],
)
def test_hostile_key_files_are_refused_with_the_reason(content: bytes, reason: str) -> None:
    with pytest.raises(SignerKeyError, match=reason):
        decode_signer_key(content)


def test_a_key_file_whose_seed_is_not_its_signer_is_refused(tmp_path: Path) -> None:
    document = json.loads(encode_signer_key(PrivateKey.generate()))
    document["signer"] = signer_id(PrivateKey.generate())
    with pytest.raises(SignerKeyError, match="does not belong to signer"):
        decode_signer_key(json.dumps(document).encode())
    huge = tmp_path / "huge.key"
    with huge.open("wb") as f:
        f.truncate(MAX_KEY_FILE * 1000)
    with pytest.raises(SignerKeyError, match="under 4 KiB"):
        read_signer_key(huge)


def test_sign_with_a_bad_key_or_bundle_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.key").write_text("not json")
    assert main(["app", "sign", str(APPS / "kv_store"), "--key", str(tmp_path / "bad.key")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not a trionode signer key file" in err
    _keygen(tmp_path / "ok.key", capsys)
    (tmp_path / "empty").mkdir()
    assert main(["app", "sign", str(tmp_path / "empty"), "--key", str(tmp_path / "ok.key")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "manifest.json" in err


def test_oversized_signature_fields_are_refused_before_decoding(tmp_path: Path) -> None:
    bundle = shutil.copytree(APPS / "kv_store", tmp_path / "kv_store")
    manifest = bundle / "manifest.json"
    document = json.loads(manifest.read_text())
    document["signer"] = "1" * 40
    document["signature"] = "2" * 60_000
    manifest.write_text(json.dumps(document))
    with pytest.raises(InvalidBundleError, match=r"manifest\.json"):
        load_bundle(bundle)


@pytest.mark.parametrize("signer", ["nope", "0" * 63, "1" * 200, ""])
def test_trusted_signers_in_config_must_be_signer_ids(signer: str) -> None:
    with pytest.raises(ConfigError, match="is not a signer id"):
        parse_config({"apps": {"trusted_signers": [signer]}}, source="config.toml")


def test_trusted_signers_accept_hex_and_base58() -> None:
    key = PrivateKey.generate()
    ids = [signer_id(key), key.public_key.data.hex()]
    parsed = parse_config({"apps": {"trusted_signers": ids}}, source="config.toml")
    assert parsed.apps.trusted_signers == ids
