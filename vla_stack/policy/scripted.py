"""Scripted expert: privileged pick-and-place with inverse kinematics, used to generate demonstrations.

It reads object poses from the simulator (which a learned policy never sees), moves the grasp site through
approach / grasp / lift / carry / release waypoints at a bounded speed, and re-grasps when a cube slips, so
demonstrations also contain recoveries. Small per-episode randomisation (speed, heights, grasp offsets)
keeps the demos diverse.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vla_stack.control.ik import GraspIK, down_rotation, yaw_of
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import TABLE_Z
from vla_stack.sim.tasks import Goal

OPEN, CLOSED = 0.0, 1.0


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def _face_yaws(cube_yaw: float, reference: float) -> list[float]:
    """A cube can be grasped across either pair of faces, from either side: the options, least wrist turn first."""
    options = {round(reference + _wrap(cube_yaw + k * np.pi / 2 - reference), 9) for k in range(4)}
    return sorted(options, key=lambda y: abs(y - reference))


class ScriptedExpert:
    name = "expert"

    def __init__(self, env: TabletopEnv, seed: int | None = None, randomize: bool = True, max_attempts: int = 3):
        self.env = env.unwrapped if hasattr(env, "unwrapped") else env
        self.sim = self.env.sim
        self.robot = self.sim.robot
        self.ik = GraspIK(self.robot)
        self.randomize = randomize
        self.max_attempts = max_attempts
        self.rng = np.random.default_rng(seed)
        self.dt = 1.0 / self.env.control_hz
        self._script: Iterator[np.ndarray] | None = None

    # ------------------------------------------------------------------------------------------- interface
    def reset(self, seed: int | None = None) -> None:
        """Call after env.reset(). A seed makes the episode's randomisation reproducible."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        r = self.rng if self.randomize else None
        jitter = (lambda lo, hi: float(r.uniform(lo, hi))) if r is not None else (lambda lo, hi: (lo + hi) / 2)
        self.speed = self.robot.max_ee_speed * jitter(0.8, 1.15)
        self.hover = self.robot.hover * jitter(0.85, 1.15)
        self.grasp_offset = self.robot.cube_half * 0.1 * np.array([jitter(-1, 1), jitter(-1, 1)])
        self.q_cmd = self.sim.arm_qpos()
        self.p_cmd, rotation = self.sim.grasp_pose()
        self.yaw_cmd = yaw_of(rotation)
        self.grip = OPEN
        self._script = None

    def select_action(self, observation: dict | None = None) -> np.ndarray:
        if self._script is None:
            self._script = self._run()
        try:
            return next(self._script)
        except StopIteration:
            return self._action()

    # ------------------------------------------------------------------------------------------- motions
    def _action(self) -> np.ndarray:
        return np.append(self.q_cmd, self.grip).astype(np.float32)

    def _move(self, target: np.ndarray, yaw: float, tolerance: float = 0.004, timeout: float = 3.0):
        """Carry the commanded grasp pose to `target` at bounded speed; stop when the real site is there."""
        target = np.asarray(target, dtype=float)
        yaw = self.yaw_cmd + _wrap(yaw - self.yaw_cmd)
        max_step, max_turn = self.speed * self.dt, 2.0 * self.dt
        for _ in range(int(timeout / self.dt) + int(np.linalg.norm(target - self.p_cmd) / max_step)):
            delta = target - self.p_cmd
            self.p_cmd = self.p_cmd + delta * min(1.0, max_step / max(np.linalg.norm(delta), 1e-9))
            self.yaw_cmd += float(np.clip(yaw - self.yaw_cmd, -max_turn, max_turn))
            self.q_cmd = self.ik.solve(self.q_cmd, self.p_cmd, down_rotation(self.yaw_cmd))
            yield self._action()
            at_target = np.linalg.norm(self.p_cmd - target) < 1e-6 and abs(self.yaw_cmd - yaw) < 1e-6
            position, rotation = self.sim.grasp_pose()
            if at_target and np.linalg.norm(position - target) < tolerance and \
                    abs(_wrap(yaw_of(rotation) - yaw)) < 0.06:
                return

    def _gripper(self, command: float, seconds: float = 0.6):
        self.grip = command
        for _ in range(max(1, int(round(seconds / self.dt)))):
            yield self._action()

    def _holding(self, cube: int) -> bool:
        lifted = self.sim.cube_pos(cube)[2] > TABLE_Z + self.robot.cube_half + 0.01
        return self.grip == CLOSED and lifted and self.sim.cube_touching_robot(cube)

    def _clearance(self, cube: int, xy: np.ndarray, yaw: float) -> float:
        """Free space around the open fingertips for a grasp at (xy, yaw): neighbours must not be hit."""
        tips = [xy + x * np.array([np.cos(yaw), np.sin(yaw)]) for x in self.robot.fingertips_open]
        gaps = [np.inf]
        for other in range(self.sim.n_cubes):
            if other != cube:
                centre = self.sim.cube_pos(other)[:2]
                gaps += [np.linalg.norm(t - centre) - 1.42 * self.robot.cube_half for t in tips]
        ring = self.robot.receptacle_half + 0.004
        for j in range(self.sim.n_receptacles):
            centre = self.sim.receptacle_pos(j)[:2]
            if np.linalg.norm(xy - centre) > ring:  # from inside a bowl the low wall is unavoidable
                gaps += [abs(np.linalg.norm(t - centre) - ring) for t in tips]
        return float(min(gaps))

    def _grasp_yaw(self, cube: int, xy: np.ndarray, height: float) -> float:
        options = _face_yaws(self.sim.cube_yaw(cube), self.robot.neutral_yaw)
        feasible = [yaw for yaw in options
                    if self.ik.reachable(self.q_cmd, np.array([*xy, height]), down_rotation(yaw))]
        options = feasible or options
        for yaw in options:
            if self._clearance(cube, xy, yaw) > 0.012:
                return yaw
        return max(options, key=lambda yaw: self._clearance(cube, xy, yaw))

    def _pick(self, cube: int):
        half = self.robot.cube_half
        for _ in range(self.max_attempts):
            pos = self.sim.cube_pos(cube)
            top = pos[2] + half
            yaw = self._grasp_yaw(cube, pos[:2], top - self.robot.grasp_depth)
            xy = pos[:2] + self.grasp_offset
            yield from self._gripper(OPEN, 0.2)
            yield from self._move([*xy, top + self.hover], yaw, tolerance=0.01)
            yield from self._move([*xy, top - self.robot.grasp_depth], yaw)
            yield from self._gripper(CLOSED)
            yield from self._move([*xy, TABLE_Z + self.robot.carry_height], self.yaw_cmd, tolerance=0.01)
            if self._holding(cube):
                return True
        return False

    def _place(self, cube: int, centre: np.ndarray, yaw: float | None = None):
        """Lower the held cube so its centre ends at `centre` (plus a small drop), release, back off."""
        half = self.robot.cube_half
        site_above_centre = half - self.robot.grasp_depth
        yaw = self.yaw_cmd if yaw is None else yaw
        carry = TABLE_Z + self.robot.carry_height
        yield from self._move([*centre[:2], carry], yaw, tolerance=0.01)
        yield from self._move([*centre[:2], centre[2] + site_above_centre + 0.25 * half], yaw, tolerance=0.005)
        yield from self._gripper(OPEN, 0.5)
        yield from self._move([*centre[:2], centre[2] + half + self.hover], self.yaw_cmd, tolerance=0.015)

    def _place_target(self, goal: Goal) -> tuple[np.ndarray, float | None]:
        half = self.robot.cube_half
        if goal.kind in ("in", "centre"):
            rec = self.sim.receptacle_pos(goal.target)
            return np.array([rec[0], rec[1], TABLE_Z + 0.004 + half]), None
        if goal.kind == "on":
            below = self.sim.cube_pos(goal.target)
            yaw = _face_yaws(self.sim.cube_yaw(goal.target), self.yaw_cmd)[0]
            return np.array([below[0], below[1], below[2] + 2 * half]), yaw
        if goal.kind == "at":
            return np.array([goal.xy[0], goal.xy[1], TABLE_Z + half]), None
        raise ValueError(f"cannot place for goal {goal.kind}")

    def _run(self):
        for subtask in self.env.task.subtasks:
            yield from self._achieve(subtask.goal)
        while True:  # done: hold still (pick keeps the cube lifted)
            yield self._action()

    def _achieve(self, goal):
        """Pick (and place) until the goal holds, re-grasping after a drop, at most max_attempts times."""
        for _ in range(self.max_attempts):
            if not self._holding(goal.cube) and not (yield from self._pick(goal.cube)):
                return
            if goal.kind == "lift":
                return
            centre, yaw = self._place_target(goal)
            yield from self._place(goal.cube, centre, yaw)
            if self.sim.goal_reached(goal):
                return
