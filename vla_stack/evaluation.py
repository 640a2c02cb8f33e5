"""Closed-loop evaluation in the MuJoCo tasks: success rate with a Wilson interval, per-episode records and
optional MP4s. Evaluation seeds start at HELDOUT_SEED_START; demo collection uses seeds below it, so a
policy is never scored on a scene it was trained on."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_stack.errors import VlaStackError
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.tabletop import CAMERAS

HELDOUT_SEED_START = 1_000_000


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


EXECUTIONS = ("rtc", "ensemble", "sync")


def load_policy(name: str, env: TabletopEnv, execution: str = "rtc", inference_steps: int | None = None):
    """'expert' is the scripted expert; anything else a checkpoint directory or a shipped policy's name, run
    with `execution`: rtc (async inference + real-time chunking), ensemble (async + ACT temporal ensembling)
    or sync (inference blocks the control step, chunks join without smoothing), and `inference_steps` Euler
    steps per chunk (default: the checkpoint's)."""
    if execution not in EXECUTIONS:
        raise VlaStackError(f"unknown execution '{execution}' (known: {', '.join(EXECUTIONS)})")
    if inference_steps is not None and inference_steps < 1:
        raise VlaStackError(f"--inference-steps must be at least 1, got {inference_steps}")
    if name == "expert":
        from vla_stack.policy.scripted import ScriptedExpert

        return ScriptedExpert(env)
    from vla_stack.paths import resolve_checkpoint
    from vla_stack.policy.vla.runner import load_vla_policy

    path = resolve_checkpoint(name)

    # The runner validates every observation (NaN/inf state or images raise InvalidObservationError) before
    # it reaches the model.
    if execution == "sync":
        return load_vla_policy(path, env.robot.name, async_inference=False, num_steps=inference_steps)
    return load_vla_policy(path, env.robot.name, execution=execution, num_steps=inference_steps)


def write_mp4(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    """H.264 MP4 through PyAV (bundled FFmpeg, no system install needed)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in frames:
            if frame.shape[0] != stream.height or frame.shape[1] != stream.width:
                frame = np.pad(frame, ((0, stream.height - height), (0, stream.width - width), (0, 0)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def run_episode(env: TabletopEnv, policy, seed: int, record_video: bool = False) -> tuple[dict, list[np.ndarray]]:
    obs, info = env.reset(seed=seed)
    policy.reset(seed=seed)
    frames: list[np.ndarray] = []
    start = time.perf_counter()
    terminated = truncated = False
    steps = 0
    actions = []
    while not (terminated or truncated):
        if record_video:
            frames.append(np.concatenate([obs["images"][c] if c in obs["images"] else env.sim.render(c)
                                          for c in CAMERAS], axis=1))
        action = policy.select_action(obs)
        actions.append(np.asarray(action, np.float64)[:-1])
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
    arm = np.asarray(actions)
    record = {
        "seed": seed,
        "success": bool(info["success"]),
        "steps": steps,
        "subtasks_completed": len(env.completed_subtasks()),
        "subtasks_total": len(info["subtasks"]),
        "instruction": env.instruction,
        "clipped_actions": info["clipped_actions"],
        "non_finite_actions": info["non_finite_actions"],
        # smoothness of the commanded arm targets: mean |second difference| (rad / step^2)
        "action_jerk": round(float(np.abs(np.diff(arm, 2, axis=0)).mean()), 5) if len(arm) > 2 else 0.0,
        "duration_s": round(time.perf_counter() - start, 3),
    }
    if hasattr(policy, "episode_metrics"):
        record["planner"] = policy.episode_metrics()
    return record, frames


def evaluate(policy_name: str, task: str, robot: str, episodes: int, seed_start: int = HELDOUT_SEED_START,
             video_dir: Path | None = None, videos: int = 1, instruction: str | None = None,
             image_size: int = 128, progress: bool = True, planner: str = "none",
             planner_checkpoint: Path | None = None, planner_options: dict | None = None,
             execution: str = "rtc", inference_steps: int | None = None) -> dict:
    if episodes < 1:
        raise VlaStackError("--episodes must be at least 1")
    # The scripted expert reads the simulator state: it renders only the frames of recorded videos.
    env = TabletopEnv(task, robot, image_size=image_size, instruction=instruction,
                      cameras=() if policy_name == "expert" else CAMERAS)
    try:
        from vla_stack.planners import wrap_policy

        low_level = load_policy(policy_name, env, execution, inference_steps)
        policy = wrap_policy(planner, low_level, env, checkpoint=planner_checkpoint, **(planner_options or {}))
        results, video_paths = [], []
        start = time.perf_counter()
        bar = tqdm(range(episodes), desc=f"eval {policy_name} {task}/{robot}", disable=not progress, unit="ep")
        for i in bar:
            record_video = video_dir is not None and i < videos
            record, frames = run_episode(env, policy, seed_start + i, record_video)
            results.append(record)
            if record_video:
                name = f"{task}-{robot}-seed{record['seed']}-{'success' if record['success'] else 'fail'}.mp4"
                video_paths.append(str(write_mp4(frames, Path(video_dir) / name, env.control_hz)))
            bar.set_postfix(success=f"{sum(r['success'] for r in results)}/{len(results)}")
    finally:
        env.close()
    successes = sum(r["success"] for r in results)
    low, high = wilson_interval(successes, episodes)
    return {
        "policy": policy_name,
        "planner": planner,
        "planner_options": planner_options or {},
        "execution": execution if policy_name != "expert" else None,
        "inference_steps": getattr(low_level, "num_steps", None),
        "planner_summary": policy.summary() if hasattr(policy, "summary") else None,
        "task": task,
        "robot": robot,
        "instruction_override": instruction,
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / episodes,
        "wilson_95": [round(low, 4), round(high, 4)],
        "seed_start": seed_start,
        "mean_steps": float(np.mean([r["steps"] for r in results])),
        "mean_action_jerk": round(float(np.mean([r["action_jerk"] for r in results])), 5),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "videos": video_paths,
        "per_episode": results,
    }
