"""joint_trajectory_controller semantics of the sim's trajectory follower: joints by name in any order, all
joints required, linear interpolation from the current state over time_from_start, replacement, empty = hold."""

import numpy as np
import pytest

from vla_stack.ros.trajectory import TrajectoryFollower


def test_interpolates_from_current_state_in_any_joint_order():
    f = TrajectoryFollower(["a", "b"], np.zeros(2))
    f.command(["b", "a"], [1.0, 2.0], [[2.0, 1.0], [4.0, 3.0]], start=10.0, current=np.zeros(2))
    np.testing.assert_allclose(f.sample(10.0), [0, 0])
    np.testing.assert_allclose(f.sample(10.5), [0.5, 1.0])
    np.testing.assert_allclose(f.sample(11.5), [2.0, 3.0])
    np.testing.assert_allclose(f.sample(99.0), [3.0, 4.0])  # holds the last point


def test_new_goal_replaces_and_empty_goal_holds():
    f = TrajectoryFollower(["a"], np.zeros(1))
    f.command(["a"], [1.0], [[1.0]], start=0.0, current=np.zeros(1))
    f.command(["a"], [1.0], [[-1.0]], start=0.5, current=np.array([0.5]))
    np.testing.assert_allclose(f.sample(1.0), [-0.25])
    f.command([], [], [], start=1.0, current=np.array([0.3]))
    np.testing.assert_allclose(f.sample(5.0), [0.3])


@pytest.mark.parametrize("names, times, positions", [
    (["a"], [1.0], [[1.0]]),  # joint b missing
    (["a", "c"], [1.0], [[1.0, 1.0]]),  # unknown joint
    (["a", "b"], [1.0], [[1.0]]),  # wrong length
    (["a", "b"], [1.0], [[np.nan, 1.0]]),
    (["a", "b"], [1.0, 0.5], [[1.0, 1.0], [1.0, 1.0]]),
])
def test_malformed_goal_is_refused_and_previous_kept(names, times, positions):
    f = TrajectoryFollower(["a", "b"], np.array([0.2, 0.4]))
    with pytest.raises(ValueError):
        f.command(names, times, positions, start=0.0, current=np.zeros(2))
    np.testing.assert_allclose(f.sample(3.0), [0.2, 0.4])

