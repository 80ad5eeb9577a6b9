"""`trionode invitation show`, and the addresses a wildcard node hands out (never 0.0.0.0)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import base58
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from trionode.api.app import create_app
from trionode.cli import main
from trionode.cli_invitations import describe_invitation
from trionode.config import FileConfig
from trionode.context.invitations import AppRef, create_invitation, parse_invitation
from trionode.node import open_node
from trionode.testing import make_test_config

from .net.host_helpers import WildcardOnLoopback

APPS = Path(__file__).resolve().parents[1] / "apps"
PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def _invitation(
    *, expires_at: float, invitee: bytes | None = None, app: AppRef | None = None
) -> str:
    return create_invitation(
        admin_key=Ed25519PrivateKey.generate(),
        context_id=b"\x01" * 32,
        application_id=b"\x02" * 32,
        role="read-only",
        expires_at=expires_at,
        inviter_peer=PEER,
        inviter_addrs=["/ip4/192.0.2.7/tcp/2428", "/dns/node.example.org/tcp/443"],
        invitee=invitee,
        app=app,
    ).text


def test_show_json_decodes_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    expires = time.time() + 3600
    assert main(["invitation", "show", _invitation(expires_at=expires), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["contextId"] == base58.b58encode(b"\x01" * 32).decode()
    assert doc["applicationId"] == base58.b58encode(b"\x02" * 32).decode()
    assert doc["role"] == "read-only"
    assert doc["expired"] is False
    assert doc["expiresAt"].startswith(time.strftime("%Y-%m-%d", time.gmtime(expires)))
    assert doc["inviterPeer"] == PEER
    assert doc["addresses"] == ["/ip4/192.0.2.7/tcp/2428", "/dns/node.example.org/tcp/443"]
    assert doc["invitee"] is None
    assert doc["oneTimeSecret"] is True


def test_show_table_flags_expiry_and_invitee(capsys: pytest.CaptureFixture[str]) -> None:
    invitee = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    text = _invitation(expires_at=time.time() - 5, invitee=invitee)
    assert main(["invitation", "show", text]) == 0
    out = capsys.readouterr().out
    assert "(EXPIRED)" in out
    assert base58.b58encode(invitee).decode() in out
    assert "address       /ip4/192.0.2.7/tcp/2428" in out


@pytest.mark.parametrize("signer", [b"\x05" * 32, None])
def test_show_prints_the_app_the_joiner_would_fetch(
    capsys: pytest.CaptureFixture[str], signer: bytes | None
) -> None:
    app = AppRef(
        application_id=b"\x02" * 32,
        bundle_blob_id=b"\x04" * 32,
        name="kv_store",
        version="1.2",
        signer=signer,
    )
    text = _invitation(expires_at=time.time() + 60, app=app)
    assert main(["invitation", "show", text, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    signer_b58 = None if signer is None else base58.b58encode(signer).decode()
    assert doc["app"] == {
        "applicationId": base58.b58encode(b"\x02" * 32).decode(),
        "name": "kv_store",
        "version": "1.2",
        "signer": signer_b58,
        "bundleBlobId": base58.b58encode(b"\x04" * 32).decode(),
    }
    assert main(["invitation", "show", text]) == 0
    out = capsys.readouterr().out
    assert "kv_store v1.2" in out
    assert f"app signer    {signer_b58 or 'unsigned'}" in out
    # An invitation without the description (older inviters) says what the joiner must do.
    assert main(["invitation", "show", _invitation(expires_at=time.time() + 60)]) == 0
    assert "install it before joining" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: "hello", "not a trionode invitation"),
        (lambda t: t[:-10], "damaged"),
        (lambda t: "trinv1" + "z" * 20_000, "not a trionode invitation"),
    ],
)
def test_show_bad_input_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], mangle: object, message: str
) -> None:
    assert callable(mangle)
    text = mangle(_invitation(expires_at=time.time() + 60))
    assert main(["invitation", "show", text]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_forged_invitation_is_refused() -> None:
    import msgspec  # noqa: PLC0415

    from trionode.context import invitations as inv  # noqa: PLC0415

    signed, invitation = parse_invitation(_invitation(expires_at=time.time() + 60))
    forged_body = msgspec.msgpack.encode(msgspec.structs.replace(invitation, role="admin"))
    forged = msgspec.structs.replace(signed, invitation=forged_body)
    text = inv.PREFIX + base58.b58encode(msgspec.msgpack.encode(forged)).decode()
    with pytest.raises(inv.InvitationError, match="signature"):
        describe_invitation(text)


def _wildcard(file: FileConfig) -> FileConfig:
    return replace(file, network=replace(file.network, listen=["/ip4/0.0.0.0/tcp/0"]))


@pytest.mark.real_network
async def test_wildcard_node_hands_out_no_wildcard(tmp_path: Path) -> None:
    config, token = make_test_config(tmp_path / "a", api=False, configure=_wildcard)
    with trio.fail_after(30):
        async with open_node(config, transport=WildcardOnLoopback()) as node:
            assert str(node.host.listen_addrs[0]).startswith("/ip4/0.0.0.0/tcp/")
            port = node.host.listen_addrs[0].tcp_host_port()
            assert port is not None
            addresses = node.listen_addresses()
            assert addresses, "a machine always has at least loopback"
            for address in addresses:
                assert "/0.0.0.0/" not in address
                assert f"/tcp/{port[1]}/p2p/{node.peer_id}" in address
            # The invitation carries the same addresses, and `invitation show` shows them.
            app = await node.applications.install(str(APPS / "kv_store"))
            context = (await node.contexts.create(app.application_id)).context_id
            text = await node.joins.invite(context)
            shown = describe_invitation(text)["addresses"]
            assert [f"{a}/p2p/{node.peer_id}" for a in shown] == addresses
            # So does /admin-api/node (what `trionode info` prints).
            client = create_app(node).test_client()
            response = await client.get(
                "/admin-api/node", headers={"Authorization": f"Bearer {token}"}
            )
            body = await response.get_json()
            assert body["addresses"] == addresses
            assert body["peerId"] == node.peer_id
            # Alone, AutoNAT has nobody to ask: unknown, in the API and in the metrics.
            assert body["reachability"]["status"] == "unknown"
            registry = node.metrics.registry
            assert registry.get_sample_value("trionode_autonat_status", {"status": "unknown"}) == 1
