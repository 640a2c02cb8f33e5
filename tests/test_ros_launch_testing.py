"""Tier C: launch_testing runs sim_eval.launch.py for real where ROS 2 launch is installed (a full ROS install);
on pip-only machines launch_testing is not installable and this module skips."""

import os
import time
import unittest
from pathlib import Path

import pytest

launch_testing = pytest.importorskip("launch_testing")
launch = pytest.importorskip("launch")
pytest.importorskip("launch_ros")

from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch_testing.actions import ReadyToTest
from launch_testing.asserts import assertExitCodes

LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "sim_eval.launch.py"


@pytest.mark.launch_test
def generate_test_description():
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    sim_eval = IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH)),
                                        launch_arguments={"robot": "panda", "task": "pick"}.items())
    return launch.LaunchDescription([sim_eval, ReadyToTest()])


class TestSimEvalLaunch(unittest.TestCase):
    def test_pick_succeeds(self):
        import rclpy
        from std_msgs.msg import Bool

        from vla_stack.ros.common import LATCHED_QOS

        rclpy.init()
        node = rclpy.create_node("launch_test_probe")
        seen = []
        node.create_subscription(Bool, "task/success", lambda m: seen.append(m.data), LATCHED_QOS)
        end = time.monotonic() + 60.0
        while time.monotonic() < end and not any(seen):
            rclpy.spin_once(node, timeout_sec=0.1)
        node.destroy_node()
        rclpy.shutdown()
        self.assertTrue(any(seen), "the expert did not complete pick within 60 s")


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        assertExitCodes(proc_info)
