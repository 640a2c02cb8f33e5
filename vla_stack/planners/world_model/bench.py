"""`vla-stack bench planner`: how fast the world-model planner thinks on this CPU.

- latent chunk-rollouts/s: the predictor applied to a batch of (latent, H-step chunk) pairs, per batch size;
- decisions: the planner on real observations (`task`, default pick, on held-out seeds): K chunks sampled from
  the VLA, encoding (and a goal_offset model's keypoint reading) and MCTS, all within the decision deadline:
  decision latency p50/p99/max, its parts, and the latent rollouts achieved per searched decision (a goal_offset
  model executes the VLA's first sample, unsearched, until it has read the target and the cube once)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from vla_stack.bench import MachineLoad, cpu_model
from vla_stack.errors import VlaStackError
from vla_stack.planners.world_model.model import LatentSearchModel, load_world_model, param_count


def _pct(x, q):
    return round(float(np.percentile(x, q)), 2)


def bench_planner(checkpoint: str | Path | None = None, vla_checkpoint: str | Path | None = None,
                  task: str = "pick", decisions: int = 30, deadline_s: float = 0.15, k: int = 8,
                  batch_size: int = 128, threads: int = 1, seconds: float = 1.0, options: dict | None = None) -> dict:
    """options: further wm planner options (as `--planner-option` gives them: backup, pessimism, ...)."""
    from vla_stack.evaluation import HELDOUT_SEED_START
    from vla_stack.paths import share_dir
    from vla_stack.planners.world_model.policy import default_checkpoint, make_policy
    from vla_stack.policy.vla.runner import load_vla_policy
    from vla_stack.sim.env import TabletopEnv

    torch.set_num_threads(threads)
    wm_path = Path(checkpoint or default_checkpoint())
    cfg = load_world_model(wm_path)[0].config  # its robot decides the VLA's embodiment and the scene
    vla_path = Path(vla_checkpoint or share_dir("policies") / "vla_tiny")
    vla = load_vla_policy(vla_path, cfg.robot, async_inference=False)
    env = TabletopEnv(task, cfg.robot, image_size=128)
    records: list[dict] = []
    try:
        planner = make_policy(vla, env, wm_path, **{"k": k, "deadline_s": deadline_s, "batch_size": batch_size,
                                                    **(options or {})})
        wm = planner.wm  # throughput of the very model the decisions use
        # ---- raw predictor throughput
        goal = wm.embed_goal(["pick up the red cube"]).detach()
        lsm = LatentSearchModel(wm, goal)
        rng = np.random.default_rng(0)
        throughput = []
        for b in (1, 8, 32, 128, 512):
            z = rng.standard_normal((b, cfg.search_dim)).astype(np.float32)
            a = rng.standard_normal((b, cfg.chunk, cfg.action_dim)).astype(np.float32)
            lsm.dynamics(z, a)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                lsm.evaluate(lsm.dynamics(z, a))
                n += 1
            dt = time.perf_counter() - t0
            throughput.append({"batch": b, "rollouts_per_s": round(n * b / dt), "ms_per_call": round(dt / n * 1e3, 3)})
        # ---- decisions on real observations, through the planner itself (the deadline covers the whole
        # decision: K proposals, encoding, search)
        decision_cpu_ms = []
        obs, _ = env.reset(seed=HELDOUT_SEED_START)
        planner.reset(seed=0)
        load = MachineLoad()
        planner.predict_action_chunk(obs)  # warm-up (lazy loads: text tower, first-call allocations), not timed
        with load:
            for i in range(decisions):
                if i % 5 == 0:
                    obs, _ = env.reset(seed=HELDOUT_SEED_START + i // 5)
                    planner.reset(seed=i)
                c0 = time.process_time()
                chunk = planner.predict_action_chunk(obs)
                decision_cpu_ms.append((time.process_time() - c0) * 1e3)
                for action in chunk:  # move on so the next decision sees a new state
                    obs, *_ = env.step(action)
                records.append(planner._decisions[-1])
    finally:
        env.close()
    searched = [r for r in records if "rollouts" in r]
    if not searched:
        raise VlaStackError(f"no decision was searched in {decisions} (a goal_offset model never read its offset "
                            f"on '{task}')")
    col = lambda key, rows=records: [r[key] for r in rows]
    return {
        "machine": {"cpu": cpu_model(), "torch_threads": threads,
                    "load_average_1min": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_during_decisions": load.summary()},
        "world_model": str(wm_path), "vla": str(vla_path), "task": task, "parameters": param_count(wm),
        "latent_dim": cfg.latent_dim, "chunk": cfg.chunk,
        "throughput": throughput,
        "decisions": {
            "count": decisions, "k": planner.k, "deadline_ms": deadline_s * 1e3, "batch_size": batch_size,
            "options": options or {},
            "decision_ms_p50": _pct(col("decision_ms"), 50), "decision_ms_p99": _pct(col("decision_ms"), 99),
            "decision_ms_max": round(max(col("decision_ms")), 2),
            "decisions_over_deadline": int(sum(d > deadline_s * 1e3 for d in col("decision_ms"))),
            # CPU time this process got: on a shared machine, well below the wall time
            "decision_cpu_ms_p50": _pct(decision_cpu_ms, 50),
            "proposal_ms_p50": _pct(col("proposal_ms"), 50), "proposal_ms_p99": _pct(col("proposal_ms"), 99),
            "search_ms_p50": _pct(col("search_ms"), 50), "search_ms_p99": _pct(col("search_ms"), 99),
            "searched": len(searched),
            "rollouts_min": int(min(col("rollouts", searched))), "rollouts_p50": _pct(col("rollouts", searched), 50),
            "rollouts_max": int(max(col("rollouts", searched))),
            "simulations_p50": _pct(col("simulations", searched), 50),
            "max_depth_p50": _pct(col("depth", searched), 50),
            "decisions_with_1000_rollouts": int(sum(r >= 1000 for r in col("rollouts", searched))),
        },
    }
