"""DART collection: the arm is pushed off the expert's path in free space, the store keeps the clean targets."""

import numpy as np
import pytest

from vla_stack.data.collect import ArmDisturbance, collect
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.policy.scripted import ScriptedExpert
from vla_stack.sim.env import TabletopEnv

SEED = 600000


def test_disturbance_is_held_and_off_near_the_cubes():
    env = TabletopEnv("pick", "so101", image_size=32)
    try:
        obs, _ = env.reset(seed=SEED)
        expert = ScriptedExpert(env)
        expert.reset(seed=SEED)
        disturb = ArmDisturbance(0.03, seed=SEED, hold=4)
        offsets, free = [], []
        opened = None
        while len(offsets) < 80:  # until the jaw closes: the cubes on the table are then the highest free ones
            action = expert.select_action(obs)
            opened = action[-1] if opened is None else opened
            if action[-1] != opened:
                break
            cube_top = env.sim.cube_pos(0)[2] + env.sim.robot.cube_half
            free.append(env.sim.grasp_pose()[0][2] >= cube_top + 0.5 * env.sim.robot.hover)
            executed = disturb(env, action)
            offsets.append(executed[:-1] - action[:-1])
            assert executed[-1] == action[-1]  # the gripper command is never disturbed
            obs, *_ = env.step(executed)
    finally:
        env.close()
    offsets, free = np.asarray(offsets), np.asarray(free)
    assert free.any() and (~free).any()  # the episode went from hovering to the grasp
    assert np.all(offsets[~free] == 0)
    assert np.all(np.abs(offsets[free]).max(axis=1) > 0)
    held = [i for i in range(1, len(free)) if free[i] and free[i - 1] and i % 4 != 0]
    assert held and all(np.allclose(offsets[i], offsets[i - 1]) for i in held)
    assert 0.01 < offsets[free].std() < 0.06


def test_disturbed_collection_records_the_clean_expert_targets(tmp_path):
    clean = collect("pick", "so101", 1, tmp_path / "clean.zarr", seed_start=SEED, image_size=32, progress=False)
    noisy = collect("pick", "so101", 1, tmp_path / "noisy.zarr", seed_start=SEED, image_size=32, progress=False,
                    arm_noise=0.03)
    assert clean["saved"] == noisy["saved"] == 1
    a, b = EpisodeStore.open(tmp_path / "clean.zarr"), EpisodeStore.open(tmp_path / "noisy.zarr")
    ea, eb = a.read_episode(0, ["state", "action"]), b.read_episode(0, ["state", "action"])
    assert b.episode_meta(0).extra["arm_noise"] == 0.03 and a.episode_meta(0).extra["arm_noise"] == 0.0
    # The arm went elsewhere ...
    n = min(len(ea["state"]), len(eb["state"]))
    assert np.abs(ea["state"][:n] - eb["state"][:n]).max() > 0.02
    # ... but every recorded target is one of the undisturbed expert's (it waits longer, on the same path).
    clean_targets = ea["action"]
    nearest = np.abs(eb["action"][:, None, :] - clean_targets[None]).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-5


def test_bad_arm_noise_is_refused(tmp_path):
    with pytest.raises(VlaStackError, match="arm-noise"):
        collect("pick", "so101", 1, tmp_path / "x.zarr", arm_noise=-0.1, progress=False)
    assert not (tmp_path / "x.zarr").exists()
