"""The `wallet` command: run the apps, migrate, seed, rotate the master key, verify the audit log.

This is the edge: settings are built here once, embedded servers started here when
`DATABASE_URL`/`REDIS_URL` are unset, and every error becomes one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog
from aiohttp import web
from redis.asyncio import Redis

from admin import bootstrap, embedded, workers
from admin.app import create_app as create_admin_app
from admin.workers import Slot
from gateway import audit, ca, canary, db, invalidation, logs, services
from gateway.app import create_app as create_gateway_app
from gateway.appkeys import SIBLINGS
from gateway.errors import WalletError
from gateway.fwdproxy import ForwardProxySite
from gateway.rotation import reseal_all
from gateway.secret import Secret
from gateway.settings import Settings, SettingsError, read_environment, read_secrets_file
from gateway.vault import Vault

log = structlog.get_logger(__name__)
T = TypeVar("T")
EXIT_USAGE: Final = 2
SHUTDOWN_TIMEOUT_S: Final = 10.0
MAX_WORKERS: Final = 64
# Each proxied request allocates a few hundred short-lived objects; with Python's default
# (700) the young generation is collected every couple of requests.
GC_YOUNG_THRESHOLD: Final = 20_000
APPS: Final = {"gateway": create_gateway_app, "admin": create_admin_app}


def say(message: str) -> None:
    print(f"wallet: {message}", file=sys.stderr, flush=True)


class Fatal(Exception):
    """Stops the command with one line and an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def load_settings() -> Settings:
    env = read_environment()
    data_dir = Path(env.get("WALLET_DATA_DIR") or ".wallet")
    zero_config = not env.get("DATABASE_URL")
    if zero_config:
        generated = bootstrap.ensure_secrets(data_dir, say)
        env = {**generated, **{k: v for k, v in env.items() if v.strip()}}
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None
    redactor = logs.Redactor()
    redactor.add(
        settings.jwt_secret,
        settings.database_url,
        settings.redis_url,
        settings.admin_password,
        settings.encryption_key,
        *settings.encryption_keys_previous,
    )
    logs.configure(settings.log_level, settings.log_format, redactor)
    return settings


def with_servers(settings: Settings) -> tuple[Settings, embedded.EmbeddedServers | None]:
    need_pg, need_redis = settings.database_url is None, settings.redis_url is None
    if not (need_pg or need_redis):
        return settings, None
    try:
        servers = embedded.start(
            settings.data_dir, postgres=need_pg, redis_server=need_redis, say=say
        )
    except embedded.EmbeddedError as exc:
        raise Fatal(str(exc)) from None
    return replace(
        settings,
        database_url=settings.database_url or servers.database_url,
        redis_url=settings.redis_url or servers.redis_url,
        embedded=need_pg,
    ), servers


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


async def _prepare(settings: Settings) -> bootstrap.Prepared:
    prepared = await bootstrap.prepare(settings)
    for name in prepared.applied:
        say(f"applied migration {name}")
    if prepared.seeded:
        say(f"added built-in services: {', '.join(prepared.seeded)}")
    if prepared.admin_password is not None:
        if settings.admin_password is not None:
            say("created user `admin` with the password from WALLET_ADMIN_PASSWORD")
        else:
            say("created user `admin`; its password is shown this once:")
            say(f"    {prepared.admin_password.reveal()}")
    return prepared


async def serve(
    settings: Settings, which: Sequence[str], *, prepare: bool = True, slot: Slot | None = None
) -> None:
    """Serve the apps until SIGINT/SIGTERM; the first signal drains, later ones are noted.
    Under `--workers N` this runs in each forked process, for its `slot`."""
    if prepare:
        await _prepare(settings)
    runners: list[web.AppRunner] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            say("already shutting down; finishing the drain")
        elif slot is None:
            say(f"received {signal.Signals(signum).name}; shutting down")
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        for name in which:
            app = APPS[name](settings)
            if slot is not None and slot.run_dir is not None:
                app[SIBLINGS] = slot.siblings
            runner = make_runner(name, app)
            await runner.setup()
            runners.append(runner)
            await _listen(settings, runner, name, slot)
        _print_welcome(settings, runners)
        # Everything allocated at startup lives as long as the process: move it out of the
        # cyclic collector's sight, so that collections on the hot path stay short.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        logs.access.flush()  # forked workers end in os._exit, which skips atexit


def make_runner(
    name: str, app: web.Application, shutdown_timeout: float = SHUTDOWN_TIMEOUT_S
) -> web.AppRunner:
    """How production serves an app (the tests build their gateways here too)."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        # A client that hangs up cancels its gateway handler, which closes the upstream request
        # at once (a quiet stream, or an upstream still thinking, would otherwise hold it, and
        # its bill, until the upstream's next bytes or a timeout).
        handler_cancellation=name == "gateway",
    )


async def _listen(settings: Settings, runner: web.AppRunner, name: str, slot: Slot | None) -> None:
    port = settings.gateway_port if name == "gateway" else settings.admin_port
    worker = slot is not None and slot.run_dir is not None
    try:
        await web.TCPSite(runner, settings.host, port, reuse_port=worker or None).start()
    except OSError as exc:
        env = "GATEWAY_PORT" if name == "gateway" else "ADMIN_PORT"
        raise Fatal(
            f"cannot listen on {settings.host}:{port} ({exc.strerror}); set {env}"
        ) from None
    if slot is not None and slot.own_socket is not None:
        await web.UnixSite(runner, str(slot.own_socket)).start()
    label = slot.label if slot is not None else name
    for address in runner.addresses:
        if isinstance(address, tuple):
            say(f"{label} listening on http://{address[0]}:{address[1]}")
            if name == "admin":
                say(f"web console on http://{address[0]}:{address[1]}/ui/")
    if name == "gateway":
        forward_port = settings.forward_proxy_port
        site = ForwardProxySite(runner, settings.host, forward_port, reuse_port=worker or None)
        try:
            await site.start()
            say(f"{label} forward proxy on {site.name}")
        except OSError as exc:
            raise Fatal(
                f"cannot listen on {settings.host}:{forward_port} ({exc.strerror}); "
                "set FORWARD_PROXY_PORT"
            ) from None


def _print_welcome(settings: Settings, runners: list[web.AppRunner]) -> None:
    admin = [
        r
        for r in runners
        if isinstance(r.app, web.Application) and r.app.router.get("auth.login") is not None
    ]
    if not admin:
        return
    host, port = admin[0].addresses[0][:2]
    say("log in with:")
    say(f"    curl -s http://{host}:{port}/auth/login -H 'Content-Type: application/json' \\")
    say('         -d \'{"username": "admin", "password": "<password>"}\'')
    say("press Ctrl-C to stop")


def _serve_command(which: Sequence[str], worker_count: int) -> None:
    settings, servers = with_servers(load_settings())
    try:
        if worker_count == 1:
            run_async(lambda: serve(settings, which))
        else:
            _serve_workers(settings, which, worker_count)
    finally:
        if servers is not None:
            # Ctrl-C pressed twice must not interrupt the databases' clean stop.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            servers.stop(say)


def _serve_workers(settings: Settings, which: Sequence[str], worker_count: int) -> None:
    """Prepare once, then fork the workers (see admin/workers.py)."""
    run_async(lambda: _prepare(settings))
    slots, run_dir = workers.plan(list(which), worker_count)
    say(f"starting {worker_count} gateway workers on port {settings.gateway_port}")

    def run(slot: Slot) -> None:
        try:
            run_async(lambda: serve(settings, [slot.app], prepare=False, slot=slot))
        except Fatal as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(exc.status) from None

    try:
        workers.Supervisor(slots, run, say).serve()
    except workers.GroupFailed as exc:
        raise Fatal(str(exc)) from None
    finally:
        workers.remove_run_dir(run_dir)


def _workers_arg(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}")
    return count


async def _with_conn(settings: Settings, work: Callable[[db.Connection], Awaitable[T]]) -> T:
    assert settings.database_url is not None
    if settings.embedded:
        await bootstrap.ensure_database(settings.database_url)
    conn = await db.connect(settings.database_url)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _one_shot(work: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    settings, servers = with_servers(load_settings())
    try:
        return run_async(lambda: work(settings))
    finally:
        if servers is not None:
            servers.stop()


def cmd_migrate(_: argparse.Namespace) -> None:
    async def work(settings: Settings) -> None:
        applied = await _with_conn(settings, db.migrate)
        say(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")

    _one_shot(work)


def cmd_seed(_: argparse.Namespace) -> None:
    async def work(settings: Settings) -> None:
        added = await _with_conn(settings, lambda c: services.seed(c, audit.Actor.system()))
        say(f"built-in services added: {', '.join(added) or 'none (all present)'}")

    _one_shot(work)


def cmd_audit_verify(_: argparse.Namespace) -> None:
    async def work(settings: Settings) -> audit.Verdict:
        return await _with_conn(settings, audit.verify)

    verdict = _one_shot(work)
    for brk in verdict.breaks:
        print(f"BROKEN at seq {brk.seq}: {brk.problem}")
    print(
        f"checked {verdict.checked} record(s); head seq {verdict.head_seq} hash {verdict.head_hash}"
    )
    if not verdict.ok:
        raise Fatal(f"audit chain broken in {len(verdict.breaks)} place(s)")
    print("audit chain intact")


async def _unsealed_vault(conn: db.Connection, settings: Settings) -> Vault:
    vault = Vault(settings.encryption_key, settings.encryption_keys_previous)
    if not await canary.unseal(conn, vault):
        raise Fatal(
            "the vault is sealed: ENCRYPTION_KEY (and _PREVIOUS) do not match the stored keys"
        )
    return vault


def cmd_ca_export(args: argparse.Namespace) -> None:
    """The CA certificate (PEM) for clients to trust; the CA is created if there is none."""

    async def work(settings: Settings) -> str:
        async def export(conn: db.Connection) -> str:
            await db.migrate(conn)
            stored = await ca.active(conn)
            if stored is None:
                vault = await _unsealed_vault(conn, settings)
                stored = await ca.ensure(conn, vault, audit.Actor.system("cli"))
            return stored.cert_pem

        return await _with_conn(settings, export)

    pem = _one_shot(work)
    if args.path is None:
        sys.stdout.write(pem)
        return
    path = Path(args.path)
    try:
        path.write_text(pem)
    except OSError as exc:
        raise Fatal(f"cannot write {path} ({exc.strerror})") from None
    say(f"CA certificate written to {path}: have clients trust it (SSL_CERT_FILE, ...)")


def cmd_ca_rotate(_: argparse.Namespace) -> None:
    """A new CA replaces the active one; running gateways load it (via Redis)."""

    async def work(settings: Settings) -> str:
        async def rotate(conn: db.Connection) -> str:
            await db.migrate(conn)
            vault = await _unsealed_vault(conn, settings)
            stored = await ca.rotate(conn, vault, audit.Actor.system("cli"))
            return stored.cert_pem

        pem = await _with_conn(settings, rotate)
        assert settings.redis_url is not None
        redis = Redis.from_url(settings.redis_url.reveal())
        try:
            await invalidation.publish(redis, "ca")
        finally:
            await redis.aclose()
        return pem

    pem = _one_shot(work)
    say("a new CA is active; export it (`wallet ca export PATH`) and have clients trust it")
    sys.stdout.write(pem)


def cmd_rotate(args: argparse.Namespace) -> None:
    settings = load_settings()
    if args.generate:
        settings = _generate_new_master_key(settings)
    settings, servers = with_servers(settings)

    async def work() -> None:
        assert settings.database_url is not None
        vault = Vault(settings.encryption_key, settings.encryption_keys_previous)
        pool = await db.create_pool(settings.database_url, max_size=2)
        try:
            async with pool.acquire() as conn:
                if not await canary.unseal(conn, vault):
                    raise Fatal(
                        "the vault is sealed: ENCRYPTION_KEY (and _PREVIOUS) do not "
                        "match the stored keys"
                    )
            result = await reseal_all(pool, vault, audit.Actor.system(), progress=_progress)
        finally:
            await pool.close()
        say(f"re-sealed {result.resealed} key(s) under master key {vault.current_kid}")
        if result.failed:
            raise Fatal(
                f"{len(result.failed)} key(s) could not be opened: {', '.join(result.failed)}"
            )
        if result.retired_kids:
            say(
                f"retired master key(s) {', '.join(result.retired_kids)}: remove them from "
                "ENCRYPTION_KEY_PREVIOUS"
            )

    try:
        run_async(work)
    finally:
        if servers is not None:
            servers.stop()


def _progress(done: int, total: int) -> None:
    print(
        f"\rre-sealing keys: {done}/{total}",
        end="" if done < total else "\n",
        file=sys.stderr,
        flush=True,
    )


def _generate_new_master_key(settings: Settings) -> Settings:
    """Zero-config rotation: a new key in secrets.env, the old one kept as previous."""
    if settings.database_url is not None:
        raise Fatal(
            "--generate works with the generated secrets of a zero-config install; "
            "in production set the new ENCRYPTION_KEY and the old one in "
            "ENCRYPTION_KEY_PREVIOUS, restart, then run this without --generate",
            EXIT_USAGE,
        )
    if settings.encryption_key is None:
        raise Fatal("ENCRYPTION_KEY is not set", EXIT_USAGE)
    values = read_secrets_file(settings.data_dir)
    new = os.urandom(32)
    old = values.get("ENCRYPTION_KEY", "")
    values["ENCRYPTION_KEY_PREVIOUS"] = ",".join(
        p for p in (old, values.get("ENCRYPTION_KEY_PREVIOUS", "")) if p
    )
    values["ENCRYPTION_KEY"] = base64.b64encode(new).decode()
    bootstrap.write_secrets(settings.data_dir, values)
    say(f"new master key written to {settings.data_dir / 'secrets.env'}; restart running apps")
    return replace(
        settings,
        encryption_key=Secret(new),
        encryption_keys_previous=(settings.encryption_key, *settings.encryption_keys_previous),
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="wallet", description="API Key Wallet")
    sub = top.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "serve the gateway and the admin app"),
        ("gateway", "serve the gateway only"),
        ("admin", "serve the admin app"),
    ):
        command = sub.add_parser(name, help=text)
        command.set_defaults(
            func=lambda a, n=name: _serve_command(
                ["gateway", "admin"] if n == "run" else [n], getattr(a, "workers", 1)
            )
        )
        if name != "admin":
            command.add_argument(
                "--workers",
                type=_workers_arg,
                default=1,
                metavar="N",
                help="gateway processes sharing the port (SO_REUSEPORT); default 1",
            )
    sub.add_parser("migrate", help="apply pending sql/ migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("seed", help="add missing built-in services").set_defaults(func=cmd_seed)
    rotate = sub.add_parser(
        "rotate-encryption-key", help="re-seal every stored key under the current master key"
    )
    rotate.add_argument(
        "--generate",
        action="store_true",
        help="zero-config installs: generate the new key into secrets.env",
    )
    rotate.set_defaults(func=cmd_rotate)
    ca_cmd = sub.add_parser("ca", help="the forward proxy's certificate authority")
    ca_sub = ca_cmd.add_subparsers(dest="ca_command", required=True)
    export = ca_sub.add_parser("export", help="write the CA certificate (PEM) to PATH or stdout")
    export.add_argument("path", nargs="?", default=None, metavar="PATH")
    export.set_defaults(func=cmd_ca_export)
    ca_sub.add_parser(
        "rotate", help="replace the CA (clients must trust the new one)"
    ).set_defaults(func=cmd_ca_rotate)
    audit_cmd = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="verify the hash chain").set_defaults(func=cmd_audit_verify)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except Fatal as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.status)
    except WalletError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
