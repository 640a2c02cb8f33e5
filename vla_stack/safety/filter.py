"""Command filtering: reject what cannot be interpreted, clamp what is merely too fast or too far.

A command is a joint trajectory in ros2_control's sense: joint names in any order, points with positions and a
time from start, interpolated linearly from the current state. Malformed commands (non-finite values, wrong
lengths, unknown or missing joints, non-increasing times) are rejected whole. Well-formed ones are clamped point
by point so that, over their time stamps, every joint stays inside its position limits, below its velocity limit,
changes velocity no faster than its acceleration limit, and keeps enough room to brake before a position limit.
The grasp site must stay inside the workspace: a trajectory is cut before its first point outside.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vla_stack.safety.limits import SafetyLimits, Workspace


class CommandRejected(ValueError):
    """A command the safety layer refused; `reason` is the counter it was counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class SafeTrajectory:
    """Filtered command, joints in SafetyLimits order: times (k,) seconds from start, positions (k, n)."""

    joint_names: tuple[str, ...]
    times: np.ndarray
    positions: np.ndarray


def _braking_speed(distance: np.ndarray, accel: np.ndarray, dt: float) -> np.ndarray:
    """Largest speed towards a limit `distance` away such that, after moving at it for dt, braking at `accel`
    still stops in time: v dt + v^2 / (2a) <= distance. Once true it stays satisfiable for any later time step
    (slowing by a*dt keeps it), so a trajectory that starts stoppable never has to break a limit."""
    distance = np.maximum(distance, 0.0)
    with np.errstate(invalid="ignore"):
        speed = accel * (-dt + np.sqrt(dt * dt + 2 * distance / accel))
    return np.where(np.isinf(accel), distance / dt, speed)


class SafetyFilter:
    """Thread-safe: the ROS nodes call it from worker threads and services at once."""

    def __init__(self, limits: SafetyLimits, workspace: Workspace | None = None):
        self.limits = limits
        self.workspace = workspace
        self.counters: Counter[str] = Counter()
        self._index = {name: i for i, name in enumerate(limits.joint_names)}
        self._estop_reason: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- e-stop
    def estop(self, reason: str = "e-stop requested") -> None:
        """Latch: every command is refused until reset_estop()."""
        with self._lock:
            self._estop_reason = reason
            self.counters["estop_engaged"] += 1

    def reset_estop(self) -> None:
        with self._lock:
            self._estop_reason = None

    @property
    def estopped(self) -> str | None:
        return self._estop_reason

    def count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    # ------------------------------------------------------------------------------------------- filtering
    def filter(self, joint_names: Sequence[str], times: Sequence[float], positions: Sequence[Sequence[float]],
               q_now: np.ndarray | None, v_now: np.ndarray | None = None) -> SafeTrajectory:
        """The safe version of a command starting from the measured state (q_now, v_now), or CommandRejected.
        The command is checked before the state, so a malformed one is counted as such even without a state."""
        with self._lock:
            try:
                names, t, q = self._validate(joint_names, times, positions)
                if q_now is None:
                    raise CommandRejected("no_state", "no fresh measured joint state to start from")
                return self._clamp(names, t, q, np.asarray(q_now, float), v_now)
            except CommandRejected as exc:
                self.counters[f"rejected_{exc.reason}"] += 1
                raise

    def _validate(self, joint_names, times, positions) -> tuple[list[str], np.ndarray, np.ndarray]:
        if self._estop_reason is not None:
            raise CommandRejected("estop", f"e-stop is latched ({self._estop_reason}); call reset first")
        names = list(joint_names)
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise CommandRejected("unknown_joint", f"unknown joint(s) {unknown}; expected {list(self.limits.joint_names)}")
        if len(set(names)) != len(names):
            raise CommandRejected("duplicate_joint", f"joint names repeat: {names}")
        missing = [n for n in self.limits.joint_names if n not in names]
        if missing:
            raise CommandRejected("missing_joint", f"all controller joints are required; missing {missing}")
        t = np.asarray(times, dtype=float).reshape(-1)
        if len(t) == 0:
            raise CommandRejected("empty", "trajectory has no points")
        rows = [np.asarray(p, dtype=float).reshape(-1) for p in positions]
        if len(rows) != len(t) or any(len(r) != len(names) for r in rows):
            lengths = sorted({len(r) for r in rows})
            raise CommandRejected("wrong_length", f"{len(rows)} points with {lengths} positions for {len(names)} joints "
                                                  f"and {len(t)} time stamps")
        q = np.stack(rows)
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))):
            raise CommandRejected("non_finite", "positions or time stamps contain NaN or infinity")
        if t[0] <= 0 or np.any(np.diff(t) <= 0):
            raise CommandRejected("bad_time", "time_from_start must be positive and strictly increasing")
        order = [names.index(n) for n in self.limits.joint_names]
        return names, t, q[:, order]

    def _clamp(self, names, t: np.ndarray, q_cmd: np.ndarray, q_now: np.ndarray, v_now) -> SafeTrajectory:
        lim = self.limits
        low, high = lim.position[:, 0], lim.position[:, 1]
        vmax, amax = lim.velocity, lim.acceleration
        if q_now.shape != (len(lim.joint_names),) or not np.all(np.isfinite(q_now)):
            raise CommandRejected("bad_state", "no valid measured joint state to start the trajectory from")
        v_prev = np.zeros_like(q_now) if v_now is None else np.nan_to_num(np.asarray(v_now, float))
        if np.any(q_now < low - 1e-6) | np.any(q_now > high + 1e-6):
            self.counters["start_outside_limits"] += 1
        q_prev, t_prev = np.clip(q_now, low, high), 0.0
        out = np.empty_like(q_cmd)
        flags = set()
        for i, (ti, target) in enumerate(zip(t, q_cmd)):
            dt = ti - t_prev
            if np.any(target < low) or np.any(target > high):
                flags.add("position")
            wanted = (target - q_prev) / dt
            v_lo, v_hi = np.maximum(-vmax, v_prev - amax * dt), np.minimum(vmax, v_prev + amax * dt)
            b_hi, b_lo = _braking_speed(high - q_prev, amax, dt), -_braking_speed(q_prev - low, amax, dt)
            if np.any(v_lo > b_hi) or np.any(v_hi < b_lo):
                self.counters["start_state_unstoppable"] += 1  # measured motion already too fast for the limits
            v = np.clip(wanted, v_lo, v_hi)
            v = np.clip(v, b_lo, b_hi)
            if np.any(np.abs(wanted) > vmax + 1e-12):
                flags.add("velocity")
            elif np.any(np.abs(v - wanted) > 1e-12):
                flags.add("acceleration" if np.any((wanted < v_lo) | (wanted > v_hi)) else "position")
            q_prev, v_prev, t_prev = np.clip(q_prev + v * dt, low, high), v, ti
            out[i] = q_prev
        for flag in flags:
            self.counters[f"clamped_{flag}"] += 1
        if self.workspace is not None:
            for i, q in enumerate(out):
                why = self.workspace.violation(q)
                if why:
                    if i == 0:
                        raise CommandRejected("workspace", why)
                    self.counters["truncated_workspace"] += 1
                    t, out = t[:i], out[:i]
                    break
        self.counters["accepted"] += 1
        return SafeTrajectory(tuple(lim.joint_names), t.copy(), out)

    def snapshot(self) -> dict[str, int]:
        """Counters so far (sorted), with the e-stop state."""
        with self._lock:
            return dict(sorted(self.counters.items()))
