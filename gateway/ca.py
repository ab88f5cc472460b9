"""The wallet's certificate authority, for forward-proxy mode.

One CA per installation, shared by every gateway process and host: created on first start,
its certificate stored in PostgreSQL in the clear (clients trust it) and its private key
sealed by the vault like a stored API key, never written anywhere in plaintext. A gateway
process opens it once and signs, on demand, a leaf certificate for exactly the host a
client asked to reach (one leaf key per process; leaves cached in memory).

`wallet ca export [PATH]` writes the certificate for clients; `wallet ca rotate` replaces
the CA (audited); running gateways load the new one when told over Redis pub/sub.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import audit
from gateway.appkeys import POOL, VAULT
from gateway.db import DB_ERRORS, Connection, Pool
from gateway.errors import NotFound, VaultSealed
from gateway.vault import Sealed, Vault, VaultError

log = structlog.get_logger(__name__)

CA_LOCK: Final = 0xCA57  # pg_advisory_xact_lock: one CA created, even by racing processes
CA_YEARS: Final = 10
LEAF_DAYS: Final = 30
LEAF_RENEW_S: Final = 24 * 3600  # a cached leaf this close to expiry is signed again
BACKDATE: Final = dt.timedelta(hours=1)  # clocks of clients may lag a little
MAX_LEAVES: Final = 1024

ACTIVE: Final = """SELECT id, cert_pem, kid, sealed FROM certificate_authorities
WHERE retired_at IS NULL"""
INSERT: Final = """INSERT INTO certificate_authorities (id, cert_pem, kid, sealed)
VALUES ($1, $2, $3, $4)"""
RETIRE: Final = """UPDATE certificate_authorities SET retired_at = now()
WHERE retired_at IS NULL RETURNING id"""


def ca_aad(ca_id: str) -> bytes:
    """Associated data binding a sealed CA key to its row."""
    return b"\x00".join((b"wallet-ca-v1", ca_id.encode()))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "API Key Wallet"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class StoredCA:
    id: str
    cert_pem: str
    sealed: Sealed = field(repr=False)  # the private key, as the vault sealed it


async def active(conn: Connection) -> StoredCA | None:
    row = await conn.fetchrow(ACTIVE)
    if row is None:
        return None
    return StoredCA(str(row["id"]), row["cert_pem"], Sealed(row["kid"], bytes(row["sealed"])))


async def _create(conn: Connection, vault: Vault, actor: audit.Actor, action: str) -> StoredCA:
    ca_id = str(uuid.uuid4())
    cert, key = _new_ca(f"API Key Wallet CA {ca_id[:8]}")
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not vault.unsealed:
        raise VaultSealed()
    sealed = vault.seal_bytes_unchecked(der, ca_aad(ca_id))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    await conn.execute(INSERT, uuid.UUID(ca_id), cert_pem, sealed.kid, sealed.blob)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    await audit.append(conn, actor, action, "ca", ca_id, {"sha256": fingerprint})
    return StoredCA(ca_id, cert_pem, sealed)


async def ensure(conn: Connection, vault: Vault, actor: audit.Actor) -> StoredCA:
    """The active CA, created (and audited) if the installation has none yet."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CA_LOCK)
        found = await active(conn)
        return found or await _create(conn, vault, actor, "ca.create")


async def rotate(conn: Connection, vault: Vault, actor: audit.Actor) -> StoredCA:
    """Retire the active CA and create a new one: clients must trust the new certificate."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CA_LOCK)
        await conn.fetch(RETIRE)
        return await _create(conn, vault, actor, "ca.rotate")


async def export_pem(conn: Connection) -> str:
    found = await active(conn)
    if found is None:
        raise NotFound("no certificate authority yet: start the gateway once to create it")
    return found.cert_pem


@dataclass
class _Leaf:
    context: ssl.SSLContext
    not_after: dt.datetime


@dataclass
class Authority:
    """The opened CA of this process: signs leaf certificates and builds TLS contexts."""

    id: str
    cert: x509.Certificate
    _key: ec.EllipticCurvePrivateKey = field(repr=False)
    _leaf_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()), repr=False
    )
    _leaves: OrderedDict[str, _Leaf] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for exactly `host` (cached), which
        refuses a handshake whose SNI names anything else (or nothing)."""
        with self._lock:
            leaf = self._leaves.get(host)
            now = _now()
            if leaf is None or (leaf.not_after - now).total_seconds() < LEAF_RENEW_S:
                leaf = self._leaves[host] = self._sign(host, now)
                if len(self._leaves) > MAX_LEAVES:
                    self._leaves.popitem(last=False)
            self._leaves.move_to_end(host)
            return leaf.context

    def _sign(self, host: str, now: dt.datetime) -> _Leaf:
        not_after = min(now + dt.timedelta(days=LEAF_DAYS), self.cert.not_valid_after_utc)
        public = self._leaf_key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return _Leaf(_server_context(host, cert, self.cert, self._leaf_key), not_after)


def _load_chain(context: ssl.SSLContext, pem: bytes) -> None:
    """The ssl module loads certificates only from files: an anonymous in-memory file where
    the system has them (never on disk), else a private folder, removed at once."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("wallet-leaf", os.MFD_CLOEXEC)
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="wallet-leaf-") as folder:
        path = Path(folder) / "leaf.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        context.load_cert_chain(path)


def _server_context(
    host: str,
    leaf: x509.Certificate,
    ca: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
        serialization.Encoding.PEM
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _load_chain(context, chain + key_pem)

    def sni(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        if server_name is None or server_name.lower().rstrip(".") != host:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    context.sni_callback = sni
    return context


async def load(pool: Pool, vault: Vault, actor: audit.Actor) -> Authority:
    """The active CA (created on first start), opened with the vault."""
    async with pool.acquire() as conn:
        stored = await ensure(conn, vault, actor)
    der = vault.open_bytes(stored.sealed, ca_aad(stored.id))
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("the stored CA key is not an EC key")
    cert = x509.load_pem_x509_certificate(stored.cert_pem.encode())
    return Authority(stored.id, cert, key)


class Authorities:
    """The gateway's opened CA (None while the vault is sealed or PostgreSQL was down at
    startup: the forward proxy then answers 503), loaded again after a `wallet ca rotate`."""

    def __init__(self, pool: Pool, vault: Vault) -> None:
        self._pool = pool
        self._vault = vault
        self.current: Authority | None = None

    async def reload(self) -> None:
        if not self._vault.unsealed:
            return
        try:
            self.current = await load(self._pool, self._vault, audit.Actor.system("gateway"))
        except (*DB_ERRORS, VaultError, ValueError, TypeError) as exc:
            # The forward proxy answers 503 meanwhile; the reverse proxy is unaffected.
            log.warning("ca_not_loaded", error=type(exc).__name__)


AUTHORITIES = web.AppKey("ca_authorities", Authorities)


async def authorities_ctx(app: web.Application) -> AsyncIterator[None]:
    app[AUTHORITIES] = authorities = Authorities(app[POOL], app[VAULT])
    await authorities.reload()
    yield
