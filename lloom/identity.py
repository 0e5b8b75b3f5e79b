"""One secp256k1 key is a node's whole identity: its libp2p PeerId and its EVM address.

The PeerId (``16Uiu2…``) embeds the compressed public key, so the EVM address of any remote
peer can be derived from its authenticated PeerId alone (:func:`address_from_peer_id`).

Keys come from a hex string (with or without ``0x``), the ``LLOOM_PRIVATE_KEY`` environment
variable, or a key file (hex, created with mode 0600). Error messages never contain the key.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import coincurve
from eth_hash.auto import keccak
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import Secp256k1PublicKey, create_new_key_pair
from libp2p.peer.id import ID

from lloom.errors import IdentityError
from lloom.paths import exposed_to_others, private_dir

#: Environment variable a private key may be read from.
ENV_PRIVATE_KEY = "LLOOM_PRIVATE_KEY"

#: Order of the secp256k1 group; a private key must be in [1, N-1].
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def parse_private_key(text: str) -> bytes:
    """Parse a 32-byte secp256k1 private key from hex (``0x`` optional).

    Raises :class:`IdentityError` with a message that never repeats the input.
    """
    s = text.strip()
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    if len(s) != 64:
        raise IdentityError(
            f"private key must be 32 bytes (64 hex digits), got {len(s)} characters"
        )
    try:
        raw = bytes.fromhex(s)
    except ValueError:
        raise IdentityError("private key is not valid hex") from None
    value = int.from_bytes(raw, "big")
    if value == 0:
        raise IdentityError("private key is zero, which is not a valid secp256k1 key")
    if value >= SECP256K1_N:
        raise IdentityError("private key is not below the secp256k1 curve order")
    return raw


@dataclass(frozen=True)
class Identity:
    """A node's identity: the private key and everything derived from it."""

    private_key: bytes = field(repr=False)
    keypair: KeyPair = field(repr=False, compare=False)
    peer_id: ID
    address: str

    @classmethod
    def from_bytes(cls, raw: bytes) -> Identity:
        """Build an identity from a validated 32-byte private key."""
        if len(raw) != 32:
            raise IdentityError(f"private key must be 32 bytes, got {len(raw)}")
        parse_private_key(raw.hex())  # range checks
        keypair = create_new_key_pair(raw)
        peer_id = ID.from_pubkey(keypair.public_key)
        point = coincurve.PrivateKey(raw).public_key.format(compressed=False)[1:]
        address = address_from_point(point)
        return cls(private_key=raw, keypair=keypair, peer_id=peer_id, address=address)

    @classmethod
    def from_hex(cls, text: str) -> Identity:
        """Build an identity from a hex private key (``0x`` optional)."""
        return cls.from_bytes(parse_private_key(text))

    @classmethod
    def generate(cls) -> Identity:
        """Generate a new random identity."""
        while True:
            raw = secrets.token_bytes(32)
            if 0 < int.from_bytes(raw, "big") < SECP256K1_N:
                return cls.from_bytes(raw)

    @classmethod
    def from_key_file(cls, path: Path) -> Identity:
        """Load an identity from a key file holding one hex private key.

        A key file that other users can read is refused, with the command that fixes it.
        """
        exposed = exposed_to_others(path)
        if exposed is not None:
            raise IdentityError(f"key file {exposed}")
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise IdentityError(f"key file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"cannot read key file {path}: {type(exc).__name__}") from None
        try:
            return cls.from_hex(text)
        except IdentityError as exc:
            raise IdentityError(f"key file {path}: {exc}") from None

    @property
    def private_key_hex(self) -> str:
        """The private key as ``0x``-prefixed hex. Handle with care; never log it."""
        return "0x" + self.private_key.hex()

    def write_key_file(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the private key to ``path`` with mode 0600 (created atomically)."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        private_dir(path.parent)
        try:
            fd = os.open(path, flags, stat.S_IRUSR | stat.S_IWUSR)
        except FileExistsError:
            raise IdentityError(f"key file {path} already exists; refusing to overwrite") from None
        except OSError as exc:
            raise IdentityError(f"cannot create key file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(self.private_key.hex() + "\n")


def load_identity(
    private_key: str | None = None,
    key_file: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    default_key_file: Path | None = None,
) -> Identity:
    """Resolve a node identity from the usual sources, in order.

    1. ``private_key`` (a ``--private-key`` flag), 2. ``key_file`` (``--key-file``),
    3. the ``LLOOM_PRIVATE_KEY`` environment variable, 4. ``default_key_file``, created
    with a new key if missing. Without any of them an :class:`IdentityError` is raised.
    """
    if private_key is not None and key_file is not None:
        raise IdentityError("give either --private-key or --key-file, not both")
    if private_key is not None:
        return Identity.from_hex(private_key)
    if key_file is not None:
        return Identity.from_key_file(key_file)
    environ = os.environ if env is None else env
    from_env = environ.get(ENV_PRIVATE_KEY)
    if from_env:
        try:
            return Identity.from_hex(from_env)
        except IdentityError as exc:
            raise IdentityError(f"{ENV_PRIVATE_KEY}: {exc}") from None
    if default_key_file is not None:
        if default_key_file.exists():
            return Identity.from_key_file(default_key_file)
        ident = Identity.generate()
        ident.write_key_file(default_key_file)
        return ident
    raise IdentityError(f"no private key: pass --private-key, --key-file, or set {ENV_PRIVATE_KEY}")


def address_from_public_key(public_key: bytes) -> str:
    """EIP-55 address of a compressed or uncompressed secp256k1 public key."""
    try:
        point = coincurve.PublicKey(public_key).format(compressed=False)[1:]
    except ValueError:
        raise IdentityError("not a valid secp256k1 public key") from None
    return address_from_point(point)


def address_from_point(point: bytes) -> str:
    """EIP-55 address of a public key given as its 64-byte uncompressed point (x then y):
    the last 20 bytes of its Keccak-256, each hex letter upper-cased where that nibble of
    the Keccak-256 of the lower-case hex is 8 or more. What ``eth_keys`` computes, without
    importing it (with ``eth_utils`` and pydantic, a tenth of a second at every start)."""
    if len(point) != 64:
        raise IdentityError("a public key point must be 64 bytes")
    hex_address = keccak(point)[-20:].hex()
    nibbles = keccak(hex_address.encode("ascii")).hex()
    return "0x" + "".join(
        c.upper() if int(n, 16) >= 8 else c for c, n in zip(hex_address, nibbles[:40], strict=True)
    )


def address_from_peer_id(peer_id: ID | str) -> str:
    """The EVM address of a peer, derived from the secp256k1 key inside its PeerId.

    Raises :class:`IdentityError` if the PeerId does not embed a secp256k1 key (for
    example an Ed25519 or RSA peer).
    """
    pid = ID.from_base58(peer_id) if isinstance(peer_id, str) else peer_id
    try:
        pub = pid.extract_public_key()
    except Exception as exc:  # py-libp2p raises assorted errors for odd ids
        raise IdentityError(f"cannot extract a public key from peer id {pid}") from exc
    if not isinstance(pub, Secp256k1PublicKey):
        raise IdentityError(f"peer id {pid} does not carry a secp256k1 key")
    return address_from_public_key(pub.to_bytes())
