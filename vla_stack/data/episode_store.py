"""Crash-safe zarr v3 store of robot episodes for one embodiment.

On-disk layout (a zarr v3 hierarchy on a LocalStore)::

    <store>/zarr.json                        root group; attrs["vla_stack"] = schema
    <store>/episodes/episode_000000/         one group per committed episode; attrs = episode metadata
        data/<feature>                       (frames, *shape) arrays; images chunked per frame
        stats/<feature>                      (2, K, C) quantile support; stats group attrs = moments
    <store>/.pending/writers.lock            flock: shared per live writer, exclusive to clean up
    <store>/.pending/<uuid>/                 episodes being recorded, same layout as above

An episode is written entirely under .pending/ and published with one os.rename into episodes/, so a
writer killed at any moment (SIGKILL included) loses only its unfinished episode. There is no index
file that could be left half-written: the episode list is the directory listing. Zarr writes each
file through tmp + rename, so a committed episode never holds a truncated file. Nothing is fsynced:
the guarantee covers killed processes, not power loss.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from vla_stack.data.stats import PartialStats
from vla_stack.errors import StoreError

FORMAT_VERSION = 1
IMAGE_PREFIX = "images."

_SCHEMA_ATTR = "vla_stack"
_EPISODES = "episodes"
_PENDING = ".pending"
_LOCK = "writers.lock"
_EPISODE_DIR = re.compile(r"episode_(\d{6,})")
_FEATURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_DTYPES = {"bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"}
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
_NUMERIC_CHUNK = 1024  # frames per chunk of the small per-frame arrays
# Every chunk is written even when it equals the fill value, so a missing chunk file means damage.
_ARRAY_CONFIG = {"write_empty_chunks": True}
# What reading a damaged zarr node raises: missing files, bad JSON, bad metadata, bad chunk bytes.
_DAMAGE = (OSError, ValueError, RuntimeError, KeyError, TypeError)


@dataclass(frozen=True)
class Feature:
    """One per-frame value: its dtype, its shape within a frame, and optional element names."""

    dtype: str
    shape: tuple[int, ...]
    names: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "names": list(self.names) if self.names else None}


@dataclass(frozen=True)
class Schema:
    """What every episode of a store has in common."""

    robot: str
    fps: int
    features: dict[str, Feature]

    @classmethod
    def parse(cls, robot: str, fps: int, features: Mapping[str, Mapping | Feature]) -> Schema:
        """Check a user-given schema; features are {"dtype", "shape", "names"?} mappings."""
        if not isinstance(robot, str) or not robot:
            raise StoreError("robot must be a non-empty string")
        # whole frames per second, as LeRobot wants; 10.0 from a control-rate computation is fine
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or fps <= 0 or fps % 1:
            raise StoreError(f"fps must be a positive whole number, got {fps!r}")
        if not features:
            raise StoreError("a store needs at least one feature")
        return cls(robot, int(fps), {name: _parse_feature(name, spec) for name, spec in features.items()})

    def to_json(self) -> dict:
        features = {name: f.to_json() for name, f in self.features.items()}
        return {"format": FORMAT_VERSION, "robot": self.robot, "fps": self.fps, "features": features}

    @classmethod
    def from_json(cls, data: dict) -> Schema:
        return cls.parse(data["robot"], data["fps"], data["features"])

    def differences(self, other: Schema) -> list[str]:
        """Human-readable reasons why episodes of `other` cannot go into this store."""
        diffs = [f"{k} is {getattr(self, k)!r}, not {getattr(other, k)!r}" for k in ("robot", "fps")
                 if getattr(self, k) != getattr(other, k)]
        for name in sorted(self.features.keys() | other.features.keys()):
            mine, theirs = self.features.get(name), other.features.get(name)
            if mine != theirs:
                diffs.append(f"feature {name!r} is {mine.to_json() if mine else 'absent'}, "
                             f"not {theirs.to_json() if theirs else 'absent'}")
        return diffs


def _parse_feature(name: str, spec: Mapping | Feature) -> Feature:
    if not isinstance(name, str) or not _FEATURE_NAME.fullmatch(name):
        raise StoreError(f"bad feature name {name!r}: use letters, digits, '_', '.', '-'")
    if isinstance(spec, Feature):
        spec = spec.to_json()
    try:
        dtype = np.dtype(spec["dtype"]).name
        shape = tuple(int(d) for d in spec["shape"])
        names = spec.get("names")
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"feature {name!r}: expected {{'dtype': ..., 'shape': [...]}}, got {spec!r} ({exc})") from None
    if dtype not in _DTYPES:
        raise StoreError(f"feature {name!r}: dtype {dtype} is not one of {', '.join(sorted(_DTYPES))}")
    if any(d <= 0 for d in shape):
        raise StoreError(f"feature {name!r}: shape {shape} has a non-positive dimension")
    if name.startswith(IMAGE_PREFIX) and (dtype != "uint8" or len(shape) != 3 or shape[2] != 3):
        raise StoreError(f"image feature {name!r} must be uint8 (H, W, 3), got {dtype} {shape}")
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != int(np.prod(shape)) and not name.startswith(IMAGE_PREFIX):
            raise StoreError(f"feature {name!r}: {len(names)} names for shape {shape}")
    return Feature(dtype, shape, names)


def is_image(name: str) -> bool:
    """Image features are named images.<camera>; they get per-frame chunks and per-channel stats."""
    return name.startswith(IMAGE_PREFIX)


@dataclass(frozen=True)
class EpisodeMeta:
    """Episode-level facts; seed and success are None for episodes imported without them."""

    index: int
    length: int
    instruction: str
    task: str
    robot: str
    subtasks: tuple[str, ...] = ()
    seed: int | None = None
    success: bool | None = None
    extra: dict = field(default_factory=dict)


class EpisodeStore:
    """Many episodes of one robot embodiment. Reads see only committed episodes; writers append
    through begin_episode(), and several processes may write to one store at once."""

    def __init__(self, path: Path, schema: Schema):
        self.path = path
        self.schema = schema
        self._reader = LocalStore(path, read_only=True)
        self._lock_fd: int | None = None

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, *, robot: str, fps: int,
               features: Mapping[str, Mapping | Feature]) -> EpisodeStore:
        """A new empty store. It is built beside `path` and renamed into place, so a crash never
        leaves a half-made store."""
        path = Path(path)
        schema = Schema.parse(robot, fps, features)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise _StoreExists(f"cannot create store {path}: it already exists")
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreError(f"cannot create store {path}: {path.parent} is not a directory")
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(LocalStore(tmp), mode="w-", attributes={_SCHEMA_ATTR: schema.to_json()})
            root.create_group(_EPISODES)
            (tmp / _PENDING).mkdir()
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None
        try:
            os.rename(tmp, path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another process created it meanwhile
                raise _StoreExists(f"cannot create store {path}: it already exists") from None
            raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None
        return cls(path, schema)

    @classmethod
    def open(cls, path: str | os.PathLike) -> EpisodeStore:
        path = Path(path)
        if not path.exists():
            raise StoreError(f"episode store {path} does not exist")
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path} is not an episode store (no zarr.json)")
        try:
            attrs = zarr.open_group(LocalStore(path, read_only=True), mode="r").attrs.asdict()
        except _DAMAGE as exc:
            raise StoreError(f"episode store {path} is corrupt: cannot read {path / 'zarr.json'} ({exc})") from None
        if _SCHEMA_ATTR not in attrs:
            raise StoreError(f"{path} is a zarr group but not a vla_stack episode store")
        version = attrs[_SCHEMA_ATTR].get("format") if isinstance(attrs[_SCHEMA_ATTR], dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(f"episode store {path} has format {version!r}; "
                             f"this vla_stack reads up to format {FORMAT_VERSION}")
        try:
            schema = Schema.from_json(attrs[_SCHEMA_ATTR])
        except (KeyError, TypeError, StoreError) as exc:
            raise StoreError(f"episode store {path} is corrupt: bad schema ({exc})") from None
        return cls(path, schema)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, *, robot: str, fps: int,
                       features: Mapping[str, Mapping | Feature]) -> EpisodeStore:
        """Open `path` if it holds a store with this schema, else create it."""
        wanted = Schema.parse(robot, fps, features)
        try:
            return cls.create(path, robot=robot, fps=fps, features=features)
        except _StoreExists:
            store = cls.open(path)
        diffs = store.schema.differences(wanted)
        if diffs:
            raise StoreError(f"store {path} holds other data: {'; '.join(diffs)}")
        return store

    def close(self) -> None:
        """Release the writer lock (taken by the first begin_episode)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------

    @property
    def robot(self) -> str:
        return self.schema.robot

    @property
    def fps(self) -> int:
        return self.schema.fps

    @property
    def features(self) -> dict[str, Feature]:
        return self.schema.features

    def episode_indices(self) -> list[int]:
        """Committed episodes, in order; read fresh each call so other writers' commits show up."""
        try:
            names = os.listdir(self.path / _EPISODES)
        except OSError as exc:
            raise StoreError(f"episode store {self.path} is corrupt: cannot list episodes ({exc.strerror})") from None
        return sorted(int(m[1]) for m in map(_EPISODE_DIR.fullmatch, names) if m)

    def __len__(self) -> int:
        return len(self.episode_indices())

    def episode_meta(self, index: int) -> EpisodeMeta:
        with self._reading(index, "metadata"):
            attrs = self._group(index).attrs.asdict()
        try:
            return EpisodeMeta(
                index=index,
                length=int(attrs["length"]),
                instruction=str(attrs["instruction"]),
                task=str(attrs["task"]),
                robot=str(attrs["robot"]),
                subtasks=tuple(str(s) for s in attrs["subtasks"]),
                seed=attrs["seed"],
                success=attrs["success"],
                extra=dict(attrs["extra"]),
            )
        except _DAMAGE as exc:
            raise self._damaged(index, f"bad metadata ({exc!r})") from None

    def episode_arrays(self, index: int) -> dict[str, zarr.Array]:
        """Lazy per-feature arrays, checked against the schema."""
        length = self.episode_meta(index).length
        arrays = {}
        for name, feature in self.features.items():
            with self._reading(index, f"feature {name!r}"):
                arr = zarr.open_array(self._reader, path=f"{self._key(index)}/data/{name}", mode="r")
            if arr.shape != (length, *feature.shape) or arr.dtype != np.dtype(feature.dtype):
                raise self._damaged(index, f"feature {name!r} is {arr.dtype} {arr.shape}, "
                                           f"expected {feature.dtype} {(length, *feature.shape)}")
            arrays[name] = arr
        return arrays

    def read_episode(self, index: int, features: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All frames of an episode in memory: {feature: (frames, *shape) array}, for every feature or only the
        named ones."""
        wanted = None if features is None else set(features)
        data = {}
        for name, arr in self.episode_arrays(index).items():
            if wanted is not None and name not in wanted:
                continue
            with self._reading(index, f"feature {name!r}"):
                data[name] = arr[...]
        return data

    def timestamps(self, index: int) -> np.ndarray:
        """Frame times in seconds; frames are evenly spaced at the store's fps."""
        return np.arange(self.episode_meta(index).length) / self.fps

    def episode_stats(self, index: int) -> dict[str, PartialStats]:
        """The mergeable summaries computed when the episode was committed."""
        with self._reading(index, "stats"):
            group = self._group(index, "stats")
            return {name: PartialStats.from_record(group.attrs[name], group[name][...]) for name in self.features}

    def stats(self, indices: Iterable[int] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """LeRobot-style stats per feature over the given episodes (default: all)."""
        parts = [self.episode_stats(i) for i in (self.episode_indices() if indices is None else indices)]
        if not parts:
            raise StoreError(f"episode store {self.path} has no episodes to compute stats over")
        return {name: PartialStats.merge([p[name] for p in parts]).summary(f.shape, image=is_image(name))
                for name, f in self.features.items()}

    def verify(self) -> dict[int, str]:
        """{episode index: what is wrong} for every damaged episode; empty when all are intact."""
        problems = {}
        for index in self.episode_indices():
            try:
                for name, arr in self.episode_arrays(index).items():
                    with self._reading(index, f"feature {name!r}"):
                        missing = arr.nchunks - arr.nchunks_initialized
                    if missing:
                        raise self._damaged(index, f"feature {name!r} has {missing} missing chunk(s)")
                self.episode_stats(index)
            except StoreError as exc:
                problems[index] = str(exc)
        return problems

    def _key(self, index: int) -> str:
        return f"{_EPISODES}/episode_{index:06d}"

    def episode_identity(self, index: int) -> str:
        """Changes whenever the committed episode `index` is replaced (store recreated at the same path), so
        caches of decoded episodes can be keyed on it."""
        st = os.stat(self.path / self._key(index))
        return f"{os.path.realpath(self.path)}:{index}:{st.st_ino}:{st.st_mtime_ns}"

    def _group(self, index: int, sub: str = "") -> zarr.Group:
        if not (self.path / self._key(index)).is_dir():
            raise StoreError(f"episode {index} is not in store {self.path} ({len(self)} episodes)")
        return zarr.open_group(self._reader, path=f"{self._key(index)}/{sub}".rstrip("/"), mode="r")

    @contextmanager
    def _reading(self, index: int, what: str) -> Iterator[None]:
        """Turn damage met while reading into a StoreError that names the episode."""
        try:
            yield
        except _DAMAGE as exc:
            raise self._damaged(index, f"cannot read {what} ({type(exc).__name__}: {exc})") from None

    def _damaged(self, index: int, why: str) -> StoreError:
        return StoreError(f"episode {index} of store {self.path} is damaged: {why}")

    # -- writing -----------------------------------------------------------------------------------

    def begin_episode(self, *, instruction: str, task: str, subtasks: Iterable[str] = (),
                      seed: int | None = None) -> EpisodeWriter:
        """Start recording an episode; nothing is visible to readers until commit()."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise StoreError("an episode needs a non-empty instruction")
        if not isinstance(task, str) or not task:
            raise StoreError("an episode needs a task family name")
        subtasks = list(subtasks)
        if not all(isinstance(s, str) for s in subtasks):
            raise StoreError(f"subtasks must be strings, got {subtasks!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise StoreError(f"seed must be an integer or None, got {seed!r}")
        self._take_writer_lock()
        meta = {"instruction": instruction, "task": task, "robot": self.robot, "subtasks": subtasks,
                "seed": None if seed is None else int(seed)}
        return EpisodeWriter(self, meta)

    def _take_writer_lock(self) -> None:
        """Hold a shared lock while writing. Whoever gets it exclusively is the only live writer, so
        every pending episode left over is from a dead one and is removed."""
        if self._lock_fd is not None:
            return
        pending = self.path / _PENDING
        try:
            pending.mkdir(exist_ok=True)
            fd = os.open(pending / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"episode store {self.path} is not writable: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # other writers are alive: their pending episodes are not ours to judge
        else:
            for entry in pending.iterdir():
                if entry.name != _LOCK:
                    shutil.rmtree(entry, ignore_errors=True)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd

    def _publish(self, pending_dir: Path) -> int:
        """Move a finished episode into episodes/ under the next free index (rename never replaces a
        non-empty directory, so concurrent writers each get their own)."""
        indices = self.episode_indices()
        index = indices[-1] + 1 if indices else 0
        while True:
            try:
                os.rename(pending_dir, self.path / self._key(index))
                return index
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StoreError(f"cannot commit episode into {self.path}: {exc.strerror}") from None
                index += 1


class _StoreExists(StoreError):
    pass


class EpisodeWriter:
    """One episode being recorded under .pending/. Images go to disk frame by frame (bounded
    memory); the small per-frame arrays are buffered and written at commit. Used as a context
    manager, leaving the block without commit() (an exception included) discards the episode."""

    def __init__(self, store: EpisodeStore, meta: dict):
        self._store = store
        self._dir = store.path / _PENDING / uuid.uuid4().hex
        self._length = 0
        self._done = False
        try:
            self._group = zarr.open_group(LocalStore(self._dir), mode="w-", attributes=meta)
            self._data = self._group.create_group("data")
            self._images = {
                name: self._data.create_array(name, shape=(0, *f.shape), chunks=(1, *f.shape), dtype=f.dtype,
                                              compressors=_COMPRESSOR, config=_ARRAY_CONFIG)
                for name, f in store.features.items() if is_image(name)
            }
        except OSError as exc:
            raise StoreError(f"cannot write to episode store {store.path}: {exc.strerror or exc}") from None
        self._histograms = {name: np.zeros((256, 3), np.int64) for name in self._images}
        self._buffers: dict[str, list[np.ndarray]] = {name: [] for name in store.features if not is_image(name)}

    def __len__(self) -> int:
        return self._length

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.discard()

    def add_frame(self, frame: Mapping[str, object]) -> None:
        """Append one frame: every feature of the schema, with its shape; values are cast to the
        feature's dtype when that loses nothing but float precision, and must be finite."""
        self._check_open()
        values = self._validate(frame)
        i = self._length
        for name, arr in self._images.items():
            try:
                if i == arr.shape[0]:
                    arr.resize((max(64, 2 * i), *arr.shape[1:]))  # grow geometrically: few metadata rewrites
                arr[i] = values[name]
            except OSError as exc:  # nothing counted yet: a retry overwrites frame i
                raise StoreError(f"cannot write to episode store {self._store.path}: {exc.strerror or exc}") from None
        for name in self._images:
            for c in range(3):
                self._histograms[name][:, c] += np.bincount(values[name][..., c].ravel(), minlength=256)
        for name, buffer in self._buffers.items():
            buffer.append(values[name])
        self._length += 1

    def commit(self, *, success: bool | None, extra: Mapping | None = None) -> int:
        """Write the rest, publish the episode atomically and return its index."""
        self._check_open()
        if self._length == 0:
            raise StoreError("cannot commit an episode with no frames")
        extra = dict(extra or {})
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"episode extra metadata must be JSON-serialisable: {exc}") from None
        if success is not None and not isinstance(success, (bool, np.bool_)):
            raise StoreError(f"success must be True, False or None, got {success!r}")
        n = self._length
        try:
            stats = {}
            for name, arr in self._images.items():
                arr.resize((n, *arr.shape[1:]))
                stats[name] = PartialStats.from_histogram(self._histograms[name], count=n)
            for name, buffer in self._buffers.items():
                values = np.stack(buffer)
                self._data.create_array(name, data=values, chunks=(min(n, _NUMERIC_CHUNK), *values.shape[1:]),
                                        compressors=_COMPRESSOR, config=_ARRAY_CONFIG)
                stats[name] = PartialStats.from_values(values)
            records = {name: s.to_record() for name, s in stats.items()}
            group = self._group.create_group("stats", attributes={name: r[0] for name, r in records.items()})
            for name, (_, support) in records.items():
                group.create_array(name, data=support, compressors=_COMPRESSOR)
            self._group.attrs.update({"length": n, "success": None if success is None else bool(success),
                                      "extra": extra})
        except OSError as exc:
            self.discard()
            raise StoreError(f"cannot write to episode store {self._store.path}: {exc.strerror or exc}") from None
        index = self._store._publish(self._dir)
        self._done = True
        return index

    def discard(self) -> None:
        """Drop the episode; nothing of it was ever visible to readers."""
        self._done = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._done:
            raise StoreError("this episode was already committed or discarded")

    def _validate(self, frame: Mapping[str, object]) -> dict[str, np.ndarray]:
        """Check a whole frame before writing any of it, so a rejected frame changes nothing."""
        features = self._store.features
        unknown, missing = frame.keys() - features.keys(), features.keys() - frame.keys()
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown feature(s) {sorted(unknown)}")
            if missing:
                parts.append(f"missing feature(s) {sorted(missing)}")
            raise StoreError(f"bad frame: {', '.join(parts)}; the store's features are {sorted(features)}")
        values = {}
        for name, feature in features.items():
            value = np.asarray(frame[name])
            dtype = np.dtype(feature.dtype)
            if value.shape != feature.shape:
                raise StoreError(f"bad frame: feature {name!r} has shape {value.shape}, expected {feature.shape}")
            # floats accept any float or int; other dtypes only lossless casts (no int64 -> uint8 images)
            casting = "same_kind" if dtype.kind == "f" else "safe"
            if not np.can_cast(value.dtype, dtype, casting=casting):
                raise StoreError(f"bad frame: feature {name!r} has dtype {value.dtype}, expected {dtype}")
            with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
                value = value.astype(dtype)  # a copy: later changes to the caller's buffer can't leak in
            if dtype.kind == "f" and not np.isfinite(value).all():
                raise StoreError(f"bad frame: feature {name!r} contains NaN or infinity")
            values[name] = value
        return values
