"""Effective configuration: command-line flags > environment variables > config file > defaults.

The config file is TOML, flat keys named as in `KEYS` (e.g. `redis_url = "redis://..."`), read from
`--config FILE`, else `$PREFIXQ_CONFIG`, else `~/.config/prefixq/config.toml` when it exists.

The rest of prefixq reads its settings from environment variables, so `apply_to_environ` exports
file values for keys the environment does not set; flags keep winning because every command
already prefers its flag over the environment.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PATH = Path("~/.config/prefixq/config.toml")
MASK = "****"


@dataclass(frozen=True)
class Key:
    name: str                 # key in the TOML file
    env: str                  # environment variable the code reads
    flag: str | None          # argparse dest of the flag that overrides it, if any
    default: str | None
    secret: str | None = None  # "url": mask the password in a URL; "value": mask all of it


KEYS: tuple[Key, ...] = (
    Key("redis_url", "PREFIXQ_REDIS_URL", "redis_url", "redis://127.0.0.1:6379/0", secret="url"),
    Key("store", "PREFIXQ_STORE", "store", "file://$PWD/.prefixq/store", secret="url"),
    Key("queue", "PREFIXQ_QUEUE", "queue", "prefixq"),
    Key("model", "PREFIXQ_MODEL", "model", "smollm2"),
    Key("engine", "PREFIXQ_ENGINE", "engine", "auto"),
    Key("metrics_port", "PREFIXQ_METRICS_PORT", "metrics_port", "9090"),
    Key("split_rows", "PREFIXQ_SPLIT_ROWS", "split_rows", "50000"),
    Key("log_format", "PREFIXQ_LOG_FORMAT", "log_format", "text"),
    Key("log_level", "PREFIXQ_LOG_LEVEL", None, "INFO"),
    Key("s3_endpoint", "PREFIXQ_S3_ENDPOINT", None, None),
    Key("aws_region", "AWS_DEFAULT_REGION", None, None),
    Key("aws_access_key_id", "AWS_ACCESS_KEY_ID", None, None),
    Key("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", None, None, secret="value"),
    Key("aws_session_token", "AWS_SESSION_TOKEN", None, None, secret="value"),
)
BY_NAME = {k.name: k for k in KEYS}


_INJECTED: dict[str, str] = {}  # environment variables this process set from the config file


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    key: Key
    value: str | None
    source: str  # flag | env | file | default

    @property
    def shown(self) -> str:
        return mask(self.value, self.key.secret)


def config_path(explicit: str | None = None, environ=os.environ) -> tuple[Path | None, bool]:
    """(path, required): an explicit or $PREFIXQ_CONFIG file must exist; the default may be absent."""
    if explicit:
        return Path(explicit).expanduser(), True
    if environ.get("PREFIXQ_CONFIG"):
        return Path(environ["PREFIXQ_CONFIG"]).expanduser(), True
    return DEFAULT_PATH.expanduser(), False


def read_file(path: Path | None, required: bool) -> dict[str, str]:
    if path is None or (not required and not path.exists()):
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    unknown = sorted(set(data) - BY_NAME.keys())
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    out = {}
    for k, v in data.items():
        if isinstance(v, (dict, list)) or isinstance(v, bool):
            raise ConfigError(f"config file {path}: '{k}' must be a string or a number")
        out[k] = str(v)
    return out


def resolve(flags: dict | None = None, config_file: str | None = None, environ=os.environ) -> dict[str, Setting]:
    """The effective value and its source for every key."""
    flags = flags or {}
    path, required = config_path(config_file, environ)
    from_file = read_file(path, required)
    out = {}
    for k in KEYS:
        if k.flag and flags.get(k.flag) is not None:
            out[k.name] = Setting(k, str(flags[k.flag]), "flag")
        elif environ.get(k.env) and _INJECTED.get(k.env) != environ[k.env]:
            out[k.name] = Setting(k, environ[k.env], "env")
        elif k.name in from_file:
            out[k.name] = Setting(k, from_file[k.name], f"file:{path}")
        else:
            out[k.name] = Setting(k, k.default, "default")
    return out


def apply_to_environ(config_file: str | None = None, environ=os.environ) -> dict[str, Setting]:
    """Export config-file values into the environment where the environment has none."""
    settings = resolve({}, config_file, environ)
    for s in settings.values():
        if s.source.startswith("file:"):
            environ[s.key.env] = s.value
            _INJECTED[s.key.env] = s.value  # so `prefixq config` still reports the file as the source
    return settings


def mask(value: str | None, kind: str | None) -> str:
    if value is None:
        return ""
    if kind == "value":
        return MASK if value else ""
    if kind == "url":
        parts = urlsplit(value)
        if parts.password is None:
            return value
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))
    return value


def render(settings: dict[str, Setting]) -> str:
    width = max(len(n) for n in settings)
    lines = [f"{'KEY':{width}}  {'VALUE':40}  SOURCE"]
    for name, s in settings.items():
        lines.append(f"{name:{width}}  {s.shown:40}  {s.source}")
    return "\n".join(lines)
