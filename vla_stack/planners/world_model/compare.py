"""Planning value on held-out seeds: VLA alone vs VLA + best-of-K (no search) vs VLA + MCTS, same seeds.

    python -m vla_stack.planners.world_model.compare --task pick --robot panda --episodes 30 \\
        --arms vla,first,best_of_k,mcts --json $VLA_STACK_DATA_DIR/wm/compare.json

Arms: `vla` = the VLA's own runner (RTC execution, re-planning every n_action_steps); `first` = the first of
the K VLA samples executed for H steps (the planner's schedule without any choice); `best_of_k` / `mcts` =
the world-model planner's modes. Each arm gets a fresh VLA and the same seeds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vla_stack.evaluation import HELDOUT_SEED_START, run_episode, wilson_interval


def run_arm(arm: str, task: str, robot: str, episodes: int, seed_start: int, vla_path: str,
            wm_path: str | None, k: int, deadline_s: float, progress: bool = True,
            options: dict | None = None) -> dict:
    from tqdm import tqdm

    from vla_stack.planners import wrap_policy
    from vla_stack.policy.vla.runner import load_vla_policy
    from vla_stack.sim.env import TabletopEnv

    env = TabletopEnv(task, robot, image_size=128)
    try:
        vla = load_vla_policy(vla_path, robot, async_inference=arm == "vla")
        policy = vla if arm == "vla" else wrap_policy("wm", vla, env, checkpoint=wm_path, k=k, mode=arm,
                                                      deadline_s=deadline_s, **(options or {}))
        records, start = [], time.perf_counter()
        bar = tqdm(range(episodes), desc=f"{arm} {task}/{robot}", disable=not progress, unit="ep")
        for i in bar:
            record, _ = run_episode(env, policy, seed_start + i)
            records.append(record)
            bar.set_postfix(success=f"{sum(r['success'] for r in records)}/{len(records)}")
    finally:
        env.close()
    successes = sum(r["success"] for r in records)
    low, high = wilson_interval(successes, episodes)
    return {"arm": arm, "episodes": episodes, "successes": successes, "success_rate": successes / episodes,
            "wilson_95": [round(low, 4), round(high, 4)], "seed_start": seed_start,
            "wall_time_s": round(time.perf_counter() - start, 1),
            "planner_summary": policy.summary() if hasattr(policy, "summary") else None, "per_episode": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="pick")
    ap.add_argument("--robot", default="panda")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seed-start", type=int, default=HELDOUT_SEED_START)
    ap.add_argument("--arms", default="vla,first,best_of_k,mcts")
    ap.add_argument("--vla", default=None)
    ap.add_argument("--wm", default=None)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--deadline-ms", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="further wm planner option (as --planner-option of vla-stack eval), repeatable")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bad = [o for o in args.option if "=" not in o]
    if bad:
        ap.error(f"--option takes KEY=VALUE, got {bad[0]!r}")
    options = dict(o.split("=", 1) for o in args.option)
    torch.set_num_threads(args.threads)
    from vla_stack.paths import share_dir

    vla = args.vla or str(share_dir("policies") / "vla_tiny")
    results = []
    for arm in args.arms.split(","):
        results.append(run_arm(arm, args.task, args.robot, args.episodes, args.seed_start, vla, args.wm, args.k,
                               args.deadline_ms / 1e3, options=options))
        r = results[-1]
        print(f"{arm:10s} {r['successes']}/{r['episodes']} = {r['success_rate']:.1%} (95% CI {r['wilson_95'][0]:.1%}-"
              f"{r['wilson_95'][1]:.1%}) {r['wall_time_s']} s", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"task": args.task, "robot": args.robot, "k": args.k, "options": options,
                                             "deadline_ms": args.deadline_ms, "results": results}, indent=1))


if __name__ == "__main__":
    main()
