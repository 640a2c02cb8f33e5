"""sim_node: the MuJoCo tabletop behind the interfaces of a ros2_control arm, so the same graph drives a real arm.

Publishes joint_states, <camera>/image_raw + camera_info, task facts (task/instruction, task/subtask,
task/success, task/info) and the privileged oracle/world_state (object poses, for the scripted expert only);
follows trajectories sent to <controller>/joint_trajectory (arm joints) and <gripper_controller>/joint_trajectory
(the gripper joint, in its native unit), each with joint_trajectory_controller semantics. The gripper has its
own controller, as in ros2_control setups where the hand is a separate controller from the arm.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import mujoco
import numpy as np
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vla_stack.errors import UnknownNameError, VlaStackError
from vla_stack.ros.common import (
    COMMAND_QOS,
    LATCHED_QOS,
    PUBLISH_QOS,
    camera_info_msg,
    image_msg,
    param,
    realtime_priority,
    run,
    seconds,
    trajectory_arrays,
    yield_to_control,
)
from vla_stack.ros.trajectory import TrajectoryFollower
from vla_stack.sim.robots import get_robot, gripper_state
from vla_stack.sim.tabletop import CAMERAS, TabletopSim
from vla_stack.sim.tasks import generate, get_family


# Render threads create and destroy their GL contexts one at a time: context setup (EGL, Mesa, mjr_makeContext)
# in two threads at once is the likeliest cause of a heap-corruption abort seen once at sim_node start-up.
_GL_SETUP = threading.Lock()


class SimNode(Node):
    def __init__(self, **kwargs):
        super().__init__("sim_node", **kwargs)
        robot = param(self, "robot", "panda", "Robot model: panda or so101", read_only=True)
        task = param(self, "task", "pick", "Task family (pick, place, place_centre, stack, sort, restore)",
                     read_only=True)
        self.seed = param(self, "seed", 0, "Scene seed of the first episode; ~/new_episode uses it when it was "
                                            "changed since the last episode, else the previous seed + 1")
        size = param(self, "image_size", 128, "Square camera image size in pixels", read_only=True)
        self.cameras = list(param(self, "cameras", list(CAMERAS), "Cameras to publish", read_only=True))
        self.camera_rate = param(self, "camera_rate", 10.0, "Image publishing rate in Hz of sim time; 0 stops images")
        self.control_rate = param(self, "control_rate", 50.0, "Controller update and joint_states rate in Hz",
                                  read_only=True)
        self.rtf = param(self, "real_time_factor", 1.0, "Sim seconds per wall second; 0 runs as fast as possible")
        self.oracle_rate = param(self, "oracle_rate", 10.0, "Rate of oracle/world_state in Hz; 0 disables it")
        controller = param(self, "controller", "arm_controller", "Arm trajectory controller name", read_only=True)
        gripper = param(self, "gripper_controller", "gripper_controller", "Gripper trajectory controller name",
                        read_only=True)
        self.render_niceness = param(self, "render_niceness", 5, "Nice value of the render threads: the control "
                                                                  "loop comes first on busy cores (0 = unchanged)",
                                     read_only=True)
        self.thread_priority = param(self, "thread_priority", 50, "SCHED_FIFO priority (1-99) of the control loop "
                                                                  "thread, as ros2_control's controller manager; "
                                                                  "0 = normal scheduling. Without the privilege "
                                                                  "the loop runs at normal priority (logged)",
                                     read_only=True)
        if not 0 <= self.thread_priority <= 99:
            raise VlaStackError(f"thread_priority must be 0 (off) or 1-99, got {self.thread_priority}")
        self._sim_tid: int | None = None  # native id of the control loop thread, once it runs
        self.publish_clock = param(self, "publish_clock", False, "Publish sim time on /clock and stamp with it "
                                                                  "(run the other nodes with use_sim_time)",
                                   read_only=True)
        self.add_on_set_parameters_callback(self._on_parameters)

        self.robot = get_robot(robot)
        self.family = get_family(task)
        unknown = set(self.cameras) - set(CAMERAS)
        if unknown:
            raise UnknownNameError(f"unknown camera(s) {sorted(unknown)} (known: {', '.join(CAMERAS)})")
        self.sim = TabletopSim(robot, self.family.n_cubes(self.robot), self.family.receptacle_kind,
                               self.family.n_receptacles(self.robot), (size, size), control_hz=self.control_rate)
        joint = self.sim.model.joint(self.robot.gripper_joint)
        self._grip_qpos, self._grip_dof = joint.qposadr[0], joint.dofadr[0]
        self.substeps = max(1, round(1.0 / (self.control_rate * self.sim.model.opt.timestep)))
        self.arm = TrajectoryFollower(self.robot.arm_joints, np.asarray(self.robot.home_qpos))
        self.gripper = TrajectoryFollower([self.robot.gripper_joint], np.array([self.robot.gripper_ctrl_open]))
        self.rejected: Counter[str] = Counter()
        self.missed_deadlines = 0
        self.ticks = 0
        self._lock = threading.Lock()  # guards the measured state read by command callbacks
        self._q = np.zeros(len(self.robot.arm_joints))
        self._grip = 0.0
        self._requests: list[tuple[str, threading.Event, dict]] = []
        self._running = True

        commands, services = MutuallyExclusiveCallbackGroup(), ReentrantCallbackGroup()
        self.create_subscription(JointTrajectory, f"{controller}/joint_trajectory",
                                 lambda m: self._on_trajectory(m, self.arm, "arm"), COMMAND_QOS,
                                 callback_group=commands)
        self.create_subscription(JointTrajectory, f"{gripper}/joint_trajectory",
                                 lambda m: self._on_trajectory(m, self.gripper, "gripper"), COMMAND_QOS,
                                 callback_group=commands)
        self.create_service(Trigger, "~/reset", lambda rq, rs: self._request("reset", rs), callback_group=services)
        self.create_service(Trigger, "~/new_episode", lambda rq, rs: self._request("new_episode", rs),
                            callback_group=services)
        self.joint_pub = self.create_publisher(JointState, "joint_states", PUBLISH_QOS)
        self.image_pubs = {c: self.create_publisher(Image, f"{c}/image_raw", PUBLISH_QOS) for c in self.cameras}
        self.info_pubs = {c: self.create_publisher(CameraInfo, f"{c}/camera_info", PUBLISH_QOS) for c in self.cameras}
        self.instruction_pub = self.create_publisher(String, "task/instruction", LATCHED_QOS)
        self.subtask_pub = self.create_publisher(String, "task/subtask", LATCHED_QOS)
        self.success_pub = self.create_publisher(Bool, "task/success", LATCHED_QOS)
        self.info_pub = self.create_publisher(String, "task/info", LATCHED_QOS)
        self.oracle_pub = self.create_publisher(String, "oracle/world_state", PUBLISH_QOS)
        self.status_pub = self.create_publisher(String, "~/status", PUBLISH_QOS)
        self.clock_pub = self.create_publisher(Clock, "/clock", PUBLISH_QOS) if self.publish_clock else None
        self.create_timer(1.0, self._publish_status, callback_group=services)

        self._render_request = threading.Condition()
        self._snapshots: dict[str, tuple[mujoco.MjData, Time] | None] = {c: None for c in self.cameras}
        self.episode = 0
        self.clock_offset = 0.0
        self._last_param_seed = self.seed
        self._start_episode(self.seed)
        self._threads = [threading.Thread(target=self._render_loop, args=(c,), daemon=True, name=f"render-{c}")
                         for c in self.cameras] + [threading.Thread(target=self._sim_loop, daemon=True, name="sim")]
        for thread in self._threads:
            thread.start()
        self.get_logger().info(f"{robot}/{task} at {self.control_rate:g} Hz, cameras {self.cameras} at "
                               f"{self.camera_rate:g} Hz, commands on {controller}/joint_trajectory and "
                               f"{gripper}/joint_trajectory")

    # ------------------------------------------------------------------------------------------- parameters
    def _on_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name in ("camera_rate", "real_time_factor", "oracle_rate") and p.value < 0:
                return SetParametersResult(successful=False, reason=f"{p.name} must be >= 0")
        for p in params:
            if p.name == "camera_rate":
                self.camera_rate = float(p.value)
            elif p.name == "real_time_factor":
                self.rtf = float(p.value)
                if self._sim_tid is not None:
                    self._apply_priority(self._sim_tid)
            elif p.name == "oracle_rate":
                self.oracle_rate = float(p.value)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------------------- episodes
    def _start_episode(self, seed: int) -> None:
        """Runs on the sim thread (or before it starts)."""
        self.seed = int(seed)
        self.task = generate(self.family.name, self.robot, self.seed)
        self.clock_offset += self.sim.data.time  # reset rewinds physics time; /clock must never go backwards
        self.sim.reset(self.task, np.random.default_rng(self.seed))
        self.episode += 1
        self.subtask_index = 0
        self.success = False
        q = self.sim.arm_qpos()
        self.arm.hold(q)
        self.gripper.hold(np.array([self.sim.data.qpos[self._grip_qpos]]))
        self._measure()
        self.instruction_pub.publish(String(data=self.task.instruction))
        self.subtask_pub.publish(String(data=self.task.subtasks[0].text))
        self.success_pub.publish(Bool(data=False))
        self.info_pub.publish(String(data=json.dumps({
            "episode": self.episode, "family": self.family.name, "robot": self.robot.name, "seed": self.seed,
            "instruction": self.task.instruction, "subtasks": self.task.subtask_texts})))
        self.get_logger().info(f"episode {self.episode} (seed {self.seed}): {self.task.instruction}")

    def _request(self, kind: str, response: Trigger.Response) -> Trigger.Response:
        """Service body: hand the reset to the sim thread and wait for it."""
        done, result = threading.Event(), {}
        with self._lock:
            self._requests.append((kind, done, result))
        if not done.wait(10.0):
            response.success, response.message = False, "sim thread did not answer within 10 s"
            return response
        response.success, response.message = True, json.dumps(result)
        return response

    def _serve_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for kind, done, result in requests:
            if kind == "new_episode":
                wanted = int(self.get_parameter("seed").value)
                seed = wanted if wanted != self._last_param_seed else self.seed + 1
                self._last_param_seed = wanted
            else:
                seed = self.seed
            self._start_episode(seed)
            result.update(episode=self.episode, seed=self.seed, instruction=self.task.instruction)
            done.set()

    # ------------------------------------------------------------------------------------------- commands
    def _on_trajectory(self, msg: JointTrajectory, follower: TrajectoryFollower, which: str) -> None:
        """A new goal starts from the current setpoint (continuous, like a stiff servo where setpoint and state
        agree); an empty one holds the measured position."""
        names, times, positions = trajectory_arrays(msg)
        with self._lock:
            sim_now = self.sim.data.time
            measured = self._q.copy() if which == "arm" else np.array([self._grip])
        current = follower.sample(sim_now) if msg.points else measured
        stamp = seconds(msg.header.stamp)
        start = sim_now if stamp == 0 else sim_now + (stamp - seconds(self._stamp()))
        try:
            follower.command(names, times, positions, start, current)
        except ValueError as exc:
            self.rejected[which] += 1
            self.get_logger().warning(f"rejected {which} trajectory: {exc}", throttle_duration_sec=1.0)

    # ------------------------------------------------------------------------------------------- simulation
    def _stamp(self) -> Time:
        if self.publish_clock:
            t = self.sim.data.time + self.clock_offset
            return Time(sec=int(t), nanosec=int((t - int(t)) * 1e9))
        return self.get_clock().now().to_msg()

    def _measure(self) -> None:
        with self._lock:
            self._q = self.sim.arm_qpos()
            self._grip = float(self.sim.data.qpos[self._grip_qpos])

    def _apply_priority(self, tid: int) -> None:
        """Real-time priority for the control loop while it sleeps every period; a loop run as fast as possible
        (real_time_factor 0) never sleeps and would shut everything else out of its core, so it runs normally."""
        refused = realtime_priority(self.thread_priority if self.rtf > 0 else 0, tid)
        if refused:
            self.get_logger().warning(f"control loop at normal priority: {refused}", once=True)

    def _sim_loop(self) -> None:
        self._sim_tid = threading.get_native_id()
        self._apply_priority(self._sim_tid)
        period = 1.0 / self.control_rate
        next_camera = next_oracle = 0.0
        deadline = time.monotonic()
        while self._running:
            self._serve_requests()
            now = self.sim.data.time
            arm, grip = self.arm.sample(now), self.gripper.sample(now)[0]
            self.sim.apply_action(np.append(arm, gripper_state(self.robot, grip)))
            self.sim.step(self.substeps)
            self._measure()
            stamp = self._stamp()
            if self.clock_pub is not None:
                self.clock_pub.publish(Clock(clock=stamp))
            self._publish_joint_state(stamp)
            sim_t = self.sim.data.time + self.clock_offset  # monotonic across resets
            if self.camera_rate > 0 and sim_t >= next_camera:
                next_camera = max(next_camera + 1.0 / self.camera_rate, sim_t)
                self._queue_render(stamp)
            if self.oracle_rate > 0 and sim_t >= next_oracle:
                next_oracle = max(next_oracle + 1.0 / self.oracle_rate, sim_t)
                self.oracle_pub.publish(String(data=json.dumps(self._world_state(stamp))))
            self._update_task()
            self.ticks += 1
            if self.rtf > 0:
                deadline += period / self.rtf
                delay = deadline - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -period / self.rtf:  # a whole period late: count it and do not try to catch up
                    self.missed_deadlines += 1
                    deadline = time.monotonic()
            else:
                deadline = time.monotonic()

    def _publish_joint_state(self, stamp: Time) -> None:
        msg = JointState(name=[*self.robot.arm_joints, self.robot.gripper_joint])
        msg.header.stamp = stamp
        with self._lock:
            msg.position = [*map(float, self._q), self._grip]
        msg.velocity = [*map(float, self.sim.arm_qvel()), float(self.sim.data.qvel[self._grip_dof])]
        self.joint_pub.publish(msg)

    def _update_task(self) -> None:
        subtasks = self.task.subtasks
        advanced = False
        while self.subtask_index < len(subtasks) and self.sim.goal_reached(subtasks[self.subtask_index].goal):
            self.subtask_index += 1
            advanced = True
        if advanced and self.subtask_index < len(subtasks):
            self.subtask_pub.publish(String(data=subtasks[self.subtask_index].text))
        success = self.subtask_index >= len(subtasks) and all(map(self.sim.goal_reached, self.task.final_goals))
        if success != self.success:
            self.success = success
            self.success_pub.publish(Bool(data=success))
            if success:
                self.get_logger().info(f"episode {self.episode}: success at sim time {self.sim.data.time:.2f} s")

    def _world_state(self, stamp: Time) -> dict:
        """Privileged ground truth (an oracle perception / mocap stand-in): only the scripted expert reads it."""
        sim = self.sim
        position, rotation = sim.grasp_pose()
        return {
            "stamp": seconds(stamp), "episode": self.episode, "family": self.family.name, "seed": self.seed,
            "arm_qpos": sim.arm_qpos().tolist(), "grasp_pos": position.tolist(), "grasp_rot": rotation.ravel().tolist(),
            "cubes": [{"pos": sim.cube_pos(i).tolist(), "yaw": sim.cube_yaw(i), "touching_robot": sim.cube_touching_robot(i)}
                      for i in range(sim.n_cubes)],
            "receptacles": [sim.receptacle_pos(j).tolist() for j in range(sim.n_receptacles)],
            "subtask_goals": [bool(sim.goal_reached(s.goal)) for s in self.task.subtasks],
        }

    # ------------------------------------------------------------------------------------------- rendering
    def _queue_render(self, stamp: Time) -> None:
        """Hand a copy of the physics state to the render threads, so rendering never delays the control loop."""
        snapshot = mujoco.MjData(self.sim.model)
        mujoco.mj_copyData(snapshot, self.sim.model, self.sim.data)
        with self._render_request:
            self._snapshots = dict.fromkeys(self.cameras, (snapshot, stamp))
            self._render_request.notify_all()

    def _render_loop(self, camera: str) -> None:
        """One thread and GL context per camera, like one driver per real camera: MuJoCo renders without the
        GIL, so both 128 px views take ~4.7 ms instead of ~7.4 one after the other (llvmpipe, 2 cores)."""
        yield_to_control(self.render_niceness)
        height, width = self.sim.image_size
        with _GL_SETUP:
            renderer = mujoco.Renderer(self.sim.model, height, width)
        frame_id = f"{camera}_camera_optical_frame"
        fovy = float(self.sim.model.cam_fovy[self.sim.model.camera(camera).id])
        try:
            while self._running:
                with self._render_request:
                    self._render_request.wait_for(lambda: self._snapshots[camera] is not None or not self._running,
                                                  0.5)
                    job, self._snapshots[camera] = self._snapshots[camera], None
                if job is None:
                    continue
                data, stamp = job
                renderer.update_scene(data, camera=camera)
                self.image_pubs[camera].publish(image_msg(renderer.render(), stamp, frame_id))
                self.info_pubs[camera].publish(camera_info_msg(width, height, fovy, stamp, frame_id))
        finally:
            with _GL_SETUP:
                renderer.close()

    # ------------------------------------------------------------------------------------------- status
    def _publish_status(self) -> None:
        self.status_pub.publish(String(data=json.dumps({
            "episode": self.episode, "seed": self.seed, "sim_time": round(self.sim.data.time + self.clock_offset, 3), "ticks": self.ticks,
            "missed_deadlines": self.missed_deadlines, "rejected_commands": dict(self.rejected),
            "success": self.success, "subtask_index": self.subtask_index})))

    def close(self) -> None:
        self._running = False
        with self._render_request:
            self._render_request.notify_all()
        for thread in self._threads:
            thread.join(timeout=2.0)
        self.sim.close()


def main() -> None:
    run(SimNode)


if __name__ == "__main__":
    main()
