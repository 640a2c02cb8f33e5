"""teleop_node: end-effector velocity teleoperation. geometry_msgs/Twist on cmd_vel (what teleop_twist_keyboard,
teleop_twist_joy and spacemouse drivers publish; linear in m/s in the robot base frame, angular.z turns the
gripper about the vertical) is integrated into a grasp-site target, converted to joint targets with inverse
kinematics and sent through the safety layer. The gripper follows ~/gripper (std_msgs/Float64, 0 open .. 1
closed) or ~/toggle_gripper (Trigger). With `keyboard` set and a terminal on stdin, keys drive it directly:
w/s x, a/d y, r/f z, q/e yaw, space toggles the gripper."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from geometry_msgs.msg import Twist
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64
from std_srvs.srv import Trigger

from vla_stack.control.ik import GraspIK, down_rotation, yaw_of
from vla_stack.ros.common import COMMAND_QOS, SENSOR_QOS, joint_positions, param, run, seconds
from vla_stack.ros.safety_gate import SafetyGate
from vla_stack.safety import Watchdog
from vla_stack.sim.robots import TABLE_Z, get_robot, gripper_ctrl

KEYS = {"w": (0, 1), "s": (0, -1), "a": (1, 1), "d": (1, -1), "r": (2, 1), "f": (2, -1), "q": (3, 1), "e": (3, -1)}


class TeleopNode(Node):
    def __init__(self, **kwargs):
        super().__init__("teleop_node", **kwargs)
        self.robot = get_robot(param(self, "robot", "panda", "Robot model: panda or so101", True))
        self.rate = param(self, "rate", 20.0, "Command rate in Hz", True)
        self.max_speed = param(self, "max_linear_speed", self.robot.max_ee_speed, "Grasp-site speed cap in m/s", True)
        self.max_yaw_rate = param(self, "max_yaw_rate", 1.0, "Gripper yaw rate cap in rad/s", True)
        self.twist_timeout = param(self, "twist_timeout", 0.3, "Stop when no Twist arrived for this long (s)", True)
        keyboard = param(self, "keyboard", False, "Read keys from the terminal (when stdin is one)", True)
        max_age = param(self, "max_input_age", 0.2, "Hold when joint_states are older than this (s)", True)
        self._running = True
        self._terminal = None
        if keyboard and sys.stdin.isatty():
            self._raw_terminal()  # before anything is published: keys typed from then on are never lost
        elif keyboard:
            self.get_logger().warning("keyboard mode needs a terminal on stdin; listening to cmd_vel only")
        group = MutuallyExclusiveCallbackGroup()
        self.gate = SafetyGate(self, self.robot, group)
        self.watchdog = Watchdog(["joint_states"], max_age)
        self.ik = GraspIK(self.robot)
        self.joints = [*self.robot.arm_joints, self.robot.gripper_joint]
        self.state = None
        self.target: np.ndarray | None = None
        self.yaw = 0.0
        self.q_cmd: np.ndarray | None = None
        self.grip = 0.0
        self._twist = (np.zeros(4), -np.inf)  # (vx, vy, vz, yaw rate), arrival time
        self.create_subscription(JointState, "joint_states", self._on_joints, SENSOR_QOS, callback_group=group)
        self.create_subscription(Twist, "cmd_vel", self._on_twist, COMMAND_QOS, callback_group=group)
        self.create_subscription(Float64, "~/gripper", lambda m: setattr(self, "grip", float(np.clip(m.data, 0, 1))),
                                 COMMAND_QOS, callback_group=group)
        self.create_service(Trigger, "~/toggle_gripper", self._on_toggle, callback_group=group)
        self.create_timer(1.0 / self.rate, self._tick, callback_group=group)
        if self._terminal is not None:
            threading.Thread(target=self._keyboard, daemon=True, name="keyboard").start()

    def _on_joints(self, msg: JointState) -> None:
        measured = joint_positions(msg, self.joints)
        if measured is not None:
            self.state = measured
            self.watchdog.feed("joint_states", seconds(msg.header.stamp))

    def _on_twist(self, msg: Twist) -> None:
        v = np.array([msg.linear.x, msg.linear.y, msg.linear.z, msg.angular.z], float)
        if not np.all(np.isfinite(v)):
            self.gate.arm.count("rejected_non_finite_twist")
            return
        speed = np.linalg.norm(v[:3])
        if speed > self.max_speed:
            v[:3] *= self.max_speed / speed
        v[3] = np.clip(v[3], -self.max_yaw_rate, self.max_yaw_rate)
        self._twist = (v, time.monotonic())

    def _on_toggle(self, request, response):
        self.grip = 0.0 if self.grip > 0.5 else 1.0
        response.success, response.message = True, "closed" if self.grip > 0.5 else "open"
        return response

    def _tick(self) -> None:
        stale = self.watchdog.stale(self.get_clock().now().nanoseconds * 1e-9)
        if stale:
            if self.target is not None:
                self.get_logger().warning(f"holding: {'; '.join(stale)}", throttle_duration_sec=1.0)
                self.gate.hold("stale_joint_states")
            self.target = None  # re-anchor at the measured pose when joint states come back
            return
        q, v = self.state
        n = len(self.robot.arm_joints)
        if self.target is None:
            self.q_cmd = q[:n].copy()
            self.target, rotation = self.ik.forward(self.q_cmd)
            self.yaw = yaw_of(rotation)
        velocity, stamp = self._twist
        if time.monotonic() - stamp > self.twist_timeout:
            velocity = np.zeros(4)
        dt = 1.0 / self.rate
        self.target = self._inside_workspace(self.target + velocity[:3] * dt)
        self.yaw += velocity[3] * dt
        self.q_cmd = self.ik.solve(self.q_cmd, self.target, down_rotation(self.yaw))
        self.gate.send_arm(self.robot.arm_joints, [dt], [self.q_cmd], q[:n], None if v is None else v[:n])
        self.gate.send_gripper([self.robot.gripper_joint], [dt], [[gripper_ctrl(self.robot, self.grip)]], q[n])

    def _inside_workspace(self, target: np.ndarray) -> np.ndarray:
        """Clamp the target into the safety layer's workspace, so holding a key at the edge cannot wind it up."""
        workspace = self.gate.arm.workspace
        base = np.asarray(self.robot.base_pos[:2])
        target = target.copy()
        target[2] = max(target[2], TABLE_Z + 0.01)
        offset = target[:2] - base
        radius = np.linalg.norm(offset)
        low, high = workspace.radius[0] + 0.01, workspace.radius[1] - 0.01
        if radius > 1e-9 and not low <= radius <= high:
            target[:2] = base + offset * np.clip(radius, low, high) / radius
        return target

    def _raw_terminal(self) -> None:
        """cbreak mode without flushing (TCSANOW): keys typed while the node starts up are kept, not discarded.
        Restored by close(), and at exit in case the node fails before it is fully built."""
        import atexit
        import termios
        import tty

        fd = sys.stdin.fileno()
        self._terminal = (fd, termios.tcgetattr(fd))
        atexit.register(termios.tcsetattr, fd, termios.TCSADRAIN, self._terminal[1])
        tty.setcbreak(fd, termios.TCSANOW)
        print("teleop keys: w/s x, a/d y, r/f z, q/e yaw, space gripper, ctrl-c quit", file=sys.stderr)

    def _keyboard(self) -> None:
        """Raw terminal keys: each press moves at half speed for one twist timeout (key repeat keeps it going)."""
        while self._running:
            key = sys.stdin.read(1)
            if key == " ":
                self.grip = 0.0 if self.grip > 0.5 else 1.0
            elif key in KEYS:
                axis, sign = KEYS[key]
                v = np.zeros(4)
                v[axis] = sign * (0.5 * self.max_speed if axis < 3 else 0.5 * self.max_yaw_rate)
                self._twist = (v, time.monotonic())

    def close(self) -> None:
        self._running = False
        if self._terminal is not None:
            import termios

            termios.tcsetattr(self._terminal[0], termios.TCSADRAIN, self._terminal[1])


def main() -> None:
    run(TeleopNode)


if __name__ == "__main__":
    main()
