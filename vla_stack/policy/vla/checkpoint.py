"""Checkpoint directories: config.json (format + VlaConfig), model.safetensors (weights, fp32 or fp16) and
normalization.safetensors (per-robot stats). Anything missing, unreadable or not matching the config is a
CheckpointError naming the file and the problem, never a pickle error or a silent partial load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vla_stack.checkpoint_files import CONFIG, read_header, write_atomic
from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.configuration_vla import VlaConfig
from vla_stack.policy.vla.modeling_vla import VlaModel
from vla_stack.policy.vla.normalize import Normalizer

FORMAT = 1
KIND = "vla_stack.vla"
WEIGHTS, NORM = "model.safetensors", "normalization.safetensors"


class CheckpointError(VlaStackError):
    """A VLA checkpoint directory is missing, corrupt or does not match its config."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def save_checkpoint(path: str | Path, model: VlaModel, normalizer: Normalizer,
                    dtype: torch.dtype = torch.float32, meta: dict | None = None) -> Path:
    """Write atomically enough for periodic saves: each file goes to a temp name and is renamed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    write_atomic(path / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"format": str(FORMAT)}))
    write_atomic(path / NORM, lambda p: save_file({k: v.contiguous() for k, v in normalizer.to_tensors().items()}, str(p)))
    doc = {"format": FORMAT, "kind": KIND, "config": model.config.to_dict(), "meta": meta or {}}
    write_atomic(path / CONFIG, lambda p: p.write_text(json.dumps(doc, indent=1)))
    return path


def load_config(path: str | Path) -> tuple[VlaConfig, dict]:
    return read_header(Path(path), KIND, FORMAT, VlaConfig.from_dict, CheckpointError, "VLA")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated: {exc}") from None


def load_checkpoint(path: str | Path, overrides: dict | None = None) -> tuple[VlaModel, Normalizer, dict]:
    """(model in eval mode, fp32; normalizer; meta). `overrides` adjusts config fields that do not change
    the weights (e.g. hf_path on another machine, n_action_steps)."""
    path = Path(path)
    config, meta = load_config(path)
    if overrides:
        config = VlaConfig.from_dict({**config.to_dict(), **overrides})
    weights = _read_tensors(path / WEIGHTS)
    norm = _read_tensors(path / NORM)
    model = VlaModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"weights in {path / WEIGHTS} do not match its config ({detail})")
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise CheckpointError(f"weights in {path / WEIGHTS} contain NaN or inf")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    normalizer = Normalizer.from_tensors(norm, config.normalization)
    lacking = sorted(set(config.embodiments) - set(normalizer.stats))
    if lacking:
        raise CheckpointError(f"{path / NORM} has no stats for robot(s) {', '.join(lacking)}")
    return model.eval(), normalizer, meta
