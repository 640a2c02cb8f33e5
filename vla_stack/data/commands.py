"""`vla-stack export|import|dataset ...`: Typer sub-apps that the main CLI mounts.

LeRobot is imported inside the commands that need it, so `vla-stack --help` stays fast.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from vla_stack.data.episode_store import EpisodeStore, is_image
from vla_stack.errors import StoreError
from vla_stack.paths import data_dir

export_app = typer.Typer(help="Write episode stores in other formats.", no_args_is_help=True)
import_app = typer.Typer(help="Read other dataset formats into episode stores.", no_args_is_help=True)
dataset_app = typer.Typer(help="Inspect episode stores.", no_args_is_help=True)

out = Console()
err = Console(stderr=True)

StoreArg = typer.Option(..., "--store", help="Episode store: a path, or a name under <data-dir>/datasets/.")
DataDir = typer.Option(None, "--data-dir", help="Where datasets live (default: $VLA_STACK_DATA_DIR or the user data "
                                                 "dir).")


@export_app.callback()
def _export() -> None:
    """Write episode stores in other formats."""  # a callback keeps `export lerobot` a sub-command


@import_app.callback()
def _import() -> None:
    """Read other dataset formats into episode stores."""


def resolve_store(value: str, data_dir_option: Optional[Path] = None) -> Path:
    """An existing path as given, else a bare name under <data-dir>/datasets/."""
    path = Path(value).expanduser()
    if path.exists() or len(path.parts) > 1:
        return path
    return data_dir(data_dir_option) / "datasets" / value


@export_app.command("lerobot")
def export_lerobot_command(
    store: str = StoreArg,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="New dataset folder (default: "
                                                               "<data-dir>/lerobot/<repo-id>)."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="LeRobot repo id (default: vla_stack/<store name>)."),
    no_videos: bool = typer.Option(False, "--no-videos", help="Store camera frames as PNG images, not AV1 video."),
    data_dir_option: Optional[Path] = DataDir,
) -> None:
    """Export every episode of a store as a LeRobotDataset v3 (parquet + mp4 + meta)."""
    import datasets

    from vla_stack.data.lerobot_format import export_lerobot

    datasets.disable_progress_bars()  # LeRobot's writer would draw one per episode under ours
    source = EpisodeStore.open(resolve_store(store, data_dir_option))
    repo_id = repo_id or f"vla_stack/{source.path.name.removesuffix('.zarr')}"
    target = out_dir or data_dir(data_dir_option) / "lerobot" / repo_id
    written = export_lerobot(source, target, repo_id, use_videos=not no_videos, progress=True)
    err.print(f"exported {len(source)} episodes of {source.path} to {written} (repo id {repo_id})")


@import_app.command("lerobot")
def import_lerobot_command(
    root: Path = typer.Option(..., "--root", help="Folder of a local LeRobot v3 dataset (holds meta/info.json)."),
    store: str = StoreArg,
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Its repo id (default: the folder name)."),
    data_dir_option: Optional[Path] = DataDir,
) -> None:
    """Import a LeRobot v3 dataset into a new episode store."""
    from vla_stack.data.lerobot_format import import_lerobot

    created = import_lerobot(root, repo_id, resolve_store(store, data_dir_option), progress=True)
    err.print(f"imported {len(created)} episodes from {root} into {created.path}")


@dataset_app.command("info")
def info_command(store: str = StoreArg, data_dir_option: Optional[Path] = DataDir) -> None:
    """Episodes, frames, features and per-task-family counts of a store."""
    source = EpisodeStore.open(resolve_store(store, data_dir_option))
    metas = [source.episode_meta(i) for i in source.episode_indices()]
    out.print(f"store    {source.path}\nrobot    {source.robot}\nfps      {source.fps}\n"
              f"episodes {len(metas)}\nframes   {sum(m.length for m in metas)}")
    features = Table(title="features")
    for column in ("name", "dtype", "shape", "names"):
        features.add_column(column)
    for name, f in source.features.items():
        features.add_row(name, f.dtype, str(f.shape), ", ".join(f.names or ()) if not is_image(name) else "")
    out.print(features)
    families = Table(title="task families")
    for column in ("task", "episodes", "frames", "success"):
        families.add_column(column, justify="right")
    counts, frames, wins = Counter(), Counter(), Counter()
    for m in metas:
        counts[m.task] += 1
        frames[m.task] += m.length
        wins[m.task] += m.success is True
    for task in sorted(counts):
        families.add_row(task, str(counts[task]), str(frames[task]), f"{wins[task]}/{counts[task]}")
    out.print(families)


@dataset_app.command("stats")
def stats_command(store: str = StoreArg, data_dir_option: Optional[Path] = DataDir) -> None:
    """Per-feature statistics over all episodes, as exported to LeRobot's stats.json (which also
    has q10 and q90); images per colour channel in [0, 1]."""
    source = EpisodeStore.open(resolve_store(store, data_dir_option))
    stats = source.stats()
    keys = ("mean", "std", "min", "max", "q01", "q50", "q99")
    table = Table(title=f"{source.path}: {int(next(iter(stats.values()))['count'][0])} frames", box=box.SIMPLE_HEAD)
    table.add_column("feature", overflow="fold")
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for name, s in stats.items():
        labels = ("r", "g", "b") if is_image(name) else source.features[name].names or range(s["mean"].size)
        for j, label in enumerate(labels):
            table.add_row(f"{name} {label}", *(f"{np.ravel(s[k])[j]:.3g}" for k in keys))
    out.print(table)


@dataset_app.command("verify")
def verify_command(store: str = StoreArg, data_dir_option: Optional[Path] = DataDir) -> None:
    """Check every episode's metadata, arrays, chunks and stats; fails if any episode is damaged."""
    source = EpisodeStore.open(resolve_store(store, data_dir_option))
    problems = source.verify()
    for message in problems.values():
        err.print(message)
    if problems:
        raise StoreError(f"{len(problems)} of {len(source)} episodes of {source.path} are damaged")
    out.print(f"{len(source)} episodes of {source.path} are intact")
