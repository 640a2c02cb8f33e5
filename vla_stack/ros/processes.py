"""Starting node graphs as separate processes (the benchmark and the multi-process tests) and driving a
lifecycle node from outside, all on loopback in a chosen ROS domain."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import sys
import time

import rclpy
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node


def ros_env(domain_id: int | None = None) -> dict[str, str]:
    """Environment for a ROS process of this stack: discovery on loopback only, a private domain."""
    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else env.get("ROS_DOMAIN_ID") or
                               random.randint(10, 200))
    env.setdefault("MUJOCO_GL", "egl")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ros_value(value) -> str:
    """A parameter value in --ros-args -p syntax (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(ros_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def spawn_node(executable: str, params: dict, env: dict[str, str], remaps: dict[str, str] | None = None,
               **popen) -> subprocess.Popen:
    """Run `python -m vla_stack.ros.<executable> --ros-args ...` (what the console script runs)."""
    args = [sys.executable, "-m", f"vla_stack.ros.{executable}", "--ros-args"]
    for name, value in params.items():
        args += ["-p", f"{name}:={ros_value(value)}"]
    for old, new in (remaps or {}).items():
        args += ["-r", f"{old}:={new}"]
    return subprocess.Popen(args, env=env, preexec_fn=_die_with_parent, **popen)


def _die_with_parent() -> None:
    """Linux: SIGTERM the node when the process that started it dies, so a killed benchmark or test run never
    leaves nodes spinning in the background."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM (the nodes shut down cleanly), then SIGKILL whatever did not exit."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_REACHES = {Transition.TRANSITION_CONFIGURE: State.PRIMARY_STATE_INACTIVE,
            Transition.TRANSITION_ACTIVATE: State.PRIMARY_STATE_ACTIVE,
            Transition.TRANSITION_DEACTIVATE: State.PRIMARY_STATE_INACTIVE,
            Transition.TRANSITION_CLEANUP: State.PRIMARY_STATE_UNCONFIGURED}


def change_state(node: Node, target: str, transitions: list[int], timeout: float = 30.0) -> None:
    """Drive the lifecycle node `target` through transitions (e.g. Transition.TRANSITION_CONFIGURE). A reply can
    be lost when the service's reply writer has not matched this client yet (wait_for_service sees only the
    request side), so an unanswered or refused request is checked against ~/get_state, and resent if the node
    is not there yet."""
    client = node.create_client(ChangeState, f"{target}/change_state")
    states = node.create_client(GetState, f"{target}/get_state")
    executor = SingleThreadedExecutor(context=node.context)

    def call(c, request, wait: float):
        future = c.call_async(request)
        rclpy.spin_until_future_complete(node, future, executor, timeout_sec=wait)
        return future.result() if future.done() else None

    try:
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"{target}/change_state did not appear within {timeout:.0f} s")
        for transition in transitions:
            end = time.monotonic() + timeout
            while True:
                result = call(client, ChangeState.Request(transition=Transition(id=transition)),
                              max(0.1, min(10.0, end - time.monotonic())))
                if result is not None and result.success:
                    break
                state = call(states, GetState.Request(), 2.0) if transition in _REACHES else None
                if state is not None and state.current_state.id == _REACHES[transition]:
                    break  # done, though the reply was lost (or a resent request found it done)
                if result is not None or time.monotonic() >= end:
                    raise RuntimeError(f"{target}: lifecycle transition {transition} failed"
                                       + ("" if result is not None else f" (no reply within {timeout:.0f} s)"))
    finally:
        executor.shutdown()
        node.destroy_client(client)
        node.destroy_client(states)


CONFIGURE_ACTIVATE = [Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE]
