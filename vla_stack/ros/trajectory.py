"""Joint trajectory following with ros2_control joint_trajectory_controller semantics, without ROS types, so the
sim node and its tests share it: joints matched by name in any order, all controller joints required, linear
interpolation over time_from_start starting from the state at the moment the goal arrives, a new goal replaces
the current one, an empty goal holds the current position."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np


class TrajectoryFollower:
    def __init__(self, joint_names: Sequence[str], initial: np.ndarray):
        self.joint_names = tuple(joint_names)
        self._lock = threading.Lock()
        self.hold(initial)

    def hold(self, position: np.ndarray) -> None:
        """Stay at `position` (what an empty trajectory does)."""
        with self._lock:
            self._times = np.zeros(1)
            self._points = np.asarray(position, float).reshape(1, -1).copy()

    def command(self, names: Sequence[str], times: Sequence[float], positions: Sequence[Sequence[float]],
                start: float, current: np.ndarray) -> None:
        """Replace the goal; `start` is when time_from_start counts from. Raises ValueError (one line) when the
        message is malformed, keeping the previous goal."""
        names = list(names)
        if not names and not len(times):
            self.hold(current)
            return
        if sorted(names) != sorted(self.joint_names):
            raise ValueError(f"joint names {names} do not match the controller's {list(self.joint_names)}")
        rows = [np.asarray(p, float).reshape(-1) for p in positions]
        if not rows or any(len(r) != len(names) for r in rows) or len(rows) != len(times):
            raise ValueError(f"every point needs {len(names)} positions")
        t = np.asarray(times, float)
        q = np.stack(rows)
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))):
            raise ValueError("positions or time stamps are not finite")
        if np.any(np.diff(t) <= 0) or t[0] < 0:
            raise ValueError("time_from_start must be non-negative and strictly increasing")
        order = [names.index(n) for n in self.joint_names]
        with self._lock:
            self._times = np.concatenate([[start], start + t])
            self._points = np.vstack([np.asarray(current, float).reshape(1, -1), q[:, order]])

    def sample(self, now: float) -> np.ndarray:
        """Interpolated setpoint at time `now`."""
        with self._lock:
            times, points = self._times, self._points
        if now <= times[0]:
            return points[0].copy()
        if now >= times[-1]:
            return points[-1].copy()
        k = int(np.searchsorted(times, now, side="right")) - 1
        w = (now - times[k]) / (times[k + 1] - times[k])
        return points[k] + w * (points[k + 1] - points[k])

    @property
    def finished_at(self) -> float:
        return float(self._times[-1])
