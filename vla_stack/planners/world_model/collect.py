"""Non-expert transitions for world-model training: the world model must see failures (wrong cube, missed grasp,
dropped cube) or its value head only ever learns that everything succeeds. Two behaviours, recorded into the
same zarr episode-store layout as the demos (so one loader reads both), failures kept:

- `vla`: the VLA checkpoint as is (weak: most episodes fail, in many different ways);
- `noisy-expert`: the scripted expert with Gaussian joint noise and, per 8-step block with probability
  `swap_prob`, the VLA's action instead of the expert's (mixed outcomes, states near the demo distribution).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_stack.data.collect import store_features
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.evaluation import HELDOUT_SEED_START
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
