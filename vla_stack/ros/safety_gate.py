"""The safety layer attached to a node that commands the arm: every trajectory it sends goes through a
SafetyFilter (arm: limits + workspace; gripper: range), and the node gains ~/estop, ~/reset_estop and
~/safety_counters (std_srvs/Trigger) plus a ~/safety topic (JSON counters, 1 Hz).

Commands go to <controller>/joint_trajectory (the joint_trajectory_controller topic). Where control_msgs is
importable (a full ROS install) and the controller's follow_joint_trajectory action server is up, goals go
through the action instead; holds always use the topic (an empty trajectory there makes the controller hold)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from rclpy.node import Node
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vla_stack.ros.common import COMMAND_QOS, PUBLISH_QOS, param, trajectory_msg
from vla_stack.safety import CommandRejected, SafetyFilter, SafetyLimits, Workspace
from vla_stack.sim.robots import RobotSpec

try:
    from control_msgs.action import FollowJointTrajectory
    from rclpy.action import ActionClient
except ImportError:  # pip-only installs have no control_msgs: the topic interface is used
    FollowJointTrajectory = None


class SafetyGate:
    def __init__(self, node: Node, robot: RobotSpec, callback_group=None):
        self.node = node
        controller = param(node, "controller", "arm_controller", "Arm joint_trajectory_controller name", True)
        gripper = param(node, "gripper_controller", "gripper_controller", "Gripper controller name", True)
        vscale = param(node, "velocity_scale", 1.0, "Fraction (0, 1] of the joint velocity limits allowed", True)
        ascale = param(node, "acceleration_scale", 1.0, "Fraction (0, 1] of the acceleration limits allowed", True)
        workspace = param(node, "check_workspace", True, "Keep the grasp site above the table and within reach", True)
        self.arm = SafetyFilter(SafetyLimits.arm(robot, vscale, ascale), Workspace(robot) if workspace else None)
        self.gripper = SafetyFilter(SafetyLimits.gripper(robot))
        self.events: Counter[str] = Counter()
        self.arm_pub = node.create_publisher(JointTrajectory, f"{controller}/joint_trajectory", COMMAND_QOS)
        self.gripper_pub = node.create_publisher(JointTrajectory, f"{gripper}/joint_trajectory", COMMAND_QOS)
        self.action = None
        if FollowJointTrajectory is not None:
            self.action = ActionClient(node, FollowJointTrajectory, f"{controller}/follow_joint_trajectory",
                                       callback_group=callback_group)
        self.safety_pub = node.create_publisher(String, "~/safety", PUBLISH_QOS)
        node.create_service(Trigger, "~/estop", self._on_estop, callback_group=callback_group)
        node.create_service(Trigger, "~/reset_estop", self._on_reset, callback_group=callback_group)
        node.create_service(Trigger, "~/safety_counters", self._on_counters, callback_group=callback_group)
        node.create_timer(1.0, self.publish_counters, callback_group=callback_group)

    # ------------------------------------------------------------------------------------------- commands
    def send_arm(self, names, times, positions, q_now: np.ndarray | None, v_now: np.ndarray | None,
                 stamp=None) -> bool:
        """Filter and send an arm trajectory starting at `stamp` (default: on receipt); a rejected one makes the
        arm hold. Returns whether it was sent."""
        try:
            safe = self.arm.filter(names, times, positions, q_now, v_now)
        except CommandRejected as exc:
            self.node.get_logger().warning(f"arm command rejected ({exc})", throttle_duration_sec=1.0)
            self.hold(f"rejected_{exc.reason}")
            return False
        msg = trajectory_msg(safe.joint_names, safe.times, safe.positions)
        if stamp is not None:
            msg.header.stamp = stamp
        if self.action is not None and self.action.server_is_ready():
            self.action.send_goal_async(FollowJointTrajectory.Goal(trajectory=msg))
        else:
            self.arm_pub.publish(msg)
        return True

    def send_gripper(self, names, times, positions, g_now: float | None, stamp=None) -> bool:
        try:
            safe = self.gripper.filter(names, times, positions, None if g_now is None else np.array([g_now]))
        except CommandRejected as exc:
            self.node.get_logger().warning(f"gripper command rejected ({exc})", throttle_duration_sec=1.0)
            return False
        msg = trajectory_msg(safe.joint_names, safe.times, safe.positions)
        if stamp is not None:
            msg.header.stamp = stamp
        self.gripper_pub.publish(msg)
        return True

    def hold(self, reason: str) -> None:
        """Stop the arm where it is (an empty trajectory is the controller's hold command). The gripper keeps its
        last command: opening or freezing it half-closed would drop what it holds."""
        self.events[f"hold_{reason}"] += 1
        self.arm_pub.publish(JointTrajectory())

    # ------------------------------------------------------------------------------------------- services
    def counters(self) -> dict:
        return {"estop": self.arm.estopped, "arm": self.arm.snapshot(), "gripper": self.gripper.snapshot(),
                "events": dict(sorted(self.events.items()))}

    def publish_counters(self) -> None:
        self.safety_pub.publish(String(data=json.dumps(self.counters())))

    def _on_estop(self, request, response):
        self.arm.estop("~/estop service")
        self.gripper.estop("~/estop service")
        self.hold("estop")
        self.node.get_logger().error("E-STOP latched: holding position until ~/reset_estop")
        response.success, response.message = True, "e-stop latched"
        return response

    def _on_reset(self, request, response):
        self.arm.reset_estop()
        self.gripper.reset_estop()
        self.node.get_logger().info("e-stop reset")
        response.success, response.message = True, "e-stop released"
        return response

    def _on_counters(self, request, response):
        response.success, response.message = True, json.dumps(self.counters())
        return response
