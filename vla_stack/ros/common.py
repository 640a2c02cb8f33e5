"""Helpers shared by the nodes: parameter declaration, message conversion, QoS profiles and the main() wrapper
that turns SIGINT/SIGTERM into a clean shutdown."""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration, Time
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, Image, JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vla_stack.errors import VlaStackError

# Publishers are reliable (any subscriber can connect); image/state subscribers take best effort, newest only.
PUBLISH_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
SENSOR_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
# Task facts (instruction, task info) reach late joiners, like a latched topic.
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def param(node: Node, name: str, default, description: str, read_only: bool = False):
    """Declare a parameter with a descriptor and return its value."""
    node.declare_parameter(name, default, ParameterDescriptor(description=description, read_only=read_only))
    return node.get_parameter(name).value


def yield_to_control(niceness: int) -> None:
    """Lower the calling thread's CPU priority (Linux nice, per thread; raising it needs no privilege) so a
    control loop on the same cores runs first when they are busy. Best effort: a no-op where unsupported."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:
        pass


def realtime_priority(priority: int, thread_id: int | None = None) -> str | None:
    """Run a thread (the calling one by default; `thread_id` is a native id) under SCHED_FIFO at `priority` (1-99),
    as ros2_control's controller manager runs its update loop (its `thread_priority`, default 50), so inference,
    rendering or a busy desktop on the same cores cannot delay a control tick; 0 puts it back to normal
    scheduling. Needs root or CAP_SYS_NICE / an rtprio limit: returns why it could not (the thread then keeps
    normal priority), None when set. Threads it starts afterwards would inherit the policy: give it only to a
    loop that starts none and sleeps every period."""
    if not 0 <= priority <= 99:
        raise VlaStackError(f"thread priority must be 0 (normal) or 1-99, got {priority}")
    if not hasattr(os, "sched_setscheduler"):
        return "SCHED_FIFO is not available on this platform" if priority else None
    policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
    try:
        os.sched_setscheduler(thread_id or threading.get_native_id(), policy, os.sched_param(priority))
    except OSError as exc:
        return f"SCHED_FIFO priority {priority} refused ({exc.strerror}): needs root, CAP_SYS_NICE or an rtprio limit"
    return None


def freeze_heap() -> None:
    """Put everything allocated so far (models, MuJoCo, rclpy) out of the cyclic garbage collector's reach. A
    full collection over the ~400k objects of a loaded node takes ~300 ms on this 2-core machine, a pause the
    control loop or an inference would otherwise take at a random moment. Call when set up; later garbage is
    still collected."""
    gc.collect()
    gc.freeze()


def seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class ImageSync:
    """The newest set of one image per camera whose stamps lie within `slop` seconds of each other
    (message_filters' approximate-time policy; message_filters has no wheel here). Cameras rendered or
    triggered together share a stamp; free-running ones land within half a frame period. Without it a
    policy can pair this moment's front image with the previous wrist image whenever they arrive in the
    other order."""

    def __init__(self, cameras: Sequence[str], slop: float, depth: int = 4):
        if slop < 0:
            raise VlaStackError(f"image sync slop must be >= 0 s, got {slop}")
        self.slop = slop
        self._buffers: dict[str, deque] = {c: deque(maxlen=depth) for c in cameras}
        self._last = -math.inf  # oldest stamp of the last set handed out

    def add(self, camera: str, msg: Image) -> dict[str, Image] | None:
        """Buffer msg; the set it completes if that is newer than the last one handed out, else None."""
        self._buffers[camera].append(msg)
        t = seconds(msg.header.stamp)
        matched = {camera: msg}
        for other, buffer in self._buffers.items():
            if other == camera:
                continue
            best = min(buffer, key=lambda m: abs(seconds(m.header.stamp) - t), default=None)
            if best is None or abs(seconds(best.header.stamp) - t) > self.slop:
                return None
            matched[other] = best
        oldest = min(seconds(m.header.stamp) for m in matched.values())
        if oldest <= self._last:
            return None
        self._last = oldest
        return matched


def duration(t: float) -> Duration:
    ns = round(t * 1e9)
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def image_msg(rgb: np.ndarray, stamp: Time, frame_id: str) -> Image:
    height, width = rgb.shape[:2]
    msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=3 * width)
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def image_array(msg: Image) -> np.ndarray:
    """rgb8 (or bgr8) Image -> uint8 HxWx3 RGB; other encodings raise ValueError."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"image encoding {msg.encoding} is not supported (use rgb8 or bgr8)")
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    rgb = rows[:, : 3 * msg.width].reshape(msg.height, msg.width, 3)
    return rgb[..., ::-1].copy() if msg.encoding == "bgr8" else rgb.copy()


def camera_info_msg(width: int, height: int, fovy_deg: float, stamp: Time, frame_id: str) -> CameraInfo:
    """Pinhole intrinsics of a MuJoCo camera (square pixels, principal point at the centre)."""
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5)
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    msg.k = [f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [f, 0.0, cx, 0.0, 0.0, f, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def trajectory_msg(joint_names: Sequence[str], times: Sequence[float], positions: np.ndarray) -> JointTrajectory:
    """A JointTrajectory starting on receipt (zero header stamp), positions only (linear interpolation)."""
    msg = JointTrajectory(joint_names=list(joint_names))
    msg.points = [JointTrajectoryPoint(positions=[float(v) for v in row], time_from_start=duration(t))
                  for t, row in zip(times, np.asarray(positions, float).reshape(len(times), -1))]
    return msg


def trajectory_arrays(msg: JointTrajectory) -> tuple[list[str], list[float], list[list[float]]]:
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
    return list(msg.joint_names), times, [list(p.positions) for p in msg.points]


def joint_positions(msg: JointState, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions and velocities of `names` from a JointState (any order, extra joints ignored); None if one is
    missing or the message is malformed."""
    index = {n: i for i, n in enumerate(msg.name)}
    if any(n not in index for n in names) or len(msg.position) != len(msg.name):
        return None
    q = np.array([msg.position[index[n]] for n in names], float)
    v = np.array([msg.velocity[index[n]] for n in names], float) if len(msg.velocity) == len(msg.name) else None
    return q, v


def run(make_node: Callable[[], Node]) -> None:
    """Body of every node's main(): spin on a SingleThreadedExecutor until SIGINT/SIGTERM, then stop the node's
    threads before the ROS context goes away. Bad configuration (VlaStackError, a parameter of the wrong type)
    ends in one line on stderr and exit code 2.

    One executor thread: the nodes' slow work (physics, rendering, inference) runs on their own threads and
    callbacks only store messages, so more executor threads add nothing but GIL contention (`bench ros` with
    rclpy's 4-thread MultiThreadedExecutor: image-to-command p99 110 ms; with this one 45 ms, README)."""
    # The control, render and inference threads make many short calls into mujoco/torch, each re-taking the
    # GIL from the executor thread; with Python's default 5 ms switch interval they queue behind it.
    sys.setswitchinterval(2e-4)
    # Own signal handling: rclpy's handler would invalidate the context while worker threads still publish.
    rclpy.init(args=sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    # A signal while spinning only sets a flag that the spin loop checks every 0.1 s: raised from the handler, a
    # KeyboardInterrupt can land inside rclpy's pybind11 calls, which turn it into a RuntimeError (seen in CI:
    # "Unable to convert call argument '0'" from take_message at teardown, exit code 1).
    stopping = threading.Event()

    def interrupt(signum, frame):
        if not spinning:  # still building the node (loading a checkpoint): nothing of rclpy's on the stack
            raise KeyboardInterrupt
        stopping.set()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    node = None
    spinning = False
    executor = SingleThreadedExecutor()
    code = 0
    try:
        node = make_node()
        freeze_heap()
        executor.add_node(node)
        spinning = True
        while not stopping.is_set():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (VlaStackError, ParameterException) as exc:  # bad configuration: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if node is not None:
            close = getattr(node, "close", None)
            if close is not None:
                close()
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown()
    sys.exit(code)
