"""What every checkpoint directory of the stack shares (VLA, world model): files written under a temp name and
renamed, and a config.json header (kind, format, config, meta) whose problems are one clear error naming the
file, never a traceback from json or a silent partial load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from vla_stack.errors import VlaStackError

CONFIG = "config.json"
Config = TypeVar("Config")


def write_atomic(target: Path, writer: Callable[[Path], object]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    writer(tmp)
    tmp.replace(target)


def read_header(path: Path, kind: str, fmt: int, parse: Callable[[dict], Config], error: type[VlaStackError],
                what: str) -> tuple[Config, dict]:
    """(parsed config, meta) from `path/config.json`; `what` names the checkpoint in messages ('VLA')."""
    if not path.is_dir():
        raise error(f"{what} checkpoint {path} is not a directory")
    try:
        doc = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise error(f"{path} is not a {what} checkpoint: no {CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} checkpoint {path / CONFIG} is corrupt: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise error(f"{path / CONFIG} is not a vla_stack {what} checkpoint config")
    if doc.get("format") != fmt:
        raise error(f"{what} checkpoint {path} has format {doc.get('format')!r}; this build reads {fmt}")
    try:
        return parse(doc["config"]), doc.get("meta", {})
    except (KeyError, TypeError, VlaStackError) as exc:
        raise error(f"{what} checkpoint {path / CONFIG} has an invalid config: {exc}") from None
