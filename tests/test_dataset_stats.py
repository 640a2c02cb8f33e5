"""Incremental dataset statistics: merged per-episode summaries must equal numpy over all the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from typer.testing import CliRunner

from vla_stack.data.commands import dataset_app
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.data.stats import QUANTILES, PartialStats

FEATURES = {
    "images.front": {"dtype": "uint8", "shape": [24, 24, 3]},
    "state": {"dtype": "float32", "shape": [5]},
    "action": {"dtype": "float64", "shape": [2]},
    "subtask_index": {"dtype": "int64", "shape": []},
}


def numpy_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """The reference: statistics over all frames at once, per channel."""
    return {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
            **{key: np.quantile(x, q, axis=0) for key, q in QUANTILES.items()}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = EpisodeStore.create(tmp_path_factory.mktemp("stats") / "s.zarr", robot="panda", fps=10, features=FEATURES)
    rng = np.random.default_rng(3)
    for length, shift in [(7, 0.0), (19, 5.0), (1, -3.0), (12, 100.0)]:  # unequal lengths and far-apart means
        with store.begin_episode(instruction="stack", task="stack") as writer:
            for t in range(length):
                writer.add_frame({
                    "images.front": rng.integers(0, 200 + length, (24, 24, 3), dtype=np.uint8),
                    "state": (rng.normal(shift, 1 + shift / 10, 5)).astype(np.float32),
                    "action": rng.exponential(1.0, 2) + shift,
                    "subtask_index": t // 4,
                })
            writer.commit(success=True)
    return store


def test_merged_stats_equal_numpy_over_all_frames(store):
    data = [store.read_episode(i) for i in range(len(store))]
    stats = store.stats()
    for name in ("state", "action", "subtask_index"):
        values = np.concatenate([d[name] for d in data]).astype(np.float64).reshape(39, -1)
        expected = numpy_stats(values)
        for key, value in expected.items():
            np.testing.assert_allclose(stats[name][key], value.reshape(stats[name][key].shape), rtol=1e-12,
                                       atol=1e-12, err_msg=f"{name} {key}")
        assert stats[name]["count"].tolist() == [39]
    assert stats["subtask_index"]["mean"].shape == (1,)
    pixels = np.concatenate([d["images.front"] for d in data]).reshape(-1, 3) / 255.0
    for key, value in numpy_stats(pixels).items():
        assert stats["images.front"][key].shape == (3, 1, 1)
        np.testing.assert_allclose(stats["images.front"][key].ravel(), value, rtol=1e-12, atol=1e-12, err_msg=key)


def test_stats_of_a_subset_and_stored_summaries(store):
    only = store.stats([1])
    np.testing.assert_allclose(only["state"]["mean"], store.read_episode(1)["state"].astype(np.float64).mean(0),
                               rtol=1e-12)
    attrs, support = store.episode_stats(3)["action"].to_record()
    assert json.loads(json.dumps(attrs)) == attrs  # plain JSON, floats round-trip exactly
    assert support.shape == (2, 12, 2)


def test_histogram_and_values_agree_for_uint8():
    x = np.random.default_rng(0).integers(0, 256, (50, 3)).astype(np.uint8)
    hist = np.stack([np.bincount(x[:, c], minlength=256) for c in range(3)], axis=1)
    a, b = PartialStats.from_histogram(hist, count=50), PartialStats.from_values(x)
    for key in ("mean", "m2", "min", "max"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-12)
    for q in QUANTILES.values():
        np.testing.assert_allclose(a.quantile(q), b.quantile(q), rtol=1e-12)


def test_subsampled_quantiles_stay_close():
    """Episodes longer than the sample bound: quantiles are estimates, checked by rank (the rank error's
    standard deviation is about 0.008 here)."""
    rng = np.random.default_rng(1)
    episodes = [rng.normal(loc, 1.0, (n, 2)) for loc, n in [(0, 6000), (2, 800), (-1, 3000)]]
    merged = PartialStats.merge([PartialStats.from_values(e, seed=i) for i, e in enumerate(episodes)])
    values = np.concatenate(episodes)
    np.testing.assert_allclose(merged.mean, values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(merged.m2 / merged.n), values.std(0), rtol=1e-12)
    for q in QUANTILES.values():
        ranks = (values <= merged.quantile(q)).mean(axis=0)
        np.testing.assert_allclose(ranks, q, atol=0.03)


@settings(max_examples=60, deadline=None)
@given(st.lists(arrays(np.float64, st.tuples(st.integers(1, 30), st.just(3)),
                       elements=st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=6))
def test_merge_of_any_split_equals_numpy(episodes):
    merged = PartialStats.merge([PartialStats.from_values(e) for e in episodes])
    values = np.concatenate(episodes)
    summary = merged.summary((3,))
    scale = np.abs(values).max() + 1
    for key, value in numpy_stats(values).items():
        np.testing.assert_allclose(summary[key], value, rtol=1e-9, atol=1e-9 * scale, err_msg=key)
    assert summary["count"].tolist() == [len(values)]


def test_stats_command(store):
    result = CliRunner().invoke(dataset_app, ["stats", "--store", str(store.path)])
    assert result.exit_code == 0, result.output
    assert "39 frames" in result.output and "images.front r" in result.output and "state 4" in result.output
