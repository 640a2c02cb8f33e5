"""safety_node: puts the safety layer in front of an arm for command sources that are not ours (MoveIt, other
teleop drivers, scripts). Trajectories sent to safety/<controller>/joint_trajectory (and the gripper's) are
checked against the measured joint_states and forwarded to the controller, or rejected and counted; stale
joint states make the arm hold."""

from __future__ import annotations

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory

from vla_stack.ros.common import COMMAND_QOS, SENSOR_QOS, joint_positions, param, run, seconds, trajectory_arrays
from vla_stack.ros.safety_gate import SafetyGate
from vla_stack.safety import Watchdog
from vla_stack.sim.robots import get_robot


class SafetyNode(Node):
    def __init__(self, **kwargs):
        super().__init__("safety_node", **kwargs)
        self.robot = get_robot(param(self, "robot", "panda", "Robot model: panda or so101", True))
        max_age = param(self, "max_input_age", 0.2, "Refuse commands when joint_states are older than this (s)", True)
        group = MutuallyExclusiveCallbackGroup()
        self.gate = SafetyGate(self, self.robot, group)
        self.watchdog = Watchdog(["joint_states"], max_age)
        self.joints = [*self.robot.arm_joints, self.robot.gripper_joint]
        self.state = None
        self.create_subscription(JointState, "joint_states", self._on_joints, SENSOR_QOS, callback_group=group)
        controller = self.get_parameter("controller").value
        gripper = self.get_parameter("gripper_controller").value
        self.create_subscription(JointTrajectory, f"safety/{controller}/joint_trajectory", self._on_arm,
                                 COMMAND_QOS, callback_group=group)
        self.create_subscription(JointTrajectory, f"safety/{gripper}/joint_trajectory", self._on_gripper,
                                 COMMAND_QOS, callback_group=group)

    def _on_joints(self, msg: JointState) -> None:
        measured = joint_positions(msg, self.joints)
        if measured is not None:
            self.state = measured
            self.watchdog.feed("joint_states", seconds(msg.header.stamp))

    def _measured(self):
        """(q, v) of the arm and gripper when joint_states are fresh; else hold the arm and return None."""
        stale = self.watchdog.stale(self.get_clock().now().nanoseconds * 1e-9)
        if not stale:
            return self.state
        self.get_logger().warning(f"holding: {'; '.join(stale)}", throttle_duration_sec=1.0)
        self.gate.hold("stale_joint_states")
        return None

    def _on_arm(self, msg: JointTrajectory) -> None:
        if not msg.points:
            self.gate.hold("requested")
            return
        measured = self._measured()
        n = len(self.robot.arm_joints)
        q, v = measured if measured is not None else (None, None)
        stamp = msg.header.stamp if msg.header.stamp.sec or msg.header.stamp.nanosec else None
        self.gate.send_arm(*trajectory_arrays(msg), None if q is None else q[:n], None if v is None else v[:n], stamp)

    def _on_gripper(self, msg: JointTrajectory) -> None:
        if msg.points:
            measured = self._measured()
            self.gate.send_gripper(*trajectory_arrays(msg), None if measured is None else measured[0][-1])


def main() -> None:
    run(SafetyNode)


if __name__ == "__main__":
    main()
