"""The safety layer: malformed commands are rejected and counted, everything else is clamped so that no joint
ever leaves its position, velocity or acceleration limits, the grasp site stays in the workspace, the e-stop
latches and the watchdog reports stale inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_stack.safety import CommandRejected, SafetyFilter, SafetyLimits, Watchdog, Workspace
from vla_stack.sim.robots import ROBOTS, TABLE_Z

LIMITS = {name: SafetyLimits.arm(name) for name in ROBOTS}
TOL = 1e-9


def check_trajectory(limits: SafetyLimits, times, positions, q0, v0, first_accel: bool) -> None:
    low, high = limits.position[:, 0], limits.position[:, 1]
    assert np.all(positions >= low - TOL) and np.all(positions <= high + TOL)
    t = np.concatenate([[0.0], times])
    q = np.vstack([np.clip(q0, low, high), positions])
    v = np.diff(q, axis=0) / np.diff(t)[:, None]
    assert np.all(np.abs(v) <= limits.velocity * (1 + 1e-9) + TOL)
    dv = np.diff(np.vstack([v0, v]), axis=0)
    bound = limits.acceleration * np.diff(t)[:, None] * (1 + 1e-9) + TOL
    checked = dv if first_accel else dv[1:]
    assert np.all(np.abs(checked) <= (bound if first_accel else bound[1:]))
    # From the last point, braking at the acceleration limit stays inside the position limits.
    stop = positions[-1] + v[-1] * np.abs(v[-1]) / (2 * limits.acceleration)
    assert np.all(stop >= low - 1e-6) and np.all(stop <= high + 1e-6)


@settings(max_examples=5_000, deadline=None, derandomize=True)
@given(robot=st.sampled_from(sorted(ROBOTS)), seed=st.integers(0, 2**32 - 1), points=st.integers(1, 10),
       dt=st.floats(0.002, 0.5), reach=st.floats(0.0, 4.0), moving=st.booleans(), shuffle=st.booleans())
def test_random_commands_never_violate_limits(robot, seed, points, dt, reach, moving, shuffle):
    """5,000 examples x 2 robots' worth of random commands (hypothesis picks the shape, NumPy the values):
    targets far outside the limits, huge jumps, tiny and large time steps, arbitrary joint order."""
    for variant in range(2):  # two commands per example: 10,000 in all
        rng = np.random.default_rng([seed, variant])
        limits = LIMITS[robot]
        low, high = limits.position[:, 0], limits.position[:, 1]
        n = len(low)
        q0 = rng.uniform(low, high)
        v0 = rng.uniform(-1, 1, n) * limits.velocity if moving else np.zeros(n)
        span = (high - low) * reach
        targets = rng.uniform(low - span, high + span, (points, n))
        times = np.cumsum(rng.uniform(0.2, 1.8, points) * dt)
        names = list(limits.joint_names)
        order = rng.permutation(n) if shuffle else np.arange(n)
        safety = SafetyFilter(limits)
        safe = safety.filter([names[i] for i in order], times, targets[:, order], q0, v0)
        assert safe.joint_names == limits.joint_names
        np.testing.assert_allclose(safe.times, times)
        first = safety.counters["start_state_unstoppable"] == 0
        assert first or moving  # from rest inside the limits the first segment is always feasible
        check_trajectory(limits, safe.times, safe.positions, q0, v0, first_accel=first)


@pytest.fixture(scope="module")
def panda():
    return SafetyFilter(LIMITS["panda"], Workspace("panda"))


HOME = np.array(ROBOTS["panda"].home_qpos)
NAMES = list(ROBOTS["panda"].arm_joints)


@pytest.mark.parametrize("names, times, positions, reason", [
    (NAMES, [0.1], [[np.nan] * 7], "non_finite"),
    (NAMES, [np.inf], [HOME], "non_finite"),
    (NAMES, [0.1], [HOME[:6]], "wrong_length"),
    (NAMES, [0.1, 0.2], [HOME], "wrong_length"),
    ([*NAMES[:6], "elbow_flex"], [0.1], [HOME], "unknown_joint"),
    (NAMES[:6], [0.1], [HOME[:6]], "missing_joint"),
    ([*NAMES[:6], NAMES[0]], [0.1], [HOME], "duplicate_joint"),
    (NAMES, [0.2, 0.1], [HOME, HOME], "bad_time"),
    (NAMES, [0.0], [HOME], "bad_time"),
    (NAMES, [], [], "empty"),
])
def test_malformed_commands_are_rejected_and_counted(panda, names, times, positions, reason):
    before = panda.snapshot().get(f"rejected_{reason}", 0)
    with pytest.raises(CommandRejected) as info:
        panda.filter(names, times, positions, HOME)
    assert info.value.reason == reason and str(info.value).startswith(reason)
    assert panda.snapshot()[f"rejected_{reason}"] == before + 1


def test_joint_order_does_not_matter(panda):
    target = HOME + 0.01
    order = np.arange(7)[::-1]
    a = panda.filter(NAMES, [0.1], [target], HOME)
    b = panda.filter([NAMES[i] for i in order], [0.1], [target[order]], HOME)
    np.testing.assert_array_equal(a.positions, b.positions)


def test_workspace_rejects_below_table_and_cuts_trajectories(panda):
    workspace = panda.workspace
    from vla_stack.control.ik import GraspIK, down_rotation

    ik = GraspIK(ROBOTS["panda"])
    above = ik.solve(HOME, np.array([0.1, 0.0, TABLE_Z + 0.05]), down_rotation(0.0), iterations=80)
    below = ik.solve(above, np.array([0.1, 0.0, TABLE_Z - 0.05]), down_rotation(0.0), iterations=80)
    assert workspace.violation(above) is None and "table" in workspace.violation(below)
    with pytest.raises(CommandRejected, match="workspace"):
        panda.filter(NAMES, [5.0], [below], above)
    safe = panda.filter(NAMES, [5.0, 10.0], [above, below], above)
    assert len(safe.times) == 1 and panda.snapshot()["truncated_workspace"] >= 1


def test_estop_latches_until_reset():
    safety = SafetyFilter(LIMITS["so101"])
    q = np.zeros(5)
    safety.estop()
    for _ in range(2):
        with pytest.raises(CommandRejected, match="estop"):
            safety.filter(LIMITS["so101"].joint_names, [0.1], [q], q)
    safety.reset_estop()
    safety.filter(LIMITS["so101"].joint_names, [0.1], [q], q)
    assert safety.snapshot()["rejected_estop"] == 2 and safety.snapshot()["accepted"] == 1


def test_watchdog_reports_missing_and_stale_inputs():
    dog = Watchdog(["front image", "joint_states"], max_age=0.2)
    assert dog.stale(0.0) == ["no front image received yet", "no joint_states received yet"]
    dog.feed("front image", 10.0)
    dog.feed("joint_states", 10.1)
    assert dog.stale(10.15) == []
    assert dog.stale(10.25) == ["front image is 0.250 s old (limit 0.200 s)"]
    assert dog.expires() == pytest.approx(10.2)
    with pytest.raises(KeyError):
        dog.feed("wrist image", 1.0)
