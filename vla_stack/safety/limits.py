"""Limits of a joint group and of the grasp-site workspace, taken from the robot model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vla_stack.errors import VlaStackError
from vla_stack.sim.robots import TABLE_Z, RobotSpec, get_robot, load_robot_spec


@dataclass(frozen=True)
class SafetyLimits:
    """Per-joint limits of one controller's joints (arm, or the gripper joint), in the controller's units."""

    joint_names: tuple[str, ...]
    position: np.ndarray  # (n, 2) low, high
    velocity: np.ndarray  # (n,) absolute
    acceleration: np.ndarray  # (n,) absolute

    @classmethod
    def arm(cls, robot: str | RobotSpec, velocity_scale: float = 1.0, acceleration_scale: float = 1.0) -> SafetyLimits:
        """Arm joints: position range from the MJCF, velocity/acceleration from the manufacturer data in RobotSpec;
        the scales (0, 1] derate them, e.g. for a first run on hardware."""
        robot = get_robot(robot) if isinstance(robot, str) else robot
        if not (0 < velocity_scale <= 1 and 0 < acceleration_scale <= 1):
            raise VlaStackError("velocity_scale and acceleration_scale must lie in (0, 1]")
        model = load_robot_spec(robot.name).compile()
        position = np.array([model.jnt_range[model.joint(j).id] for j in robot.arm_joints], dtype=float)
        return cls(tuple(robot.arm_joints), position, np.asarray(robot.velocity_limits, float) * velocity_scale,
                   np.asarray(robot.acceleration_limits, float) * acceleration_scale)

    @classmethod
    def gripper(cls, robot: str | RobotSpec) -> SafetyLimits:
        """The gripper joint in its native unit, between the open and closed command; its own motor limits speed."""
        robot = get_robot(robot) if isinstance(robot, str) else robot
        low, high = sorted((robot.gripper_ctrl_open, robot.gripper_ctrl_closed))
        return cls((robot.gripper_joint,), np.array([[low, high]]), np.array([np.inf]), np.array([np.inf]))


class Workspace:
    """Bounds for the grasp site, checked through forward kinematics: above the table surface and inside an
    annulus around the arm base (the task reach, widened by a margin)."""

    def __init__(self, robot: str | RobotSpec, table_clearance: float = 0.005, reach_margin: float = 0.06):
        self.robot = get_robot(robot) if isinstance(robot, str) else robot
        from vla_stack.control.ik import GraspIK  # mink is only needed when a workspace is checked

        self._ik = GraspIK(self.robot)
        self.z_min = TABLE_Z + table_clearance
        self.radius = (0.5 * self.robot.reach[0], self.robot.reach[1] + reach_margin)
        self._base = np.asarray(self.robot.base_pos[:2], float)

    def violation(self, q_arm: np.ndarray) -> str | None:
        """Why the grasp site at these joint positions is out of bounds, or None when it is inside."""
        position, _ = self._ik.forward(np.asarray(q_arm, float))
        if position[2] < self.z_min:
            return f"grasp site {position[2] - TABLE_Z:+.3f} m from the table surface (min {self.z_min - TABLE_Z:.3f})"
        radius = float(np.hypot(*(position[:2] - self._base)))
        if not self.radius[0] <= radius <= self.radius[1]:
            return f"grasp site {radius:.3f} m from the base (allowed {self.radius[0]:.3f}-{self.radius[1]:.3f})"
        return None
