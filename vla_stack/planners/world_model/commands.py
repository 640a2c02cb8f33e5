"""CLI commands of the world-model planner, mounted by vla_stack/cli.py: `vla-stack wm-collect`,
`vla-stack train-wm --config policies/wm_tiny.yaml`, `vla-stack wm-quality`, `vla-stack bench planner`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _write(result: dict, path: Optional[Path]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def wm_collect_command(
    store: Path = typer.Option(..., help="Zarr episode store to create or append to."),
    task: str = typer.Option("stack", help="Task family."),
    robot: str = typer.Option("panda", help="Robot."),
    behaviour: str = typer.Option("branched", help="vla (the VLA alone), noisy-expert (the scripted expert with "
                                  "noise and VLA chunks mixed in) or branched (the planner's schedule, some "
                                  "decisions branched: every candidate tried from the saved state to an outcome)."),
    vla: Optional[Path] = typer.Option(None, help="VLA checkpoint (default: policies/vla_tiny)."),
    episodes: int = typer.Option(100, help="Episodes."),
    seed_start: int = typer.Option(0, help="First seed (training seeds stay below 1,000,000)."),
    k: int = typer.Option(8, help="branched: VLA samples per decision."),
    branch_prob: float = typer.Option(0.2, help="branched: probability that a decision is branched."),
    branch_before: Optional[int] = typer.Option(None, help="branched: branch only decisions before this step "
                                                "(late decisions of a lost episode all fail alike)."),
    threads: int = typer.Option(1, help="torch threads."),
) -> None:
    """Non-expert episodes for world-model training: failures, and (branched) outcomes of different chunks
    from the same state, which is what ranks the planner's candidates."""
    import torch

    from vla_stack.paths import share_dir
    from vla_stack.planners.world_model.collect import collect_branched, collect_rollouts

    torch.set_num_threads(threads)
    vla_path = vla or share_dir("policies") / "vla_tiny"
    if behaviour == "branched":
        result = collect_branched(task, robot, vla_path, store, episodes, seed_start, k=k, branch_prob=branch_prob,
                                  branch_before=branch_before)
    else:
        result = collect_rollouts(task, robot, behaviour, vla_path, store, episodes, seed_start)
    print(json.dumps(result, indent=2))


def train_wm_command(
    config: Path = typer.Option(Path("policies/wm_tiny.yaml"), "--config", help="YAML with model:, data:, train:."),
) -> None:
    """Train the latent world model (next-latent prediction + SIGReg, value/progress/prior heads)."""
    from vla_stack.planners.world_model.train import train

    result = train(config)
    print(json.dumps({k: result[k] for k in ("output_dir", "export_dir", "steps", "last")}, indent=2))


def wm_quality_command(
    checkpoint: Optional[Path] = typer.Option(None, help="World-model checkpoint (default: policies/wm_tiny)."),
    config: Path = typer.Option(Path("policies/wm_tiny.yaml"), "--config", help="Its training YAML (for the data)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Open-loop latent error vs horizon (model vs copy-last) and the collapse check on held-out episodes."""
    from vla_stack.planners.world_model.model import load_world_model
    from vla_stack.planners.world_model.policy import default_checkpoint
    from vla_stack.planners.world_model.quality import prediction_quality
    from vla_stack.planners.world_model.train import load_episodes, load_yaml

    model, _ = load_world_model(checkpoint or default_checkpoint())
    _, data, tc = load_yaml(config)
    _, val = load_episodes(data, model.config, tc.max_episodes_per_store)
    result = prediction_quality(model, val)
    print(f"held-out: {result['episodes']} episodes, {result['frames']} frames")
    print("horizon   model  copy-last")
    for h, m, c in zip(result["horizons"], result["latent_error_model"], result["latent_error_copy_last"]):
        print(f"{h:7d} {m:7.4f} {c:9.4f}")
    print(f"collapse check: {result['collapse_check']}")
    _write(result, json_out)


def bench_planner_command(
    checkpoint: Optional[Path] = typer.Option(None, help="World-model checkpoint (default: policies/wm_tiny)."),
    vla: Optional[Path] = typer.Option(None, help="VLA checkpoint proposing chunks (default: policies/vla_tiny)."),
    task: str = typer.Option("pick", help="Task family whose held-out scenes the decisions are timed on."),
    decisions: int = typer.Option(30, help="Timed planning decisions."),
    deadline_ms: float = typer.Option(150.0, help="Deadline of one decision (VLA proposals + encoding + search)."),
    k: int = typer.Option(8, help="VLA chunks sampled per decision (root children)."),
    batch_size: int = typer.Option(128, help="Leaves expanded per batched model call."),
    threads: int = typer.Option(1, help="torch threads."),
    planner_option: Optional[list[str]] = typer.Option(None, help="KEY=VALUE wm planner option, repeatable (as "
                                                       "for vla-stack eval: backup=max, pessimism=1, ...)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Latent chunk-rollouts/s, decision latency p50/p99 and rollouts achieved within the deadline."""
    from rich.console import Console
    from rich.table import Table

    from vla_stack.cli import _key_values
    from vla_stack.planners.world_model.bench import bench_planner

    r = bench_planner(checkpoint, vla, task=task, decisions=decisions, deadline_s=deadline_ms / 1e3, k=k,
                      batch_size=batch_size, threads=threads, options=_key_values(planner_option or []))
    table = Table(title=f"bench planner: latent predictor ({r['parameters']:,} params, {threads} thread(s))")
    for col in ("batch", "chunk-rollouts/s", "ms/call"):
        table.add_column(col, justify="right")
    for row in r["throughput"]:
        table.add_row(str(row["batch"]), f"{row['rollouts_per_s']:,}", f"{row['ms_per_call']}")
    Console().print(table)
    d = r["decisions"]
    table = Table(title=f"bench planner: {d['count']} MCTS decisions, K={d['k']}, deadline {d['deadline_ms']:.0f} ms")
    for col in ("metric", "p50", "p99 / max"):
        table.add_column(col, justify="right")
    table.add_row("decision ms (VLA K-sample + encode + search)", str(d["decision_ms_p50"]),
                  f"{d['decision_ms_p99']} / {d['decision_ms_max']}")
    table.add_row("decision CPU ms (this process)", str(d["decision_cpu_ms_p50"]), "")
    table.add_row("VLA K-chunk proposal ms", str(d["proposal_ms_p50"]), str(d["proposal_ms_p99"]))
    table.add_row("encode + search ms", str(d["search_ms_p50"]), str(d["search_ms_p99"]))
    table.add_row("decisions over the deadline", f"{d['decisions_over_deadline']}/{d['count']}", "")
    table.add_row("latent rollouts / searched decision", str(d["rollouts_p50"]),
                  f"min {d['rollouts_min']} / max {d['rollouts_max']}")
    table.add_row("searched decisions with >= 1000 rollouts",
                  f"{d['decisions_with_1000_rollouts']}/{d['searched']}", "")
    Console().print(table)
    print(f"1-min load average {r['machine']['load_average_1min']} on {r['machine']['cores']} cores "
          f"of {r['machine']['cpu']}")
    load = r["machine"]["load_during_decisions"]
    if load["cpu_steal_pct"] is not None:
        print(f"during the decisions: CPU steal {load['cpu_steal_pct']}% (the host's other guests), "
              f"busy {load['cpu_busy_pct']}%")
    _write(r, json_out)
