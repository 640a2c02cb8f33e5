"""`vla-stack mem ...`: collect high-level training episodes, train the high-level model, score it on held-out
episode stores. (Closed-loop evaluation is `vla-stack eval --planner mem`.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

mem_app = typer.Typer(help="Hierarchical MEM planner: data, training, held-out scoring.", no_args_is_help=True)


@mem_app.command("collect")
def collect_command(
    task: str = typer.Option(..., help="Task family (sort and restore are the long-horizon ones)."),
    robot: str = typer.Option("panda", help="Robot."),
    episodes: int = typer.Option(100, help="Episodes to add."),
    store: Path = typer.Option(..., help="Zarr episode store to create or extend."),
    seed_start: int = typer.Option(0, help="First scene seed (resumes after the store's last seed)."),
    image_size: int = typer.Option(128, help="Front camera size (evaluation renders 128 px)."),
    drop_fraction: float = typer.Option(0.4, help="Fraction of episodes with an injected dropped cube."),
    pause_steps: int = typer.Option(0, help="Run one subtask at a time as the planner does (subtask executor, "
                                            "arm parked after each) with random pauses of up to N steps between "
                                            "them; 0 = the flat expert."),
    executor: str = typer.Option("expert", help="Who runs the subtasks: 'expert' (scripted) or a VLA checkpoint "
                                                "(e.g. vla_mem_tiny), handed one subtask at a time as the planner "
                                                "does: high-level data on the learned low level's own states."),
) -> None:
    """Episodes for the high level (front camera, completed subtasks per frame, terminal frame, injected failed
    grasps), run by the scripted expert or by a VLA."""
    from vla_stack.errors import VlaStackError
    from vla_stack.evaluation import HELDOUT_SEED_START
    from vla_stack.planners.mem.data import collect_mem
    from vla_stack.sim.robots import get_robot
    from vla_stack.sim.tasks import get_family

    get_family(task), get_robot(robot)
    if seed_start + episodes > HELDOUT_SEED_START:
        raise VlaStackError(f"training seeds must stay below {HELDOUT_SEED_START} (held out for evaluation)")
    print(json.dumps(collect_mem(task, robot, episodes, store, seed_start=seed_start, image_size=image_size,
                                 drop_fraction=drop_fraction, pause_steps=pause_steps, executor=executor),
                     indent=2))


@mem_app.command("train")
def train_command(config: Path = typer.Option(..., "--config", help="Training YAML (e.g. policies/mem_tiny.yaml).")) -> None:
    """Train the high-level model; prints held-out subtask accuracy and memory exact match."""
    from vla_stack.planners.mem.train import train

    result = train(config)
    result.pop("history", None)
    print(json.dumps(result, indent=2))


@mem_app.command("score")
def score_command(
    store: List[Path] = typer.Option(..., help="Held-out episode store(s)."),
    checkpoint: Optional[Path] = typer.Option(None, help="High-level checkpoint (default: the shipped mem_tiny)."),
    memory: bool = typer.Option(True, help="--no-memory feeds the empty memory (the ablation)."),
    last: Optional[int] = typer.Option(None, help="Score only each store's last N episodes (the held-out split of "
                                                  "a training store, data.heldout_last)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Teacher-forced held-out scoring: subtask accuracy, memory exact match and completion accuracy per sample
    kind (boundary / steady / reset / after_failure)."""
    from vla_stack.planners.mem.data import build_samples
    from vla_stack.planners.mem.model import load_model
    from vla_stack.planners.mem.policy import default_checkpoint
    from vla_stack.planners.mem.train import SampleSet, score

    model = load_model(checkpoint or default_checkpoint())
    data = SampleSet(build_samples(list(store), seed=1, last=last), model.config.image_size, use_memory=memory,
                     running=bool(model.checkpoint_meta.get("running_subtask_input", False)))
    result = {"checkpoint": str(checkpoint or default_checkpoint()), "stores": [str(s) for s in store],
              "last_episodes": last, "use_memory": memory, "samples": len(data), "scores": score(model, data)}
    print(json.dumps(result, indent=2))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@mem_app.command("failures")
def failures_command(
    record: Path = typer.Argument(..., help="JSON written by `vla-stack eval --planner mem --json`."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the breakdown here."),
) -> None:
    """Failed episodes by their first high-level error (outcome recorded that did not happen / missed, at a
    completion call or a stall re-plan; none: the low level failed under a right memory), from the per-call
    traces of an evaluation record."""
    from vla_stack.errors import VlaStackError
    from vla_stack.planners.mem.failures import LATE_HANDOVER, failure_breakdown

    try:
        result = failure_breakdown(json.loads(record.read_text()))
    except (OSError, ValueError) as exc:
        raise VlaStackError(f"cannot read evaluation record {record}: {exc}") from None
    print(f"{result['task']}/{result['robot']}: {result['failures']} of {result['episodes']} episodes failed")
    for kind, count in result["by_first_error"].items():
        print(f"{count:5d}  {kind}")
    if result["low_level_after_late_handover"]:
        late = result["low_level_after_late_handover"]
        print(f"       of the low level: {late} with a subtask handed over more than {LATE_HANDOVER} steps after the "
              "scene finished the previous one")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@mem_app.command("bench")
def bench_command(
    checkpoint: Optional[Path] = typer.Option(None, help="High-level checkpoint (default: the shipped mem_tiny)."),
    task: str = typer.Option("sort", help="Task family whose scenes are rendered."),
    iterations: int = typer.Option(50, help="Timed high-level calls (and completion checks)."),
    threads: int = typer.Option(1, help="torch threads."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """High-level latency on this CPU: a full call (encoder + greedy decoding of subtask and memory) and a
    completion check (encoder only), batch 1, on rendered held-out scenes with their true memories."""
    import time

    import numpy as np
    import torch

    from vla_stack.evaluation import HELDOUT_SEED_START
    from vla_stack.planners.mem.memory import TaskMemory, model_context
    from vla_stack.planners.mem.model import load_model, prepare_images
    from vla_stack.planners.mem.policy import default_checkpoint
    from vla_stack.sim.env import TabletopEnv

    torch.set_num_threads(threads)
    model = load_model(checkpoint or default_checkpoint())
    running = bool(model.checkpoint_meta.get("running_subtask_input", False))  # inputs as the planner feeds them
    env = TabletopEnv(task, "panda", cameras=("front",))
    inputs = []
    try:
        for i in range(5):
            obs, _ = env.reset(seed=HELDOUT_SEED_START + i)
            memory = TaskMemory(env.task, env.robot)
            image = prepare_images(obs["images"]["front"][None], model.config.image_size)
            contexts = [model_context(memory.label(k), memory.subtask(k)) if running else memory.label(k)
                        for k in (0, 1)]
            inputs += [(image, env.task.instruction, m) for m in ["", *contexts]]
    finally:
        env.close()
    for image, goal, memory in inputs:  # warm-up, and MiniLM states of these strings get cached
        model.generate(image, [goal], [memory])
    calls, checks, tokens = [], [], []
    for i in range(iterations):
        image, goal, memory = inputs[i % len(inputs)]
        start = time.perf_counter()
        subtask, new_memory, _ = model.generate(image, [goal], [memory])
        calls.append((time.perf_counter() - start) * 1000)
        tokens.append(len(model.text.tokenizer(subtask[0], new_memory[0])["input_ids"]))
        start = time.perf_counter()
        model.completion_probability(image, [goal], [memory])
        checks.append((time.perf_counter() - start) * 1000)
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 2)
    result = {"checkpoint": str(checkpoint or default_checkpoint()), "threads": threads, "iterations": iterations,
              "trainable_parameters": model.trainable_parameters(), "call_ms_p50": pct(calls, 50),
              "call_ms_p90": pct(calls, 90), "completion_check_ms_p50": pct(checks, 50),
              "completion_check_ms_p90": pct(checks, 90), "decoded_tokens_mean": round(float(np.mean(tokens)), 1),
              "note": "MiniLM text states are cached per string (goal and memory repeat); a new memory string costs "
                      "one MiniLM forward more"}
    print(json.dumps(result, indent=2))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    mem_app()
