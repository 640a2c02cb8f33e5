"""The MuJoCo tabletop: scene assembly (sim/scenes/tabletop.xml + a robot + cubes + bowls/bins), per-episode
randomisation, joint-position control and offscreen rendering. The Gymnasium env and the ROS sim node both
drive this class, so they behave identically."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from vla_stack.paths import share_dir
from vla_stack.sim.robots import TABLE_Z, RobotSpec, get_robot, gripper_ctrl, gripper_state, load_robot_spec, look_at_quat
from vla_stack.sim.tasks import TaskInstance

CAMERAS = ("front", "wrist")
_FULL_STATE = mujoco.mjtState.mjSTATE_INTEGRATION
N_TABLE_LOOKS = 6
FRONT_FOVY = 50.0  # degrees
FRONT_UP = (-1.0, 0.0, 0.0)  # image up points away from the robot base


def front_camera_frame(robot: RobotSpec) -> tuple[np.ndarray, np.ndarray, float]:
    """The fixed front camera as (position (3,), rotation (3, 3) whose columns are its right, up and backward
    axes in the world, focal length in half-image units): MuJoCo's camera convention, as it renders it."""
    eye, target = np.asarray(robot.front_camera_pos, float), np.asarray(robot.front_camera_target, float)
    back = (eye - target) / np.linalg.norm(eye - target)
    right = np.cross(FRONT_UP, back)
    right /= np.linalg.norm(right)
    return eye, np.stack([right, np.cross(back, right), back], 1), 1.0 / math.tan(math.radians(FRONT_FOVY) / 2)


def front_camera_coords(robot: RobotSpec, points) -> np.ndarray:
    """World points (..., 3) -> where they appear in the fixed front camera: (..., 2) as (column, row) in
    [-1, 1], left to right and top to bottom (a pinhole camera of FRONT_FOVY, as MuJoCo renders it).
    Privileged training labels (where the named cube is) come from this."""
    return _project(*front_camera_frame(robot), points)[0]


def _project(position: np.ndarray, rotation: np.ndarray, focal: float, points) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> ((..., 2) image coordinates, (...) depth in front of the camera)."""
    rel = (np.asarray(points, float) - position) @ rotation
    depth = -rel[..., 2]
    return np.stack([focal * rel[..., 0], -focal * rel[..., 1]], -1) / np.maximum(depth, 1e-6)[..., None], depth


def camera_rays(position: np.ndarray, rotation: np.ndarray, focal: float, coords) -> np.ndarray:
    """Inverse of a camera's projection: image points (..., 2) (column, row) in [-1, 1] -> unit directions
    (..., 3) in the world of the rays from `position` through them (camera frame as front_camera_frame's)."""
    coords = np.asarray(coords, float)
    local = np.stack([coords[..., 0] / focal, -coords[..., 1] / focal, -np.ones(coords.shape[:-1])], -1)
    world = local @ np.asarray(rotation).T
    return world / np.linalg.norm(world, axis=-1, keepdims=True)


@dataclass
class ActionCounters:
    """How often commands had to be corrected: the env reports these instead of silently fixing input."""

    clipped: int = 0
    non_finite: int = 0


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def camera_coords(model: mujoco.MjModel, data: mujoco.MjData, camera: str, points) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> ((..., 2) (column, row) in [-1, 1] in `camera` at the pose in `data` (after
    mj_kinematics / mj_forward), (...) bool: in front of the camera and inside the image)."""
    cam = model.camera(camera).id
    rotation = data.cam_xmat[cam].reshape(3, 3)  # columns: camera x (right), y (up), z (backwards)
    focal = 1.0 / math.tan(math.radians(model.cam_fovy[cam]) / 2)
    coords, depth = _project(data.cam_xpos[cam], rotation, focal, points)
    return coords, (depth > 1e-3) & np.all(np.abs(coords) <= 1.0, -1)


def build_scene(robot: RobotSpec, n_cubes: int, receptacle_kind: str | None, n_receptacles: int,
                image_size: tuple[int, int]) -> mujoco.MjModel:
    spec = mujoco.MjSpec.from_file(str(share_dir("sim") / "scenes" / "tabletop.xml"))
    height, width = image_size
    spec.visual.global_.offwidth = max(width, 64)
    spec.visual.global_.offheight = max(height, 64)

    frame = spec.worldbody.add_frame(pos=robot.base_pos)
    frame.attach_body(load_robot_spec(robot.name).body(robot.root_body), "", "")

    spec.worldbody.add_camera(name="front", pos=robot.front_camera_pos, fovy=FRONT_FOVY,
                              quat=look_at_quat(robot.front_camera_pos, robot.front_camera_target, FRONT_UP))

    # A few table looks, switched per episode by material id (no texture upload at reset).
    looks = np.random.default_rng(7)
    for i, builtin in enumerate(("flat", "checker", "gradient", "checker", "flat", "gradient")[:N_TABLE_LOOKS]):
        rgb1, rgb2 = looks.uniform(0.35, 0.85, 3), looks.uniform(0.25, 0.75, 3)
        tex = spec.add_texture(name=f"table_tex{i}", type=mujoco.mjtTexture.mjTEXTURE_2D,
                               builtin=getattr(mujoco.mjtBuiltin, f"mjBUILTIN_{builtin.upper()}"),
                               mark=mujoco.mjtMark.mjMARK_RANDOM if i >= 3 else mujoco.mjtMark.mjMARK_NONE,
                               random=0.02, markrgb=rgb2 * 0.8, rgb1=rgb1, rgb2=rgb2, width=128, height=128)
        mat = spec.add_material(name=f"table_look{i}", texrepeat=[4, 4])
        mat.textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = tex.name
    spec.geom("table_top").material = "table_look0"

    half = robot.cube_half
    for i in range(n_cubes):
        body = spec.worldbody.add_body(name=f"cube{i}", pos=[0, 0, TABLE_Z + half])
        body.add_freejoint(name=f"cube{i}_joint")
        body.add_geom(name=f"cube{i}", type=mujoco.mjtGeom.mjGEOM_BOX, size=[half] * 3, mass=0.05 if half > 0.015 else 0.015,
                      friction=[1.2, 0.01, 0.0001], condim=4, rgba=[1, 0, 0, 1],
                      solref=[0.004, 1.0], solimp=[0.95, 0.99, 0.001, 0.5, 2.0])  # stiff: no visible squeeze

    inner = robot.receptacle_half
    wall = 0.006 if inner > 0.04 else 0.004
    wall_h = 0.025 if inner > 0.04 else 0.013
    for j in range(n_receptacles):
        body = spec.worldbody.add_body(name=f"receptacle{j}", pos=[0, 0, TABLE_Z])
        body.add_geom(name=f"receptacle{j}_floor", type=mujoco.mjtGeom.mjGEOM_CYLINDER if receptacle_kind == "bowl"
                      else mujoco.mjtGeom.mjGEOM_BOX, size=[inner + wall, inner + wall, 0.002] if receptacle_kind != "bowl"
                      else [inner + wall, 0.002, 0], pos=[0, 0, 0.002], rgba=[1, 1, 1, 1])
        segments = 14 if receptacle_kind == "bowl" else 4
        for k in range(segments):
            angle = 2 * math.pi * k / segments
            radius = inner + wall / 2
            seg_half = (radius * math.tan(math.pi / segments) + wall / 2) if receptacle_kind == "bowl" else inner + wall
            body.add_geom(name=f"receptacle{j}_wall{k}", type=mujoco.mjtGeom.mjGEOM_BOX,
                          size=[wall / 2, seg_half, wall_h / 2],
                          pos=[radius * math.cos(angle), radius * math.sin(angle), wall_h / 2],
                          quat=_yaw_quat(angle), rgba=[1, 1, 1, 1])
    return spec.compile()


class TabletopSim:
    """One robot on the table with the objects of one task family; reset() applies a TaskInstance."""

    def __init__(self, robot: str, n_cubes: int, receptacle_kind: str | None, n_receptacles: int,
                 image_size: tuple[int, int] = (128, 128), control_hz: float = 10.0):
        self.robot = get_robot(robot)
        self.image_size = image_size
        self.model = build_scene(self.robot, n_cubes, receptacle_kind, n_receptacles, image_size)
        self.data = mujoco.MjData(self.model)
        self.n_cubes, self.n_receptacles = n_cubes, n_receptacles
        self.control_hz = control_hz
        self.substeps = max(1, int(round(1.0 / (control_hz * self.model.opt.timestep))))
        m = self.model
        self._arm_qpos = np.array([m.jnt_qposadr[m.joint(j).id] for j in self.robot.arm_joints])
        self._arm_dof = np.array([m.jnt_dofadr[m.joint(j).id] for j in self.robot.arm_joints])
        self._gripper_qpos = m.jnt_qposadr[m.joint(self.robot.gripper_joint).id]
        self._arm_act = np.array([self._actuator_for(j) for j in self.robot.arm_joints])
        self._grip_act = np.array([m.actuator(a).id for a in self.robot.gripper_actuators])
        self.joint_limits = np.array([m.jnt_range[m.joint(j).id] for j in self.robot.arm_joints])
        self._cube_qpos = [m.jnt_qposadr[m.joint(f"cube{i}_joint").id] for i in range(n_cubes)]
        self._cube_geom = [m.geom(f"cube{i}").id for i in range(n_cubes)]
        self._cube_body = [m.body(f"cube{i}").id for i in range(n_cubes)]
        self._rec_body = [m.body(f"receptacle{j}").id for j in range(n_receptacles)]
        robot_root = m.body(self.robot.root_body).id
        self._robot_bodies = {b for b in range(m.nbody) if self._is_descendant(b, robot_root)}
        self._table_geom = m.geom("table_top").id
        self._table_mats = [m.material(f"table_look{i}").id for i in range(N_TABLE_LOOKS)]
        self._light_pos0 = m.light_pos.copy()
        self._grasp_site = m.site("grasp_site").id
        self._renderer: mujoco.Renderer | None = None
        self.counters = ActionCounters()
        self.task: TaskInstance | None = None

    def _actuator_for(self, joint: str) -> int:
        jid = self.model.joint(joint).id
        for a in range(self.model.nu):
            if self.model.actuator_trntype[a] == mujoco.mjtTrn.mjTRN_JOINT and self.model.actuator_trnid[a, 0] == jid:
                return a
        raise ValueError(f"joint {joint} has no position actuator")

    def _is_descendant(self, body: int, root: int) -> bool:
        while body > 0:
            if body == root:
                return True
            body = self.model.body_parentid[body]
        return False

    # ----------------------------------------------------------------------------------------------- reset
    def reset(self, task: TaskInstance, rng: np.random.Generator, home_noise: float = 0.02) -> None:
        m, d = self.model, self.data
        if len(task.cubes) != self.n_cubes or len(task.receptacles) != self.n_receptacles:
            raise ValueError("task instance does not match this scene's objects")
        self.task = task
        mujoco.mj_resetData(m, d)
        # Appearance: table look, lighting.
        m.geom_matid[self._table_geom] = self._table_mats[int(rng.integers(len(self._table_mats)))]
        m.light_pos[:] = self._light_pos0 + rng.uniform(-0.3, 0.3, self._light_pos0.shape)
        m.light_diffuse[:] = rng.uniform(0.3, 0.7, (m.nlight, 1))
        for cube, geom, adr in zip(task.cubes, self._cube_geom, self._cube_qpos):
            m.geom_rgba[geom] = cube.rgba
            d.qpos[adr:adr + 3] = (*cube.xy, TABLE_Z + self.robot.cube_half + 0.001)
            d.qpos[adr + 3:adr + 7] = _yaw_quat(cube.yaw)
        for rec, body in zip(task.receptacles, self._rec_body):
            m.body_pos[body] = (*rec.xy, TABLE_Z)
            for g in range(m.body_geomadr[body], m.body_geomadr[body] + m.body_geomnum[body]):
                m.geom_rgba[g] = rec.rgba
        home = np.asarray(self.robot.home_qpos) + rng.uniform(-home_noise, home_noise, len(self.robot.arm_joints))
        home = np.clip(home, self.joint_limits[:, 0], self.joint_limits[:, 1])
        d.qpos[self._arm_qpos] = home
        d.qpos[self._gripper_qpos] = self.robot.gripper_ctrl_open
        d.ctrl[self._arm_act] = home
        d.ctrl[self._grip_act] = self.robot.gripper_ctrl_open
        self.counters = ActionCounters()
        mujoco.mj_forward(m, d)
        for _ in range(int(0.2 / m.opt.timestep)):  # let objects settle on the table
            mujoco.mj_step(m, d)

    # ----------------------------------------------------------------------------------------------- control
    def apply_action(self, action: np.ndarray) -> None:
        """Joint position targets + gripper command; out-of-range values are clipped and counted, non-finite
        commands are dropped (the previous target is held) and counted."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.robot.action_dim:
            raise ValueError(f"action for {self.robot.name} must have {self.robot.action_dim} values, got {action.shape[0]}")
        if not np.all(np.isfinite(action)):
            self.counters.non_finite += 1
            return
        low = np.append(self.joint_limits[:, 0], 0.0)
        high = np.append(self.joint_limits[:, 1], 1.0)
        clipped = np.clip(action, low, high)
        if np.any(clipped != action):
            self.counters.clipped += 1
        self.data.ctrl[self._arm_act] = clipped[:-1]
        self.data.ctrl[self._grip_act] = gripper_ctrl(self.robot, clipped[-1])

    def step(self, n: int | None = None) -> None:
        mujoco.mj_step(self.model, self.data, nstep=n or self.substeps)

    def get_state(self) -> np.ndarray:
        """The full integration state (time, qpos, qvel, act, warm start, ctrl, ...): set_state() then
        continues bit-identically."""
        state = np.empty(mujoco.mj_stateSize(self.model, _FULL_STATE))
        mujoco.mj_getState(self.model, self.data, state, _FULL_STATE)
        return state

    def set_state(self, state: np.ndarray) -> None:
        mujoco.mj_setState(self.model, self.data, np.asarray(state, np.float64), _FULL_STATE)
        mujoco.mj_forward(self.model, self.data)  # positions, contacts and sensors for the next render/read

    # ----------------------------------------------------------------------------------------------- sensing
    def joint_state(self) -> np.ndarray:
        """Arm joint positions (rad) + gripper closure in [0, 1], float32: the policy's proprioception."""
        q = self.data.qpos
        return np.append(q[self._arm_qpos], gripper_state(self.robot, q[self._gripper_qpos])).astype(np.float32)

    def arm_qpos(self) -> np.ndarray:
        return self.data.qpos[self._arm_qpos].copy()

    def arm_qvel(self) -> np.ndarray:
        return self.data.qvel[self._arm_dof].copy()

    def render(self, camera: str) -> np.ndarray:
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, *self.image_size)
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ----------------------------------------------------------------------------------------------- world state
    def grasp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.site_xpos[self._grasp_site].copy(), self.data.site_xmat[self._grasp_site].reshape(3, 3).copy()

    def cube_pos(self, i: int) -> np.ndarray:
        return self.data.xpos[self._cube_body[i]].copy()

    def cube_yaw(self, i: int) -> float:
        mat = self.data.xmat[self._cube_body[i]].reshape(3, 3)
        return float(math.atan2(mat[1, 0], mat[0, 0]))

    def receptacle_pos(self, j: int) -> np.ndarray:
        return self.data.xpos[self._rec_body[j]].copy()

    def cube_touching_robot(self, i: int) -> bool:
        d, m = self.data, self.model
        geom = self._cube_geom[i]
        for c in d.contact[: d.ncon]:
            other = c.geom2 if c.geom1 == geom else c.geom1 if c.geom2 == geom else -1
            if other >= 0 and m.geom_bodyid[other] in self._robot_bodies:
                return True
        return False

    def physics_ok(self) -> bool:
        return bool(np.all(np.isfinite(self.data.qpos)) and np.all(np.isfinite(self.data.qvel)))

    # ----------------------------------------------------------------------------------------------- goals
    def goal_reached(self, goal) -> bool:
        """The success detector for one subtask goal (see vla_stack.sim.tasks.Goal)."""
        half = self.robot.cube_half
        pos = self.cube_pos(goal.cube)
        height = pos[2] - (TABLE_Z + half)
        if goal.kind == "lift":
            return height > 2 * half + 0.01 and self.cube_touching_robot(goal.cube)
        released = not self.cube_touching_robot(goal.cube)
        if goal.kind in ("in", "centre"):
            centre = self.receptacle_pos(goal.target)
            radius = self.robot.receptacle_half - 0.3 * half if goal.kind == "in" else 0.5 * half
            inside = np.hypot(*(pos[:2] - centre[:2])) < radius
            return bool(inside and height < 0.5 * half + 0.006 and released)
        if goal.kind == "on":
            below = self.cube_pos(goal.target)
            aligned = np.hypot(*(pos[:2] - below[:2])) < 0.8 * half
            return bool(aligned and abs(pos[2] - below[2] - 2 * half) < 0.4 * half and released)
        if goal.kind == "at":
            close = np.hypot(pos[0] - goal.xy[0], pos[1] - goal.xy[1]) < 1.5 * half
            return bool(close and height < 0.3 * half and released)
        raise ValueError(f"unknown goal kind {goal.kind}")
