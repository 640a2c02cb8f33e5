"""How well does the world model rank the VLA's K candidates, measured against the simulator itself.

    python -m vla_stack.planners.world_model.critic_check --task place_centre --wm DATA/wm/runs/wm_place_centre \\
        --episodes 20 --execute model --json critic_check.json

At every H-step decision the VLA proposes K chunks; each is run for its H steps from a simulator snapshot (the
episode is restored afterwards) and scored by what happened: 1 if the task succeeded, else
0.5 * exp(-d / 1 cm), d = the goal cube's distance to its target. The world model scores the same candidates as
best_of_k does. Which one is executed: `model` (the world model's pick: best_of_k's episodes), `oracle` (the
truly best: VLAPS-style planning in the simulator, the ceiling of any one-step critic over these candidates) or
`first` (the VLA's own first sample). `--true-offset` replaces a goal_offset model's reading of the offset at
the root by the simulator's (privileged: what a perfect offset reader would give the same critic), plus
Gaussian noise of `--offset-noise` metres per axis if given (how precise a reader must be).

Reports success and, over the decisions whose candidates' true scores differ, the mean true score of the
critic's pick against a random pick and the best, and the rank correlation between the two."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vla_stack.errors import VlaStackError

EXECUTE = ("model", "oracle", "first")


def true_score(env, goal, succeeded: bool, scale: float = 0.01) -> float:
    from vla_stack.planners.world_model.train import GoalDistanceReplay

    return 1.0 if succeeded else 0.5 * float(np.exp(-GoalDistanceReplay.measure(env.sim, goal)[0] / scale))


def try_candidates(env, chunks: np.ndarray) -> np.ndarray:
    """True score of each chunk run from the current state; the env is back at that state afterwards."""
    goal = env.task.final_goals[-1]
    snapshot, scores = env.snapshot(), []
    for chunk in chunks:
        env.restore(snapshot)
        succeeded = False
        for action in chunk:
            succeeded, truncated = env.step_unobserved(action)
            if succeeded or truncated:
                break
        scores.append(true_score(env, goal, succeeded))
    env.restore(snapshot)
    return np.array(scores)


def critic_check(task: str, robot: str, episodes: int, seed_start: int, vla_path: str | Path,
                 wm_path: str | Path | None, execute: str = "model", k: int = 8, progress_weight: float = 0.25,
                 true_offset: bool = False, offset_noise: float = 0.0, max_steps: int | None = None,
                 progress: bool = True) -> dict:
    from scipy.stats import spearmanr
    from tqdm import tqdm

    from vla_stack.planners.world_model.model import LatentSearchModel, load_world_model
    from vla_stack.planners.world_model.policy import WorldModelPlanner, sample_vla_chunks
    from vla_stack.planners.world_model.train import GoalDistanceReplay
    from vla_stack.policy.vla.runner import load_vla_policy
    from vla_stack.sim.env import TabletopEnv

    if execute not in EXECUTE:
        raise VlaStackError(f"execute must be one of {', '.join(EXECUTE)}, got '{execute}'")
    if execute == "model" and wm_path is None:
        raise VlaStackError("execute=model needs a world model (--wm)")
    wm = load_world_model(wm_path)[0] if wm_path is not None else None
    if true_offset and (wm is None or not wm.config.goal_offset):
        raise VlaStackError("--true-offset is for goal_offset world models")
    if offset_noise and not true_offset:
        raise VlaStackError("--offset-noise perturbs the simulator's offset: it needs --true-offset")
    vla = load_vla_policy(vla_path, robot, async_inference=False)
    planner = WorldModelPlanner(vla, wm, robot, k=k, mode="best_of_k") if wm is not None else None
    H = wm.config.chunk if wm is not None else vla.config.n_action_steps
    env = TabletopEnv(task, robot, image_size=128, max_steps=max_steps)
    decisions, per_episode = [], []
    try:
        for seed in tqdm(range(seed_start, seed_start + episodes), desc=f"critic check {execute}", disable=not progress):
            obs, info = env.reset(seed=seed)
            (vla if planner is None else planner).reset(seed=seed)
            generator = torch.Generator().manual_seed(seed)
            noise = np.random.default_rng(seed)
            command, done = None, False
            while not done:
                vla.observe(obs)
                chunks = sample_vla_chunks(vla, obs, k, generator)[:, :H]
                truth = try_candidates(env, chunks)
                scores = None
                root = None
                if wm is not None:
                    lsm = LatentSearchModel(wm, wm.embed_goal([obs["instruction"]]), progress_weight)
                    if true_offset:
                        offset = (GoalDistanceReplay.measure(env.sim, env.task.final_goals[-1])[1]
                                  + noise.normal(0.0, offset_noise, 2))
                        root = lsm.root(planner._encode(obs), obs["state"] if command is None else command,
                                        obs["state"], offset)
                    else:
                        root = planner.root(obs, lsm, obs["instruction"], command)
                if root is not None:
                    with torch.inference_mode():
                        norm = wm.norm_action(torch.from_numpy(chunks)).numpy()
                    scores = lsm.evaluate(lsm.dynamics(np.repeat(root[None], k, 0), norm))
                pick = {"model": lambda: 0 if scores is None else int(np.argmax(scores)),
                        "oracle": lambda: int(np.argmax(truth)), "first": lambda: 0}[execute]()
                decisions.append({"seed": seed, "t": env.steps, "truth": truth.round(5).tolist(),
                                  "scores": None if scores is None else scores.round(5).tolist()})
                for i, action in enumerate(chunks[pick]):
                    if i:
                        vla.observe(obs)
                    obs, _, terminated, truncated, info = env.step(action)
                    done = terminated or truncated
                    if done:
                        break
                command = chunks[pick][-1]
            per_episode.append({"seed": seed, "success": bool(info["success"]), "steps": env.steps})
    finally:
        env.close()
    out = {"task": task, "robot": robot, "execute": execute, "k": k, "true_offset": true_offset,
           "offset_noise": offset_noise if true_offset else None,
           "episodes": episodes, "successes": sum(e["success"] for e in per_episode), "per_episode": per_episode}
    differ = [d for d in decisions if d["scores"] is not None and np.ptp(d["truth"]) > 0.05]
    if differ:
        with np.errstate(invalid="ignore"):
            rank = [spearmanr(d["scores"], d["truth"])[0] for d in differ]
        out["critic"] = {
            "decisions": len(decisions), "differing_decisions": len(differ),
            "true_score_of_pick": round(float(np.mean([d["truth"][int(np.argmax(d["scores"]))] for d in differ])), 4),
            "true_score_random": round(float(np.mean([np.mean(d["truth"]) for d in differ])), 4),
            "true_score_best": round(float(np.mean([max(d["truth"]) for d in differ])), 4),
            "rank_correlation": round(float(np.nanmean(rank)), 4)}
    out["decisions"] = decisions
    return out


def main() -> None:
    from vla_stack.paths import share_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="place_centre")
    ap.add_argument("--robot", default="panda")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed-start", type=int, default=5_000_000,
                    help="default: the validation seeds (5,000,000), apart from training and held-out evaluation")
    ap.add_argument("--vla", default=None)
    ap.add_argument("--wm", default=None)
    ap.add_argument("--execute", choices=EXECUTE, default="model")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--progress-weight", type=float, default=0.25)
    ap.add_argument("--true-offset", action="store_true")
    ap.add_argument("--offset-noise", type=float, default=0.0, help="m per axis, added to --true-offset")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        out = critic_check(args.task, args.robot, args.episodes, args.seed_start,
                           args.vla or share_dir("policies") / "vla_tiny", args.wm, args.execute, args.k,
                           args.progress_weight, args.true_offset, args.offset_noise)
    except VlaStackError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.execute}: {out['successes']}/{out['episodes']} succeeded")
    if "critic" in out:
        print(json.dumps(out["critic"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
