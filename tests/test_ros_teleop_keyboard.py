"""Tier A: teleop_node's built-in keyboard mode, driven through a pseudo-terminal on its stdin: holding 'r'
lowers the grasp site (home is near the top of the top-down reach), and the terminal settings are restored when the node exits."""

import json
import os
import pty
import random
import termios
import threading
import time

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from vla_stack.ros.processes import ros_env, spawn_node, stop

pytestmark = pytest.mark.timeout(120)  # a wedged graph fails the test instead of hanging the run


def test_keyboard_keys_move_the_grasp_site():
    domain = random.Random(os.getpid() + 4).randint(10, 200)
    env = ros_env(domain)
    controller, terminal = pty.openpty()
    settings = termios.tcgetattr(terminal)
    sim = spawn_node("sim_node", {"robot": "panda", "task": "pick", "image_size": 64, "camera_rate": 2.0,
                                  "oracle_rate": 10.0}, env)
    teleop = spawn_node("teleop_node", {"robot": "panda", "keyboard": True}, env, stdin=terminal)
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    node = Node("probe", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    heights = []
    node.create_subscription(String, "oracle/world_state", lambda m: heights.append(json.loads(m.data)["grasp_pos"][2]),
                             10)
    commands = []
    node.create_subscription(JointTrajectory, "arm_controller/joint_trajectory", commands.append, 10)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        end = time.monotonic() + 30.0
        while len(heights) < 5 or not commands:  # teleop streams commands once it has anchored at the arm's pose
            assert time.monotonic() < end, "graph did not come up"
            time.sleep(0.1)
        time.sleep(0.5)
        start = heights[-1]
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # key repeat: 'f' = down at half speed
            os.write(controller, b"f")
            time.sleep(0.05)
        time.sleep(0.5)
        assert start - heights[-1] > 0.05, (start, heights[-10:])
    finally:  # processes first, and the spinner joined before its context goes (see test_ros_vla.probe_graph)
        stop([teleop, sim])
        executor.shutdown(timeout_sec=10.0)
        spinner.join(timeout=10.0)
        node.destroy_node()
        rclpy.shutdown(context=context)
    assert teleop.returncode == 0
    assert termios.tcgetattr(terminal) == settings  # cbreak mode undone on exit
    os.close(controller)
    os.close(terminal)

