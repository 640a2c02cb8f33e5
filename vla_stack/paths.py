"""Where generated data lives (never inside the repo) and where shipped assets are found."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

from vla_stack.errors import VlaStackError

_PKG_ROOT = Path(__file__).resolve().parent


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """User data dir: --data-dir, then $VLA_STACK_DATA_DIR, then the platform's user data dir."""
    path = Path(override or os.environ.get("VLA_STACK_DATA_DIR") or platformdirs.user_data_dir("vla_stack"))
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VlaStackError(f"data dir {path} is not writable: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise VlaStackError(f"data dir {path} is not writable")
    return path


def resolve_data_path(path: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """Absolute (or ~) paths stay as they are; relative ones are relative to the user data dir (see data_dir), so
    a shipped training config names `vla/pick-panda.zarr` and works on any machine."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else data_dir(override) / path


def share_dir(name: str) -> Path:
    """A shipped top-level folder (sim/, launch/, config/, policies/): source checkout first, then the
    install prefix's share/vla_stack (pip or colcon install)."""
    candidates = [_PKG_ROOT.parent / name, Path(sys.prefix) / "share" / "vla_stack" / name]
    prefix = os.environ.get("AMENT_PREFIX_PATH", "")
    candidates += [Path(p) / "share" / "vla_stack" / name for p in prefix.split(os.pathsep) if p]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise VlaStackError(f"cannot find the shipped '{name}/' folder (looked in {', '.join(map(str, candidates))})")


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """A checkpoint directory given as a path, or by the name of a shipped one (`vla_tiny` -> policies/vla_tiny)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.name == str(name):  # a bare name: look among the shipped policies
        shipped = share_dir("policies") / path.name
        if shipped.is_dir():
            return shipped
    raise VlaStackError(f"policy '{name}' is neither 'expert', a checkpoint directory nor a shipped policy name")
