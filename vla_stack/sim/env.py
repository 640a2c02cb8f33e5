"""Gymnasium environments: `gym.make("vla_stack/pick-panda-v0")`, one per (task family, robot)."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from vla_stack.errors import UnknownNameError
from vla_stack.sim.robots import ROBOTS, get_robot
from vla_stack.sim.tabletop import CAMERAS, TabletopSim
from vla_stack.sim.tasks import FAMILIES, TaskInstance, generate, get_family


class TabletopEnv(gym.Env):
    """Observation: {"images": {front, wrist}: uint8 HxWx3, "state": arm joints + gripper, "instruction": str}.
    Action: arm joint position targets (rad) + gripper command in [0, 1] (0 open, 1 closed).

    Success and subtask completion come from the scene's detectors; `info` carries the subtask index and
    the count of actions that had to be clipped or dropped.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: str = "pick", robot: str = "panda", image_size: int | tuple[int, int] = 128,
                 control_hz: float = 10.0, max_steps: int | None = None, render_mode: str | None = "rgb_array",
                 instruction: str | None = None, cameras: tuple[str, ...] = CAMERAS):
        self.family = get_family(task)
        self.robot = get_robot(robot)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.sim = TabletopSim(robot, self.family.n_cubes(self.robot), self.family.receptacle_kind,
                               self.family.n_receptacles(self.robot), size, control_hz)
        self.control_hz = control_hz
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": control_hz}
        self._max_steps_override = max_steps
        self._instruction_override = instruction
        unknown = set(cameras) - set(CAMERAS)
        if unknown:
            raise UnknownNameError(f"unknown camera(s) {sorted(unknown)} (known: {', '.join(CAMERAS)})")
        self.cameras = tuple(cameras)
        limits = self.sim.joint_limits
        self.action_space = spaces.Box(np.append(limits[:, 0], 0.0).astype(np.float32),
                                       np.append(limits[:, 1], 1.0).astype(np.float32), dtype=np.float32)
        self.observation_space = spaces.Dict({
            "images": spaces.Dict({c: spaces.Box(0, 255, (*size, 3), np.uint8) for c in self.cameras}),
            "state": spaces.Box(self.action_space.low, self.action_space.high, dtype=np.float32),
            "instruction": spaces.Text(max_length=512, charset=_CHARSET),
        })
        self.task: TaskInstance | None = None
        self.subtask_index = 0
        self.steps = 0
        self.max_steps = 0

    @property
    def instruction(self) -> str:
        return self._instruction_override or (self.task.instruction if self.task else "")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task_seed = int(seed) if seed is not None else int(self.np_random.integers(2**31))
        self.task = generate(self.family.name, self.robot, task_seed, self.control_hz)
        self.sim.reset(self.task, self.np_random)
        self.subtask_index = 0
        self.steps = 0
        self.max_steps = self._max_steps_override or self.task.max_steps
        return self._observation(), self._info(success=False)

    def step(self, action):
        success, truncated = self.step_unobserved(action)
        return self._observation(), float(success), success, truncated, self._info(success)

    def step_unobserved(self, action) -> tuple[bool, bool]:
        """step() without rendering the cameras (5-7x faster here): (terminated, truncated). For rollouts that
        look only at decision points; `observation()` renders when they do."""
        if self.task is None:
            raise RuntimeError("call reset() before step()")
        self.sim.apply_action(action)
        self.sim.step()
        self.steps += 1
        if not self.sim.physics_ok():  # unreachable with clipped targets, but never hand NaN physics on
            raise RuntimeError("physics diverged; reset the environment")
        self._advance_subtasks()
        success = self.success()
        return success, not success and self.steps >= self.max_steps

    def observation(self) -> dict:
        return self._observation()

    def snapshot(self) -> dict:
        """Everything an episode changes (physics state incl. actuator targets, step and subtask counters), for
        branching: restore() returns to it, so several futures can be tried from one state."""
        if self.task is None:
            raise RuntimeError("call reset() before snapshot()")
        return {"physics": self.sim.get_state(), "steps": self.steps, "subtask_index": self.subtask_index,
                "counters": dataclasses.replace(self.sim.counters), "task_seed": self.task.seed}

    def restore(self, snapshot: dict) -> None:
        if self.task is None or snapshot["task_seed"] != self.task.seed:
            raise RuntimeError("a snapshot restores only into the episode it was taken from")
        self.sim.set_state(snapshot["physics"])
        self.steps, self.subtask_index = snapshot["steps"], snapshot["subtask_index"]
        self.sim.counters = dataclasses.replace(snapshot["counters"])

    def success(self) -> bool:
        return self.subtask_index >= len(self.task.subtasks) and all(map(self.sim.goal_reached, self.task.final_goals))

    def completed_subtasks(self) -> set[int]:
        """Subtasks done so far: for sort (any order) every cube now in its bin, else the in-order count."""
        if self.task.family == "sort":
            return {i for i, s in enumerate(self.task.subtasks) if self.sim.goal_reached(s.goal)}
        return set(range(self.subtask_index))

    def _advance_subtasks(self) -> None:
        while self.subtask_index < len(self.task.subtasks) and \
                self.sim.goal_reached(self.task.subtasks[self.subtask_index].goal):
            self.subtask_index += 1

    def _observation(self) -> dict:
        return {
            "images": {c: self.sim.render(c) for c in self.cameras},
            "state": self.sim.joint_state(),
            "instruction": self.instruction,
        }

    def _info(self, success: bool) -> dict:
        subtasks = self.task.subtask_texts
        return {
            "success": success,
            "subtask_index": min(self.subtask_index, len(subtasks) - 1),
            "subtask": subtasks[min(self.subtask_index, len(subtasks) - 1)],
            "subtasks": subtasks,
            "task_instruction": self.task.instruction,
            "seed": self.task.seed,
            "clipped_actions": self.sim.counters.clipped,
            "non_finite_actions": self.sim.counters.non_finite,
        }

    def render(self):
        return self.sim.render("front")

    def close(self):
        self.sim.close()


_CHARSET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:'\"!?-()/&+")


def env_id(task: str, robot: str) -> str:
    return f"vla_stack/{task}-{robot}-v0"


def register_envs() -> None:
    for task in FAMILIES:
        for robot in ROBOTS:
            if env_id(task, robot) not in gym.registry:
                gym.register(env_id(task, robot), entry_point="vla_stack.sim.env:TabletopEnv",
                             kwargs={"task": task, "robot": robot})
