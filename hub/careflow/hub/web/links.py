"""Signed one-tap links: the secret that signs them (and, in its part of issue 13, signing
and checking them)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from careflow.core.config import Settings, read_secret
from careflow.core.errors import ConfigError

__all__ = ["LINK_SECRET_FILE", "load_link_key"]

LINK_SECRET_FILE = "link-secret"  # noqa: S105 (a file name) in the data directory, 0600
_MIN_SECRET = 32


def load_link_key(settings: Settings, env: dict[str, str] | None = None) -> bytes:
    """The key that signs links: CAREFLOW_LINK_SECRET (or the file CAREFLOW_LINK_SECRET_FILE
    names), else one generated into the data directory (0600) and kept there, so links sent
    before a restart still work after it."""
    environ = dict(os.environ) if env is None else env
    given = read_secret(environ, "CAREFLOW_LINK_SECRET")
    if given is not None:
        given = given.strip()
        if len(given) < _MIN_SECRET:
            msg = (f"CAREFLOW_LINK_SECRET must be at least {_MIN_SECRET} characters (e.g. the "
                   "output of `openssl rand -hex 32`)")
            raise ConfigError(msg)
        return given.encode()
    path = Path(settings.data_dir) / LINK_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if len(key) < _MIN_SECRET:
            msg = (f"{path} holds no usable link secret: delete it (a new one is made; "
                   "links already sent stop working) or set CAREFLOW_LINK_SECRET")
            raise ConfigError(msg) from None
        return key.encode()
    with os.fdopen(fd, "w") as out:
        key = secrets.token_hex(32)
        out.write(key + "\n")
    return key.encode()
