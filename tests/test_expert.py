"""The scripted expert solves every family on both arms (measured here on a few seeds; the 50-seed numbers
come from `vla-stack eval --policy expert`)."""

import pytest

from vla_stack.evaluation import evaluate
from vla_stack.sim.robots import ROBOTS
from vla_stack.sim.tasks import FAMILIES


@pytest.mark.parametrize("robot", list(ROBOTS))
@pytest.mark.parametrize("task", list(FAMILIES))
def test_expert_solves_family(task, robot):
    result = evaluate("expert", task, robot, episodes=4, seed_start=500_000, progress=False)
    assert result["successes"] >= 3, result["per_episode"]
    for episode in result["per_episode"]:
        assert episode["clipped_actions"] == 0 and episode["non_finite_actions"] == 0
        if episode["success"]:
            assert episode["subtasks_completed"] == episode["subtasks_total"]
