"""Settings from flags and ``CAREFLOW_*`` environment variables, shared by every command.

Secrets are read from ``NAME`` or from the file named by ``NAME_FILE`` and never printed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from careflow.core.errors import ConfigError

__all__ = [
    "AUTOMATION_LEVELS",
    "DEFAULT_DEAD_LETTER_MAX_MB",
    "DEFAULT_DEAD_LETTER_MAX_ROWS",
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_DEVICES_PER_GATEWAY",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CERT_DAYS",
    "MAX_INT_SETTING",
    "BrokerUrl",
    "HostPort",
    "Settings",
    "TlsFiles",
    "default_data_dir",
    "load_settings",
    "parse_broker_url",
    "parse_host_port",
    "parse_http_listen",
    "read_secret",
    "tls_files",
]

DEFAULT_LISTEN = "127.0.0.1:1883"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"  # the on-call web: links, console, /metrics
DEFAULT_LINK_TTL_S = 24 * 3600  # how long a one-tap link in a message works
MAX_LINK_TTL_S = 7 * 24 * 3600  # a link forwarded or leaked stays a key to the incident that long
# The contract's careflow.schemas.limits.MAX_MESSAGE_BYTES, spelled here because the core sits
# below the contract (which imports the core's errors); tests/test_config.py keeps them equal.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
# A gateway's devices the hub registers and evaluates; a new one beyond is dead-lettered.
DEFAULT_MAX_DEVICES_PER_GATEWAY = 1000
DEFAULT_DEAD_LETTER_MAX_ROWS = 100_000
DEFAULT_DEAD_LETTER_MAX_MB = 256
# The largest whole-number setting taken: beyond any sane value, and small enough that a setting
# scaled for use (seconds * 1000, MB << 20) still fits SQLite's 64-bit integers.
MAX_INT_SETTING = 2**31 - 1
# A device certificate outliving the CA that signs it means nothing (provisioning/pki.py
# CA_DAYS); from ~2.9 million days its end date is past the year 9999 and every claim fails.
MAX_CERT_DAYS = 3650
_SYNC_MODES = ("full", "normal")


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """For mqtts://: the CA that signed the broker's certificate (None: the system's), and this
    client's certificate and key for mutual TLS (None: no client certificate)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_host_port(text: str, *, what: str = "address") -> HostPort:
    """Parse ``HOST:PORT``; a ConfigError says what a good value looks like."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        msg = f"{what} {text!r} is not HOST:PORT (for example 127.0.0.1:1883)"
        raise ConfigError(msg)
    return HostPort(host.strip("[]"), int(port_text))


def parse_broker_url(text: str) -> BrokerUrl:
    """Parse ``mqtt://host[:port]`` or ``mqtts://host[:port]``."""
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        msg = f"broker URL {text!r} must look like mqtt://host:1883 or mqtts://host:8883"
        raise ConfigError(msg)
    try:
        port = parts.port
    except ValueError as exc:
        msg = f"broker URL {text!r} has an invalid port"
        raise ConfigError(msg) from exc
    tls = parts.scheme == "mqtts"
    return BrokerUrl(parts.hostname, port or (8883 if tls else 1883), tls)


def read_secret(env: Mapping[str, str], name: str) -> str | None:
    """The value of ``name``, or the contents of the file ``name_FILE`` points at."""
    if name in env:
        return env[name]
    path = env.get(f"{name}_FILE")
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        msg = f"{name}_FILE points at {path!r}, which cannot be read: {exc.strerror}"
        raise ConfigError(msg) from exc


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/careflow``, or ``~/.local/share/careflow``."""
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "careflow"


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    """Where the time-series sink writes: the v1 API (database) or the v2 API (org + bucket)."""

    url: str
    database: str | None = None  # v1: /write?db=
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    org: str | None = None  # v2: /api/v2/write?org=&bucket=
    bucket: str | None = None
    token: str | None = field(default=None, repr=False)
    backlog_warn: int = 100_000

    @property
    def api(self) -> Literal["v1", "v2"]:
        """v2 when a bucket is named, else v1."""
        return "v2" if self.bucket else "v1"


def load_influx(env: Mapping[str, str]) -> InfluxSettings | None:
    """The InfluxDB settings, or None when ``CAREFLOW_INFLUX_URL`` is unset (sink off)."""
    url = (env.get("CAREFLOW_INFLUX_URL") or "").rstrip("/")
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        msg = f"CAREFLOW_INFLUX_URL must start with http:// or https://, not {url!r}"
        raise ConfigError(msg)
    database, bucket = env.get("CAREFLOW_INFLUX_DB"), env.get("CAREFLOW_INFLUX_BUCKET")
    if bool(database) == bool(bucket):
        msg = ("set CAREFLOW_INFLUX_DB (InfluxDB 1.x /write API) or CAREFLOW_INFLUX_BUCKET with "
               "CAREFLOW_INFLUX_ORG and CAREFLOW_INFLUX_TOKEN (v2 API), exactly one of the two")
        raise ConfigError(msg)
    token = read_secret(env, "CAREFLOW_INFLUX_TOKEN")
    if bucket and not (env.get("CAREFLOW_INFLUX_ORG") and token):
        msg = "the v2 API (CAREFLOW_INFLUX_BUCKET) also needs CAREFLOW_INFLUX_ORG and CAREFLOW_INFLUX_TOKEN"
        raise ConfigError(msg)
    return InfluxSettings(
        url=url, database=database or None, retention_policy=env.get("CAREFLOW_INFLUX_RP") or None,
        username=env.get("CAREFLOW_INFLUX_USER") or None,
        password=read_secret(env, "CAREFLOW_INFLUX_PASSWORD"),
        org=env.get("CAREFLOW_INFLUX_ORG") or None, bucket=bucket or None, token=token,
        backlog_warn=_int_setting(env, "CAREFLOW_INFLUX_BACKLOG_WARN", 100_000))


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a careflow command needs to find the broker and the data."""

    data_dir: Path
    broker_url: BrokerUrl | None
    listen: HostPort
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    hub_client_id: str = "careflow-hub"
    broker_username: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    sqlite_synchronous: Literal["full", "normal"] = "full"
    broker_tls: TlsFiles = TlsFiles()
    self_silence_ms: int = 600_000  # no event for this long: the hub alerts about itself
    deadman_url: str | None = field(default=None, repr=False)
    deadman_interval_s: int = 60
    influx: InfluxSettings | None = None
    runbook_url: str | None = None  # e.g. https://git.example.org/careflow/blob/main/
    pki_dir: Path | None = None  # set: the hub answers claims (see provisioning/README.md)
    device_broker_url: BrokerUrl | None = None  # where provisioned gateways connect
    cert_days: int = 30  # lifetime of device certificates issued by claim or renewal
    max_devices_per_gateway: int = DEFAULT_MAX_DEVICES_PER_GATEWAY
    dead_letter_max_rows: int = DEFAULT_DEAD_LETTER_MAX_ROWS  # the newest dead letters kept...
    dead_letter_max_bytes: int = DEFAULT_DEAD_LETTER_MAX_MB << 20  # ...within this much payload
    http_listen: HostPort | None = None  # the on-call web (None: off); port 0: any free port
    public_url: str | None = None  # how people reach the web, for links in messages
    auth_header: str | None = None  # a trusted reverse proxy's header naming the user (SSO)
    link_ttl_s: int = DEFAULT_LINK_TTL_S
    automation: str = "manual"  # CAREFLOW_AUTOMATION: the most the operations agent may do

    @property
    def web_url(self) -> str | None:
        """Where the links in messages point: CAREFLOW_PUBLIC_URL, else the listen address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.http_listen is None:
            return None
        host = self.http_listen.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_listen.port}"

    @property
    def embedded(self) -> bool:
        """True when no broker is configured and the hub runs its own."""
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> BrokerUrl:
        """Where clients connect: the configured broker, or the embedded one's address."""
        if self.broker_url is not None:
            return self.broker_url
        return BrokerUrl(self.listen.host, self.listen.port, tls=False)

    @property
    def db_path(self) -> Path:
        """The SQLite event store."""
        return self.data_dir / "careflow.db"


def _int_setting(env: Mapping[str, str], name: str, default: int, *,
                 maximum: int = MAX_INT_SETTING) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError as exc:
        msg = f"{name}={text!r} is not a whole number"
        raise ConfigError(msg) from exc
    if not 0 < value <= maximum:
        msg = f"{name} must be from 1 to {maximum}, not {value}"
        raise ConfigError(msg)
    return value


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    data_dir: Path | None = None,
    broker: str | None = None,
    listen: str | None = None,
) -> Settings:
    """Build settings: explicit flags win over ``CAREFLOW_*`` variables, which win over defaults."""
    env = os.environ if env is None else env
    broker_text = broker or env.get("CAREFLOW_BROKER_URL") or None
    sync = env.get("CAREFLOW_SQLITE_SYNC", "full").lower()
    if sync not in _SYNC_MODES:
        msg = f"CAREFLOW_SQLITE_SYNC must be one of {', '.join(_SYNC_MODES)}, not {sync!r}"
        raise ConfigError(msg)
    return Settings(
        data_dir=data_dir or Path(env.get("CAREFLOW_DATA_DIR") or default_data_dir(env)),
        broker_url=parse_broker_url(broker_text) if broker_text else None,
        listen=parse_host_port(listen or env.get("CAREFLOW_LISTEN") or DEFAULT_LISTEN,
                               what="listen address"),
        max_message_bytes=_int_setting(env, "CAREFLOW_MAX_MESSAGE_BYTES",
                                       DEFAULT_MAX_MESSAGE_BYTES),
        hub_client_id=env.get("CAREFLOW_HUB_CLIENT_ID") or "careflow-hub",
        broker_username=env.get("CAREFLOW_BROKER_USERNAME") or None,
        broker_password=read_secret(env, "CAREFLOW_BROKER_PASSWORD"),
        sqlite_synchronous="normal" if sync == "normal" else "full",
        broker_tls=tls_files(env.get("CAREFLOW_BROKER_CA"), env.get("CAREFLOW_BROKER_CERT"),
                             env.get("CAREFLOW_BROKER_KEY")),
        self_silence_ms=_int_setting(env, "CAREFLOW_SELF_SILENCE_S", 600) * 1000,
        deadman_url=read_secret(env, "CAREFLOW_DEADMAN_URL"),
        deadman_interval_s=_int_setting(env, "CAREFLOW_DEADMAN_INTERVAL_S", 60),
        influx=load_influx(env),
        runbook_url=env.get("CAREFLOW_RUNBOOK_URL") or None,
        pki_dir=Path(env["CAREFLOW_PKI_DIR"]) if env.get("CAREFLOW_PKI_DIR") else None,
        device_broker_url=parse_broker_url(env["CAREFLOW_DEVICE_BROKER_URL"])
        if env.get("CAREFLOW_DEVICE_BROKER_URL") else None,
        cert_days=_int_setting(env, "CAREFLOW_CERT_DAYS", 30, maximum=MAX_CERT_DAYS),
        max_devices_per_gateway=_int_setting(env, "CAREFLOW_MAX_DEVICES_PER_GATEWAY",
                                             DEFAULT_MAX_DEVICES_PER_GATEWAY),
        dead_letter_max_rows=_int_setting(env, "CAREFLOW_DEAD_LETTER_MAX_ROWS",
                                          DEFAULT_DEAD_LETTER_MAX_ROWS),
        dead_letter_max_bytes=_int_setting(env, "CAREFLOW_DEAD_LETTER_MAX_MB",
                                           DEFAULT_DEAD_LETTER_MAX_MB) << 20,
        http_listen=parse_http_listen(env.get("CAREFLOW_HTTP_LISTEN") or DEFAULT_HTTP_LISTEN),
        public_url=_public_url(env.get("CAREFLOW_PUBLIC_URL")),
        auth_header=env.get("CAREFLOW_AUTH_HEADER") or None,
        link_ttl_s=_int_setting(env, "CAREFLOW_LINK_TTL_S", DEFAULT_LINK_TTL_S,
                                maximum=MAX_LINK_TTL_S),
        automation=_automation(env.get("CAREFLOW_AUTOMATION")),
    )


AUTOMATION_LEVELS = ("off", "manual", "auto")  # in order: each allows what the one before does


def _automation(text: str | None) -> str:
    """CAREFLOW_AUTOMATION: the ceiling of the operations agent's mode (default manual)."""
    value = (text or "manual").strip().lower()
    if value not in AUTOMATION_LEVELS:
        msg = (f"CAREFLOW_AUTOMATION must be one of {', '.join(AUTOMATION_LEVELS)}, not "
               f"{text!r}")
        raise ConfigError(msg)
    return value


def parse_http_listen(text: str) -> HostPort | None:
    """CAREFLOW_HTTP_LISTEN: ``HOST:PORT`` (port 0: any free port), or ``off``."""
    if text.strip().lower() in ("off", "none", "no", "0"):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        msg = (f"CAREFLOW_HTTP_LISTEN={text!r} is not HOST:PORT or off (for example "
               f"{DEFAULT_HTTP_LISTEN}; put TLS in a reverse proxy in front of it)")
        raise ConfigError(msg)
    return HostPort(host.strip("[]"), int(port_text))


def _public_url(text: str | None) -> str | None:
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        msg = (f"CAREFLOW_PUBLIC_URL={text!r} must start with https:// (or http://): it is "
               "the address the links in messages open, e.g. https://careflow.example.org")
        raise ConfigError(msg)
    return text.rstrip("/")


def tls_files(ca: str | os.PathLike[str] | None, cert: str | os.PathLike[str] | None,
              key: str | os.PathLike[str] | None) -> TlsFiles:
    """TLS file settings; each named file must exist, and a certificate needs its key."""
    paths = {name: Path(value) if value else None
             for name, value in (("CA", ca), ("certificate", cert), ("key", key))}
    for name, path in paths.items():
        if path is not None and not path.is_file():
            msg = f"the TLS {name} file {path} does not exist"
            raise ConfigError(msg)
    if (paths["certificate"] is None) != (paths["key"] is None):
        msg = "a client certificate and its key go together: set both or neither"
        raise ConfigError(msg)
    return TlsFiles(paths["CA"], paths["certificate"], paths["key"])
