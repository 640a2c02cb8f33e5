"""Demonstration collection: run the scripted expert in the tasks and append episodes to a zarr store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.policy.scripted import CLOSED, OPEN, ScriptedExpert
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import TABLE_Z
from vla_stack.sim.tabletop import CAMERAS


def store_features(env: TabletopEnv) -> dict:
    names = list(env.robot.joint_names)
    height, width = env.sim.image_size
    features = {f"images.{c}": {"dtype": "uint8", "shape": [height, width, 3], "names": ["height", "width", "channel"]}
                for c in env.cameras}
    features["state"] = {"dtype": "float32", "shape": [len(names)], "names": names}
    features["action"] = {"dtype": "float32", "shape": [len(names)], "names": names}
    features["subtask_index"] = {"dtype": "int64", "shape": [], "names": None}
    return features


class ArmDisturbance:
    """DART-style disturbance (Laskey et al., 2017): the arm executes the expert's joint targets plus a Gaussian
    offset held for `hold` steps, while the episode records the clean targets. Demos then visit the off-path
    states a learned policy drifts into, labelled with the way back (the expert plans from its own command, so
    its targets return to the nominal path). Off once the grasp site is below half the approach height over the
    highest free cube top: grasps and releases, where closing or opening at the wrong place teaches the wrong
    thing, stay clean."""

    def __init__(self, sigma: float, seed: int, hold: int = 4):
        self.sigma, self.hold = sigma, hold
        self.rng = np.random.default_rng(seed)
        self.offset: np.ndarray | None = None
        self.steps = 0

    def __call__(self, env: TabletopEnv, action: np.ndarray) -> np.ndarray:
        if self.steps % self.hold == 0:
            self.offset = self.rng.normal(0.0, self.sigma, len(action) - 1)
        self.steps += 1
        sim, robot = env.sim, env.sim.robot
        free_tops = [sim.cube_pos(i)[2] + robot.cube_half for i in range(sim.n_cubes)
                     if not sim.cube_touching_robot(i)]
        if sim.grasp_pose()[0][2] < max(free_tops, default=TABLE_Z) + 0.5 * robot.hover:
            return action
        disturbed = np.array(action, dtype=np.float32)
        disturbed[:-1] += self.offset
        return disturbed


class SubtaskHandOff:
    """Low-level demos timed the way the hierarchical planner runs them (`--pause-steps`): the subtask executor
    (planners.mem.policy.SubtaskExpert) gets one subtask at a time, and the next arrives up to `pause_steps` steps
    after the previous one finished (the high level's detection delay). Meanwhile the finished subtask is still
    the instruction, and the executor lets go, backs away and parks: what a low level should do then, instead
    of the flat expert's "go straight on to the next cube", which it cannot know from its instruction. Frames
    record the handed subtask's index, so each frame's instruction is the one the low level had. `executor` is
    any policy with an `instruction` (a VLA runner records the planner's high-level data on the VLA's own
    states, `vla-stack mem collect --executor`); default the subtask executor."""

    def __init__(self, env: TabletopEnv, pause_steps: int, executor=None):
        from vla_stack.planners.mem.policy import SubtaskExpert

        self.env, self.pause_steps = env, pause_steps
        self.expert = executor if executor is not None else SubtaskExpert(env)

    def reset(self, seed: int) -> None:
        self.expert.reset(seed=seed)
        self.rng = np.random.default_rng([seed, 7])
        self.handed, self.due = -1, None

    def subtask_index(self) -> int:
        """Hand the next subtask over when it is due; the index of the subtask being executed."""
        from vla_stack.planners.mem.memory import DONE

        env, subtasks = self.env, self.env.task.subtasks
        if env.subtask_index != self.handed:
            if self.due is None:
                self.due = env.steps + (int(self.rng.integers(0, self.pause_steps + 1)) if self.handed >= 0 else 0)
            if env.steps >= self.due:
                self.handed, self.due = env.subtask_index, None
                if self.handed < len(subtasks):
                    self.expert.instruction = subtasks[self.handed].text
                elif getattr(self.expert, "accepts_done", False):
                    self.expert.instruction = DONE
        return min(max(self.handed, 0), len(subtasks) - 1)


class LearnerTakeover:
    """Correction data in the HG-DAgger way (Kelly et al., 2019): a learned low level runs the subtasks it is
    handed until a random step, then the subtask executor takes over from whatever state the learner left (a
    missed grasp, a cube dropped short of the bowl) and finishes the episode. Demos alone never show the
    expert getting out of the learner's own mistakes. The learner's frames stay in the episode, since the video
    memory looks back at them, but their actions are not the expert's: `takeover_step` (the episode meta's
    `learner_steps`) is how many leading frames training must not imitate. Takeover steps are uniform over the
    first `max_fraction` of the episode's step limit, so the states a failing learner lingers in get most."""

    accepts_done = True

    def __init__(self, env: TabletopEnv, learner, max_fraction: float = 0.6):
        from vla_stack.planners.mem.policy import SubtaskExpert

        if not 0.0 < max_fraction <= 1.0:
            raise VlaStackError(f"takeover fraction must be in (0, 1], got {max_fraction}")
        self.env, self.learner, self.max_fraction = env, learner, max_fraction
        self.expert = SubtaskExpert(env)
        self._instruction: str | None = None

    def reset(self, seed: int) -> None:
        self.learner.reset(seed=seed)
        self.expert.reset(seed=seed)
        self.park_position = self.expert.park_position.copy()
        limit = max(2, int(self.max_fraction * self.env.max_steps))
        self.takeover_step = int(np.random.default_rng([seed, 11]).integers(1, limit))
        self.learning = True
        self._instruction = None
        self._gripper = OPEN

    @property
    def instruction(self) -> str | None:
        return self._instruction

    @instruction.setter
    def instruction(self, text: str | None) -> None:
        from vla_stack.planners.mem.memory import DONE

        self._instruction = text
        if text != DONE:  # as the planner does: a learner that does not accept 'done' keeps its last subtask
            self.learner.instruction = text
        if not self.learning:
            self.expert.instruction = text

    def select_action(self, obs: dict) -> np.ndarray:
        if self.learning and self.env.steps >= self.takeover_step:
            self.learning = False
            self.expert.reset()  # plans from here: the arm where the learner left it, no script running
            self.expert.park_position = self.park_position
            self.expert.grip = self._gripper  # a cube the learner holds stays held
            self.expert.instruction = self._instruction
        action = (self.learner if self.learning else self.expert).select_action(obs)
        self._gripper = CLOSED if action[-1] > 0.5 else OPEN
        return action


def default_store_path(data_dir: Path, task: str, robot: str) -> Path:
    return data_dir / "datasets" / f"{task}-{robot}.zarr"


def collect(task: str, robot: str, episodes: int, store_path: Path, seed_start: int = 0, image_size: int = 128,
            keep_failures: bool = False, progress: bool = True, arm_noise: float = 0.0, tail_steps: int = 0,
            pause_steps: int | None = None, learner: str | None = None) -> dict:
    """Append `episodes` expert demonstrations. Seeds continue after the highest seed already in the store, so
    an interrupted collection resumes without duplicating scenes. `arm_noise` > 0 (rad) disturbs the executed
    arm targets (ArmDisturbance); recorded actions stay the expert's. `tail_steps` > 0 keeps recording that many
    steps after success: the success detector fires the moment the fingers leave the cube, so without a tail a
    demo never shows the gripper opening fully and the arm backing off (episode meta `success_step` marks
    where the task was done). `pause_steps` (0 or more) runs the subtask executor one subtask at a time
    (SubtaskHandOff) instead of the flat expert. `learner` (a VLA checkpoint; needs `pause_steps`) records
    takeover episodes (LearnerTakeover): the learner runs first, the subtask executor finishes; episodes the
    learner finished alone before the takeover teach nothing and are skipped like failures."""
    if episodes < 1:
        raise VlaStackError("--episodes must be at least 1")
    if tail_steps < 0:
        raise VlaStackError(f"--tail-steps must be >= 0, got {tail_steps}")
    if pause_steps is not None and pause_steps < 0:
        raise VlaStackError(f"--pause-steps must be >= 0, got {pause_steps}")
    if not np.isfinite(arm_noise) or arm_noise < 0:
        raise VlaStackError(f"--arm-noise must be a finite angle >= 0 (rad), got {arm_noise}")
    if learner is not None and (pause_steps is None or arm_noise > 0):
        raise VlaStackError("--learner needs --pause-steps (the learner gets one subtask at a time, as under the "
                            "planner) and no --arm-noise")
    env = TabletopEnv(task, robot, image_size=image_size, cameras=CAMERAS)
    try:
        store = EpisodeStore.open_or_create(store_path, robot=robot, fps=int(env.control_hz),
                                            features=store_features(env))
        used = [meta.seed for i in store.episode_indices() if (meta := store.episode_meta(i)).seed is not None]
        seed = max(seed_start, max(used, default=seed_start - 1) + 1)
        if learner is not None:
            from vla_stack.evaluation import load_policy

            expert = SubtaskHandOff(env, pause_steps, LearnerTakeover(env, load_policy(learner, env)))
        else:
            expert = SubtaskHandOff(env, pause_steps) if pause_steps is not None else ScriptedExpert(env)
        saved = attempts = failures = learner_alone = 0
        bar = tqdm(total=episodes, desc=f"collect {task}/{robot}", disable=not progress, unit="ep")
        while saved < episodes:
            if attempts >= 3 * episodes + 10:
                raise VlaStackError(f"expert failed {failures} of {attempts} episodes ({learner_alone} finished by the "
                                f"learner alone); stopping collection")
            disturb = ArmDisturbance(arm_noise, seed) if arm_noise > 0 else None
            success = _record_episode(env, expert, store, seed, keep_failures, disturb, tail_steps)
            attempts += 1
            alone = learner is not None and expert.expert.learning  # finished before the takeover came
            learner_alone += alone
            failures += not success and not alone
            saved += success or keep_failures
            seed += 1
            bar.update(int(success or keep_failures))
            bar.set_postfix(failed=failures)
        bar.close()
    finally:
        env.close()
    return {"store": str(store_path), "saved": saved, "attempts": attempts, "expert_failures": failures,
            "learner_finished_alone": learner_alone, "episodes_in_store": len(store)}


def _record_episode(env: TabletopEnv, expert: ScriptedExpert | SubtaskHandOff, store: EpisodeStore, seed: int,
                    keep_failures: bool, disturb: ArmDisturbance | None = None, tail_steps: int = 0) -> bool:
    obs, info = env.reset(seed=seed)
    expert.reset(seed=seed)
    handoff = expert if isinstance(expert, SubtaskHandOff) else None
    extra = {"executor": "subtask", "pause_steps": handoff.pause_steps} if handoff else {}
    takeover = handoff.expert if handoff and isinstance(handoff.expert, LearnerTakeover) else None
    with store.begin_episode(instruction=env.instruction, subtasks=info["subtasks"], task=env.family.name,
                             seed=seed) as writer:
        done = False
        tail = 0
        success_step = None
        while not done:
            index = handoff.subtask_index() if handoff else info["subtask_index"]
            action = (handoff.expert if handoff else expert).select_action(obs)
            frame = {f"images.{c}": obs["images"][c] for c in env.cameras}
            frame.update(state=obs["state"], action=np.asarray(action, np.float32), subtask_index=np.int64(index))
            writer.add_frame(frame)
            obs, _, terminated, truncated, info = env.step(disturb(env, action) if disturb else action)
            if success_step is None and terminated:
                success_step = env.steps
            tail += success_step is not None and success_step < env.steps
            done = truncated or (success_step is not None and tail >= tail_steps)
        success = success_step is not None and bool(info["success"])  # a tail that undid the goal is a failure
        if takeover is not None:
            success = success and not takeover.learning
            extra.update(executor="learner-takeover", learner_steps=takeover.takeover_step)
        if success or keep_failures:
            writer.commit(success=success, extra={"steps": env.steps, "clipped_actions": info["clipped_actions"],
                                                  "arm_noise": disturb.sigma if disturb else 0.0,
                                                  "success_step": success_step, **extra})
        else:
            writer.discard()
    return success
