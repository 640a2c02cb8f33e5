"""planner_node in one process (rclpy with its own context, no spawned graph): the memory is published and
inspectable, resettable by the ~/reset_memory service, a garbled memory string is reset and logged without
stopping the node, and the node plans from an image + task/info, publishing a subtask of the scene."""

import json
import time

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla_stack.planners.mem.memory import TaskMemory
from vla_stack.planners.mem.model import HighLevelModel, MemConfig
from vla_stack.ros.common import LATCHED_QOS, image_msg
from vla_stack.ros.planner_node import PlannerNode
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import get_robot
from vla_stack.sim.tasks import generate

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ros(tmp_path):
    """A planner_node (tiny untrained checkpoint unless `shipped`) and a probe node in one private context."""
    context = Context()
    rclpy.init(context=context)
    made = []

    def make(checkpoint=None, **params):
        if checkpoint is None:
            checkpoint = HighLevelModel(MemConfig(image_size=32, width=32, encoder_layers=1, decoder_layers=1,
                                                  heads=2)).save(tmp_path / "ckpt", extra={"use_memory": True})
        overrides = [Parameter("checkpoint", value=str(checkpoint)), *(Parameter(k, value=v) for k, v in params.items())]
        node = PlannerNode(context=context, parameter_overrides=overrides)
        probe = Node("probe", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.add_node(probe)
        made.append((executor, node, probe))
        return executor, node, probe

    yield make
    for executor, node, probe in made:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        probe.destroy_node()
    rclpy.shutdown(context=context)


def spin_until(executor, condition, timeout=20.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
    return condition()


def test_memory_topic_reset_service_and_garbled_memory(ros, capfd):
    executor, node, probe = ros()
    memories = []
    probe.create_subscription(String, "planner/memory", lambda m: memories.append(m.data), LATCHED_QOS)
    set_memory = probe.create_publisher(String, "planner_node/set_memory", 10)
    info = probe.create_publisher(String, "task/info", LATCHED_QOS)
    task = generate("sort", get_robot("panda"), 7)
    info.publish(String(data=json.dumps({"family": "sort", "robot": "panda", "seed": 7})))
    assert spin_until(executor, lambda: node.planner.scene is not None)
    good = TaskMemory(task, get_robot("panda")).label(1)
    spin_until(executor, lambda: probe.count_publishers("planner_node/set_memory") and
               node.count_subscribers("planner_node/set_memory"))
    set_memory.publish(String(data=good))
    assert spin_until(executor, lambda: memories and memories[-1] == good), memories
    # Garbled and unknown-for-this-scene strings: reset to '' and logged, the node keeps running.
    wrong_scene = "1 of 2 cubes sorted; red is in the red bin"
    for garbled in ("%%% 9 of cubes ;;", wrong_scene):
        set_memory.publish(String(data=garbled))
        assert spin_until(executor, lambda: memories[-1] == "" and node.planner.episode_metrics()["invalid_memory"]
                          >= (1 if garbled.startswith("%") else 2))
        set_memory.publish(String(data=good))
        assert spin_until(executor, lambda: memories[-1] == good)
    assert node.planner.episode_metrics()["invalid_memory"] == 2
    assert capfd.readouterr().err.count("memory reset") == 2  # the node's ROS logger (stderr)
    # The reset service.
    client = probe.create_client(Trigger, "planner_node/reset_memory")
    assert client.wait_for_service(timeout_sec=10.0)
    future = client.call_async(Trigger.Request())
    assert spin_until(executor, future.done)
    assert future.result().success
    assert spin_until(executor, lambda: memories[-1] == "") and node.planner.memory == ""


def test_planner_node_publishes_a_subtask_of_the_scene(ros):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "policies" / "mem_tiny"
    executor, node, probe = ros(checkpoint=shipped, control_rate=50.0)
    subtasks, statuses = [], []
    probe.create_subscription(String, "planner/subtask", lambda m: subtasks.append(m.data), LATCHED_QOS)
    probe.create_subscription(String, "planner_node/status", lambda m: statuses.append(json.loads(m.data)), 10)
    env = TabletopEnv("sort", "panda", cameras=("front",))
    try:
        obs, _ = env.reset(seed=1_000_001)
        image = obs["images"]["front"]
    finally:
        env.close()
    probe.create_publisher(String, "task/info", LATCHED_QOS).publish(
        String(data=json.dumps({"family": "sort", "robot": "panda", "seed": 1_000_001})))
    probe.create_publisher(String, "task/instruction", LATCHED_QOS).publish(String(data=env.task.instruction))
    images = probe.create_publisher(Image, "front/image_raw", 10)
    stamp = probe.get_clock().now().to_msg()
    end = time.monotonic() + 30.0
    while not subtasks and time.monotonic() < end:
        images.publish(image_msg(np.asarray(image), stamp, "front"))
        executor.spin_once(timeout_sec=0.05)
    assert subtasks, statuses[-3:]
    assert subtasks[-1] in env.task.subtask_texts
    assert spin_until(executor, lambda: statuses and statuses[-1]["calls"] >= 1), statuses[-3:]
