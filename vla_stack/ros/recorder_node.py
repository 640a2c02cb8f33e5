"""recorder_node: records synchronised episodes from topics into the zarr EpisodeStore (the demo format that
training reads). At a fixed rate it takes the newest set of camera images of one moment (stamps within
`image_sync_slop`), the newest joint state and the last command sent to the controllers (the action), and
appends them as one frame; ~/start, ~/stop (commit) and ~/discard (std_srvs/Trigger) bracket episodes. A commit is one atomic rename in the store, so killing the
recorder loses at most the episode being recorded."""

from __future__ import annotations

import json
import threading
from functools import partial

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import StoreError, VlaStackError
from vla_stack.ros.common import (
    COMMAND_QOS,
    LATCHED_QOS,
    PUBLISH_QOS,
    SENSOR_QOS,
    ImageSync,
    image_array,
    joint_positions,
    param,
    run,
    seconds,
)
from vla_stack.safety import Watchdog
from vla_stack.sim.robots import get_robot, gripper_state
from vla_stack.sim.tabletop import CAMERAS


class RecorderNode(Node):
    def __init__(self, **kwargs):
        super().__init__("recorder_node", **kwargs)
        self.robot = get_robot(param(self, "robot", "panda", "Robot model: panda or so101", True))
        store = param(self, "store", "", "Zarr episode store path (created when missing)", True)
        fps = param(self, "fps", 10, "Frames per second recorded", True)
        self.cameras = list(param(self, "cameras", list(CAMERAS), "Cameras to record", True))
        size = param(self, "image_size", 128, "Square image size the cameras publish", True)
        self.task_name = param(self, "task", "teleop", "Task family name stored with each episode "
                                                      "(task/info overrides it)", True)
        self.instruction = param(self, "instruction", "", "Instruction stored with each episode when no "
                                                           "task/instruction is published", True)
        slop = param(self, "image_sync_slop", 0.05, "Cameras' images belong to one frame when their stamps lie "
                                                    "within this (s)", True)
        max_age = param(self, "max_input_age", 0.2, "Skip (and count) a frame when an input is older (s)", True)
        controller = param(self, "controller", "arm_controller", "Arm controller whose commands are the action", True)
        gripper = param(self, "gripper_controller", "gripper_controller", "Gripper controller name", True)
        if not store:
            raise VlaStackError("recorder_node needs the 'store' parameter (a zarr store path)")
        names = list(self.robot.joint_names)
        features = {f"images.{c}": {"dtype": "uint8", "shape": [size, size, 3], "names": ["height", "width", "channel"]}
                    for c in self.cameras}
        features["state"] = {"dtype": "float32", "shape": [len(names)], "names": names}
        features["action"] = {"dtype": "float32", "shape": [len(names)], "names": names}
        features["subtask_index"] = {"dtype": "int64", "shape": [], "names": None}
        self.store = EpisodeStore.open_or_create(store, robot=self.robot.name, fps=int(fps), features=features)
        self.watchdog = Watchdog([*(f"{c} image" for c in self.cameras), "image set", "joint_states"], max_age)
        self._sync = ImageSync(self.cameras, slop)
        self.images: dict[str, Image] = {}
        self.joints = None
        self.arm_command: np.ndarray | None = None
        self.gripper_command: float | None = None
        self.info: dict = {}
        self.subtask = ""
        self.success: bool | None = None
        self.writer = None
        self.dropped = 0
        self._lock = threading.Lock()  # the writer: services and the frame timer run in different groups

        inputs, control = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        for camera in self.cameras:
            self.create_subscription(Image, f"{camera}/image_raw", partial(self._on_image, camera),
                                     SENSOR_QOS, callback_group=inputs)
        self.create_subscription(JointState, "joint_states", self._on_joints, SENSOR_QOS, callback_group=inputs)
        self.create_subscription(JointTrajectory, f"{controller}/joint_trajectory", self._on_arm, COMMAND_QOS,
                                 callback_group=inputs)
        self.create_subscription(JointTrajectory, f"{gripper}/joint_trajectory", self._on_gripper, COMMAND_QOS,
                                 callback_group=inputs)
        self.create_subscription(String, "task/instruction", lambda m: setattr(self, "instruction", m.data),
                                 LATCHED_QOS, callback_group=inputs)
        self.create_subscription(String, "task/info", lambda m: setattr(self, "info", json.loads(m.data)),
                                 LATCHED_QOS, callback_group=inputs)
        self.create_subscription(String, "task/subtask", lambda m: setattr(self, "subtask", m.data), LATCHED_QOS,
                                 callback_group=inputs)
        self.create_subscription(Bool, "task/success", lambda m: setattr(self, "success", m.data), LATCHED_QOS,
                                 callback_group=inputs)
        self.create_service(Trigger, "~/start", self._on_start, callback_group=control)
        self.create_service(Trigger, "~/stop", self._on_stop, callback_group=control)
        self.create_service(Trigger, "~/discard", self._on_discard, callback_group=control)
        self.status_pub = self.create_publisher(String, "~/status", PUBLISH_QOS)
        self.create_timer(1.0 / fps, self._record_frame, callback_group=control)
        self.get_logger().info(f"recording into {store} ({len(self.store)} episodes there)")

    # ------------------------------------------------------------------------------------------- inputs
    def _on_image(self, camera: str, msg: Image) -> None:
        self.watchdog.feed(f"{camera} image", seconds(msg.header.stamp))
        matched = self._sync.add(camera, msg)
        if matched is not None:
            self.images = matched
            self.watchdog.feed("image set", min(seconds(m.header.stamp) for m in matched.values()))

    def _on_joints(self, msg: JointState) -> None:
        measured = joint_positions(msg, [*self.robot.arm_joints, self.robot.gripper_joint])
        if measured is not None:
            self.joints = measured[0]
            self.watchdog.feed("joint_states", seconds(msg.header.stamp))

    def _on_arm(self, msg: JointTrajectory) -> None:
        """The action is where the arm was sent next: the first point (an empty trajectory means hold)."""
        if not msg.points:
            self.arm_command = None
        elif sorted(msg.joint_names) == sorted(self.robot.arm_joints):
            index = {n: i for i, n in enumerate(msg.joint_names)}
            first = msg.points[0].positions
            self.arm_command = np.array([first[index[n]] for n in self.robot.arm_joints])

    def _on_gripper(self, msg: JointTrajectory) -> None:
        if msg.points and list(msg.joint_names) == [self.robot.gripper_joint]:
            self.gripper_command = gripper_state(self.robot, msg.points[0].positions[0])

    # ------------------------------------------------------------------------------------------- episodes
    def _on_start(self, request, response):
        with self._lock:
            if self.writer is not None:
                response.success, response.message = False, "already recording; call ~/stop or ~/discard first"
                return response
            if not self.info and self.count_publishers("task/info"):
                # a sim publishes the task (family, subtasks, seed): starting before its latched message arrives
                # would record the episode under the default family
                response.success, response.message = False, "task/info is published but not received yet; retry"
                return response
            instruction = self.info.get("instruction") or self.instruction
            if not instruction:
                response.success, response.message = False, "no instruction: set the 'instruction' parameter"
                return response
            self.writer = self.store.begin_episode(instruction=instruction, task=self.info.get("family", self.task_name),
                                                   subtasks=self.info.get("subtasks", []), seed=self.info.get("seed"))
            self.dropped = 0
        self.get_logger().info(f"recording: {instruction}")
        response.success, response.message = True, "recording"
        return response

    def _on_stop(self, request, response):
        with self._lock:
            if self.writer is None or len(self.writer) == 0:
                response.success, response.message = False, "no frames recorded yet"
                return response
            index = self.writer.commit(success=self.success, extra={"source": "recorder_node",
                                                                    "dropped_frames": self.dropped})
            frames, self.writer = self.store.episode_meta(index).length, None
        self.get_logger().info(f"episode {index} committed ({frames} frames)")
        response.success, response.message = True, json.dumps({"episode": index, "frames": frames})
        return response

    def _on_discard(self, request, response):
        with self._lock:
            if self.writer is None:
                response.success, response.message = False, "not recording"
                return response
            self.writer.discard()
            self.writer = None
        response.success, response.message = True, "discarded"
        return response

    def _record_frame(self) -> None:
        with self._lock:
            if self.writer is None:
                return
            stale = self.watchdog.stale(self.get_clock().now().nanoseconds * 1e-9)
            if stale:
                self.dropped += 1
                self.get_logger().warning(f"frame skipped: {'; '.join(stale)}", throttle_duration_sec=1.0)
                return
            n = len(self.robot.arm_joints)
            state = np.append(self.joints[:n], gripper_state(self.robot, self.joints[n])).astype(np.float32)
            action = state.copy()
            if self.arm_command is not None:
                action[:n] = self.arm_command
            if self.gripper_command is not None:
                action[n] = self.gripper_command
            subtasks = self.info.get("subtasks", [])
            frame = {f"images.{c}": image_array(self.images[c]) for c in self.cameras}
            frame.update(state=state, action=action,
                         subtask_index=np.int64(subtasks.index(self.subtask) if self.subtask in subtasks else 0))
            try:
                self.writer.add_frame(frame)
            except StoreError as exc:
                self.dropped += 1
                self.get_logger().error(f"frame not stored: {exc}", throttle_duration_sec=1.0)
                return
            frames = len(self.writer)
        self.status_pub.publish(String(data=json.dumps({"recording": True, "frames": frames, "dropped": self.dropped})))

    def close(self) -> None:
        with self._lock:
            if self.writer is not None:  # an interrupted episode is not a finished one
                self.writer.discard()
                self.writer = None
        self.store.close()


def main() -> None:
    run(RecorderNode)


if __name__ == "__main__":
    main()
