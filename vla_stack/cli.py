"""The `vla-stack` command line. Bad input ends in a one-line `error: ...`, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vla_stack.errors import VlaStackError

app = typer.Typer(help="vla_stack: collect demos, train and evaluate policies in MuJoCo, run them under ROS 2.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
list_app = typer.Typer(help="List what the stack knows about.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
app.add_typer(list_app, name="list")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)

DataDir = typer.Option(None, "--data-dir", help="Where datasets and runs live (default: $VLA_STACK_DATA_DIR or the "
                                                 "user data dir).")


def _write_json(result: dict, path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise VlaStackError(f"cannot write {path}: {exc.strerror}") from None
    console.print(f"wrote {path}")


@list_app.command("robots")
def list_robots() -> None:
    """Robot embodiments, one name per line."""
    from vla_stack.sim.robots import ROBOTS

    for name in ROBOTS:
        print(name)


@list_app.command("tasks")
def list_tasks() -> None:
    """Task families, one name per line."""
    from vla_stack.sim.tasks import FAMILIES

    for name in FAMILIES:
        print(name)


@app.command()
def collect(
    task: str = typer.Option(..., help="Task family (see `vla-stack list tasks`)."),
    robot: str = typer.Option(..., help="Robot (see `vla-stack list robots`)."),
    episodes: int = typer.Option(200, help="Number of episodes to add."),
    store: Optional[Path] = typer.Option(None, help="Zarr store path (default: <data-dir>/datasets/<task>-<robot>.zarr)."),
    data_dir: Optional[Path] = DataDir,
    image_size: int = typer.Option(128, help="Square camera image size in pixels."),
    seed_start: int = typer.Option(0, help="First scene seed (collection resumes after the store's last seed)."),
    keep_failures: bool = typer.Option(False, help="Also store episodes the expert failed (flagged success=false)."),
    arm_noise: float = typer.Option(0.0, help="DART: std (rad) of a held offset added to the executed arm targets "
                                               "in free space; the clean expert targets are recorded."),
    tail_steps: int = typer.Option(0, help="Keep recording this many steps after success (the gripper opening "
                                            "fully and the arm backing off)."),
    pause_steps: Optional[int] = typer.Option(None, help="Run the subtask executor one subtask at a time, the next "
                                                         "handed over up to this many steps after the previous one "
                                                         "finished, as the MEM planner runs a low level."),
    learner: Optional[str] = typer.Option(None, help="A VLA checkpoint that runs the subtasks first; the subtask "
                                                     "executor takes over at a random step and its corrections "
                                                     "are what training imitates (needs --pause-steps)."),
) -> None:
    """Record scripted-expert demonstrations into a crash-safe zarr episode store."""
    from vla_stack.data.collect import collect as run_collect, default_store_path
    from vla_stack.evaluation import HELDOUT_SEED_START
    from vla_stack.paths import data_dir as resolve_data_dir
    from vla_stack.sim.robots import get_robot
    from vla_stack.sim.tasks import get_family

    get_family(task), get_robot(robot)
    if seed_start + episodes > HELDOUT_SEED_START:
        raise VlaStackError(f"training seeds must stay below {HELDOUT_SEED_START} (held out for evaluation)")
    path = store or default_store_path(resolve_data_dir(data_dir), task, robot)
    result = run_collect(task, robot, episodes, path, seed_start=seed_start, image_size=image_size,
                         keep_failures=keep_failures, arm_noise=arm_noise, tail_steps=tail_steps,
                         pause_steps=pause_steps, learner=learner)
    console.print(f"{result['saved']} episodes added to {result['store']} ({result['episodes_in_store']} in store, "
                  f"{result['expert_failures']} expert failures discarded"
                  + (f", {result['learner_finished_alone']} finished by the learner alone" if learner else "") + ")")


def _key_values(items: list[str]) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items]
    bad = [item for item, pair in zip(items, pairs) if len(pair) != 2 or not pair[0]]
    if bad:
        raise VlaStackError(f"planner options must be KEY=VALUE, got {bad}")
    return dict(pairs)


@app.command("eval")
def evaluate(
    policy: str = typer.Option(..., help="'expert' or a checkpoint directory."),
    task: str = typer.Option(..., help="Task family."),
    robot: str = typer.Option(..., help="Robot."),
    episodes: int = typer.Option(50, help="Episodes (held-out seeds)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result here."),
    video_dir: Optional[Path] = typer.Option(None, help="Write MP4s of the first --videos episodes here."),
    videos: int = typer.Option(1, help="How many episodes to record when --video-dir is set."),
    instruction: Optional[str] = typer.Option(None, help="Replace the templated instruction with your own words."),
    seed_start: Optional[int] = typer.Option(None, help="First evaluation seed (default: the held-out range)."),
    planner: str = typer.Option("none", help="Planner over the policy: none, mem (hierarchical memory) or wm "
                                             "(world-model MCTS)."),
    planner_checkpoint: Optional[Path] = typer.Option(None, help="Planner checkpoint directory (default: the "
                                                                 "shipped one)."),
    planner_option: Optional[list[str]] = typer.Option(None, help="KEY=VALUE passed to the planner, repeatable "
                                                                  "(e.g. memory=off for the mem ablation)."),
    execution: str = typer.Option("rtc", help="How a VLA joins its chunks: rtc (async inference, real-time "
                                              "chunking), ensemble (async, temporal ensembling) or sync."),
    inference_steps: Optional[int] = typer.Option(None, help="Euler steps per action chunk (default: the "
                                                             "checkpoint's, 10 for the shipped VLA)."),
) -> None:
    """Closed-loop success rate of a policy, with a 95% Wilson interval."""
    from vla_stack.evaluation import HELDOUT_SEED_START, evaluate as run_eval
    from vla_stack.sim.robots import get_robot
    from vla_stack.sim.tasks import get_family

    get_family(task), get_robot(robot)
    result = run_eval(policy, task, robot, episodes, seed_start=HELDOUT_SEED_START if seed_start is None else seed_start,
                      video_dir=video_dir, videos=videos, instruction=instruction, planner=planner,
                      planner_checkpoint=planner_checkpoint, planner_options=_key_values(planner_option or []),
                      execution=execution, inference_steps=inference_steps)
    low, high = result["wilson_95"]
    print(f"{policy} {task}/{robot}: success {result['successes']}/{episodes} = {result['success_rate']:.1%} "
          f"(95% CI {low:.1%}-{high:.1%})")
    for path in result["videos"]:
        print(f"video: {path}")
    _write_json(result, json_out)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where the summary and videos go."),
    episodes: int = typer.Option(5, help="Episodes per task and robot."),
    policy: str = typer.Option("vla_tiny", help="Checkpoint directory or shipped policy name."),
) -> None:
    """The main job on the embedded default: the shipped VLA on language tasks in held-out scenes (in-process and
    through the ROS 2 node graph in one process), with the scripted expert as the reference; per-cell success,
    videos and a JSON summary."""
    from vla_stack.evaluation import evaluate as run_eval
    from vla_stack.ros.commands import run_sim_eval
    from vla_stack.sim.robots import ROBOTS
    from vla_stack.sim.tasks import FAMILIES

    table = Table(title=f"vla_stack demo on held-out scenes ({episodes} episodes per cell)")
    for column in ("policy", "path", "robot", "task", "success", "95% CI"):
        table.add_column(column)
    summary = []

    def add(result: dict, path: str) -> None:
        from vla_stack.evaluation import wilson_interval

        low, high = wilson_interval(result["successes"], result["episodes"])
        table.add_row(Path(result["policy"]).name, path, result["robot"], result["task"],
                      f"{result['successes']}/{result['episodes']}", f"{low:.0%}-{high:.0%}")
        summary.append({"path": path, "wilson_95": [round(low, 4), round(high, 4)],
                        **{k: result.get(k) for k in ("policy", "task", "robot", "episodes", "success_rate", "videos")}})

    for robot in ROBOTS:
        for task in ("pick", "place"):
            add(run_eval(policy, task, robot, episodes, video_dir=out / "videos" / "vla", videos=1), "gym")
    add(run_sim_eval("pick", "panda", policy, max(1, episodes // 2), progress=False), "ros2 (one process)")
    for robot in ROBOTS:
        for task in FAMILIES:
            add(run_eval("expert", task, robot, max(1, episodes // 2), video_dir=out / "videos" / "expert", videos=1),
                "gym")
    Console().print(table)
    print(f"videos in {out / 'videos'}")
    _write_json({"results": summary}, out / "summary.json")


@bench_app.command("sim")
def bench_sim(
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
    seconds: float = typer.Option(3.0, help="Measuring time per scene and metric."),
    image_size: int = typer.Option(128, help="Camera image size."),
) -> None:
    """Physics steps/s and rendered frames/s per scene, and zarr recording throughput."""
    from vla_stack.bench.sim_bench import run_sim_benchmark

    result = run_sim_benchmark(seconds=seconds, image_size=image_size)
    table = Table(title="bench sim")
    for column in ("robot", "task", "physics steps/s", "frames/s (2 cams)", "control steps/s"):
        table.add_column(column, justify="right")
    for row in result["scenes"]:
        table.add_row(row["robot"], row["task"], f"{row['physics_steps_per_s']:.0f}", f"{row['rendered_frames_per_s']:.1f}",
                      f"{row['control_steps_per_s_with_images']:.1f}")
    Console().print(table)
    rec = result["recording"]
    print(f"recording: {rec['frames_per_s']:.1f} frames/s to zarr, {rec['frames_written']}/{rec['frames_fed']} frames "
          f"stored, dropped {rec['dropped_frames']}")
    _write_json(result, json_out)


def _mount_subcommands() -> None:
    from vla_stack.data.commands import dataset_app, export_app, import_app
    from vla_stack.policy.vla.commands import bench_policy_command, train_command
    from vla_stack.planners.mem.commands import mem_app
    from vla_stack.ros.commands import bench_ros, sim_eval

    app.add_typer(export_app, name="export")
    app.add_typer(import_app, name="import")
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(mem_app, name="mem")
    app.command("sim-eval")(sim_eval)
    bench_app.command("ros")(bench_ros)
    app.command("train")(train_command)
    bench_app.command("policy")(bench_policy_command)
    from vla_stack.planners.world_model.commands import (bench_planner_command, train_wm_command, wm_collect_command,
                                                         wm_quality_command)

    app.command("wm-collect")(wm_collect_command)
    app.command("train-wm")(train_wm_command)
    app.command("wm-quality")(wm_quality_command)
    bench_app.command("planner")(bench_planner_command)


_mount_subcommands()


def main() -> None:
    try:
        app()
    except VlaStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
