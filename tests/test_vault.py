"""The vault (pure, no server): sealing, tamper detection, row binding, key versions, masks,
and the Secret type that keeps plaintext out of reprs and pickles."""

from __future__ import annotations

import os
import pickle
import uuid

import pytest

from gateway.errors import VaultSealed
from gateway.secret import Secret
from gateway.vault import NONCE_BYTES, MasterKey, Sealed, Vault, VaultError, key_aad, mask

PLAINTEXT = "sk_live_" + "Zq9" * 10
OWNER = str(uuid.uuid4())
KEY_ID = str(uuid.uuid4())
AAD = key_aad(KEY_ID, OWNER, "stripe")


def unsealed(current: bytes | None, *previous: bytes) -> Vault:
    vault = Vault(None if current is None else Secret(current), tuple(Secret(p) for p in previous))
    vault.unsealed = True  # what the canary check does at startup
    return vault


@pytest.fixture
def old_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def vault(old_key: bytes) -> Vault:
    return unsealed(old_key)


def test_round_trip(vault: Vault) -> None:
    sealed = vault.seal(Secret(PLAINTEXT), AAD)
    assert PLAINTEXT.encode() not in sealed.blob
    opened = vault.open(sealed, AAD)
    assert isinstance(opened, Secret)
    assert opened.reveal() == PLAINTEXT


def test_round_trip_unicode_and_long(vault: Vault) -> None:
    secret = "pässwörd-✓-" + "x" * 4000
    assert vault.open(vault.seal(Secret(secret), AAD), AAD).reveal() == secret


def test_every_seal_uses_a_fresh_nonce(vault: Vault) -> None:
    blobs = [vault.seal(Secret(PLAINTEXT), AAD).blob for _ in range(20)]
    assert len(set(blobs)) == len(blobs)
    assert len({b[:NONCE_BYTES] for b in blobs}) == len(blobs)
    assert all(
        vault.open(Sealed(vault.current_kid or "", b), AAD).reveal() == PLAINTEXT for b in blobs
    )


def test_flipping_any_byte_fails_authentication(vault: Vault) -> None:
    sealed = vault.seal(Secret(PLAINTEXT), AAD)
    assert len(sealed.blob) == NONCE_BYTES + len(PLAINTEXT) + 16
    for i in range(len(sealed.blob)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(sealed.blob)
            tampered[i] ^= flip
            with pytest.raises(VaultError):
                vault.open(Sealed(sealed.kid, bytes(tampered)), AAD)


def test_truncated_or_extended_blob_fails(vault: Vault) -> None:
    sealed = vault.seal(Secret(PLAINTEXT), AAD)
    for blob in (sealed.blob[:-1], sealed.blob + b"\x00", sealed.blob[:NONCE_BYTES], b""):
        with pytest.raises(VaultError):
            vault.open(Sealed(sealed.kid, blob), AAD)


@pytest.mark.parametrize(
    "other_aad",
    [
        key_aad(str(uuid.uuid4()), OWNER, "stripe"),  # another row's id
        key_aad(KEY_ID, str(uuid.uuid4()), "stripe"),  # another owner
        key_aad(KEY_ID, OWNER, "openai"),  # another service
        b"",
    ],
    ids=["key-id", "owner", "service", "empty"],
)
def test_ciphertext_is_bound_to_its_row(vault: Vault, other_aad: bytes) -> None:
    sealed = vault.seal(Secret(PLAINTEXT), AAD)
    with pytest.raises(VaultError):
        vault.open(sealed, other_aad)


def test_key_aad_fields_cannot_be_shifted() -> None:
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert key_aad("ab", "c", "s") != key_aad("a", "bc", "s")


def test_another_master_key_cannot_open(vault: Vault) -> None:
    sealed = vault.seal(Secret(PLAINTEXT), AAD)
    stranger = unsealed(os.urandom(32))
    with pytest.raises(VaultError, match="no master key with id"):
        stranger.open(sealed, AAD)
    # Even claiming the stranger's kid, the bytes don't open under its key.
    with pytest.raises(VaultError):
        stranger.open(Sealed(stranger.current_kid or "", sealed.blob), AAD)


def test_previous_keys_open_old_ciphertexts(old_key: bytes, vault: Vault) -> None:
    old_sealed = vault.seal(Secret(PLAINTEXT), AAD)
    new_key = os.urandom(32)
    rotated = unsealed(new_key, old_key)
    assert rotated.open(old_sealed, AAD).reveal() == PLAINTEXT
    new_sealed = rotated.seal(Secret(PLAINTEXT), AAD)
    assert new_sealed.kid == rotated.current_kid != old_sealed.kid
    assert rotated.open(new_sealed, AAD).reveal() == PLAINTEXT
    # The old vault alone knows nothing of the new key.
    with pytest.raises(VaultError, match="no master key with id"):
        vault.open(new_sealed, AAD)
    assert set(rotated.kids) == {old_sealed.kid, new_sealed.kid}


def test_kid_is_stable_and_differs_per_key(old_key: bytes) -> None:
    first = MasterKey(Secret(old_key)).kid
    assert first == MasterKey(Secret(bytes(old_key))).kid == unsealed(old_key).current_kid
    assert len(first) == 16
    assert int(first, 16) >= 0
    others = {MasterKey(Secret(os.urandom(32))).kid for _ in range(20)}
    assert first not in others
    assert len(others) == 20
    # The kid does not reveal the key.
    assert old_key.hex()[:16] != first


def test_master_key_must_be_32_bytes() -> None:
    for size in (0, 16, 31, 33, 64):
        with pytest.raises(ValueError, match="32 bytes"):
            MasterKey(Secret(os.urandom(size)))


def test_fingerprints(old_key: bytes, vault: Vault) -> None:
    secret = Secret(PLAINTEXT)
    same = vault.fingerprint("api-key", Secret(PLAINTEXT))
    assert vault.fingerprint("api-key", secret) == same
    assert PLAINTEXT.encode() not in same
    assert vault.fingerprint("api-key", Secret(PLAINTEXT + "x")) != same
    assert vault.fingerprint("other-namespace", secret) != same
    assert unsealed(os.urandom(32)).fingerprint("api-key", secret) != same

    assert vault.fingerprints("api-key", secret) == [same]
    new_key = os.urandom(32)
    rotated = unsealed(new_key, old_key, os.urandom(32))
    prints = rotated.fingerprints("api-key", secret)
    assert len(prints) == 3 == len(set(prints))
    # Mid-rotation a duplicate stored under the old key is still found.
    assert same in prints
    assert prints[0] == rotated.fingerprint("api-key", secret)


def test_sealed_vault_refuses_everything(old_key: bytes) -> None:
    opened = unsealed(old_key)
    sealed = opened.seal(Secret(PLAINTEXT), AAD)
    vault = Vault(Secret(old_key))
    assert vault.unsealed is False
    with pytest.raises(VaultSealed):
        vault.seal(Secret(PLAINTEXT), AAD)
    with pytest.raises(VaultSealed):
        vault.open(sealed, AAD)
    with pytest.raises(VaultSealed):
        vault.open_bytes(sealed, AAD)
    with pytest.raises(VaultSealed):
        vault.fingerprint("api-key", Secret(PLAINTEXT))
    with pytest.raises(VaultSealed):
        vault.fingerprints("api-key", Secret(PLAINTEXT))
    assert VaultSealed.status == 503
    assert VaultSealed.code == "vault_sealed"


def test_vault_without_a_current_key_cannot_seal(old_key: bytes) -> None:
    vault = unsealed(None)
    assert vault.current_kid is None
    assert vault.kids == ()
    with pytest.raises(VaultSealed):
        vault.seal(Secret(PLAINTEXT), AAD)
    with pytest.raises(VaultSealed):
        vault.seal_bytes_unchecked(b"x", AAD)


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("sk_test_" + "4eC39HqLyjWDarjtT1zd" + "a1b2", "sk_test_…a1b2"),
        ("sk_live_" + "Q" * 24 + "a1b2", "sk_live_…a1b2"),
        ("rk_live_" + "Q" * 24 + "9z9z", "rk_live_…9z9z"),
        ("sk-proj-" + "abcdefghijklmnop" * 3 + "wxyz", "sk-proj-…wxyz"),
        ("sk-" + "A" * 44 + "wxyz", "sk-…wxyz"),
        ("AIza" + "B" * 31 + "qrst", "AIza…qrst"),
        ("0123456789abcdef0123456789abcdef", "…cdef"),
    ],
)
def test_mask(secret: str, expected: str) -> None:
    assert mask(Secret(secret)) == expected


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "a",
        "abc",
        "abcdefg",
        "abcdefgh",
        "hunter2hunt",
        "sk_test_abc",
        "sk-proj-abcdefghijk",
        "sk-" + "x" * 11,
        "AIzaShort1234",
    ],
)
def test_mask_reveals_at_most_two_chars_of_short_secrets(secret: str) -> None:
    masked = mask(Secret(secret))
    assert "…" in masked
    prefix, _, tail = masked.partition("…")
    assert secret.startswith(prefix)
    assert len(tail) <= 2
    assert masked != secret
    body = secret[len(prefix) :]
    assert body == "" or body not in masked or len(body) <= 2


def test_secret_never_prints_itself() -> None:
    value = "sk_live_never-print-me-123"
    secret = Secret(value)
    assert repr(secret) == "Secret(***)"
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert f"{secret!r}" == "Secret(***)"
    assert format(secret) == "***"
    template, old_style = "{}", "%s %r"  # str.format and % are what is under test
    assert template.format(secret) == "***"
    assert old_style % (secret, secret) == "*** Secret(***)"
    assert value not in repr([secret, {"k": secret}, (secret,)])
    assert secret.reveal() == value
    assert Secret(b"raw-bytes-secret").reveal() == b"raw-bytes-secret"
    assert str(Secret(b"raw-bytes-secret")) == "***"


def test_secret_cannot_be_pickled() -> None:
    for secret in (Secret("sk_live_pickle-me-not"), Secret(b"\x00" * 32)):
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError, match="cannot be pickled"):
                pickle.dumps(secret, protocol=protocol)
        with pytest.raises(TypeError):
            pickle.dumps({"nested": [secret]})


def test_secret_equality_and_truthiness() -> None:
    assert Secret("a") == Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert not Secret("")
    assert Secret("x")
    assert len({Secret("a"), Secret("a")}) == 1
