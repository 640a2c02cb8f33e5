"""Recording past success: the release the success detector cuts short is in the demo."""

import numpy as np
import pytest

from vla_stack.data.collect import collect
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError

SEED = 610000


def test_tail_records_the_gripper_opening_fully_after_success(tmp_path):
    cut = collect("place", "so101", 1, tmp_path / "cut.zarr", seed_start=SEED, image_size=32, progress=False)
    tail = collect("place", "so101", 1, tmp_path / "tail.zarr", seed_start=SEED, image_size=32, progress=False,
                   tail_steps=12)
    assert cut["saved"] == tail["saved"] == 1
    a, b = EpisodeStore.open(tmp_path / "cut.zarr"), EpisodeStore.open(tmp_path / "tail.zarr")
    ma, mb = a.episode_meta(0), b.episode_meta(0)
    assert ma.success and mb.success
    assert ma.extra["success_step"] == ma.length  # the demo ends the step the detector fires
    assert mb.extra["success_step"] == ma.length and mb.length == ma.length + 12
    ea, eb = a.read_episode(0, ["state", "action"]), b.read_episode(0, ["state", "action"])
    np.testing.assert_array_equal(eb["action"][: ma.length], ea["action"])  # same demo up to success
    # Without the tail the open command shows on the last frame only; with it the jaw is seen opening fully.
    assert ea["action"][-1, -1] < 0.5 < ea["action"][-2, -1] and ea["state"][-1, -1] > 0.2
    assert (eb["action"][ma.length:, -1] < 0.5).all() and eb["state"][-1, -1] < 0.05


def test_negative_tail_is_refused(tmp_path):
    with pytest.raises(VlaStackError, match="tail-steps"):
        collect("place", "so101", 1, tmp_path / "x.zarr", tail_steps=-1, progress=False)


def test_paused_hand_off_keeps_the_finished_subtask_as_instruction_until_the_next_is_due(tmp_path):
    from vla_stack.data.collect import SubtaskHandOff
    from vla_stack.sim.env import TabletopEnv

    env = TabletopEnv("restore", "panda", image_size=32, cameras=())
    try:
        env.reset(seed=SEED)
        handoff = SubtaskHandOff(env, pause_steps=15)
        handoff.reset(SEED)
        finished_at, handed_at = None, None
        for _ in range(env.max_steps):
            index = handoff.subtask_index()
            assert handoff.expert.instruction == env.task.subtasks[index].text
            if env.subtask_index == 1 and finished_at is None:
                finished_at = env.steps
            if index == 1 and handed_at is None:
                handed_at = env.steps
            _, _, terminated, _, _ = env.step(handoff.expert.select_action())
            if terminated:
                break
        assert terminated and finished_at is not None
        assert 0 <= handed_at - finished_at <= 15
    finally:
        env.close()
    result = collect("restore", "panda", 1, tmp_path / "p.zarr", seed_start=SEED, image_size=32, progress=False,
                     pause_steps=15)
    meta = EpisodeStore.open(tmp_path / "p.zarr").episode_meta(0)
    assert result["saved"] == 1 and meta.extra["executor"] == "subtask" and meta.extra["pause_steps"] == 15
    with pytest.raises(VlaStackError, match="pause-steps"):
        collect("restore", "panda", 1, tmp_path / "x.zarr", pause_steps=-1, progress=False)
