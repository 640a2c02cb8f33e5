"""The Gymnasium tasks: spaces, seeding, randomisation, bounded actions and the success detectors."""

from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest

import vla_stack.sim  # noqa: F401  (registers the envs)
from vla_stack.errors import UnknownNameError
from vla_stack.sim.env import TabletopEnv, env_id
from vla_stack.sim.robots import ROBOTS, TABLE_Z
from vla_stack.sim.tasks import FAMILIES, generate


@pytest.fixture(scope="module", params=list(ROBOTS))
def place_env(request):
    env = gym.make(env_id("place", request.param), image_size=64)
    yield env
    env.close()


def test_every_family_and_robot_is_registered():
    for task in FAMILIES:
        for robot in ROBOTS:
            assert env_id(task, robot) in gym.registry


def test_observation_matches_space_and_carries_language(place_env):
    obs, info = place_env.reset(seed=3)
    assert place_env.observation_space.contains(obs)
    assert set(obs["images"]) == {"front", "wrist"}
    assert obs["images"]["front"].shape == (64, 64, 3) and obs["images"]["front"].std() > 5
    assert "cube" in obs["instruction"] and "bowl" in obs["instruction"]
    assert info["subtasks"][0].startswith("pick up the") and len(info["subtasks"]) == 2
    robot = place_env.unwrapped.robot
    assert obs["state"].shape == (robot.action_dim,)


def test_reset_is_deterministic_per_seed_and_randomised_across_seeds(place_env):
    env = place_env.unwrapped
    obs_a, _ = place_env.reset(seed=11)
    pose_a, light_a, mat_a = env.sim.cube_pos(0), env.sim.model.light_pos.copy(), env.sim.model.geom_matid.copy()
    obs_b, _ = place_env.reset(seed=11)
    np.testing.assert_array_equal(obs_a["images"]["front"], obs_b["images"]["front"])
    np.testing.assert_allclose(pose_a, env.sim.cube_pos(0))
    differs = {"pose": 0, "light": 0, "table": 0, "colour": 0, "instruction": 0}
    for seed in range(12, 24):
        obs, _ = place_env.reset(seed=seed)
        differs["pose"] += not np.allclose(pose_a, env.sim.cube_pos(0))
        differs["light"] += not np.allclose(light_a, env.sim.model.light_pos)
        differs["table"] += not np.array_equal(mat_a, env.sim.model.geom_matid)
        differs["colour"] += env.task.cubes[0].color != generate("place", env.robot, 11).cubes[0].color
        differs["instruction"] += obs["instruction"] != obs_a["instruction"]
    assert all(count >= 6 for count in differs.values()), differs


def test_restoring_a_snapshot_replays_the_same_future(place_env):
    """Branched rollouts try several futures from one saved state: each must start from exactly that state."""
    env = place_env.unwrapped
    obs, _ = place_env.reset(seed=5)
    rng = np.random.default_rng(0)
    home = obs["state"]
    actions = [np.append(home[:-1] + rng.normal(0, 0.1, len(home) - 1), t > 12).astype(np.float32) for t in range(24)]
    for a in actions[:8]:
        place_env.step(a)
    snap = env.snapshot()
    futures = []
    for blind in (False, True):
        env.restore(snap)
        for a in actions[8:]:
            if blind:
                env.step_unobserved(a)
            else:
                place_env.step(a)
        futures.append((env.observation(), env.steps, env.sim.cube_pos(0)))
    env.restore(snap)
    assert env.steps == 8
    (obs_a, steps_a, cube_a), (obs_b, steps_b, cube_b) = futures
    assert steps_a == steps_b == 24
    np.testing.assert_array_equal(obs_a["state"], obs_b["state"])
    np.testing.assert_array_equal(obs_a["images"]["front"], obs_b["images"]["front"])
    np.testing.assert_array_equal(cube_a, cube_b)
    place_env.reset(seed=6)
    with pytest.raises(RuntimeError, match="only into the episode"):
        env.restore(snap)


def test_out_of_range_actions_are_clipped_and_counted(place_env):
    env = place_env.unwrapped
    place_env.reset(seed=0)
    huge = np.full(env.robot.action_dim, 1e6, dtype=np.float32)
    for _ in range(3):
        obs, *_ , info = place_env.step(huge)
    assert info["clipped_actions"] == 3
    q = env.sim.arm_qpos()
    assert np.all(q <= env.sim.joint_limits[:, 1] + 0.05)
    assert np.all(np.isfinite(obs["state"]))


def test_non_finite_actions_hold_the_previous_target_and_are_counted(place_env):
    env = place_env.unwrapped
    obs, _ = place_env.reset(seed=0)
    hold = obs["state"].copy()
    place_env.step(hold)
    bad = hold.copy()
    bad[0] = np.nan
    for _ in range(5):
        obs, *_, info = place_env.step(bad)
    assert info["non_finite_actions"] == 5
    assert env.sim.physics_ok()
    np.testing.assert_allclose(obs["state"][:-1], hold[:-1], atol=0.02)


def test_wrong_action_length_is_a_clear_error(place_env):
    place_env.reset(seed=0)
    with pytest.raises(ValueError, match="must have"):
        place_env.step(np.zeros(3, dtype=np.float32))


def test_unknown_names_are_clear_errors():
    with pytest.raises(UnknownNameError, match="unknown task 'juggle'"):
        TabletopEnv("juggle", "panda")
    with pytest.raises(UnknownNameError, match="unknown robot 'ur5'"):
        TabletopEnv("pick", "ur5")
    with pytest.raises(UnknownNameError, match="unknown camera"):
        TabletopEnv("pick", "panda", cameras=("top",))


def _teleport_cube(sim, i, xyz):
    adr = sim.model.jnt_qposadr[sim.model.joint(f"cube{i}_joint").id]
    sim.data.qpos[adr:adr + 3] = xyz
    sim.data.qpos[adr + 3:adr + 7] = (1, 0, 0, 0)
    sim.data.qvel[:] = 0
    sim.step(200)


@pytest.mark.parametrize("robot", list(ROBOTS))
def test_success_detectors_follow_the_physical_state(robot):
    env = TabletopEnv("place", robot, cameras=())
    env.reset(seed=1)
    sim, goal = env.sim, env.task.subtasks[-1].goal
    assert not sim.goal_reached(goal)
    bowl = sim.receptacle_pos(goal.target)
    _teleport_cube(sim, goal.cube, (bowl[0], bowl[1], TABLE_Z + 0.01 + env.robot.cube_half))
    assert sim.goal_reached(goal)
    _teleport_cube(sim, goal.cube, (bowl[0], bowl[1] + 3 * env.robot.receptacle_half, TABLE_Z + env.robot.cube_half))
    assert not sim.goal_reached(goal)
    env.close()

    env = TabletopEnv("stack", robot, cameras=())
    env.reset(seed=2)
    sim, goal = env.sim, env.task.subtasks[-1].goal
    below = sim.cube_pos(goal.target)
    _teleport_cube(sim, goal.cube, (below[0], below[1], below[2] + 2 * env.robot.cube_half + 0.002))
    assert sim.goal_reached(goal)
    env.close()


@pytest.mark.parametrize("robot", list(ROBOTS))
def test_place_centre_needs_the_cube_near_the_bowl_centre(robot):
    env = TabletopEnv("place_centre", robot, cameras=())
    env.reset(seed=5)
    sim, goal = env.sim, env.task.subtasks[-1].goal
    assert goal.kind == "centre" and "centre" in env.task.subtasks[-1].text
    bowl, half = sim.receptacle_pos(goal.target), env.robot.cube_half
    _teleport_cube(sim, goal.cube, (bowl[0] + 0.3 * half, bowl[1], TABLE_Z + 0.004 + half))
    assert sim.goal_reached(goal)
    # inside the bowl (place's goal holds there) but a cube's half-width off the centre
    _teleport_cube(sim, goal.cube, (bowl[0] + half, bowl[1], TABLE_Z + 0.004 + half))
    assert sim.goal_reached(replace(goal, kind="in")) and not sim.goal_reached(goal)
    env.close()


def test_sort_counts_cubes_sorted_out_of_order():
    env = TabletopEnv("sort", "panda", cameras=())
    env.reset(seed=3)
    sim, last = env.sim, env.task.subtasks[-1].goal
    bin_xy = sim.receptacle_pos(last.target)
    _teleport_cube(sim, last.cube, (bin_xy[0], bin_xy[1], TABLE_Z + 0.01 + env.robot.cube_half))
    env.step(np.append(sim.joint_state()[:-1], 0.0))
    assert sim.goal_reached(last)
    assert env.subtask_index == 0  # the in-order count waits for the first cube
    assert env.completed_subtasks() == {len(env.task.subtasks) - 1}
    env.close()


def test_restore_needs_the_original_position():
    env = TabletopEnv("restore", "panda", cameras=())
    env.reset(seed=4)
    sim, (_, put_back) = env.sim, env.task.subtasks
    start = sim.cube_pos(0)
    assert put_back.goal.kind == "at" and np.allclose(put_back.goal.xy, start[:2], atol=0.01)
    assert sim.goal_reached(put_back.goal)  # trivially true before moving, which is why subtasks are ordered
    assert not env.success()
    env.close()
