"""Typer commands of the ROS integration, mounted by the main CLI:

- `sim_eval` (vla-stack sim-eval): sim_node + policy_node composed in one process on a MultiThreadedExecutor (no
  ROS install needed), running episodes and printing success.
- `bench_ros` (vla-stack bench ros): image-to-command latency and control-loop timing through the real node graph,
  each node in its own process.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import typer

from vla_stack.bench import MachineLoad, cpu_model
from vla_stack.errors import VlaStackError



def _loopback_domain() -> None:
    """This process talks ROS: discovery on loopback, and a private domain unless the user chose one."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(10, 200)))
    os.environ.setdefault("MUJOCO_GL", "egl")


def _write_json(result: dict, path: Path | None) -> None:
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise VlaStackError(f"cannot write {path}: {exc.strerror}") from None


# ----------------------------------------------------------------------------------------------- sim-eval
def run_sim_eval(task: str, robot: str, policy: str, episodes: int, seed_start: int = 1_000_000,
                 image_size: int = 128, real_time_factor: float = 1.0, progress: bool = True) -> dict:
    """Episodes of `policy` through ROS topics with every node in this process; success from task/success.
    The nodes run on sim time (/clock), so a busy host slows the episode down instead of failing it."""
    from vla_stack.sim.robots import get_robot
    from vla_stack.sim.tasks import get_family

    family, _ = get_family(task), get_robot(robot)
    if episodes < 1:
        raise VlaStackError("--episodes must be at least 1")
    if real_time_factor <= 0:
        raise VlaStackError("--real-time-factor must be positive (the policy runs in wall-clock time)")
    _loopback_domain()
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import Bool, String
    from std_srvs.srv import Trigger

    from vla_stack.ros.common import LATCHED_QOS, seconds
    from vla_stack.ros.policy_node import PolicyNode
    from vla_stack.ros.sim_node import SimNode

    rclpy.init()
    nodes, executor = [], MultiThreadedExecutor(num_threads=6)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        nodes.append(SimNode(parameter_overrides=[
            Parameter("robot", value=robot), Parameter("task", value=task), Parameter("seed", value=seed_start),
            Parameter("image_size", value=image_size), Parameter("real_time_factor", value=real_time_factor),
            Parameter("publish_clock", value=True)]))
        nodes.append(PolicyNode(parameter_overrides=[Parameter("robot", value=robot), Parameter("policy", value=policy),
                                                     Parameter("use_sim_time", value=True)]))
        judge = Node("sim_eval")
        nodes.append(judge)
        state = {"episode": 0, "success": False, "clock": 0.0}
        changed = threading.Condition()

        def on_info(msg: String) -> None:
            with changed:
                state.update(episode=json.loads(msg.data)["episode"], success=False)
                changed.notify_all()

        def on_success(msg: Bool) -> None:
            with changed:
                state["success"] = state["success"] or msg.data
                changed.notify_all()

        judge.create_subscription(String, "task/info", on_info, LATCHED_QOS)
        judge.create_subscription(Bool, "task/success", on_success, LATCHED_QOS)
        judge.create_subscription(Clock, "/clock", lambda m: state.update(clock=seconds(m.clock)), 10)
        new_episode = judge.create_client(Trigger, "sim_node/new_episode")
        for node in nodes:
            executor.add_node(node)
        spinner.start()
        policy_node = nodes[1]
        ok = TransitionCallbackReturn.SUCCESS
        if policy_node.trigger_configure() != ok or policy_node.trigger_activate() != ok:
            raise VlaStackError(f"policy '{policy}' could not be configured (see the log above)")
        results = []
        for i in range(episodes):
            if i > 0:
                if not new_episode.wait_for_service(timeout_sec=10.0):
                    raise VlaStackError("sim_node/new_episode is not available")
                new_episode.call(Trigger.Request(), timeout_sec=20.0)
            with changed:
                changed.wait_for(lambda i=i: state["episode"] == i + 1, timeout=20.0)
                start, wall = state["clock"], time.monotonic()
                give_up = wall + 5 * family.max_seconds / real_time_factor  # the sim stopped advancing
                while not (state["success"] or state["clock"] - start >= family.max_seconds
                           or time.monotonic() > give_up):
                    changed.wait(0.1)
                success, sim_seconds = bool(state["success"]), state["clock"] - start
            record = {"episode": i, "seed": seed_start + i, "success": success, "sim_seconds": round(sim_seconds, 2),
                      "wall_seconds": round(time.monotonic() - wall, 2)}
            results.append(record)
            if progress:
                print(f"episode {i} seed {record['seed']}: {'success' if success else 'failure'} after "
                      f"{record['sim_seconds']:.1f} s sim time", flush=True)
        successes = sum(r["success"] for r in results)
        return {"task": task, "robot": robot, "policy": policy, "episodes": episodes, "successes": successes,
                "success_rate": successes / episodes, "per_episode": results}
    finally:
        for node in nodes:
            close = getattr(node, "close", None)
            if close is not None:
                close()
        executor.shutdown(timeout_sec=2.0)
        if spinner.is_alive():
            spinner.join(timeout=5.0)
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()


def sim_eval(
    task: str = typer.Option("pick", help="Task family."),
    robot: str = typer.Option("panda", help="Robot."),
    policy: str = typer.Option("expert", help="'expert' or a checkpoint path."),
    episodes: int = typer.Option(5, help="Episodes to run."),
    seed_start: int = typer.Option(1_000_000, help="Scene seed of the first episode (held-out range by default)."),
    image_size: int = typer.Option(128, help="Camera image size in pixels."),
    real_time_factor: float = typer.Option(1.0, help="Sim speed relative to wall-clock time."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Run sim_node + policy_node in one process (no ROS install needed) and print the success rate."""
    result = run_sim_eval(task, robot, policy, episodes, seed_start, image_size, real_time_factor)
    print(f"{policy} {task}/{robot} through ROS: success {result['successes']}/{episodes} "
          f"= {result['success_rate']:.0%}")
    _write_json(result, json_out)


# ----------------------------------------------------------------------------------------------- bench ros
def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": float(a.mean())}


def run_ros_benchmark(duration: float = 300.0, robot: str = "panda", task: str = "pick", policy: str = "expert",
                      image_size: int = 128, camera_rate: float = 10.0, control_rate: float = 50.0,
                      inference_steps: int = 0, domain_id: int | None = None, progress: bool = True,
                      episode_timeout: float = 30.0, thread_priority: int = 50, replan_steps: int = 1) -> dict:
    """sim_node and policy_node as separate processes; this process measures, from the messages alone:
    image-to-command latency (command receipt minus the stamp of the image it was computed from), the sim
    control loop's tick intervals (joint_states stamps) and its missed deadlines. The sim moves to the next
    scene on success or after `episode_timeout` seconds, so the run spans many scenes and resets, as an
    evaluation does. `replan_steps` 1 (default) makes the policy node infer on every image set: the heaviest
    load, one latency sample per image (deployed, a VLA infers every n_action_steps sets)."""
    if duration <= 0 or episode_timeout <= 0:
        raise VlaStackError("--duration and --episode-timeout must be positive")
    from vla_stack.ros.processes import CONFIGURE_ACTIVATE, change_state, ros_env, spawn_node, stop

    env = ros_env(domain_id)
    os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=env["ROS_DOMAIN_ID"])
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Bool, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory

    from vla_stack.ros.common import LATCHED_QOS, PUBLISH_QOS, seconds

    processes = [
        spawn_node("sim_node", {"robot": robot, "task": task, "image_size": image_size, "camera_rate": camera_rate,
                                "control_rate": control_rate, "thread_priority": thread_priority,
                                "oracle_rate": 10.0 if policy == "expert" else 0.0}, env),  # only the expert reads it
        spawn_node("policy_node", {"robot": robot, "policy": policy, "control_rate": camera_rate,
                                   "inference_steps": inference_steps, "replan_steps": replan_steps}, env),
    ]
    rclpy.init()
    node = Node("bench_ros")
    received: dict[float, float] = {}
    sources: dict[float, float] = {}
    inference: list[float] = []  # the policy node's own inference time per command
    input_age: list[float] = []  # and the age of its images when inference started (render, transport, wake)
    ticks: list[float] = []
    sim_status: dict = {}
    episodes = {"done": 0, "started": 0, "since": time.monotonic()}
    measuring = threading.Event()
    load = MachineLoad()
    try:
        new_episode = node.create_client(Trigger, "sim_node/new_episode")

        def on_command(msg: JointTrajectory, info) -> None:
            # the middleware's receipt time, not this callback's: a busy bench process must not add latency
            if measuring.is_set() and msg.points:
                now = info["received_timestamp"] or node.get_clock().now().nanoseconds
                received[round(seconds(msg.header.stamp), 6)] = now * 1e-9

        def on_status(msg: String) -> None:
            data = json.loads(msg.data)
            if "command_stamp" in data:
                sources[round(data["command_stamp"], 6)] = data["obs_stamp"]
                if measuring.is_set():
                    inference.append(data["inference_ms"])
                    input_age.append(data["input_age_ms"])

        def on_joints(msg: JointState) -> None:
            if measuring.is_set():
                ticks.append(seconds(msg.header.stamp))

        def next_scene() -> None:
            episodes["since"] = time.monotonic()
            episodes["started"] += measuring.is_set()
            new_episode.call_async(Trigger.Request())

        def on_success(msg: Bool) -> None:
            if msg.data:  # keep the arm busy: next scene
                episodes["done"] += measuring.is_set()
                next_scene()

        node.create_subscription(JointTrajectory, "arm_controller/joint_trajectory", on_command, 50)
        node.create_subscription(String, "policy_node/status", on_status, 50)
        node.create_subscription(JointState, "joint_states", on_joints, PUBLISH_QOS)
        node.create_subscription(String, "sim_node/status", lambda m: sim_status.update(json.loads(m.data)), 10)
        node.create_subscription(Bool, "task/success", on_success, LATCHED_QOS)
        change_state(node, "policy_node", CONFIGURE_ACTIVATE)
        end = time.monotonic() + 2.0  # warm-up: discovery and the first commands
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
        missed_before = sim_status.get("missed_deadlines", 0)
        measuring.set()
        episodes["started"], episodes["since"] = 1, time.monotonic()  # the scene running now counts
        start = time.monotonic()
        with load:
            while time.monotonic() - start < duration:
                rclpy.spin_once(node, timeout_sec=0.05)
                if time.monotonic() - episodes["since"] > episode_timeout:
                    next_scene()
                if any(p.poll() is not None for p in processes):
                    raise VlaStackError("a node process exited during the benchmark")
        measuring.clear()
        end = time.monotonic() + 1.5  # the last status messages
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop(processes)
    latencies = [1e3 * (t - sources[k]) for k, t in received.items() if k in sources]
    period = 1.0 / control_rate
    intervals = np.diff(np.asarray(ticks)) if len(ticks) > 1 else np.zeros(0)
    jitter = np.abs(intervals - period) * 1e3
    return {
        "robot": robot, "task": task, "policy": policy, "duration_s": duration, "image_size": image_size,
        "camera_rate_hz": camera_rate, "inference_steps": inference_steps or None,
        "image_to_command_latency_ms": _percentiles(latencies),
        "inference_ms": _percentiles(inference),
        "input_age_at_inference_ms": _percentiles(input_age),
        "commands": len(received),
        "control_loop": {
            "target_hz": control_rate,
            "achieved_hz": float(1.0 / intervals.mean()) if len(intervals) else 0.0,
            "ticks": len(ticks),
            "jitter_ms": _percentiles(list(jitter)),
            "missed_deadlines": int(sim_status.get("missed_deadlines", 0) - missed_before),
            "late_ticks": int(np.sum(intervals > 1.5 * period)),
        },
        "episodes_started": episodes["started"], "episodes_succeeded": episodes["done"],
        "sim_thread_priority": thread_priority, "replan_steps": replan_steps,
        "machine_load": load.summary(),
        "cpu": cpu_model(),
    }


def bench_ros(
    json_out: Path | None = typer.Option(None, "--json", help="Write the results here."),
    duration: float = typer.Option(300.0, help="Measuring time in seconds."),
    robot: str = typer.Option("panda", help="Robot."),
    task: str = typer.Option("pick", help="Task family."),
    policy: str = typer.Option("vla_tiny", help="'expert', a checkpoint path or a shipped policy name."),
    image_size: int = typer.Option(128, help="Camera image size."),
    camera_rate: float = typer.Option(10.0, help="Camera rate in Hz (the policy runs on each image)."),
    control_rate: float = typer.Option(50.0, help="Sim controller rate in Hz."),
    inference_steps: int = typer.Option(0, help="Euler steps per chunk (0 = the checkpoint's)."),
    episode_timeout: float = typer.Option(30.0, help="Next scene after this many seconds without success."),
    thread_priority: int = typer.Option(50, help="sim_node's control loop SCHED_FIFO priority (0 = normal)."),
    replan_steps: int = typer.Option(1, help="Image sets per new chunk (1: infer on every one, the heaviest load; "
                                             "0: the checkpoint's n_action_steps, as deployed)."),
) -> None:
    """Image-to-command latency p50/p99 and control-loop timing through the node graph (separate processes)."""
    result = run_ros_benchmark(duration, robot, task, policy, image_size, camera_rate, control_rate, inference_steps,
                               episode_timeout=episode_timeout, thread_priority=thread_priority,
                               replan_steps=replan_steps)
    lat, loop = result["image_to_command_latency_ms"], result["control_loop"]
    if lat["n"]:
        print(f"image-to-command latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms over {lat['n']} commands")
    if result["inference_ms"]["n"]:
        inf = result["inference_ms"]
        age = result["input_age_at_inference_ms"]
        print(f"  of which images' age when inference starts: p50 {age['p50']:.1f} ms, p99 {age['p99']:.1f} ms; "
              f"policy inference: p50 {inf['p50']:.1f} ms, p99 {inf['p99']:.1f} ms")
    print(f"control loop: {loop['achieved_hz']:.1f}/{loop['target_hz']:.0f} Hz, jitter p99 "
          f"{loop['jitter_ms'].get('p99', 0):.2f} ms, missed deadlines {loop['missed_deadlines']}, late ticks "
          f"{loop['late_ticks']}; {result['episodes_succeeded']} of {result['episodes_started']} scenes succeeded")
    load = result["machine_load"]
    if load["cpu_steal_pct"] is not None:
        print(f"while measuring on {result['cpu']}: CPU steal {load['cpu_steal_pct']}% (the host's other guests), "
              f"busy {load['cpu_busy_pct']}%, load average {load['load_avg_1m']}")
    _write_json(result, json_out)
