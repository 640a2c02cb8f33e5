"""LeRobot v3 export and import: round trips through our importer and through LeRobot's own loader."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from typer.testing import CliRunner

from vla_stack.data.commands import export_app, import_app
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.data.lerobot_format import SIDE_FILE, export_lerobot, import_lerobot
from vla_stack.errors import StoreError

SIZE = 48
FEATURES = {
    "images.front": {"dtype": "uint8", "shape": [SIZE, SIZE, 3]},
    "images.wrist": {"dtype": "uint8", "shape": [SIZE, SIZE, 3]},
    "state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "grip"]},
    "action": {"dtype": "float64", "shape": [3]},
    "subtask_index": {"dtype": "int64", "shape": []},
}
EPISODES = [("put the red cube in the bowl", 20), ("stack the blue cube on the red cube", 17),
            ("put the red cube in the bowl", 22)]


def smooth_image(t: int, e: int, flip: bool) -> np.ndarray:
    """Moving gradients: video codecs keep these at high PSNR, unlike noise."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    image = np.stack([128 + 100 * np.sin((x + 2 * t) / 9 + e), 128 + 100 * np.cos((y - t) / 11),
                      np.full_like(x, 40 + 60 * e)], axis=-1)
    return (image[::-1] if flip else image).astype(np.uint8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = EpisodeStore.create(tmp_path_factory.mktemp("lr") / "s.zarr", robot="panda", fps=10, features=FEATURES)
    rng = np.random.default_rng(0)
    for e, (instruction, length) in enumerate(EPISODES):
        with store.begin_episode(instruction=instruction, task=instruction.split()[0], subtasks=["reach", "place"],
                                 seed=100 + e) as writer:
            for t in range(length):
                writer.add_frame({"images.front": smooth_image(t, e, False), "images.wrist": smooth_image(t, e, True),
                                  "state": rng.normal(size=4).astype(np.float32), "action": rng.normal(size=3),
                                  "subtask_index": int(t >= length // 2)})
            writer.commit(success=e != 1, extra={"steps": length})
    return store


@pytest.fixture(scope="module", params=[False, True], ids=["images", "videos"])
def exported(request, store, tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "ds"
    policy = os.sched_getscheduler(0), os.sched_getparam(0)
    export_lerobot(store, root, "vla_stack/test", use_videos=request.param)
    # SVT-AV1 run as root makes the calling thread SCHED_FIFO 99 (hangs torch's OpenMP threads later): undone
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == policy
    imported = import_lerobot(root, "vla_stack/test", root.parent / "back.zarr")
    return request.param, root, imported


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_layout_is_lerobot_v3(exported, store):
    videos, root, _ = exported
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert (info["total_episodes"], info["total_frames"], info["fps"], info["robot_type"]) == (3, 59, 10, "panda")
    assert info["features"]["observation.images.front"]["dtype"] == ("video" if videos else "image")
    assert info["features"]["subtask_index"] == {"dtype": "int64", "shape": [1], "names": None}
    for path in ("meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet",
                 "data/chunk-000/file-000.parquet", SIDE_FILE):
        assert (root / path).is_file(), path
    assert (root / "videos/observation.images.front/chunk-000/file-000.mp4").is_file() == videos

    data = pq.read_table(root / "data/chunk-000/file-000.parquet").to_pandas()
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pandas()
    lengths = [length for _, length in EPISODES]
    assert episodes["length"].tolist() == lengths
    assert episodes["dataset_from_index"].tolist() == [0, 20, 37]
    assert episodes["dataset_to_index"].tolist() == [20, 37, 59]
    expected_ts = np.concatenate([np.arange(n, dtype=np.float32) / np.float32(10) for n in lengths])
    np.testing.assert_array_equal(data["timestamp"].to_numpy(), expected_ts)
    tasks = pq.read_table(root / "meta/tasks.parquet").to_pandas()
    assert set(tasks.index) == {instruction for instruction, _ in EPISODES}

    stats = json.loads((root / "meta/stats.json").read_text())
    ours = store.stats()
    np.testing.assert_allclose(stats["observation.state"]["q50"], ours["state"]["q50"], rtol=1e-12)
    np.testing.assert_allclose(stats["observation.images.wrist"]["std"], ours["images.wrist"]["std"], rtol=1e-12)
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index"} <= stats.keys()


def test_import_restores_the_store(exported, store):
    videos, _, imported = exported
    assert imported.schema == store.schema
    assert len(imported) == len(store)
    for i in range(len(store)):
        assert imported.episode_meta(i) == store.episode_meta(i)
        np.testing.assert_array_equal(imported.timestamps(i), store.timestamps(i))
        a, b = store.read_episode(i), imported.read_episode(i)
        for name in ("state", "action", "subtask_index"):
            assert b[name].dtype == a[name].dtype
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)
        for name in ("images.front", "images.wrist"):
            if videos:
                assert psnr(a[name], b[name]) >= 30, name
            else:
                np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_lerobot_loads_the_export(exported, store):
    videos, root, _ = exported
    dataset = LeRobotDataset("vla_stack/test", root=root, video_backend="pyav")
    assert (len(dataset), dataset.num_episodes, dataset.fps) == (59, 3, 10)
    starts = np.cumsum([0] + [length for _, length in EPISODES])
    for e in range(3):
        data, meta = store.read_episode(e), store.episode_meta(e)
        for t in (0, meta.length // 2, meta.length - 1):
            item = dataset[int(starts[e]) + t]
            assert item["task"] == meta.instruction and int(item["episode_index"]) == e
            assert int(item["frame_index"]) == t and float(item["timestamp"]) == np.float32(t / 10)
            np.testing.assert_array_equal(item["observation.state"].numpy(), data["state"][t])
            # the parquet keeps float64; LeRobot's loader hands out float32 tensors
            np.testing.assert_array_equal(item["action"].numpy(), data["action"][t].astype(np.float32))
            assert int(item["subtask_index"]) == data["subtask_index"][t]
            for cam in ("front", "wrist"):
                image = item[f"observation.images.{cam}"].numpy()  # float CHW in [0, 1]
                assert image.shape == (3, SIZE, SIZE)
                expected = data[f"images.{cam}"][t].transpose(2, 0, 1)
                if videos:
                    assert psnr(np.round(image * 255), expected) >= 30
                else:
                    np.testing.assert_array_equal(image, expected.astype(np.float32) / 255)


def test_import_of_a_foreign_dataset(exported, tmp_path):
    """Without our side file: names map back, shapes are LeRobot's, facts we never had are None."""
    _, root, _ = exported
    foreign = tmp_path / "foreign"
    shutil.copytree(root, foreign)
    (foreign / SIDE_FILE).unlink()
    imported = import_lerobot(foreign, None, tmp_path / "f.zarr")
    assert sorted(imported.features) == sorted(FEATURES)
    assert imported.features["subtask_index"].shape == (1,)
    meta = imported.episode_meta(1)
    assert (meta.instruction, meta.task, meta.seed, meta.success, meta.subtasks) == (EPISODES[1][0], "foreign", None,
                                                                                     None, ())
    np.testing.assert_array_equal(imported.read_episode(2)["action"], EpisodeStore.open(
        root.parent / "back.zarr").read_episode(2)["action"])


def test_refusals(store, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        export_lerobot(store, tmp_path / "taken", "x/y")
    empty = EpisodeStore.create(tmp_path / "empty.zarr", robot="panda", fps=10, features=FEATURES)
    with pytest.raises(StoreError, match="no episodes"):
        export_lerobot(empty, tmp_path / "out", "x/y")
    with pytest.raises(StoreError, match="not a LeRobot dataset"):
        import_lerobot(tmp_path / "taken", None, tmp_path / "in.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.zarr", "taken"]  # no half-written leftovers


def test_cli_export_then_import(store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(export_app, ["lerobot", "--store", str(store.path), "--out", str(tmp_path / "ds"),
                                        "--no-videos"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(import_app, ["lerobot", "--root", str(tmp_path / "ds"), "--store", str(tmp_path / "b.zarr")])
    assert result.exit_code == 0, result.output
    assert len(EpisodeStore.open(tmp_path / "b.zarr")) == 3
    result = runner.invoke(export_app, ["lerobot", "--store", str(tmp_path / "missing.zarr"), "--out", str(tmp_path)])
    assert isinstance(result.exception, StoreError) and "does not exist" in str(result.exception)
