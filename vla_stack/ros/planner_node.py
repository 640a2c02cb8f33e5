"""planner_node: the MEM high level under ROS. It reads the front camera, the task instruction (the goal) and
task/info (which scene runs, so memories are checked against it), and publishes the next subtask and the memory
text as std_msgs/String on planner/subtask and planner/memory (latched). Remap the policy node's
task/instruction onto planner/subtask and it runs the subtasks (sim_eval.launch.py planner:=mem does that).

The high level runs at subtask boundaries: every `check_every` control periods only the completion head runs;
the decoder runs when it fires (or after `replan_steps` periods without a call). With joint_states of the
scene's robot it makes no call while the gripper is closed (`holding_closure`; see MemPlanner.update). The memory is inspectable on
planner/memory and ~/status, resettable with the ~/reset_memory service (std_srvs/Trigger), and can be set from
outside on ~/set_memory (std_msgs/String). A memory that is garbled or unknown for the scene, whoever wrote it,
is logged and reset to the empty memory; it never stops the node.
"""

from __future__ import annotations

import json
import threading

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla_stack.errors import VlaStackError
from vla_stack.ros.common import LATCHED_QOS, PUBLISH_QOS, SENSOR_QOS, image_array, joint_positions, param, run


class PlannerNode(Node):
    def __init__(self, **kwargs):
        super().__init__("planner_node", **kwargs)
        from vla_stack.planners.mem.model import load_model
        from vla_stack.planners.mem.policy import MemPlanner, default_checkpoint, trigger_settings

        checkpoint = param(self, "checkpoint", "", "High-level checkpoint directory ('' = the shipped mem_tiny)", True)
        use_memory = param(self, "memory", True, "Feed the memory back to the high level (false = the ablation)",
                           True)
        check_every = param(self, "check_every", 1, "Run the completion head every N control periods", True)
        replan_steps = param(self, "replan_steps", 100, "Call the high level after N periods without a call", True)
        threshold = param(self, "threshold", 0.0, "Completion probability that triggers a high-level call "
                                                  "(0 = the checkpoint's)", True)
        confirm = param(self, "confirm", 0, "Consecutive positive completion checks before a call (0 = the "
                                            "checkpoint's)", True)
        holding = param(self, "holding_closure", 0.25, "Gripper closure above which the high level is not called "
                                                       "(a cube still held cannot be placed yet; negative = off)", True)
        min_subtask = param(self, "min_subtask_steps", 40, "Control periods after an accepted call before the "
                                                           "completion head is consulted again", True)
        grasp_gate = param(self, "grasp_gate", True, "Adopt a subtask's outcome only if the gripper held something "
                                                     "while that subtask ran", True)
        carry_steps = param(self, "carry_steps", 10, "Control periods the gripper must hold something for a "
                                                     "subtask's outcome to count", True)
        head_decides = param(self, "head_decides", "carried", "Calls at which the completion head overrules a "
                                                              "memory that misses the running subtask's outcome: "
                                                              "stall, or carried (also right after a carry)", True)
        rate = param(self, "control_rate", 10.0, "Control periods per second (the policy's rate)", True)
        self.camera = param(self, "camera", "front", "Camera the high level sees", True)
        model = load_model(checkpoint or default_checkpoint())  # CheckpointError -> one-line error, exit 2
        threshold, confirm = trigger_settings(model, threshold or None, confirm or None)
        self.planner = MemPlanner(None, None, model, use_memory=use_memory, check_every=check_every,
                                  replan_steps=replan_steps, threshold=threshold, confirm=confirm,
                                  holding_closure=holding if holding >= 0 else None, min_subtask_steps=min_subtask,
                                  grasp_gate=grasp_gate, carry_steps=carry_steps, head_decides=head_decides)
        self.planner.warn = lambda message: self.get_logger().warning(message)
        self._lock = threading.Lock()
        self._image: Image | None = None
        self._joints: JointState | None = None
        self.robot = None
        self.goal = ""
        self.subtask_pub = self.create_publisher(String, "planner/subtask", LATCHED_QOS)
        self.memory_pub = self.create_publisher(String, "planner/memory", LATCHED_QOS)
        self.status_pub = self.create_publisher(String, "~/status", PUBLISH_QOS)
        inputs = MutuallyExclusiveCallbackGroup()
        self.create_subscription(Image, f"{self.camera}/image_raw", self._on_image, SENSOR_QOS, callback_group=inputs)
        self.create_subscription(JointState, "joint_states", self._on_joints, SENSOR_QOS, callback_group=inputs)
        self.create_subscription(String, "task/instruction", self._on_goal, LATCHED_QOS, callback_group=inputs)
        self.create_subscription(String, "task/info", self._on_info, LATCHED_QOS, callback_group=inputs)
        self.create_subscription(String, "~/set_memory", self._on_set_memory, PUBLISH_QOS, callback_group=inputs)
        self.create_service(Trigger, "~/reset_memory", self._on_reset, callback_group=inputs)
        self.create_timer(1.0 / rate, self._tick, callback_group=MutuallyExclusiveCallbackGroup())
        self._publish_memory()

    # ------------------------------------------------------------------------------------------- inputs
    def _on_image(self, msg: Image) -> None:
        self._image = msg

    def _on_joints(self, msg: JointState) -> None:
        self._joints = msg

    def _gripper(self) -> float | None:
        """The scene robot's gripper closure from the latest joint_states, None when unknown."""
        from vla_stack.sim.robots import gripper_state

        if self.robot is None or self._joints is None:
            return None
        measured = joint_positions(self._joints, [self.robot.gripper_joint])
        return None if measured is None else float(gripper_state(self.robot, measured[0][0]))

    def _on_goal(self, msg: String) -> None:
        self.goal = msg.data

    def _on_info(self, msg: String) -> None:
        """A new episode: check memories against its scene from now on, start from the empty memory."""
        from vla_stack.sim.robots import get_robot
        from vla_stack.sim.tasks import generate

        try:
            info = json.loads(msg.data)
            robot = get_robot(info["robot"])
            task = generate(info["family"], robot, int(info["seed"]))
        except (ValueError, KeyError, TypeError, VlaStackError) as exc:
            self.get_logger().warning(f"task/info not understood ({exc}); checking memories by grammar only")
            task, robot = None, None
        with self._lock:
            self.planner.set_scene(task, robot)
            self.robot = robot
            if task is not None and not self.goal:
                self.goal = task.instruction
        self._publish_memory()

    def _on_set_memory(self, msg: String) -> None:
        with self._lock:
            memory = self.planner.set_memory(msg.data)  # a rejected string is logged and reset to ''
        if memory == msg.data:
            self.get_logger().info(f"memory set from outside: {memory!r}")
        self._publish_memory()

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self.planner.reset_memory()
        self.get_logger().info("memory reset by service")
        self._publish_memory()
        response.success, response.message = True, "memory reset; the next control period re-plans"
        return response

    # ------------------------------------------------------------------------------------------- control
    def _tick(self) -> None:
        image_msg = self._image
        if image_msg is None or not self.goal:
            return
        try:
            image = image_array(image_msg)
        except ValueError as exc:
            self.get_logger().warning(f"cannot use the {self.camera} image: {exc}", throttle_duration_sec=5.0)
            return
        with self._lock:
            try:
                called = self.planner.update(image, self.goal, self._gripper())
            except VlaStackError as exc:
                self.get_logger().error(f"high level failed: {exc}", throttle_duration_sec=5.0)
                return
            subtask = self.planner.subtask
        if called:
            if subtask:
                self.subtask_pub.publish(String(data=subtask))
            self._publish_memory()

    def _publish_memory(self) -> None:
        self.memory_pub.publish(String(data=self.planner.memory))
        ep = self.planner.episode_metrics()
        self.status_pub.publish(String(data=json.dumps({
            "memory": self.planner.memory, "subtask": self.planner.subtask, "calls": ep["high_level_calls"],
            "completion_checks": ep["completion_checks"], "invalid_memory": ep["invalid_memory"],
            "invalid_subtask": ep["invalid_subtask"], "high_level_ms_p50": self.planner.latency_p50()})))


def main() -> None:
    run(PlannerNode)
