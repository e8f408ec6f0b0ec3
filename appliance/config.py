"""Configuration: embedded defaults, a TOML file, then environment overrides.

Every key is validated at start; a bad one is a ConfigError whose message
names the key and the file, so the CLI prints one line and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from hw.profiles import PROFILES
from hw.profiles import detect as detect_profile

ENV_CONFIG = "MODULE_INGEST_CONFIG"
ENV_LISTEN = "MODULE_INGEST_LISTEN"
ENV_DATA_DIR = "MODULE_INGEST_DATA_DIR"


class ConfigError(Exception):
    pass


# (type, default, lower bound or None) of one key. Bounds keep every buffer finite.
Spec = tuple[Any, Any, float | None]
REQUIRED = object()  # the default of a key that must be given (subscriber tables)

# section -> key -> Spec
SCHEMA: dict[str, dict[str, Spec]] = {
    "server": {
        "name": (str, "module-ingest", None),
        "listen": (str, "127.0.0.1:7878", None),
        "backlog": (int, 4096, 1),
        "max_connections": (int, 16384, 1),
        "max_handshakes": (int, 1024, 1),
        "max_handshakes_per_source": (int, 256, 1),
        "max_payload": (int, 65536, 1),
        "handshake_timeout": (float, 10.0, 0.1),
        "idle_timeout": (float, 60.0, 0),
        "recv_bytes": (int, 262144, 4096),
        "send_buffer_limit": (int, 1048576, 4096),
        "keepalive": (bool, True, None),
    },
    "tls": {
        "enabled": (bool, False, None),
        "listen": (str, "127.0.0.1:7879", None),
        "cert": (str, "", None),
        "key": (str, "", None),
    },
    "storage": {
        "data_dir": (str, "./data", None),
        "segment_bytes": (int, 64 * 1024 * 1024, 1024 * 1024),
        "ring_bytes": (int, 16 * 1024 * 1024, 1024 * 1024),
        "commit_delay": (float, 0.0, 0),
        "commit_max_bytes": (int, 4 * 1024 * 1024, 65536),
        "checkpoint_bytes": (int, 32 * 1024 * 1024, 65536),
        "checkpoint_seconds": (float, 10.0, 0.1),
        "quota_bytes": (int, 0, 0),
        "min_free_bytes": (int, 0, 0),
        "retention_bytes": (int, 0, 0),
        "retention_seconds": (float, 0.0, 0),
        "overflow": (str, "block", None),
    },
    "auth": {
        "trust_on_first_use": (bool, False, None),
        "dev_identity": (bool, True, None),
    },
    "log": {
        "format": (str, "logfmt", None),
        "level": (str, "info", None),
        "file": (str, "", None),
        "file_max_bytes": (int, 10 * 1024 * 1024, 4096),
        "file_backups": (int, 3, 0),
        "buffer_lines": (int, 1000, 1),
    },
    "stats": {
        "socket": (str, "stats.sock", None),
        "tcp": (str, "", None),
    },
    "console": {
        "port": (str, "", None),
        "baud": (int, 115200, 50),
        "idle_logout": (float, 300.0, 1),
    },
    "watchdog": {
        "stall_seconds": (float, 10.0, 0.1),
        "device": (str, "", None),
    },
    "board": {
        "profile": (str, "auto", None),
    },
}

# keys whose value is one of a few words
CHOICES: dict[str, tuple[str, ...]] = {
    "log.format": ("logfmt", "json"),
    "storage.overflow": ("block", "drop-oldest"),
    "log.level": ("debug", "info", "warning", "error"),
    "board.profile": ("auto", *PROFILES),
}


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return Address(host.strip("[]"), int(port))


class Config:
    """The effective configuration: `config.section[key]`, plus a few derived values."""

    def __init__(
        self,
        values: dict[str, dict[str, Any]],
        source: str,
        path: str | None = None,
        subscribers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.values = values
        self.source = source
        self.path = path  # the config file, if any (subscriber processes read it too)
        # [subscribers.NAME] tables: "type", optional "channels"/"identities", options
        self.subscribers = subscribers or {}
        self.server = values["server"]
        self.tls = values["tls"]
        self.storage = values["storage"]
        self.auth = values["auth"]
        self.listen = parse_address(self.server["listen"])
        self.tls_listen = parse_address(self.tls["listen"])
        self.data_dir = Path(self.storage["data_dir"])

    def to_toml(self, secrets: bool = False) -> str:
        """The effective configuration as TOML; a credential (SECRET_OPTION) shows as
        HIDDEN unless `secrets`: the output goes to terminals, tickets and serial logs."""
        lines = [f"# effective configuration (from {self.source})"]
        tables = list(self.values.items())
        tables += [(f"subscribers.{name}", keys) for name, keys in self.subscribers.items()]
        hidden = []
        for section, keys in tables:
            lines.append(f"\n[{section}]")
            for key, value in keys.items():
                if not secrets and is_secret(key, value):
                    hidden.append(f"{section}.{key}")
                    value = HIDDEN
                lines.append(f"{key} = {_toml_value(value)}")
        if hidden:
            lines.insert(1, f"# hidden: {', '.join(hidden)} (--secrets prints them)")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _check(section: str, key: str, value: Any, where: str) -> Any:
    name = f"{section}.{key}"
    value = check_value(name, SCHEMA[section][key], value, where, CHOICES.get(name))
    if key in ("listen", "tcp") and (value or key == "listen"):
        try:
            parse_address(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {name}: {exc}") from None
    return value


def check_value(name: str, spec: Spec, value: Any, where: str, choices: tuple | None = None) -> Any:
    """One value against its (type, default, lower bound) spec; ConfigError naming `name`
    and `where`. The type may be list[int] or list[str]: a list of those."""
    kind, _, low = spec
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        if not isinstance(value, list) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where}: {name} must be a list of {item.__name__}, got {value!r}")
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} must be {kind.__name__}, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{where}: {name} must be >= {low}, got {value!r}")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{where}: {name} must be one of {allowed}, got {value!r}")
    return value


def load(path: str | os.PathLike | None = None, environ: dict | None = None) -> Config:
    """Defaults, the board profile, the file (`path`, else $MODULE_INGEST_CONFIG), then
    the environment."""
    env = os.environ if environ is None else environ
    values = {s: {k: spec[1] for k, spec in keys.items()} for s, keys in SCHEMA.items()}
    path = path or env.get(ENV_CONFIG) or None
    source = "embedded defaults"
    data: dict = {}
    subscribers: dict[str, dict[str, Any]] = {}
    if path:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: invalid TOML: not UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        subscribers = _subscribers(data.pop("subscribers", {}), str(path))
        warn_if_secrets_exposed(path, subscribers)
        for section, keys in data.items():
            if section not in SCHEMA or not isinstance(keys, dict):
                raise ConfigError(f"{path}: unknown section [{section}]")
            for key in keys:
                if key not in SCHEMA[section]:
                    raise ConfigError(f"{path}: unknown key {section}.{key}")
    profile = data.get("board", {}).get("profile", "auto")
    _check("board", "profile", profile, str(path))
    values["board"]["profile"] = detect_profile() if profile == "auto" else profile
    for section, keys in PROFILES[values["board"]["profile"]].items():
        values[section].update(keys)
    for section, keys in data.items():
        for key, value in keys.items():
            values[section][key] = _check(section, key, value, str(path))
    for var, section, key in (
        (ENV_LISTEN, "server", "listen"),
        (ENV_DATA_DIR, "storage", "data_dir"),
    ):
        if env.get(var):
            values[section][key] = _check(section, key, env[var], f"${var}")
            source += f" + ${var}"
    if values["tls"]["enabled"] and not (values["tls"]["cert"] and values["tls"]["key"]):
        raise ConfigError(f"{source}: tls.enabled needs tls.cert and tls.key")
    if values["storage"]["ring_bytes"] < 4 * values["server"]["recv_bytes"]:
        raise ConfigError(f"{source}: storage.ring_bytes must be >= 4 * server.recv_bytes")
    return Config(values, source, str(path) if path else None, subscribers)


SUBSCRIBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}")


# the keys every [subscribers.NAME] table may have (the runner's); the others are the
# options of its type, checked against the schema the type declares (subscribers/runner.py)
SUBSCRIBER_KEYS: dict[str, Spec] = {
    "type": (str, REQUIRED, None),  # archive, index, ..., module:Class or an entry point
    "channels": (list[int], [], None),  # filters: only these channels / identities
    "identities": (list[str], [], None),
    "batch": (int, 10000, 1),  # records per read of the log at most
    "poll": (float, 0.05, 0.001),  # seconds between reads when caught up
    "nice": (int, 10, 0),  # the process's nice value: ingestion gets the CPU first
}


def _subscribers(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    """The [subscribers.NAME] tables: names, and the keys every table has."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: [subscribers] must hold [subscribers.NAME] tables")
    out = {}
    for name, table in tables.items():
        key = f"subscribers.{name}"
        if not SUBSCRIBER_NAME.fullmatch(name) or not isinstance(table, dict):
            raise ConfigError(f"{where}: [{key}]: a name of letters, digits, _ . - and a table")
        own = {k: v for k, v in table.items() if k in SUBSCRIBER_KEYS}
        checked = check_table(key, own, SUBSCRIBER_KEYS, where)
        if not checked["type"]:
            raise ConfigError(f"{where}: {key}.type is required (archive, index, ...)")
        if not all(0 <= c <= 0xFFFF for c in checked["channels"]):
            raise ConfigError(f"{where}: {key}.channels must be channels 0..65535")
        if checked["nice"] > 19:
            raise ConfigError(f"{where}: {key}.nice must be 0..19, got {checked['nice']}")
        out[name] = {**table, **checked}
    return out


class OptionError(ConfigError):
    """A table's value is wrong in a way its type alone does not show (a file that is
    missing, a URL it cannot use): check_table names the table, `key` and the file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_table(
    table: str,
    values: dict[str, Any],
    schema: dict[str, Spec],
    where: str,
    choices: dict[str, tuple] | None = None,
) -> dict[str, Any]:
    """The keys of one table (say "subscribers.up") against `schema`: unknown keys, types,
    bounds, choices and REQUIRED keys; returns the values with the defaults filled in."""
    choices = choices or {}
    for key in values:
        if key not in schema:
            raise ConfigError(
                f"{where}: unknown key {table}.{key} (known: {', '.join(sorted(schema))})"
            )
    out = {}
    for key, spec in schema.items():
        if key in values:
            out[key] = check_value(f"{table}.{key}", spec, values[key], where, choices.get(key))
        elif spec[1] is REQUIRED:
            raise ConfigError(f"{where}: {table}.{key} is required")
        else:
            out[key] = spec[1]
    return out


# Option names that hold a credential (a "..._file" option names a file instead).
SECRET_OPTION = re.compile(r"secret|password|token|private_key", re.IGNORECASE)
HIDDEN = "(hidden)"  # what `config show` prints for one


def is_secret(key: str, value: Any) -> bool:
    """Whether the option `key` holds a credential (set)."""
    return bool(SECRET_OPTION.search(key)) and not key.endswith("_file") and bool(value)


def warn_if_secrets_exposed(path: str | os.PathLike, subscribers: dict[str, dict]) -> None:
    """Warn once if the config file holds a subscriber secret and others may read it."""
    names = [
        f"subscribers.{name}.{key}"
        for name, table in subscribers.items()
        for key, value in table.items()
        if is_secret(key, value)
    ]
    if not names:
        return
    try:
        info = os.stat(path)
    except OSError:
        return  # it was just read; a file that vanished since is not this check's business
    mode = stat.S_IMODE(info.st_mode)
    # group-readable is fine when the group is the daemon's own (the image installs the
    # config 0640 root:module-ingest): nobody but the service can read it then
    exposed = mode & 0o004 or (mode & 0o040 and info.st_gid != os.getegid())
    if exposed:
        logging.getLogger("appliance.config").warning(
            "config %s holds secrets (%s) and is readable by %s (mode %04o): make it 0600, "
            "owned by the user the daemon runs as, or move them to the environment",
            path,
            ", ".join(names),
            "others" if mode & 0o004 else "its group",
            mode,
        )
