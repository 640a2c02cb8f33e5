"""CLI commands of the VLA policy, mounted by vla_stack/cli.py:
`vla-stack train --config policies/<name>.yaml` and `vla-stack bench policy --json out.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def train_command(
    config: Path = typer.Option(..., "--config", help="Training YAML (policy:, data:, train: sections)."),
    resume: bool = typer.Option(False, help="Continue from output_dir/train_state.pt if it exists."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Resolve the config's relative data: and "
                                            "output_dir paths here (default: $VLA_STACK_DATA_DIR or the user data dir)."),
) -> None:
    """Train a VLA policy (runs under torchrun for DDP: gloo on CPU, nccl on GPU)."""
    from vla_stack.policy.vla.train import train

    result = train(config, resume=resume, data_dir=data_dir)
    if result["rank"] == 0:
        print(json.dumps(result, indent=2))


def bench_policy_command(
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: the shipped policies/vla_tiny)."),
    robot: str = typer.Option("panda", help="Robot whose observation is fed."),
    iterations: int = typer.Option(100, help="Timed chunk inferences per mode."),
    threads: int = typer.Option(1, help="torch threads for inference (training uses all cores)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Chunk latency p50/p99 with and without the prefix KV cache, train samples/s, params, peak memory."""
    from vla_stack.policy.vla.bench import bench_policy

    result = bench_policy(checkpoint, robot=robot, iterations=iterations, threads=threads)
    lat, speedup = result["chunk_latency"], result["kv_cache_speedup_p50"]
    print(f"chunk latency (batch 1, {len(result['cameras'])} cameras, {result['num_inference_steps']} steps, "
          f"{result['inference_threads']} inference thread(s)):")
    for kind in ("end_to_end", "model"):
        cached, plain = lat["with_kv_cache"][kind], lat["without_kv_cache"][kind]
        print(f"  {kind:10s} p50 {cached['p50_ms']} ms / p99 {cached['p99_ms']} ms with KV cache, "
              f"p50 {plain['p50_ms']} ms / p99 {plain['p99_ms']} ms without -> {speedup[kind]}x")
    load = result["machine_load_during_latency"]
    if load["cpu_steal_pct"] is not None:
        print(f"  while timing on {result['cpu']}: CPU steal {load['cpu_steal_pct']}% (the host's other guests), "
              f"busy {load['cpu_busy_pct']}%, load average {load['load_avg_1m']}")
    print(f"train {result['train']['samples_per_s']} samples/s, {result['parameters']:,} parameters, "
          f"peak RSS {result['peak_rss_mb']} MB")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_out}")
