"""policy_node: a lifecycle node that turns camera images, joint states and the instruction into action chunks.

configure loads the policy (`expert` or a checkpoint path), activate starts control, deactivate holds the arm.
Inference runs on a worker thread, woken as soon as every camera has delivered an image of one new moment
(stamps within `image_sync_slop`, so image-to-command latency is inference plus transport) or after one control
period without that, when the watchdog decides whether the inputs went stale; callbacks only store the newest
messages, so they never block. Each chunk becomes a multi-point JointTrajectory (arm) plus one for the gripper,
time-stamped at send time, through the safety layer. ~/status (JSON) says what the node does and why it holds.
"""

from __future__ import annotations

import json
import threading
import time
from functools import partial

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from vla_stack.errors import VlaStackError
from vla_stack.ros.common import (LATCHED_QOS, PUBLISH_QOS, SENSOR_QOS, ImageSync, freeze_heap, image_array,
                                   joint_positions, param, run, seconds, yield_to_control)
from vla_stack.ros.policy_source import load_source
from vla_stack.ros.safety_gate import SafetyGate
from vla_stack.safety import Watchdog
from vla_stack.sim.robots import get_robot, gripper_ctrl, gripper_state
from vla_stack.sim.tabletop import CAMERAS


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("policy_node", **kwargs)
        self.robot = get_robot(param(self, "robot", "panda", "Robot model: panda or so101", True))
        self.policy_name = param(self, "policy", "expert", "'expert' or a checkpoint path", True)
        self.planner = param(self, "planner", "none", "Planner over a checkpoint policy: none, wm (world-model "
                                                      "MCTS over VLA chunks) or mem", True)
        self.planner_checkpoint = param(self, "planner_checkpoint", "", "Planner checkpoint directory ('' = the "
                                                                        "shipped one)", True)
        self.planner_deadline = param(self, "planner_deadline", 0.15, "Deadline of one wm planner decision (s): "
                                                                      "VLA proposals + search", True)
        self.cameras = list(param(self, "cameras", list(CAMERAS), "Cameras the policy sees; a new image from "
                                                                  "each triggers inference", True))
        self.action_dt = param(self, "action_dt", 0.1, "Seconds between the points of an action chunk (the "
                                                       "policy's training frame period)", True)
        slop = param(self, "image_sync_slop", 0.05, "Cameras' images are one observation when their stamps lie "
                                                    "within this (s); sim cameras share a stamp", True)
        max_age = param(self, "max_input_age", 0.2, "Hold when an image or joint state is older than this (s)", True)
        self.period = 1.0 / param(self, "control_rate", 10.0, "Inference rate in Hz when images keep coming", True)
        self.inference_threads = param(self, "inference_threads", 1, "torch threads for inference (1 keeps the "
                                                                      "latency tail short beside a sim or driver on "
                                                                      "few cores; 0 = torch's default)", True)
        self.inference_steps = param(self, "inference_steps", 0, "Euler steps per action chunk of a checkpoint "
                                                                  "policy (0 = the checkpoint's; fewer cut "
                                                                  "inference time proportionally)", True)
        self.replan_steps = param(self, "replan_steps", 0, "New action chunk every this many observations, the "
                                                          "running chunk in between (0 = the checkpoint's "
                                                          "n_action_steps, as it was trained and evaluated; 1 = "
                                                          "every image set). The scripted expert acts every "
                                                          "observation", True)
        self.inference_niceness = param(self, "inference_niceness", 5, "Nice value of the inference thread: a "
                                                                        "controller or sim on the same cores comes "
                                                                        "first (0 = unchanged)", True)
        autostart = param(self, "autostart", False, "Configure and activate on start (launch files set it; tests "
                                                    "and lifecycle managers leave it off and drive the transitions)",
                          True)
        self.workers = ReentrantCallbackGroup()
        self.gate = SafetyGate(self, self.robot, self.workers)
        # "image set": cameras that keep publishing but never within image_sync_slop of each other also hold
        self.watchdog = Watchdog([*(f"{c} image" for c in self.cameras), "image set", "joint_states"], max_age)
        self.status_pub = self.create_publisher(String, "~/status", PUBLISH_QOS)
        self._inputs = inputs = MutuallyExclusiveCallbackGroup()
        for camera in self.cameras:
            self.create_subscription(Image, f"{camera}/image_raw", partial(self._on_image, camera),
                                     SENSOR_QOS, callback_group=inputs)
        self.create_subscription(JointState, "joint_states", self._on_joints, SENSOR_QOS, callback_group=inputs)
        self.create_subscription(String, "task/instruction", self._on_instruction, LATCHED_QOS, callback_group=inputs)
        self._oracle_sub = None  # only the scripted expert reads the sim's world state (configure subscribes)
        self._images: dict[str, Image] = {}
        self._joints: JointState | None = None
        self._oracle: dict | None = None
        self.instruction = ""
        self._sync = ImageSync(self.cameras, slop)
        self._wake = threading.Condition()
        self._fresh = False
        self._active = False
        self._thread: threading.Thread | None = None
        self.source = None
        self.commands = 0
        self.holding: list[str] | None = None
        self._chunk_running = False  # a sent chunk the controller still executes
        if autostart:
            self._autostart_timer = self.create_timer(0.0, self._autostart)

    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    # ------------------------------------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.inference_threads > 0 and self.policy_name != "expert":
            import torch

            torch.set_num_threads(self.inference_threads)
        try:
            options = {"checkpoint": self.planner_checkpoint}
            if self.planner == "wm":
                options["deadline_s"] = self.planner_deadline
            self.source = load_source(self.policy_name, self.robot, 1.0 / self.action_dt, self.planner,
                                      options if self.planner != "none" else None, self.inference_steps or None,
                                      self.replan_steps or None)
        except VlaStackError as exc:
            self.get_logger().error(f"cannot load policy: {exc}")
            return TransitionCallbackReturn.FAILURE
        if self.source.needs_oracle:
            self._oracle_sub = self.create_subscription(String, "oracle/world_state", self._on_oracle, SENSOR_QOS,
                                                        callback_group=self._inputs)
        freeze_heap()  # the weights and whatever loading them left behind
        self.get_logger().info(f"policy '{self.policy_name}' loaded")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self._chunk_running = True, False
        self._thread = threading.Thread(target=self._control_loop, daemon=True, name="inference")
        self._thread.start()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self.gate.hold("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.source = None
        if self._oracle_sub is not None:
            self.destroy_subscription(self._oracle_sub)
            self._oracle_sub, self._oracle = None, None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        self._active = False
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def close(self) -> None:
        self._stop_worker()

    # ------------------------------------------------------------------------------------------- inputs
    def _on_image(self, camera: str, msg: Image) -> None:
        self.watchdog.feed(f"{camera} image", seconds(msg.header.stamp))
        matched = self._sync.add(camera, msg)
        if matched is not None:
            self.watchdog.feed("image set", min(seconds(m.header.stamp) for m in matched.values()))
            with self._wake:
                self._images = matched
                self._fresh = True
                self._wake.notify()

    def _on_joints(self, msg: JointState) -> None:
        self._joints = msg
        self.watchdog.feed("joint_states", seconds(msg.header.stamp))

    def _on_instruction(self, msg: String) -> None:
        self.instruction = msg.data

    def _on_oracle(self, msg: String) -> None:
        self._oracle = json.loads(msg.data)

    # ------------------------------------------------------------------------------------------- control
    def _control_loop(self) -> None:
        yield_to_control(self.inference_niceness)
        while self._active:
            # Wake on a new image, when an input is about to go stale, or after one control period at most.
            expires = self.watchdog.expires()
            timeout = self.period
            if expires is not None and self.holding is None:
                timeout = min(timeout, max(expires - self.get_clock().now().nanoseconds * 1e-9 + 1e-3, 1e-3))
            with self._wake:
                self._wake.wait_for(lambda: self._fresh or not self._active, timeout=timeout)
                triggered, self._fresh = self._fresh, False
            if not self._active:
                break
            now = self.get_clock().now()
            stale = self.watchdog.stale(now.nanoseconds * 1e-9)
            if stale:
                self._hold(stale)
            elif triggered:
                self._step()

    def _hold(self, reasons: list[str], why: str = "stale_inputs") -> None:
        """Hold once per episode of trouble (the controller keeps holding), report why every period."""
        if self.holding is None:
            self.get_logger().warning(f"holding position: {'; '.join(reasons)}")
            self.gate.hold(why)
        self.holding, self._chunk_running = reasons, False
        self._status("holding", reasons=reasons)

    def _step(self) -> None:
        with self._wake:
            joints, images = self._joints, self._images
        measured = joint_positions(joints, [*self.robot.arm_joints, self.robot.gripper_joint])
        if measured is None:
            self._hold([f"joint_states lack the joints {[*self.robot.arm_joints, self.robot.gripper_joint]}"],
                       "bad_joint_states")
            return
        q, v = measured
        n = len(self.robot.arm_joints)
        obs = {"images": {c: image_array(images[c]) for c in self.cameras},
               "state": np.append(q[:n], gripper_state(self.robot, q[n])).astype(np.float32),
               "instruction": self.instruction}
        oldest_image = min(seconds(images[c].header.stamp) for c in self.cameras)
        input_age_ms = (self.get_clock().now().nanoseconds * 1e-9 - oldest_image) * 1e3  # render, transport, wake
        start = time.perf_counter()
        try:
            chunk = self.source.chunk(obs, self._oracle, replan=not self._chunk_running)
        except (ValueError, VlaStackError) as exc:  # e.g. no oracle yet, or an observation the policy refuses
            self._hold([f"policy cannot act: {exc}"], "policy_error")
            return
        if chunk is None:  # the running chunk goes on
            self._status("running", obs_stamp=oldest_image, input_age_ms=round(input_age_ms, 3))
            return
        inference_ms = (time.perf_counter() - start) * 1e3
        times = self.action_dt * np.arange(1, len(chunk) + 1)
        stamp = self.get_clock().now().to_msg()
        sent = self.gate.send_arm(self.robot.arm_joints, times, chunk[:, :n], q[:n], None if v is None else v[:n], stamp)
        if sent:
            grip = [[gripper_ctrl(self.robot, g)] for g in chunk[:, n]]
            self.gate.send_gripper([self.robot.gripper_joint], times, grip, q[n], stamp)
            self.commands += 1
            self._chunk_running = True
            if self.holding is not None:
                self.get_logger().info("inputs fresh again: resuming control")
                self.holding = None
        else:
            self._chunk_running = False
        self._status("running" if sent else "rejected", obs_stamp=oldest_image, command_stamp=seconds(stamp),
                     input_age_ms=round(input_age_ms, 3), inference_ms=round(inference_ms, 3), chunk=len(chunk))

    def _status(self, state: str, **fields) -> None:
        self.status_pub.publish(String(data=json.dumps({"state": state, "commands": self.commands, **fields})))


def main() -> None:
    run(PolicyNode)


if __name__ == "__main__":
    main()
