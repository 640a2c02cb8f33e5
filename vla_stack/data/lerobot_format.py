"""Export an episode store to a LeRobotDataset v3 and import one back.

Writing goes through LeRobot's own writer (LeRobotDataset.create / add_frame / save_episode /
finalize), so the layout is LeRobot's by construction. Feature names map as
images.<cam> -> observation.images.<cam>, state -> observation.state, others unchanged; the episode
instruction becomes the LeRobot task. What LeRobot has no column for (subtask texts, seed, success,
task family, extra, the store's exact feature shapes) goes to meta/vla_stack_episodes.json, so an
import of our own export restores it.

Videos use LeRobot's default encoder, AV1 via libsvtav1, which PyAV's wheels bundle, so no system
ffmpeg is needed; import decodes them with PyAV too (torchcodec needs a system ffmpeg). Video is
lossy, so images come back close rather than equal; everything else comes back bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
from lerobot.datasets.io_utils import load_stats, write_stats
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.constants import DEFAULT_FEATURES
from tqdm import tqdm

from vla_stack.data.episode_store import IMAGE_PREFIX, EpisodeStore, Feature, Schema, is_image
from vla_stack.errors import StoreError

SIDE_FILE = "meta/vla_stack_episodes.json"
_LR_IMAGE_PREFIX = "observation.images."
_RENAMES = {"state": "observation.state", "action": "action"}

logger = logging.getLogger(__name__)


def lerobot_name(name: str) -> str:
    """The LeRobot feature name of a store feature."""
    if is_image(name):
        return _LR_IMAGE_PREFIX + name.removeprefix(IMAGE_PREFIX)
    return _RENAMES.get(name, name)


def store_name(lr_name: str, visual: bool) -> str:
    """The store feature name of a LeRobot feature (inverse of lerobot_name on our exports)."""
    if visual:
        return IMAGE_PREFIX + lr_name.removeprefix(_LR_IMAGE_PREFIX).removeprefix("observation.")
    return {lr: ours for ours, lr in _RENAMES.items()}.get(lr_name, lr_name)


def export_lerobot(store: EpisodeStore, out_root: str | os.PathLike, repo_id: str, *, use_videos: bool = True,
                   progress: bool = False) -> Path:
    """Write every committed episode of `store` as a new LeRobot v3 dataset at `out_root`.

    The dataset is built beside `out_root` and renamed into place, so a failed export leaves nothing
    that looks finished. meta/stats.json carries the store's stats for our features (exact moments,
    pooled quantiles) and LeRobot's for its bookkeeping columns."""
    with keep_scheduling_policy():
        return _export_lerobot(store, out_root, repo_id, use_videos=use_videos, progress=progress)


@contextlib.contextmanager
def keep_scheduling_policy():
    """SVT-AV1 (LeRobot's video codec) run as root switches the calling thread to SCHED_FIFO priority 99, and
    every thread started afterwards inherits it: torch's OpenMP workers then spin-wait at real-time priority
    and starve each other (a hung process), and spawned ROS nodes hog the CPU. Put the policy back."""
    if not hasattr(os, "sched_getscheduler"):
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)


def _export_lerobot(store: EpisodeStore, out_root: str | os.PathLike, repo_id: str, *, use_videos: bool,
                    progress: bool) -> Path:
    out_root = Path(out_root)
    if out_root.exists():
        raise StoreError(f"export target {out_root} already exists")
    indices = store.episode_indices()
    if not indices:
        raise StoreError(f"episode store {store.path} has no episodes to export")
    features = {lerobot_name(name): _lerobot_feature(name, f, use_videos) for name, f in store.features.items()}
    if len(features) != len(store.features):
        raise StoreError(f"store features {sorted(store.features)} collide once renamed for LeRobot")
    stats = store.stats(indices)  # fails early, naming the episode, if any is damaged

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole config per episode otherwise
    tmp = out_root.with_name(f".{out_root.name}.partial-{uuid.uuid4().hex}")
    try:
        out_root.parent.mkdir(parents=True, exist_ok=True)
        dataset = LeRobotDataset.create(repo_id, fps=store.fps, features=features, root=tmp,
                                        robot_type=store.robot, use_videos=use_videos, video_backend="pyav")
    except OSError as exc:
        raise StoreError(f"cannot write LeRobot dataset to {out_root}: {exc.strerror or exc}") from None
    try:
        side = []
        for position, index in enumerate(tqdm(indices, desc="export", unit="episode", disable=not progress)):
            meta = store.episode_meta(index)
            data = store.read_episode(index)
            for t in range(meta.length):
                frame = {lerobot_name(name): values[t].reshape(features[lerobot_name(name)]["shape"])
                         for name, values in data.items()}
                dataset.add_frame({**frame, "task": meta.instruction})
            # one process: a per-episode process pool costs more than it saves for short episodes
            dataset.save_episode(parallel_encoding=False)
            side.append({"episode_index": position, "store_index": index, "instruction": meta.instruction,
                         "task": meta.task, "subtasks": list(meta.subtasks), "seed": meta.seed,
                         "success": meta.success, "extra": meta.extra})
        dataset.finalize()
        lerobot_stats = load_stats(tmp) or {}
        write_stats({**lerobot_stats, **{lerobot_name(k): v for k, v in stats.items()}}, tmp)
        (tmp / SIDE_FILE).write_text(json.dumps({"store_schema": store.schema.to_json(), "episodes": side}, indent=1))
        if (tmp / "images").is_dir() and not any((tmp / "images").rglob("*.png")):
            shutil.rmtree(tmp / "images")  # LeRobot's empty staging folder for camera frames
        os.rename(tmp, out_root)
    except BaseException:
        with contextlib.suppress(Exception):
            dataset.finalize()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_root


def import_lerobot(root: str | os.PathLike, repo_id: str | None, store_path: str | os.PathLike, *,
                   progress: bool = False) -> EpisodeStore:
    """Read a local LeRobot v3 dataset into a new episode store at `store_path`.

    Image and video features become images.<cam>, numeric ones keep their data; text columns and
    depth maps have no place in a store and are skipped with a warning. Datasets that vla_stack did
    not export get the repo id (default: the folder name) as task family and no seed or success.
    The store is built beside `store_path` and renamed into place once complete."""
    root, store_path = Path(root), Path(store_path)
    if not (root / "meta" / "info.json").is_file():
        raise StoreError(f"{root} is not a LeRobot dataset (no meta/info.json)")
    if store_path.exists() and (not store_path.is_dir() or any(store_path.iterdir())):
        raise StoreError(f"cannot import into {store_path}: it already exists")
    repo_id = repo_id or root.name
    try:
        dataset = LeRobotDataset(repo_id, root=root, video_backend="pyav")
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"cannot load LeRobot dataset {root}: {exc}") from None
    side_path = root / SIDE_FILE
    side = json.loads(side_path.read_text()) if side_path.is_file() else None
    schema = Schema.from_json(side["store_schema"]) if side else _schema_from_lerobot(dataset)
    if schema.fps != dataset.fps:
        raise StoreError(f"{root} runs at {dataset.fps} fps but its vla_stack metadata says {schema.fps}")
    facts = {e["episode_index"]: e for e in side["episodes"]} if side else {}

    tmp = store_path.with_name(f".{store_path.name}.importing-{uuid.uuid4().hex}")
    try:
        with EpisodeStore.create(tmp, robot=schema.robot, fps=schema.fps, features=schema.features) as store:
            for e in tqdm(range(dataset.meta.total_episodes), desc="import", unit="episode", disable=not progress):
                data, instruction = _read_lerobot_episode(dataset, e, store.features)
                ep = facts.get(e, {"task": repo_id, "extra": {}})
                with store.begin_episode(instruction=instruction, task=ep["task"], subtasks=ep.get("subtasks", ()),
                                         seed=ep.get("seed")) as writer:
                    for t in range(len(data["timestamp"])):
                        writer.add_frame({name: data[name][t] for name in store.features})
                    writer.commit(success=ep.get("success"), extra=ep["extra"])
        os.rename(tmp, store_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EpisodeStore.open(store_path)


def _lerobot_feature(name: str, feature: Feature, use_videos: bool) -> dict:
    if is_image(name):
        return {"dtype": "video" if use_videos else "image", "shape": feature.shape,
                "names": ["height", "width", "channels"]}
    # LeRobot has no scalar features: a per-frame scalar is a (1,) vector there
    return {"dtype": feature.dtype, "shape": feature.shape or (1,),
            "names": list(feature.names) if feature.names else None}


def _schema_from_lerobot(dataset: LeRobotDataset) -> Schema:
    """A store schema for a dataset that vla_stack did not write."""
    features, skipped = {}, []
    for key, ft in dataset.meta.features.items():
        if key in DEFAULT_FEATURES:
            continue
        shape = tuple(ft["shape"])
        if ft["dtype"] in ("image", "video") and not (ft.get("info") or {}).get("is_depth_map"):
            if list(ft.get("names") or [])[:1] == ["channels"]:
                shape = (*shape[1:], shape[0])
            if len(shape) == 3 and shape[2] == 3:
                features[store_name(key, visual=True)] = {"dtype": "uint8", "shape": shape}
                continue
        elif ft["dtype"] not in ("image", "video", "string", "language"):
            names = ft.get("names")
            flat = isinstance(names, list) and len(names) == np.prod(shape) and all(isinstance(n, str) for n in names)
            features[store_name(key, visual=False)] = {"dtype": ft["dtype"], "shape": shape,
                                                       "names": names if flat else None}
            continue
        skipped.append(key)
    if skipped:
        logger.warning("skipping LeRobot features with no episode-store equivalent: %s", ", ".join(skipped))
    return Schema.parse(dataset.meta.robot_type or "unknown", dataset.fps, features)


def _read_lerobot_episode(dataset: LeRobotDataset, e: int, features: dict[str, Feature]) -> tuple[dict, str]:
    """One episode as {store feature: (frames, *shape) array, "timestamp": seconds} plus its task text.
    Columns are read from Arrow: datasets' numpy formatter would turn float64 into float32."""
    ep = dataset.meta.episodes[e]
    start, stop = ep["dataset_from_index"], ep["dataset_to_index"]
    table = dataset.hf_dataset.with_format("arrow")[start:stop]
    timestamps = _arrow_column(table, "timestamp").astype(np.float64)
    expected = np.arange(stop - start) / dataset.fps
    if np.any(_arrow_column(table, "episode_index") != e) or np.abs(timestamps - expected).max() > dataset.tolerance_s:
        raise StoreError(f"LeRobot episode {e} of {dataset.root} is not a run of frames at {dataset.fps} fps")
    tasks = {dataset.meta.tasks.iloc[int(i)].name for i in _arrow_column(table, "task_index")}
    if len(tasks) != 1:
        raise StoreError(f"LeRobot episode {e} of {dataset.root} has {len(tasks)} tasks; "
                         "a store episode has one instruction")
    data = {"timestamp": timestamps}
    for name, feature in features.items():
        key = lerobot_name(name)
        if key in dataset.meta.video_keys:
            path = dataset.root / dataset.meta.get_video_file_path(e, key)
            data[name] = _decode_video(path, ep[f"videos/{key}/from_timestamp"] + timestamps, dataset.tolerance_s)
        elif key in dataset.meta.image_keys:  # decoded to PIL by datasets
            images = dataset.hf_dataset.with_format(None).select_columns([key])[start:stop][key]
            data[name] = np.stack([np.asarray(image.convert("RGB")) for image in images])
        else:
            data[name] = _arrow_column(table, key).reshape(stop - start, *feature.shape)
    return data, tasks.pop()


def _decode_video(path: Path, times: np.ndarray, tolerance_s: float) -> np.ndarray:
    """Frames at these times (s) as (n, H, W, 3) uint8, decoded forward from the keyframe before the
    first. Plain PyAV and numpy: LeRobot's decoder goes through torch, whose thread pool crawls on
    a busy machine."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        container.seek(round(times[0] / stream.time_base) - 1, backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts * stream.time_base < times[len(frames)] - tolerance_s:
                continue
            if abs(frame.pts * stream.time_base - times[len(frames)]) > tolerance_s:
                break
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == len(times):
                return np.stack(frames)
    raise StoreError(f"{path} has no frame within {tolerance_s}s of {times[len(frames)]:.4f}s")


def _arrow_column(table: pa.Table, key: str) -> np.ndarray:
    """A numeric column as one flat numpy array, whatever list nesting datasets gave it."""
    column = table.column(key).combine_chunks()
    while not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
               or pa.types.is_boolean(column.type)):
        column = column.storage if isinstance(column, pa.ExtensionArray) else column.flatten()
    return column.to_numpy(zero_copy_only=False)
