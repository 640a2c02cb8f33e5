"""Where the policy node's actions come from: `expert` (the scripted expert, fed by the sim's oracle topic) or a
trained checkpoint (the VLA of vla_stack.policy.vla). Both are wrapped to return action chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vla_stack.errors import VlaStackError
from vla_stack.sim.robots import RobotSpec
from vla_stack.sim.tasks import TaskInstance, generate


class OracleView:
    """The read-only part of TabletopSim the scripted expert uses, filled from oracle/world_state messages, so the
    expert runs against a simulator in another process (or any ground-truth perception publishing the same JSON)."""

    def __init__(self, robot: RobotSpec, task: TaskInstance, state: dict):
        self.robot = robot
        self.task = task
        self.n_cubes = len(task.cubes)
        self.n_receptacles = len(task.receptacles)
        self.update(state)

    def update(self, state: dict) -> None:
        self.state = state

    def arm_qpos(self) -> np.ndarray:
        return np.asarray(self.state["arm_qpos"], float)

    def grasp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.state["grasp_pos"], float), np.asarray(self.state["grasp_rot"], float).reshape(3, 3)

    def cube_pos(self, i: int) -> np.ndarray:
        return np.asarray(self.state["cubes"][i]["pos"], float)

    def cube_yaw(self, i: int) -> float:
        return float(self.state["cubes"][i]["yaw"])

    def cube_touching_robot(self, i: int) -> bool:
        return bool(self.state["cubes"][i]["touching_robot"])

    def receptacle_pos(self, j: int) -> np.ndarray:
        return np.asarray(self.state["receptacles"][j], float)

    def goal_reached(self, goal) -> bool:
        for subtask, reached in zip(self.task.subtasks, self.state["subtask_goals"]):
            if subtask.goal == goal:
                return bool(reached)
        raise ValueError(f"goal {goal} is not one of this task's subtask goals")


class _OracleEnv:
    """What ScriptedExpert needs of an env: the world view, the task and the control rate."""

    def __init__(self, view: OracleView, control_hz: float):
        self.sim, self.task, self.control_hz = view, view.task, control_hz


class ExpertSource:
    """Scripted expert over the oracle topic; one action per observation (a chunk of length 1)."""

    name = "expert"
    needs_oracle = True

    def __init__(self, robot: RobotSpec, control_hz: float):
        self.robot, self.control_hz = robot, control_hz
        self.view: OracleView | None = None
        self.expert = None
        self.episode = None

    def reset(self, state: dict) -> None:
        """New episode: rebuild the task from (family, seed), which the task generator makes deterministic."""
        from vla_stack.policy.scripted import ScriptedExpert

        task = generate(state["family"], self.robot, int(state["seed"]))
        self.view = OracleView(self.robot, task, state)
        self.expert = ScriptedExpert(_OracleEnv(self.view, self.control_hz), seed=int(state["seed"]))
        self.expert.reset(seed=int(state["seed"]))
        self.episode = state["episode"]

    def chunk(self, obs: dict, state: dict | None, replan: bool = False) -> np.ndarray:
        if state is None:
            raise ValueError("the expert needs oracle/world_state (is sim_node publishing it?)")
        if state["episode"] != self.episode:
            self.reset(state)
        self.view.update(state)
        return np.asarray(self.expert.select_action(obs), np.float32)[None]


class CheckpointSource:
    """A trained VLA checkpoint: a chunk of future targets every `replan_steps` observations (default: the
    checkpoint's n_action_steps, as the in-process runner executes it), the running chunk in between; the node
    runs inference off the executor itself, so the policy's own asynchronous inference is off. With a planner
    (`wm`: world-model MCTS over the VLA's sampled chunks) each chunk is one planning decision, searched within
    the planner's deadline; `mem` steps its high level on every observation and asks for a new chunk as soon as
    it changes the subtask."""

    needs_oracle = False

    def __init__(self, path: str, robot: RobotSpec, planner: str = "none", planner_options: dict | None = None,
                 inference_steps: int | None = None, replan_steps: int | None = None):
        from vla_stack.policy.vla.runner import load_vla_policy

        self.name = Path(path).name
        self.policy = load_vla_policy(path, robot.name, async_inference=False, num_steps=inference_steps)
        self.policy.warm_up()  # at configure, not on the first image
        self.instruction = None
        if planner != "none":
            from types import SimpleNamespace

            from vla_stack.planners import wrap_policy

            options = dict(planner_options or {})
            try:
                self.policy = wrap_policy(planner, self.policy, SimpleNamespace(robot=robot),
                                          checkpoint=options.pop("checkpoint", None) or None, **options)
            except ImportError as exc:
                raise VlaStackError(f"planner '{planner}' is not available: {exc}") from None
            if not hasattr(self.policy, "predict_action_chunk"):
                raise VlaStackError(f"planner '{planner}' cannot produce action chunks for the policy node")
            self.name += f"+{planner}"
        self.replan_steps = replan_steps or self.policy.n_action_steps
        self._since = 0  # observations since the last chunk

    def chunk(self, obs: dict, state: dict | None, replan: bool = False) -> np.ndarray | None:
        """A new chunk, or None while the last one should keep running. `replan`: no chunk runs (start, after a
        hold or a rejected command)."""
        if obs["instruction"] != self.instruction:  # a new task: forget the previous one
            self.policy.reset()
            self.instruction, replan = obs["instruction"], True
        changed = self.policy.observe(obs)  # every step: validation, video memory, a planner's own step
        self._since += 1
        if not (replan or changed or self._since >= self.replan_steps):
            return None
        self._since = 0
        chunk = self.policy.predict_action_chunk(obs, observe=False)
        return np.asarray(chunk, np.float32).reshape(-1, len(obs["state"]))


def load_source(policy: str, robot: RobotSpec, control_hz: float, planner: str = "none",
                planner_options: dict | None = None, inference_steps: int | None = None,
                replan_steps: int | None = None):
    """'expert' or a checkpoint directory (optionally wrapped by a planner: none, wm, mem) run with
    `inference_steps` Euler steps per chunk (None: the checkpoint's) and a new chunk every `replan_steps`
    observations (None: the checkpoint's n_action_steps); bad input raises VlaStackError with a one-line reason."""
    if inference_steps is not None and inference_steps < 1:
        raise VlaStackError(f"inference_steps must be at least 1 (0 = the checkpoint's), got {inference_steps}")
    if replan_steps is not None and replan_steps < 1:
        raise VlaStackError(f"replan_steps must be at least 1 (0 = the checkpoint's), got {replan_steps}")
    if policy == "expert":
        if planner != "none":
            raise VlaStackError(f"planner '{planner}' needs a checkpoint policy, not the scripted expert")
        return ExpertSource(robot, control_hz)
    from vla_stack.paths import resolve_checkpoint

    return CheckpointSource(str(resolve_checkpoint(policy)), robot, planner, planner_options, inference_steps,
                            replan_steps)
