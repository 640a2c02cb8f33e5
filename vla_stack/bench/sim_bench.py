"""Simulation and recording throughput on this machine."""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from vla_stack.bench import cpu_model
from vla_stack.data.collect import store_features
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import ROBOTS
from vla_stack.sim.tabletop import CAMERAS
from vla_stack.sim.tasks import FAMILIES


def _rate(fn, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        count += 1
    return count / elapsed


def _bench_scene(robot: str, task: str, seconds: float, image_size: int) -> dict:
    env = TabletopEnv(task, robot, image_size=image_size)
    try:
        env.reset(seed=0)
        sim = env.sim
        hold = sim.joint_state()
        physics = _rate(lambda: sim.step(1), seconds)
        frames = _rate(lambda: [sim.render(c) for c in CAMERAS], seconds) * len(CAMERAS)
        control = _rate(lambda: env.step(hold), seconds)
        return {"robot": robot, "task": task, "physics_steps_per_s": physics, "rendered_frames_per_s": frames,
                "control_steps_per_s_with_images": control, "timestep_s": sim.model.opt.timestep,
                "substeps_per_control_step": sim.substeps}
    finally:
        env.close()


def _bench_recording(image_size: int, frames: int = 300) -> dict:
    env = TabletopEnv("place", "panda", image_size=image_size)
    try:
        obs, info = env.reset(seed=0)
        pool = [env.step(obs["state"])[0] for _ in range(8)]  # distinct real frames, rendered up front
        features = store_features(env)
    finally:
        env.close()
    with tempfile.TemporaryDirectory() as tmp:
        store = EpisodeStore.open_or_create(Path(tmp) / "bench.zarr", robot="panda", fps=10, features=features)
        start = time.perf_counter()
        with store.begin_episode(instruction="bench", subtasks=["bench"], task="place", seed=0) as writer:
            for i in range(frames):
                o = pool[i % len(pool)]
                frame = {f"images.{c}": o["images"][c] for c in CAMERAS}
                frame.update(state=o["state"], action=o["state"], subtask_index=np.int64(0))
                writer.add_frame(frame)
            index = writer.commit(success=True)
        elapsed = time.perf_counter() - start
        written = len(store.read_episode(index)["action"])
    return {"frames_fed": frames, "frames_written": written, "dropped_frames": frames - written,
            "frames_per_s": frames / elapsed, "cameras": len(CAMERAS), "image_size": image_size}


def run_sim_benchmark(seconds: float = 3.0, image_size: int = 128) -> dict:
    scenes = [_bench_scene(robot, task, seconds, image_size) for robot in ROBOTS for task in FAMILIES]
    return {"machine": {"processor": cpu_model(), "python": platform.python_version()},
            "image_size": image_size, "scenes": scenes, "recording": _bench_recording(image_size)}
