"""`trionode app keygen` and `trionode app sign`: make a signer key, sign a bundle (offline).

Neither needs a node: they work on files. A signed bundle runs on any node that lists its
signer id in `apps.trusted_signers`, including nodes that fetch it from a peer when they
join a context that uses it (docs/apps.md, "Signing and sharing apps").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trionode.cli_contexts import table

EXIT_OK = 0


def cmd_keygen(args: argparse.Namespace) -> int:
    # Imported here: `trionode.cli` registers these commands for every run, and keys load
    # the crypto libraries that client commands must not pay for.
    from trionode.sdk.signer import signer_id, write_signer_key  # noqa: PLC0415
    from trionode.wire.keys import PrivateKey  # noqa: PLC0415

    key = PrivateKey.generate()
    path = Path(args.key)
    write_signer_key(path, key, force=args.force)  # SignerKeyError: one line from cli.main
    signer = signer_id(key)
    if args.json:
        print(json.dumps({"signer": signer, "keyFile": str(path)}, sort_keys=True))
    else:
        print(signer)
    return EXIT_OK


def sign_path(bundle_path: Path, key_path: Path, output: Path | None) -> dict[str, Any]:
    """Sign the bundle at `bundle_path` with the key file at `key_path`.

    A directory is signed in place (or packed, signed, to `output`); an archive is written
    signed as a deterministic `.tar.gz` to `output`, by default `<stem>.signed.tar.gz`
    beside it. Returns what the command prints.

    Raises:
        SignerKeyError: the key file is unusable.
        BundleError: the bundle is not valid.
    """
    from trionode.sdk.bundle import (  # noqa: PLC0415 - see cmd_keygen
        load_bundle,
        pack_bundle,
        sign_bundle,
        signed_copy,
    )
    from trionode.sdk.signer import read_signer_key, signer_id  # noqa: PLC0415

    key = read_signer_key(key_path)
    if bundle_path.is_dir() and output is None:
        signed = sign_bundle(bundle_path, key)
        written = bundle_path
    else:
        signed = signed_copy(load_bundle(bundle_path), key)
        written = output if output is not None else _signed_name(bundle_path)
        tmp = written.with_name(f".{written.name}.tmp")
        tmp.write_bytes(pack_bundle(signed))
        tmp.replace(written)  # no half-written bundle under the final name
    return {
        "applicationId": signed.app_id_base58,
        "name": signed.name,
        "version": signed.version,
        "signer": signer_id(key),
        "bundle": str(written),
    }


def _signed_name(archive: Path) -> Path:
    stem = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return archive.with_name(f"{stem}.signed.tar.gz")


def cmd_sign(args: argparse.Namespace) -> int:
    output = None if args.output is None else Path(args.output)
    doc = sign_path(Path(args.bundle), Path(args.key), output)
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        print(table(list(doc.items()), ("field", "value")))
    return EXIT_OK


def add_app_sign_commands(
    leaves: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Register `app keygen` and `app sign` on the `app` group's sub-parsers."""
    keygen = leaves.add_parser(
        "keygen", parents=[common], help="make an app signer key; prints its signer id"
    )
    keygen.add_argument("--key", required=True, metavar="KEYFILE", help="key file to write")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(func=cmd_keygen)
    sign = leaves.add_parser(
        "sign", parents=[common], help="sign a bundle (directory in place, archive to a copy)"
    )
    sign.add_argument("bundle", metavar="BUNDLE", help="bundle directory or archive")
    sign.add_argument("--key", required=True, metavar="KEYFILE", help="signer key file")
    sign.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the signed bundle as .tar.gz here (default: a directory is signed in "
        "place, an archive is copied to NAME.signed.tar.gz)",
    )
    sign.set_defaults(func=cmd_sign)
