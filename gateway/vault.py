"""The vault: AES-256-GCM sealing of stored secrets under versioned master keys.

Pure crypto, no I/O. Each sealed value records the id (`kid`) of the master key that
sealed it; the kid is derived from the key itself, so no version numbering is configured.
Associated data binds a ciphertext to its row: copied to another row it fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import VaultSealed
from gateway.secret import Secret

NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_KNOWN_PREFIXES: Final = (
    "sk_test_",
    "sk_live_",
    "rk_test_",
    "rk_live_",
    "pk_test_",
    "pk_live_",
    "sk-proj-",
    "sk-",
    "AIza",
)


class VaultError(Exception):
    """A sealed value that does not open: wrong key, wrong row, or tampered bytes."""


@dataclass(frozen=True)
class Sealed:
    kid: str
    blob: bytes  # nonce || ciphertext || tag


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)


class MasterKey:
    """One master key and the subkeys derived from it (encryption, fingerprints)."""

    def __init__(self, master: Secret[bytes]) -> None:
        raw = master.reveal()
        if len(raw) != 32:
            raise ValueError("a master key is 32 bytes")
        self.kid = _derive(raw, b"wallet kid v1")[:8].hex()
        self._aead = AESGCM(_derive(raw, b"wallet aes-256-gcm v1"))
        self._fingerprint_key = _derive(raw, b"wallet fingerprint v1")

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        return Sealed(self.kid, nonce + self._aead.encrypt(nonce, plaintext, aad))

    def open(self, sealed: Sealed, aad: bytes) -> bytes:
        nonce, body = sealed.blob[:NONCE_BYTES], sealed.blob[NONCE_BYTES:]
        if len(nonce) != NONCE_BYTES or len(body) < TAG_BYTES:
            # A truncated blob would make AESGCM raise ValueError, not InvalidTag.
            raise VaultError(f"sealed value under key {self.kid} is truncated")
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise VaultError(f"sealed value under key {self.kid} failed authentication") from None

    def fingerprint(self, namespace: str, secret: Secret[str]) -> bytes:
        message = namespace.encode() + b"\x00" + secret.reveal().encode()
        return hmac.new(self._fingerprint_key, message, hashlib.sha256).digest()


class Vault:
    """The keyring: the current master key seals; it and previous keys open."""

    def __init__(
        self, current: Secret[bytes] | None, previous: tuple[Secret[bytes], ...] = ()
    ) -> None:
        self._current = MasterKey(current) if current is not None else None
        keys = ([self._current] if self._current else []) + [MasterKey(p) for p in previous]
        self._by_kid = {k.kid: k for k in keys}
        # Set by the canary check at startup (canary.py); until then nothing is decrypted.
        self.unsealed = False

    @property
    def current_kid(self) -> str | None:
        return self._current.kid if self._current else None

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._by_kid)

    def _require_current(self) -> MasterKey:
        if self._current is None or not self.unsealed:
            raise VaultSealed()
        return self._current

    def seal(self, plaintext: Secret[str], aad: bytes) -> Sealed:
        return self._require_current().seal(plaintext.reveal().encode(), aad)

    def open(self, sealed: Sealed, aad: bytes) -> Secret[str]:
        return Secret(self.open_bytes(sealed, aad).decode())

    def open_bytes(self, sealed: Sealed, aad: bytes) -> bytes:
        if not self.unsealed:
            raise VaultSealed()
        return self.open_unchecked(sealed, aad)

    def open_unchecked(self, sealed: Sealed, aad: bytes) -> bytes:
        """Open without the sealed-state gate: used only by the canary check itself."""
        key = self._by_kid.get(sealed.kid)
        if key is None:
            raise VaultError(f"no master key with id {sealed.kid} is configured")
        return key.open(sealed, aad)

    def seal_bytes_unchecked(self, plaintext: bytes, aad: bytes) -> Sealed:
        if self._current is None:
            raise VaultSealed()
        return self._current.seal(plaintext, aad)

    def fingerprint(self, namespace: str, secret: Secret[str]) -> bytes:
        return self._require_current().fingerprint(namespace, secret)

    def fingerprints(self, namespace: str, secret: Secret[str]) -> list[bytes]:
        """The fingerprint under every configured key: duplicates are found mid-rotation too."""
        self._require_current()
        return [k.fingerprint(namespace, secret) for k in self._by_kid.values()]


def key_aad(key_id: str, owner_id: str, service: str) -> bytes:
    """Associated data binding a stored API key to its row."""
    return b"\x00".join((b"wallet-key-v1", key_id.encode(), owner_id.encode(), service.encode()))


def mask(secret: Secret[str]) -> str:
    """A hint safe to show anywhere: a known format prefix and the last four characters."""
    value = secret.reveal()
    prefix = next((p for p in _KNOWN_PREFIXES if value.startswith(p)), "")
    if len(value) - len(prefix) < 12:
        return f"{prefix}…{value[-2:]}" if len(value) >= 8 else "…"
    return f"{prefix}…{value[-4:]}"
