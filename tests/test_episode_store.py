"""The zarr episode store: round trips, validation, and survival of killed writers and damage."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from vla_stack.data.commands import dataset_app
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import StoreError

CHILD = Path(__file__).with_name("episode_writer_child.py")
_spec = importlib.util.spec_from_file_location("episode_writer_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)
FEATURES, make_episode, write_episode = child.FEATURES, child.make_episode, child.write_episode


def new_store(path: Path, episodes: int = 0) -> EpisodeStore:
    store = EpisodeStore.create(path, robot="panda", fps=10, features=FEATURES)
    for seed in range(episodes):
        write_episode(store, seed)
    return store


def assert_episode_is(store: EpisodeStore, index: int, seed: int) -> None:
    expected = make_episode(seed)
    got = store.read_episode(index)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    meta = store.episode_meta(index)
    assert (meta.seed, meta.instruction, meta.length) == (seed, f"episode {seed}", len(expected["state"]))


def pending_entries(store: EpisodeStore) -> list[str]:
    return sorted(p.name for p in (store.path / ".pending").iterdir() if p.name != "writers.lock")


def test_round_trip(tmp_path):
    new_store(tmp_path / "s.zarr", episodes=3)
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert (len(store), store.robot, store.fps) == (3, "panda", 10)
    assert store.features["state"].names == ("x", "y", "z", "grip")
    for i in range(3):
        assert_episode_is(store, i, seed=i)
    meta = store.episode_meta(1)
    assert (meta.task, meta.robot, meta.subtasks, meta.success, meta.extra) == (
        "place", "panda", ("reach", "place"), True, {"seed_again": 1})
    arrays = store.episode_arrays(2)
    assert arrays["images.front"].chunks == (1, 32, 32, 3)
    np.testing.assert_array_equal(arrays["images.wrist"][1], make_episode(2)["images.wrist"][1])
    np.testing.assert_array_equal(store.timestamps(1), np.arange(meta.length) / 10)
    assert store.verify() == {}
    assert pending_entries(store) == []


def frame(**changes) -> dict:
    values = {name: v[0] for name, v in make_episode(0).items()}
    return {**values, **changes}


@pytest.mark.parametrize("bad, message", [
    (frame(extra_camera=np.zeros(3)), "unknown feature(s) ['extra_camera']"),
    ({k: v for k, v in frame().items() if k != "action"}, "missing feature(s) ['action']"),
    (frame(state=np.zeros(5, np.float32)), "'state' has shape (5,), expected (4,)"),
    (frame(**{"images.front": np.zeros((32, 32, 3), np.float32)}), "'images.front' has dtype float32, expected uint8"),
    (frame(**{"images.front": np.zeros((32, 32, 3), np.int64)}), "'images.front' has dtype int64, expected uint8"),
    (frame(subtask_index=1.5), "'subtask_index' has dtype float64, expected int64"),
    (frame(state=np.array([0, np.nan, 0, 0], np.float32)), "'state' contains NaN or infinity"),
    (frame(action=np.array([np.inf, 0, 0])), "'action' contains NaN or infinity"),
    (frame(action=np.array([1e300, 0, 0])), "'action' contains NaN or infinity"),  # overflows float32
])
def test_bad_frames_are_rejected_whole(tmp_path, bad, message):
    store = new_store(tmp_path / "s.zarr")
    with store.begin_episode(instruction="x", task="place") as writer:
        writer.add_frame(frame())
        with pytest.raises(StoreError) as err:
            writer.add_frame(bad)
        assert message in str(err.value)
        assert len(writer) == 1
        writer.add_frame(frame(state=np.arange(4), action=[1.0, 2.0, 3.0]))  # lossless casts are fine
        assert writer.commit(success=False) == 0
    np.testing.assert_array_equal(store.read_episode(0)["state"][1], [0, 1, 2, 3])


@pytest.mark.parametrize("features, message", [
    ({"images.front": {"dtype": "float32", "shape": [8, 8, 3]}}, "must be uint8 (H, W, 3)"),
    ({"images.front": {"dtype": "uint8", "shape": [8, 8]}}, "must be uint8 (H, W, 3)"),
    ({"state": {"dtype": "complex64", "shape": [2]}}, "dtype complex64 is not one of"),
    ({"state": {"dtype": "float32", "shape": [0]}}, "non-positive dimension"),
    ({"state": {"dtype": "float32", "shape": [2], "names": ["a"]}}, "1 names for shape (2,)"),
    ({"a/b": {"dtype": "float32", "shape": [2]}}, "bad feature name 'a/b'"),
    ({"state": {"shape": [2]}}, "expected {'dtype': ..., 'shape': [...]}"),
    ({}, "at least one feature"),
])
def test_bad_schemas(tmp_path, features, message):
    with pytest.raises(StoreError) as err:
        EpisodeStore.create(tmp_path / "s.zarr", robot="panda", fps=10, features=features)
    assert message in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


def test_exception_or_early_exit_discards(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    with pytest.raises(RuntimeError, match="robot fell over"):
        with store.begin_episode(instruction="x", task="place") as writer:
            writer.add_frame(frame())
            raise RuntimeError("robot fell over")
    with store.begin_episode(instruction="x", task="place") as writer:
        writer.add_frame(frame())  # leaves without commit
    with pytest.raises(StoreError, match="already committed or discarded"):
        writer.add_frame(frame())
    with store.begin_episode(instruction="x", task="place") as writer, pytest.raises(StoreError, match="no frames"):
        writer.commit(success=True)
    assert len(store) == 0 and pending_entries(store) == []


def test_commit_checks_metadata(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    with store.begin_episode(instruction="x", task="place") as writer:
        writer.add_frame(frame())
        with pytest.raises(StoreError, match="JSON-serialisable"):
            writer.commit(success=True, extra={"array": np.zeros(2)})
        with pytest.raises(StoreError, match="success must be"):
            writer.commit(success="yes")
        writer.commit(success=None, extra={"note": "ok"})
    assert store.episode_meta(0).success is None
    with pytest.raises(StoreError, match="instruction"):
        store.begin_episode(instruction=" ", task="place")
    with pytest.raises(StoreError, match="seed must be an integer"):
        store.begin_episode(instruction="x", task="place", seed=1.5)


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        EpisodeStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not an episode store"):
        EpisodeStore.open(tmp_path / "plain")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not a vla_stack episode store"):
        EpisodeStore.open(tmp_path / "other.zarr")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create store .* is not a directory"):
        new_store(tmp_path / "file" / "s.zarr")
    new_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        new_store(tmp_path / "s.zarr")


def test_open_or_create_checks_the_schema(tmp_path):
    path = tmp_path / "s.zarr"
    assert len(EpisodeStore.open_or_create(path, robot="panda", fps=10, features=FEATURES)) == 0
    write_episode(EpisodeStore.open_or_create(path, robot="panda", fps=10, features=FEATURES), 0)
    assert len(EpisodeStore.open_or_create(path, robot="panda", fps=10, features=FEATURES)) == 1
    with pytest.raises(StoreError, match="fps is 10, not 20"):
        EpisodeStore.open_or_create(path, robot="panda", fps=20, features=FEATURES)
    other = {**FEATURES, "state": {"dtype": "float32", "shape": [7]}}
    with pytest.raises(StoreError, match="feature 'state' is"):
        EpisodeStore.open_or_create(path, robot="panda", fps=10, features=other)


def test_damaged_store_is_reported_and_the_rest_still_reads(tmp_path):
    store = new_store(tmp_path / "s.zarr", episodes=4)
    episodes = store.path / "episodes"
    json_file = episodes / "episode_000001" / "zarr.json"
    json_file.write_text(json_file.read_text()[:25])  # truncated metadata
    for chunk in (episodes / "episode_000002" / "data" / "state" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()  # lost chunk
    array = episodes / "episode_000003" / "data" / "action"
    for path in sorted(array.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    array.rmdir()  # lost array

    store = EpisodeStore.open(store.path)
    assert len(store) == 4
    problems = store.verify()
    assert sorted(problems) == [1, 2, 3]
    assert "episode 1 of store" in problems[1] and "cannot read metadata" in problems[1]
    assert "feature 'state' has 1 missing chunk(s)" in problems[2]
    assert "feature 'action'" in problems[3]
    assert_episode_is(store, 0, seed=0)
    with pytest.raises(StoreError, match="episode 1 of store .* is damaged"):
        store.read_episode(1)
    with pytest.raises(StoreError, match="episode 3 of store .* feature 'action'"):
        store.read_episode(3)
    with pytest.raises(StoreError, match="episode 9 is not in store"):
        store.episode_meta(9)
    result = CliRunner().invoke(dataset_app, ["verify", "--store", str(store.path)])
    assert result.exit_code != 0 and "3 of 4 episodes" in str(result.exception)

    root_json = store.path / "zarr.json"
    root_json.write_text(root_json.read_text()[:-30])
    with pytest.raises(StoreError, match=r"is corrupt: cannot read .*zarr.json"):
        EpisodeStore.open(store.path)


def test_concurrent_writers_keep_each_others_episodes(tmp_path):
    first = new_store(tmp_path / "s.zarr")
    second = EpisodeStore.open(first.path)
    with first.begin_episode(instruction="a", task="place") as a:
        a.add_frame(frame())
        with second.begin_episode(instruction="b", task="place") as b:  # must not clean up a's pending episode
            b.add_frame(frame())
            assert len(pending_entries(first)) == 2
            assert b.commit(success=True) == 0
        assert a.commit(success=True) == 1
    assert [first.episode_meta(i).instruction for i in range(2)] == ["b", "a"]


def run_child(store: Path, mode: str, number: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(store), mode, str(number)],
                            stdout=subprocess.PIPE, text=True)


def test_sigkill_mid_episode_loses_only_that_episode(tmp_path):
    path = tmp_path / "s.zarr"
    proc = run_child(path, "midway", 3)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    store = EpisodeStore.open(path)
    assert len(pending_entries(store)) == 1  # the killed episode, still on disk
    assert len(store) == 3 and store.verify() == {}
    for i in range(3):
        assert_episode_is(store, i, seed=i)
    assert write_episode(store, 3) == 3  # the first writer after the crash cleans up
    assert pending_entries(store) == []
    assert_episode_is(store, 3, seed=3)


def test_sigkill_at_random_moments(tmp_path):
    """Kill a writer that commits back to back at arbitrary moments (mid-frame, mid-commit, mid-rename)."""
    path = tmp_path / "s.zarr"
    new_store(path)
    rng = random.Random(7)
    for _ in range(3):
        proc = run_child(path, "forever", len(EpisodeStore.open(path)))
        assert proc.stdout.readline().strip() == "COMMITTING"
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        store = EpisodeStore.open(path)
        assert store.verify() == {}
        for i in store.episode_indices():
            assert_episode_is(store, i, seed=store.episode_meta(i).seed)
    assert len(store) >= 3 and store.episode_indices() == list(range(len(store)))
    assert [store.episode_meta(i).seed for i in range(len(store))] == list(range(len(store)))


def test_info_command(tmp_path):
    store = new_store(tmp_path / "s.zarr", episodes=2)
    result = CliRunner().invoke(dataset_app, ["info", "--store", str(store.path)])
    assert result.exit_code == 0, result.output
    assert "episodes 2" in result.output and "images.front" in result.output
