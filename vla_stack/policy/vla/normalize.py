"""Per-embodiment normalisation and padding into the shared 32-dim space (openpi's transforms, kept out of
the network so the model only ever sees padded, normalised tensors)."""

from __future__ import annotations

import numpy as np
import torch

from vla_stack.errors import VlaStackError

STATS = ("mean", "std", "q01", "q99")
FEATURES = ("state", "action")
# A joint that barely moves in the demos (or a gripper that never opens) would otherwise be blown up into a
# huge normalised value: openpi saw training diverge from such tiny q01/q99/std ranges.
MIN_SCALE = 1e-2


def compute_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Stats of (N, D) samples of one feature."""
    values = np.asarray(values, np.float64)
    return {"mean": values.mean(0), "std": values.std(0),
            "q01": np.quantile(values, 0.01, axis=0), "q99": np.quantile(values, 0.99, axis=0)}


class Normalizer:
    """stats[robot][feature][stat] -> (D,) array, D = that robot's joint count."""

    def __init__(self, stats: dict[str, dict[str, dict[str, np.ndarray]]], mode: str):
        self.mode = mode
        self.stats = {r: {f: {s: np.asarray(v[s], np.float32) for s in STATS} for f, v in feats.items()}
                      for r, feats in stats.items()}

    def _shift_scale(self, robot: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            s = self.stats[robot][feature]
        except KeyError:
            raise VlaStackError(f"no normalisation stats for {robot}/{feature}") from None
        if self.mode == "mean_std":
            return s["mean"], np.maximum(s["std"], MIN_SCALE)
        return (s["q01"] + s["q99"]) / 2, np.maximum((s["q99"] - s["q01"]) / 2, MIN_SCALE)

    def normalize(self, robot: str, feature: str, x: np.ndarray) -> np.ndarray:
        shift, scale = self._shift_scale(robot, feature)
        return ((np.asarray(x, np.float32) - shift) / scale).astype(np.float32)

    def unnormalize(self, robot: str, feature: str, x: np.ndarray) -> np.ndarray:
        shift, scale = self._shift_scale(robot, feature)
        return (np.asarray(x, np.float32) * scale + shift).astype(np.float32)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{r}.{f}.{s}": torch.from_numpy(v) for r, feats in self.stats.items()
                for f, sv in feats.items() for s, v in sv.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], mode: str) -> Normalizer:
        stats: dict = {}
        for key, value in tensors.items():
            robot, feature, stat = key.rsplit(".", 2)
            stats.setdefault(robot, {}).setdefault(feature, {})[stat] = value.float().numpy()
        for robot, feats in stats.items():
            for feature in FEATURES:
                missing = [s for s in STATS if s not in feats.get(feature, {})]
                if missing:
                    raise VlaStackError(f"normalisation stats for {robot}/{feature} lack {', '.join(missing)}")
        return cls(stats, mode)


def pad(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim`."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] > dim:
        raise VlaStackError(f"{x.shape[-1]} dims do not fit the {dim}-dim padded space")
    return np.concatenate([x, np.zeros((*x.shape[:-1], dim - x.shape[-1]), np.float32)], -1)


def dim_mask(n_real: int, dim: int) -> np.ndarray:
    mask = np.zeros(dim, np.float32)
    mask[:n_real] = 1.0
    return mask
