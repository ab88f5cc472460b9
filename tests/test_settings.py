"""Settings: parsed once from the environment; a bad one names its variable, never its value.

Also drives the real `wallet` CLI with bad settings (one line on stderr, exit status 2) and
checks that the README's settings table documents exactly the declared settings.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import pytest

from gateway.secret import Secret
from gateway.settings import SETTINGS, Settings, SettingsError, parse_master_key
from tests.conftest import wallet_bin

README = Path(__file__).resolve().parent.parent / "README.md"
JWT = "j" * 40
MASTER = os.urandom(32)
GOOD_ENV = {
    "DATABASE_URL": "postgresql://wallet:DbPassw0rd@127.0.0.1:5432/wallet",
    "REDIS_URL": "redis://:RedisPassw0rd@127.0.0.1:6379/0",
    "JWT_SECRET": JWT,
    "ENCRYPTION_KEY": base64.b64encode(MASTER).decode(),
}
BOOLEANS = ("ENABLE_METRICS", "ENABLE_RATE_LIMITING", "ALLOW_INSECURE_UPSTREAMS")


def env_with(**changes: str | None) -> dict[str, str]:
    env = dict(GOOD_ENV)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def test_good_environment() -> None:
    old = os.urandom(32)
    settings = Settings.from_env(
        env_with(
            ENCRYPTION_KEY_PREVIOUS=" " + base64.b64encode(old).decode() + " , ",
            HOST="0.0.0.0",
            GATEWAY_PORT="8001",
            ADMIN_PORT="0",
            WALLET_DATA_DIR="/tmp/wallet-data",
            JWT_EXPIRES_IN="15m",
            WALLET_ADMIN_PASSWORD="a-long-admin-password",
            ENABLE_METRICS="no",
            ENABLE_RATE_LIMITING="0",
            ALLOW_INSECURE_UPSTREAMS="YES",
            DEFAULT_FREE_QUOTA="0",
            MAX_BODY_BYTES="2048",
            LOG_LEVEL="DEBUG",
            LOG_FORMAT="Console",
        )
    )
    assert settings.database_url == Secret(GOOD_ENV["DATABASE_URL"])
    assert settings.redis_url == Secret(GOOD_ENV["REDIS_URL"])
    assert settings.jwt_secret.reveal() == JWT
    assert settings.encryption_key == Secret(MASTER)
    assert settings.encryption_keys_previous == (Secret(old),)
    assert settings.host == "0.0.0.0"
    assert (settings.gateway_port, settings.admin_port) == (8001, 0)
    assert settings.data_dir == Path("/tmp/wallet-data")
    assert settings.jwt_expires_in_s == 900
    assert settings.admin_password == Secret("a-long-admin-password")
    assert settings.enable_metrics is False
    assert settings.enable_rate_limiting is False
    assert settings.allow_insecure_upstreams is True
    assert settings.default_free_quota == 0
    assert settings.max_body_bytes == 2048
    assert settings.log_level == "debug"
    assert settings.log_format == "console"
    # Secrets stay wrapped: the settings object prints none of them.
    text = repr(settings)
    for secret in ("DbPassw0rd", "RedisPassw0rd", JWT, "a-long-admin-password"):
        assert secret not in text


def test_defaults() -> None:
    settings = Settings.from_env({"JWT_SECRET": JWT})
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.encryption_key is None
    assert settings.encryption_keys_previous == ()
    assert settings.host == "127.0.0.1"
    assert (settings.gateway_port, settings.admin_port) == (6789, 6790)
    assert settings.jwt_expires_in_s == 3600
    assert settings.admin_password is None
    assert settings.enable_metrics
    assert settings.enable_rate_limiting
    assert not settings.allow_insecure_upstreams
    assert settings.default_free_quota == 1000
    assert settings.max_body_bytes == 1 << 20
    assert (settings.log_level, settings.log_format) == ("info", "json")
    # Blank values count as unset.
    assert Settings.from_env({"JWT_SECRET": JWT, "GATEWAY_PORT": "  "}).gateway_port == 6789


def test_declared_defaults_parse() -> None:
    env = {s.name: s.default for s in SETTINGS if s.default is not None}
    settings = Settings.from_env({**env, "JWT_SECRET": JWT})
    assert settings.gateway_port == 6789
    assert settings.max_body_bytes == 1 << 20
    assert all(s.help.strip() for s in SETTINGS)
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3600", 3600), ("45s", 45), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1H", 3600)],
)
def test_durations(value: str, seconds: int) -> None:
    assert Settings.from_env(env_with(JWT_EXPIRES_IN=value)).jwt_expires_in_s == seconds


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("no", False),
        ("TRUE", True),
        ("No", False),
        (" yes ", True),
    ],
)
def test_booleans_accept(name: str, value: str, expected: bool) -> None:
    settings = Settings.from_env(env_with(**{name: value}))
    assert getattr(settings, name.lower()) is expected


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("value", ["on", "off", "2", "y", "n", "truthy-xyz", "enabled"])
def test_booleans_refuse(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env_with(**{name: value}))
    message = str(info.value)
    assert message.split()[0] == name
    assert "true/false/1/0/yes/no" in message


BAD_SETTINGS: list[tuple[str, str | None, str | None]] = [
    # (variable, bad value or None for "unset", a secret that must not leak beyond the value)
    ("JWT_SECRET", None, None),
    ("JWT_SECRET", "s3cr3t-but-only-31-characters!!"[:31], None),
    ("JWT_SECRET", "tiny", None),
    ("ENCRYPTION_KEY", "tooShortKeyMaterial-xyz", None),
    ("ENCRYPTION_KEY", base64.b64encode(b"k" * 16).decode(), None),
    ("ENCRYPTION_KEY", base64.b64encode(b"k" * 33).decode(), None),
    ("ENCRYPTION_KEY", "!" * 44, None),
    ("ENCRYPTION_KEY", "@@@@notbase64@@@@notbase64@@@@notbase64@@@@", None),
    ("ENCRYPTION_KEY_PREVIOUS", base64.b64encode(MASTER).decode() + ",bogusPreviousKey", None),
    ("ENCRYPTION_KEY_PREVIOUS", "bogusPreviousKey", None),
    ("GATEWAY_PORT", "not-a-port-xyz", None),
    ("GATEWAY_PORT", "65536", None),
    ("GATEWAY_PORT", "-80", None),
    ("ADMIN_PORT", "99999", None),
    ("ADMIN_PORT", "80.5", None),
    ("JWT_EXPIRES_IN", "forever-ish", None),
    ("JWT_EXPIRES_IN", "0s", None),
    ("JWT_EXPIRES_IN", "10w", None),
    ("JWT_EXPIRES_IN", "-5m", None),
    ("LOG_LEVEL", "verbose-xyz", None),
    ("LOG_LEVEL", "critical", None),
    ("LOG_FORMAT", "xml-xyz", None),
    ("DEFAULT_FREE_QUOTA", "lots-xyz", None),
    ("DEFAULT_FREE_QUOTA", "-5", None),
    ("DEFAULT_FREE_QUOTA", "1.5", None),
    ("MAX_BODY_BYTES", "1023", None),
    ("MAX_BODY_BYTES", "huge-xyz", None),
    ("DATABASE_URL", "mysql://wallet:SuperSecretPw@127.0.0.1:3306/wallet", "SuperSecretPw"),
    ("DATABASE_URL", "http://wallet:SuperSecretPw@127.0.0.1/wallet", "SuperSecretPw"),
    ("DATABASE_URL", "postgresql://wallet:SuperSecretPw@/wallet", "SuperSecretPw"),
    ("DATABASE_URL", "postgresql://wallet:SuperSecretPw@[::1/wallet", "SuperSecretPw"),
    ("DATABASE_URL", "SuperSecretPw-no-scheme", "SuperSecretPw"),
    ("REDIS_URL", "http://:RedisSecretPw@127.0.0.1:6379", "RedisSecretPw"),
    ("REDIS_URL", "redis://:RedisSecretPw@", "RedisSecretPw"),
    ("REDIS_URL", "RedisSecretPw", "RedisSecretPw"),
    ("WALLET_ADMIN_PASSWORD", "short-pw-11", None),
    ("PUBLIC_GATEWAY_URL", "ftp://gw.example", None),
    ("PUBLIC_GATEWAY_URL", "https://gw.example/?token=PublicSecretQ", "PublicSecretQ"),
    ("CONSOLE_SECURE_COOKIE", "sometimes", None),
    ("CONSOLE_IDLE_TIMEOUT", "0m", None),
]


@pytest.mark.parametrize(("name", "value", "secret"), BAD_SETTINGS)
def test_bad_setting_names_variable_not_value(
    name: str, value: str | None, secret: str | None
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env_with(**{name: value}))
    message = str(info.value)
    assert message.split()[0] == name, message
    if value is not None:
        assert value.strip() not in message
        for piece in value.split(","):
            assert len(piece) < 4 or piece not in message
    if secret is not None:
        assert secret not in message
    # The exception is not chained to one that might carry the value.
    assert info.value.__cause__ is None
    assert value is None or value not in repr(info.value.__context__)


def test_redis_cluster_needs_a_node_to_start_from() -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_CLUSTER needs REDIS_URL"):
        Settings.from_env(env_with(REDIS_CLUSTER="true", REDIS_URL=None))
    assert Settings.from_env(env_with(REDIS_CLUSTER="true")).redis_cluster is True


def test_public_gateway_url_feeds_the_snippets() -> None:
    assert Settings.from_env(env_with()).gateway_url == "http://127.0.0.1:6789"
    given = Settings.from_env(env_with(PUBLIC_GATEWAY_URL="https://gw.example/wallet/"))
    assert given.gateway_url == "https://gw.example/wallet"


FREE_TEXT = frozenset({"HOST", "WALLET_DATA_DIR", "WALLET_ADMIN_PASSWORD"})


@pytest.mark.parametrize("name", sorted(s.name for s in SETTINGS if s.name not in FREE_TEXT))
def test_every_setting_refuses_garbage_by_name(name: str) -> None:
    """Any declared setting (free text aside) given garbage fails naming itself, not the value."""
    garbage = "garbage:Value-9f3c/\\x"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env_with(**{name: garbage}))
    message = str(info.value)
    assert message.split()[0] == name
    assert garbage not in message
    assert "Value-9f3c" not in message


def test_encryption_key_raw_32_characters() -> None:
    raw = "0123456789abcdefghijklmnopqrstuv"
    settings = Settings.from_env(env_with(ENCRYPTION_KEY=raw))
    assert settings.encryption_key == Secret(raw.encode())


def test_encryption_key_base64_standard_and_urlsafe() -> None:
    # Bytes whose encodings contain the characters that differ between the two alphabets.
    key = bytes([0xFB, 0xEF, 0xBE] * 10 + [0xFF, 0xFE])
    std = base64.b64encode(key).decode()
    url = base64.urlsafe_b64encode(key).decode()
    assert "+" in std or "/" in std
    assert "-" in url or "_" in url
    for encoded in (std, url, std.rstrip("="), url.rstrip("=")):
        assert Settings.from_env(env_with(ENCRYPTION_KEY=encoded)).encryption_key == Secret(key)
        assert parse_master_key("ENCRYPTION_KEY", encoded) == key
    previous = Settings.from_env(env_with(ENCRYPTION_KEY_PREVIOUS=f"{url},{std}"))
    assert previous.encryption_keys_previous == (Secret(key), Secret(key))


def test_wallet_admin_password_of_twelve_is_enough() -> None:
    settings = Settings.from_env(env_with(WALLET_ADMIN_PASSWORD="x" * 12))
    assert settings.admin_password == Secret("x" * 12)


# -- the real CLI --------------------------------------------------------------------------

CLI_ENV = {
    "DATABASE_URL": "postgresql://u:SuperSecretPw@127.0.0.1:1/x",
    "REDIS_URL": "redis://127.0.0.1:1",
    "JWT_SECRET": "cli-jwt-secret-" + "z" * 30,
    "ENCRYPTION_KEY": base64.b64encode(MASTER).decode(),
}


def run_wallet(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(wallet_bin()), *args],
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "value", "secrets"),
    [
        ("JWT_SECRET", "short", ["short", "SuperSecretPw"]),
        ("ENCRYPTION_KEY", "bad-key-material-CliSecret", ["bad-key-material-CliSecret"]),
        ("DATABASE_URL", "mysql://u:SuperSecretPw@127.0.0.1:1/x", ["SuperSecretPw"]),
        ("REDIS_URL", "http://:RedisCliSecret@127.0.0.1:1", ["RedisCliSecret"]),
        ("ADMIN_PORT", "not-a-port-xyz", ["not-a-port-xyz"]),
        ("WALLET_ADMIN_PASSWORD", "pw-CliShort", ["pw-CliShort"]),
        ("LOG_LEVEL", "loud-xyz", ["loud-xyz"]),
    ],
)
def test_cli_refuses_bad_setting_in_one_line(
    tmp_path: Path, name: str, value: str, secrets: list[str]
) -> None:
    result = run_wallet({**CLI_ENV, name: value}, tmp_path, "admin")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert name in lines[0]
    assert lines[0].split()[1] == name
    assert "Traceback" not in result.stderr + result.stdout
    for secret in [*secrets, CLI_ENV["JWT_SECRET"], CLI_ENV["ENCRYPTION_KEY"]]:
        assert secret not in result.stderr + result.stdout
    # Nothing was started or written: no embedded servers, no generated secrets.
    assert list(tmp_path.iterdir()) == []


def test_cli_reads_dotenv_and_the_environment_wins(tmp_path: Path) -> None:
    """A `.env` in the working directory is read; the environment wins over it."""
    (tmp_path / ".env").write_text("JWT_SECRET=from-dotenv-short\nLOG_FORMAT=yaml-xyz\n")
    env = {k: v for k, v in CLI_ENV.items() if k != "JWT_SECRET"}
    result = run_wallet(env, tmp_path, "admin")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: JWT_SECRET must be at least 32 characters"
    assert "from-dotenv-short" not in result.stderr
    # With JWT_SECRET from the environment, the next bad value comes from `.env`.
    result = run_wallet(CLI_ENV, tmp_path, "admin")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: LOG_FORMAT must be one of json, console"


# -- the README documents every setting -----------------------------------------------------


def readme_settings(text: str) -> set[str]:
    section = re.search(r"^## Settings\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section is not None, "README.md has no `## Settings` section"
    names: set[str] = set()
    for line in section.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def test_readme_settings_table_matches_settings() -> None:
    assert README.exists(), "README.md is missing"
    documented = readme_settings(README.read_text())
    declared = {s.name for s in SETTINGS}
    assert documented == declared, (
        f"undocumented: {sorted(declared - documented)}; unknown: {sorted(documented - declared)}"
    )
