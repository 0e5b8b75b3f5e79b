"""Identity: the known vector, every kind of bad key, key files and the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from lloom.cli.main import main
from lloom.errors import IdentityError
from lloom.identity import (
    SECP256K1_N,
    Identity,
    address_from_peer_id,
    address_from_point,
    address_from_public_key,
    load_identity,
    parse_private_key,
)

KEY0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ADDR0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
PEER0 = "16Uiu2HAmMUjGmiUhJeiZgu6ZZnLRkE2VViR2JgjqtW9aTZnHQqgg"


def test_known_vector() -> None:
    ident = Identity.from_hex(KEY0)
    assert ident.address == ADDR0
    assert str(ident.peer_id) == PEER0


def test_hex_without_prefix_and_whitespace() -> None:
    assert Identity.from_hex("  " + KEY0[2:] + "\n").address == ADDR0


def test_address_from_remote_peer_id() -> None:
    assert address_from_peer_id(PEER0) == ADDR0
    fresh = Identity.generate()
    assert address_from_peer_id(fresh.peer_id) == fresh.address


def test_addresses_are_what_eth_keys_computes() -> None:
    # lloom derives EIP-55 addresses itself (eth_keys costs 0.1 s of every start).
    from eth_keys.datatypes import PrivateKey

    for _ in range(200):
        ident = Identity.generate()
        public = PrivateKey(ident.private_key).public_key
        assert ident.address == public.to_checksum_address()
        assert address_from_public_key(public.to_compressed_bytes()) == ident.address
        assert address_from_public_key(b"\x04" + public.to_bytes()) == ident.address


def test_address_from_point_needs_64_bytes() -> None:
    with pytest.raises(IdentityError, match="64 bytes"):
        address_from_point(bytes(33))


def test_address_from_non_secp256k1_peer_id() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    ed = ID.from_pubkey(create_new_key_pair().public_key)
    with pytest.raises(IdentityError, match="secp256k1"):
        address_from_peer_id(ed)


def test_repr_hides_key() -> None:
    ident = Identity.from_hex(KEY0)
    assert KEY0[2:] not in repr(ident)
    assert KEY0[2:] not in str(ident)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("0x1234", "64 hex digits"),
        (KEY0 + "00", "64 hex digits"),
        ("zz" * 32, "not valid hex"),
        ("00" * 32, "zero"),
        (f"{SECP256K1_N:064x}", "curve order"),
        ("ff" * 32, "curve order"),
        ("", "64 hex digits"),
    ],
)
def test_bad_keys(bad: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message) as info:
        parse_private_key(bad)
    if len(bad) > 8:
        assert bad not in str(info.value)


def test_largest_valid_key() -> None:
    Identity.from_hex(f"{SECP256K1_N - 1:064x}")


def test_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.key"
    ident = Identity.generate()
    ident.write_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.from_key_file(path) == ident
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().write_key_file(path)
    assert Identity.from_key_file(path) == ident


def test_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.from_key_file(tmp_path / "missing")
    bad = tmp_path / "bad.key"
    bad.write_text("nonsense-key-material")
    with pytest.raises(IdentityError, match=r"bad\.key") as info:
        Identity.from_key_file(bad)
    assert "nonsense" not in str(info.value)


def test_load_identity_order(tmp_path: Path) -> None:
    other = Identity.generate()
    env = {"LLOOM_PRIVATE_KEY": other.private_key_hex}
    assert load_identity(KEY0, env=env).address == ADDR0
    assert load_identity(env=env) == other
    default = tmp_path / "client.key"
    created = load_identity(env={}, default_key_file=default)
    assert default.exists()
    assert load_identity(env={}, default_key_file=default) == created
    with pytest.raises(IdentityError, match="no private key"):
        load_identity(env={})
    with pytest.raises(IdentityError, match="LLOOM_PRIVATE_KEY"):
        load_identity(env={"LLOOM_PRIVATE_KEY": "0x12"})
    with pytest.raises(IdentityError, match="not both"):
        load_identity(KEY0, default)


def test_cli_identity_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "--private-key", KEY0, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"peer_id": PEER0, "address": ADDR0}


def test_cli_identity_text_from_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLOOM_PRIVATE_KEY", KEY0)
    assert main(["identity"]) == 0
    out = capsys.readouterr().out
    assert f"peer_id: {PEER0}" in out
    assert f"address: {ADDR0}" in out


def test_cli_identity_new_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my.key"
    assert main(["identity", "new", "--key-file", str(path), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert main(["identity", "--key-file", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["address"] == created["address"]
    assert main(["identity", "new", "--key-file", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0x1234", "g" * 64, "00" * 32, "ff" * 32])
def test_cli_bad_key_one_line_exit_2(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "--private-key", bad]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert bad not in captured.err
