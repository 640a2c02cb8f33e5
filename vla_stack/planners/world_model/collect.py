"""Non-expert transitions for world-model training: the world model must see failures (wrong cube, missed grasp,
dropped cube) or its value head only ever learns that everything succeeds. Two behaviours, recorded into the
same zarr episode-store layout as the demos (so one loader reads both), failures kept:

- `vla`: the VLA checkpoint as is (weak: most episodes fail, in many different ways);
- `noisy-expert`: the scripted expert with Gaussian joint noise and, per 8-step block with probability
  `swap_prob`, the VLA's action instead of the expert's (mixed outcomes, states near the demo distribution).

`collect_branched` records what neither gives: outcomes of *different chunks from the same state*, the targets
a critic needs to rank the planner's candidates (a value head trained on single trajectories learns how good a
state is, not which of K chunks from it is better). It runs the planner's own schedule (K VLA samples per
decision, the first executed for H steps) and at some decisions saves the simulator, tries each other
candidate, continues every branch with the VLA to the episode's end, and restores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vla_stack.data.collect import store_features
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.evaluation import HELDOUT_SEED_START
from vla_stack.planners.world_model.policy import sample_vla_chunks
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.tabletop import CAMERAS

BEHAVIOURS = ("vla", "noisy-expert")


def collect_rollouts(task: str, robot: str, behaviour: str, vla_checkpoint: str | Path, store_path: str | Path,
                     episodes: int, seed_start: int = 0, noise: float = 0.05, swap_prob: float = 0.3,
                     max_steps: int | None = None, progress: bool = True) -> dict:
    if behaviour not in BEHAVIOURS:
        raise VlaStackError(f"unknown behaviour '{behaviour}' (known: {', '.join(BEHAVIOURS)})")
    if seed_start + episodes > HELDOUT_SEED_START:
        raise VlaStackError(f"training seeds must stay below {HELDOUT_SEED_START} (held out for evaluation)")
    from vla_stack.policy.scripted import ScriptedExpert
    from vla_stack.policy.vla.runner import load_vla_policy

    env = TabletopEnv(task, robot, image_size=128, cameras=CAMERAS, max_steps=max_steps)
    rng = np.random.default_rng(seed_start)
    successes = 0
    try:
        store = EpisodeStore.open_or_create(store_path, robot=robot, fps=int(env.control_hz),
                                            features=store_features(env))
        vla = load_vla_policy(vla_checkpoint, robot, async_inference=False)
        expert = ScriptedExpert(env) if behaviour == "noisy-expert" else None
        for seed in tqdm(range(seed_start, seed_start + episodes), desc=f"wm collect {behaviour} {task}/{robot}",
                         disable=not progress, unit="ep"):
            obs, info = env.reset(seed=seed)
            vla.reset(seed=seed)
            if expert is not None:
                expert.reset(seed=seed)
            with store.begin_episode(instruction=env.instruction, subtasks=info["subtasks"], task=env.family.name,
                                     seed=seed) as writer:
                done, step, use_vla = False, 0, behaviour == "vla"
                while not done:
                    vla_action = vla.select_action(obs)  # keeps the VLA's chunk queue in step with the episode
                    if expert is not None:
                        if step % 8 == 0:
                            use_vla = bool(rng.random() < swap_prob)
                        action = np.asarray(expert.select_action(obs), np.float32)
                        if use_vla:
                            action = np.asarray(vla_action, np.float32)
                        action[:-1] += rng.normal(0.0, noise, action.shape[0] - 1).astype(np.float32)
                        action[-1] = np.clip(action[-1], 0.0, 1.0)
                    else:
                        action = np.asarray(vla_action, np.float32)
                    frame = {f"images.{c}": obs["images"][c] for c in env.cameras}
                    frame.update(state=obs["state"], action=action, subtask_index=np.int64(info["subtask_index"]))
                    writer.add_frame(frame)
                    obs, _, terminated, truncated, info = env.step(action)
                    done, step = terminated or truncated, step + 1
                success = bool(info["success"])
                successes += success
                writer.commit(success=success, extra={"steps": env.steps, "behaviour": behaviour,
                                                      "subtasks_completed": int(env.subtask_index)})
    finally:
        env.close()
    return {"store": str(store_path), "episodes": episodes, "successes": successes, "behaviour": behaviour}


def collect_branched(task: str, robot: str, vla_checkpoint: str | Path, store_path: str | Path, episodes: int,
                     seed_start: int = 0, k: int = 8, chunk: int = 8, branch_prob: float = 0.2,
                     branch_before: int | None = None, max_steps: int | None = None, progress: bool = True) -> dict:
    """Episodes of the planner's `first` schedule (K VLA samples per decision, the first executed for `chunk`
    steps), each decision before step `branch_before` (None: all) branched with probability `branch_prob`
    (on stack/panda the candidates' outcomes differ at 82% of the points before step 24, 14% at steps 80-119
    and 2% later, when the episode is mostly lost already). Stored with the frames like
    collect_rollouts; the branches go into the episode's extra metadata: `branches` = one entry per tried
    candidate {t, chunk (chunk x action_dim, robot units), success, steps_to_success (from t)}, candidate 0 being
    the episode's own continuation. Branches are continued blind (cameras rendered only at decisions) unless the
    VLA has video memory."""
    from vla_stack.policy.vla.runner import load_vla_policy

    if seed_start + episodes > HELDOUT_SEED_START:
        raise VlaStackError(f"training seeds must stay below {HELDOUT_SEED_START} (held out for evaluation)")
    if k < 2 or chunk < 1 or not 0.0 <= branch_prob <= 1.0:
        raise VlaStackError("need k >= 2, chunk >= 1 and branch_prob in [0, 1]")
    env = TabletopEnv(task, robot, image_size=128, cameras=CAMERAS, max_steps=max_steps)
    totals = {"episodes": episodes, "successes": 0, "branch_points": 0, "mixed_points": 0, "branches": 0}
    try:
        store = EpisodeStore.open_or_create(store_path, robot=robot, fps=int(env.control_hz),
                                            features=store_features(env))
        vla = load_vla_policy(vla_checkpoint, robot, async_inference=False)
        if vla.config.chunk_size < chunk:
            raise VlaStackError(f"VLA chunks ({vla.config.chunk_size}) are shorter than {chunk}")
        every_step = bool(vla.config.memory_offsets)
        for seed in tqdm(range(seed_start, seed_start + episodes), desc=f"wm branched {task}/{robot}",
                         disable=not progress, unit="ep"):
            obs, info = env.reset(seed=seed)
            vla.reset(seed=seed)
            generator = torch.Generator().manual_seed(seed)
            rng = np.random.default_rng(seed)
            branches, own = [], []  # own: indices into branches of candidate 0 (filled at the episode end)
            with store.begin_episode(instruction=env.instruction, subtasks=info["subtasks"], task=env.family.name,
                                     seed=seed) as writer:
                done = False
                while not done:
                    vla.observe(obs)
                    chunks = sample_vla_chunks(vla, obs, k, generator)[:, :chunk]
                    if rng.random() < branch_prob and (branch_before is None or env.steps < branch_before):
                        t = env.steps
                        outcomes = _try_branches(env, vla, chunks[1:], every_step, seed * 100_003 + t)
                        own.append(len(branches))
                        branches.append({"t": t, "chunk": _rounded(chunks[0]), "success": None,
                                         "steps_to_success": None})
                        for c, (ok, n) in zip(chunks[1:], outcomes):
                            branches.append({"t": t, "chunk": _rounded(c), "success": ok, "steps_to_success": n})
                        totals["branch_points"] += 1
                    for i, action in enumerate(chunks[0]):
                        if i:
                            vla.observe(obs)
                        frame = {f"images.{c}": obs["images"][c] for c in env.cameras}
                        frame.update(state=obs["state"], action=action.astype(np.float32),
                                     subtask_index=np.int64(info["subtask_index"]))
                        writer.add_frame(frame)
                        obs, _, terminated, truncated, info = env.step(action)
                        done = terminated or truncated
                        if done:
                            break
                success = bool(info["success"])
                for i in own:
                    b = branches[i]
                    b["success"], b["steps_to_success"] = success, (env.steps - b["t"]) if success else None
                    group = [x["success"] for x in branches if x["t"] == b["t"]]
                    totals["mixed_points"] += 0 < sum(group) < len(group)
                totals["successes"] += success
                totals["branches"] += len(branches)
                writer.commit(success=success, extra={"steps": env.steps, "behaviour": "vla-branched",
                                                      "subtasks_completed": int(env.subtask_index),
                                                      "branches": branches})
    finally:
        env.close()
    return {"store": str(store_path), **totals}


def _try_branches(env: TabletopEnv, vla, chunks: np.ndarray, every_step: bool, seed: int) -> list[tuple]:
    """Each chunk from the current state, then the VLA to the episode's end: [(success, steps to success)].
    The env and the VLA's memory are back at the current state afterwards."""
    env_snap, vla_snap = env.snapshot(), vla.memory_snapshot()
    t0, H = env.steps, len(chunks[0])
    generator = torch.Generator().manual_seed(seed)
    outcomes = []
    for first in chunks:
        env.restore(env_snap)
        vla.restore_memory(vla_snap)
        plan, success, done = first, False, False
        while not done:
            for i, action in enumerate(plan):
                success, truncated = env.step_unobserved(action)
                done = success or truncated
                if done:
                    break
                if every_step and i < len(plan) - 1:
                    vla.observe(env.observation())
            if not done:
                obs = env.observation()
                vla.observe(obs)
                plan = sample_vla_chunks(vla, obs, 1, generator)[0, :H]
        outcomes.append((bool(success), env.steps - t0 if success else None))
    env.restore(env_snap)
    vla.restore_memory(vla_snap)
    return outcomes


def _rounded(chunk: np.ndarray) -> list[list[float]]:
    return np.round(chunk.astype(np.float64), 5).tolist()
