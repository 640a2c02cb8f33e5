"""Forward kinematics of the grasp site (and the wrist camera) for batches of arm joint vectors, on the
robot-only MuJoCo model (the same model the IK and the simulator use). ~3 us a row here: cheap enough for a
planner's inner loop."""

from __future__ import annotations

from functools import lru_cache

import mujoco
import numpy as np

from vla_stack.errors import VlaStackError
from vla_stack.sim.robots import get_robot, load_robot_spec


class GraspSiteFK:
    def __init__(self, robot: str):
        self.robot = get_robot(robot)
        self.model = load_robot_spec(robot).compile()
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._qpos = np.array([m.jnt_qposadr[m.joint(j).id] for j in self.robot.arm_joints])
        self._site = m.site("grasp_site").id
        self._base = np.asarray(self.robot.base_pos, np.float64)

    @property
    def arm_dof(self) -> int:
        return len(self._qpos)

    def positions(self, q_arm: np.ndarray) -> np.ndarray:
        """(..., arm_dof) joint positions -> (..., 3) world positions of the grasp site."""
        q = np.asarray(q_arm, np.float64)
        if q.shape[-1] != self.arm_dof:
            raise VlaStackError(f"{self.robot.name} has {self.arm_dof} arm joints, got vectors of {q.shape[-1]}")
        flat = q.reshape(-1, self.arm_dof)
        pos = np.empty((len(flat), 3))
        d = self.data
        for i, row in enumerate(flat):
            d.qpos[self._qpos] = row
            mujoco.mj_kinematics(self.model, d)
            pos[i] = d.site_xpos[self._site]
        return (pos + self._base).reshape(*q.shape[:-1], 3)

    def camera_frame(self, q_arm: np.ndarray, camera: str = "wrist") -> tuple[np.ndarray, np.ndarray, float]:
        """One arm joint vector -> the hand-mounted `camera` in the world as tabletop.front_camera_frame gives
        the fixed one: (position (3,), rotation (3, 3), columns right / up / backward, focal length)."""
        q = np.asarray(q_arm, np.float64).reshape(-1)
        if q.shape[0] != self.arm_dof:
            raise VlaStackError(f"{self.robot.name} has {self.arm_dof} arm joints, got {q.shape[0]}")
        m, d = self.model, self.data
        d.qpos[self._qpos] = q
        mujoco.mj_kinematics(m, d)
        mujoco.mj_camlight(m, d)
        cam = m.camera(camera).id
        focal = 1.0 / np.tan(np.radians(m.cam_fovy[cam]) / 2)
        return d.cam_xpos[cam] + self._base, d.cam_xmat[cam].reshape(3, 3).copy(), float(focal)


@lru_cache(maxsize=None)
def grasp_site_fk(robot: str) -> GraspSiteFK:
    """One shared instance per robot (compiling the model takes ~50 ms; a planner asks at every decision)."""
    return GraspSiteFK(robot)
