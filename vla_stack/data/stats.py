"""Mergeable per-feature statistics, in LeRobot's stats.json layout.

Each episode's summary is computed once, when it is committed, so dataset statistics cost a merge
instead of a pass over every frame. Mean/std/min/max merge exactly (Chan et al.'s parallel variance);
quantiles come from a pooled, count-weighted sample, which is exact for uint8 images (a full
histogram) and for episodes no longer than the sample bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
MAX_SAMPLES = 1000  # rows kept per episode for quantiles: episodes up to this length are exact


@dataclass(frozen=True)
class PartialStats:
    """Summary of one feature over some frames, reduced per channel C (a vector's elements, an
    image's colour channels)."""

    count: int  # frames
    n: int  # values per channel (frames x pixels for images)
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) sum of squared deviations from the mean
    min: np.ndarray  # (C,)
    max: np.ndarray  # (C,)
    values: np.ndarray  # (K, C) quantile support ...
    weights: np.ndarray  # (K, C) ... and how many values each one stands for

    @classmethod
    def from_values(cls, x: np.ndarray, max_samples: int = MAX_SAMPLES, seed: int = 0) -> PartialStats:
        """Stats of a (frames, ...) array, one channel per element of a frame."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if len(x) == 0:
            raise ValueError("cannot summarise zero frames")
        mean = x.mean(axis=0)
        rows = x
        if len(x) > max_samples:
            pick = np.random.default_rng(seed).choice(len(x), size=max_samples, replace=False)
            rows = x[np.sort(pick)]
        return cls(
            count=len(x),
            n=len(x),
            mean=mean,
            m2=((x - mean) ** 2).sum(axis=0),
            min=x.min(axis=0),
            max=x.max(axis=0),
            values=rows,
            weights=np.full(rows.shape, len(x) / len(rows)),
        )

    @classmethod
    def from_histogram(cls, hist: np.ndarray, count: int) -> PartialStats:
        """Stats of uint8 data from per-channel value counts (256, C): exact, and cheap to keep
        while frames stream in."""
        hist = np.asarray(hist, dtype=np.int64)
        levels = np.arange(hist.shape[0], dtype=np.float64)[:, None]
        n = int(hist[:, 0].sum())
        mean = (hist * levels).sum(axis=0) / n
        seen = hist > 0
        return cls(
            count=count,
            n=n,
            mean=mean,
            m2=(hist * (levels - mean) ** 2).sum(axis=0),
            min=seen.argmax(axis=0).astype(np.float64),
            max=(len(hist) - 1 - seen[::-1].argmax(axis=0)).astype(np.float64),
            values=np.broadcast_to(levels, hist.shape).copy(),
            weights=hist.astype(np.float64),
        )

    @classmethod
    def merge(cls, parts: list[PartialStats]) -> PartialStats:
        """Exact moments of the union; quantile supports are pooled with their weights."""
        if not parts:
            raise ValueError("nothing to merge")
        ns = np.array([p.n for p in parts], dtype=np.float64)[:, None]
        means = np.stack([p.mean for p in parts])
        n = int(ns.sum())
        mean = (ns * means).sum(axis=0) / n
        return cls(
            count=sum(p.count for p in parts),
            n=n,
            mean=mean,
            m2=np.stack([p.m2 for p in parts]).sum(axis=0) + (ns * (means - mean) ** 2).sum(axis=0),
            min=np.min([p.min for p in parts], axis=0),
            max=np.max([p.max for p in parts], axis=0),
            values=np.concatenate([p.values for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
        )

    def quantile(self, q: float) -> np.ndarray:
        """np.quantile's default (linear) rule applied to the weighted values, per channel; equal to
        it exactly when the weights are whole counts."""
        out = np.empty(self.values.shape[1])
        for c in range(len(out)):
            order = np.argsort(self.values[:, c], kind="stable")
            v, cw = self.values[order, c], np.cumsum(self.weights[order, c])
            pos = q * (cw[-1] - 1)
            lo = np.floor(pos)
            at = np.searchsorted(cw, [lo, min(lo + 1, cw[-1] - 1)], side="right").clip(max=len(v) - 1)
            out[c] = v[at[0]] + (pos - lo) * (v[at[1]] - v[at[0]])
        return out

    def summary(self, shape: tuple[int, ...], image: bool = False) -> dict[str, np.ndarray]:
        """LeRobot stats.json entry: images per colour channel as (3, 1, 1) in [0, 1], other
        features in their own shape (scalars as (1,))."""
        stats = {
            "mean": self.mean,
            "std": np.sqrt(self.m2 / self.n),
            "min": self.min,
            "max": self.max,
            **{key: self.quantile(q) for key, q in QUANTILES.items()},
        }
        if image:
            stats = {k: (v / 255.0).reshape(-1, 1, 1) for k, v in stats.items()}
        else:
            stats = {k: v.reshape(shape or (1,)) for k, v in stats.items()}
        return {**stats, "count": np.array([self.count])}

    def to_record(self) -> tuple[dict, np.ndarray]:
        """JSON attributes (floats round-trip exactly) plus one (2, K, C) array of values and weights."""
        attrs = {"count": self.count, "n": self.n}
        attrs |= {k: getattr(self, k).tolist() for k in ("mean", "m2", "min", "max")}
        return attrs, np.stack([self.values, self.weights])

    @classmethod
    def from_record(cls, attrs: dict, support: np.ndarray) -> PartialStats:
        arrays = {k: np.asarray(attrs[k], dtype=np.float64) for k in ("mean", "m2", "min", "max")}
        return cls(count=int(attrs["count"]), n=int(attrs["n"]), values=support[0], weights=support[1], **arrays)
