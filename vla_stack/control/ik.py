"""Differential inverse kinematics for the grasp site, on a robot-only model (mink + daqp)."""

from __future__ import annotations

import logging

import mink
import numpy as np

from vla_stack.sim.robots import RobotSpec, load_robot_spec

# mink logs a warning whenever a QP step is clipped; that is routine for tracking and floods the console.
logging.getLogger("mink").setLevel(logging.ERROR)


def down_rotation(yaw: float) -> np.ndarray:
    """Grasp frame pointing straight down (z = -world z) with its jaw axis (x) at `yaw` about world z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def yaw_of(rotation: np.ndarray) -> float:
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


class GraspIK:
    """Joint targets that put the grasp site at a world pose. Works in the robot's base frame, so the scene
    (objects with free joints) never enters the QP."""

    def __init__(self, robot: RobotSpec, orientation_cost: float = 0.5, posture_cost: float = 1e-3):
        self.robot = robot
        self.model = load_robot_spec(robot.name).compile()
        self.configuration = mink.Configuration(self.model)
        self.frame = mink.FrameTask("grasp_site", "site", position_cost=1.0, orientation_cost=orientation_cost,
                                    lm_damping=1e-3)
        self.posture = mink.PostureTask(self.model, cost=posture_cost)
        self.limits = [mink.ConfigurationLimit(self.model)]
        m = self.model
        self._arm_qpos = np.array([m.jnt_qposadr[m.joint(j).id] for j in robot.arm_joints])
        self._base = np.asarray(robot.base_pos)
        home = self.configuration.q.copy()
        home[self._arm_qpos] = robot.home_qpos
        self.posture.set_target(home)

    def solve(self, q_arm: np.ndarray, position: np.ndarray, rotation: np.ndarray, iterations: int = 8,
              dt: float = 0.05) -> np.ndarray:
        """Arm joint positions reaching (position, rotation) from q_arm, in at most `iterations` QP steps."""
        q = self.configuration.q.copy()
        q[self._arm_qpos] = q_arm
        self.configuration.update(q)
        target = mink.SE3.from_rotation_and_translation(mink.SO3.from_matrix(rotation), np.asarray(position) - self._base)
        self.frame.set_target(target)
        for _ in range(iterations):
            velocity = mink.solve_ik(self.configuration, [self.frame, self.posture], dt, "daqp", damping=1e-3,
                                     limits=self.limits)
            self.configuration.integrate_inplace(velocity, dt)
            error = self.frame.compute_error(self.configuration)
            if np.linalg.norm(error[:3]) < 5e-4 and np.linalg.norm(error[3:]) < 1e-2:
                break
        return self.configuration.q[self._arm_qpos].copy()

    def reachable(self, q_arm: np.ndarray, position: np.ndarray, rotation: np.ndarray, tolerance: float = 0.004) -> bool:
        """Whether the pose can be reached (position within tolerance, orientation within ~3 degrees)."""
        q = self.solve(q_arm, position, rotation, iterations=60)
        reached, reached_rotation = self.forward(q)
        angle = np.arccos(np.clip((np.trace(reached_rotation.T @ rotation) - 1) / 2, -1.0, 1.0))
        return bool(np.linalg.norm(reached - position) < tolerance and angle < 0.05)

    def forward(self, q_arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World pose of the grasp site for the given arm joints."""
        q = self.configuration.q.copy()
        q[self._arm_qpos] = q_arm
        self.configuration.update(q)
        transform = self.configuration.get_transform_frame_to_world("grasp_site", "site")
        return transform.translation() + self._base, transform.rotation().as_matrix()
