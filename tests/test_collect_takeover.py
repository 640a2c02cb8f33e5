"""Takeover collection (collect --learner): the learner's frames are context, the expert's are the labels."""

import numpy as np
import pytest

from vla_stack.data.collect import LearnerTakeover, SubtaskHandOff, collect
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.policy import SubtaskExpert
from vla_stack.policy.vla.dataset import ChunkDataset, load_store
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import TABLE_Z

from vla_helpers import tiny_config, tiny_normalizer

SEED = 620000


def test_expert_takes_over_a_carried_cube_without_dropping_it_and_finishes():
    """Taken over mid-carry, the expert keeps the gripper closed (a reset expert would open it) and completes
    the episode from the learner's state."""
    env = TabletopEnv("restore", "panda", image_size=32, cameras=())
    try:
        takeover = LearnerTakeover(env, SubtaskExpert(env))
        handoff = SubtaskHandOff(env, pause_steps=10, executor=takeover)
        env.reset(seed=SEED)
        handoff.reset(SEED)
        takeover.takeover_step = env.max_steps  # decided below, once the learner carries the cube
        cube = env.task.subtasks[0].goal.cube
        grips, terminated = [], False
        for _ in range(env.max_steps):
            handoff.subtask_index()
            carrying = env.sim.cube_touching_robot(cube) and env.sim.cube_pos(cube)[2] > TABLE_Z + 0.03
            if takeover.learning and carrying:
                takeover.takeover_step = env.steps
                grips.append(None)
            action = takeover.select_action({})
            if grips and len(grips) < 6:
                grips.append(float(action[-1]))
                assert env.sim.cube_touching_robot(cube)
            _, _, terminated, _, _ = env.step(action)
            if terminated:
                break
        assert not takeover.learning and grips[1:] and min(grips[1:]) > 0.5
        assert terminated and env.success()
    finally:
        env.close()


def test_takeover_episode_trains_only_on_the_frames_after_the_takeover(tmp_path):
    path = tmp_path / "takeover.zarr"
    result = collect("restore", "panda", 1, path, seed_start=SEED, image_size=64, progress=False, pause_steps=10,
                     learner="vla_mem_tiny")
    assert result["saved"] == 1
    assert result["attempts"] == 1 + result["expert_failures"] + result["learner_finished_alone"]
    store = EpisodeStore.open(path)
    meta = store.episode_meta(0)
    k = meta.extra["learner_steps"]
    assert meta.success and meta.extra["executor"] == "learner-takeover" and 1 <= k < meta.length
    episode, = load_store(path, ("front", "wrist"), 32)
    assert episode.learn_from == k
    data = ChunkDataset([episode], tiny_config(), tiny_normalizer())
    np.testing.assert_array_equal(data.trainable.numpy(), np.arange(k, meta.length))
    with pytest.raises(VlaStackError, match="--learner needs --pause-steps"):
        collect("restore", "panda", 1, tmp_path / "x.zarr", learner="vla_mem_tiny", progress=False)
