"""The hierarchical policy: the high-level model writes (subtask, memory) at subtask boundaries, the low-level
policy runs the subtask text as its instruction.

Control loop per step:
- step 0 (memory empty) -> high-level call;
- every `check_every` steps -> completion head only (encoder, no decoding): "the memory is stale" -> call
  (default every step: the low level takes a subtask handed over late worse, see `make_policy`);
- no completion check sooner than `min_subtask_steps` after the last accepted call: no subtask of these tasks
  (grasp, carry, let go) finishes faster, and right after a call the arm still hangs over the cube it just let
  go of, which the head read as the *new* subtask done (default 40, the VLA's fastest subtask under the oracle;
  held-out traces before it: 13 false outcomes 10-35 steps after the previous call, no true one sooner than 45);
- with `settle` > 0 a firing head schedules the call `settle` steps later and the running subtask goes on
  meanwhile: a head that fires while the cube is still being lowered then reads a finished outcome;
- no accepted call for `replan_steps` steps (false alarms do not count) -> call anyway (a stalled or failed
  subtask gets re-planned);
- while the gripper is closed (closure above `holding_closure`) no call of either kind: every sort/restore
  subtask ends with the cube let go, so nothing can have finished yet;
- no outcome of the running subtask is adopted unless the gripper carried something while the subtask ran
  (closure steady inside `HELD_CLOSURE`, `carry_steps` steps in all once steady for `HELD_STEPS`; closing on
  nothing passes through that band in a step or two, a real carry to a bin holds 18-37 steps (p10-p90 over the
  VLA), a cube knocked or dropped on the way 2-19; a subtask left at a stall re-plan and re-issued later keeps its
  evidence): every sort/restore subtask is a grasp, and a cube pushed against its bin or missed in the grasp looks
  sorted in the 128 px front image. A stall re-plan without that evidence re-issues the running subtask; a
  completion call without it is a false alarm (`grasp_gate=off` turns this off);
- `memory=off` (the ablation) feeds the empty memory to the model and calls it every `check_every` steps, since
  without memory there is nothing to be stale against.
A call decodes (subtask, memory). A memory string that is not well formed for the scene is logged and reset to
the empty memory; an invalid subtask keeps the previous one. A completion-triggered call is a false alarm when its
memory brings no new outcome or does not record the running subtask as done (it names another cube: a misread
image, e.g. red for orange at 128 px): memory and subtask stay as they were, since switching to another equally
valid one (sort: any unsorted cube) would abandon a cube mid-carry. Stall re-plans may switch. Except right after
a carry (`head_decides=carried`, the default: carried for `carry_steps`, let go within RECENT_RELEASE steps):
there the decoder naming another cube was mostly a misread colour (the running cube was in its bin at 86-90% of
such calls over the VLA, held-out sort), so the completion head decides between the kept memory and the running
subtask's outcome added, as at a stall re-plan. The low level gets the subtask text through its `instruction`
attribute (VlaPolicy uses it instead of obs["instruction"]).

Scoring (privileged, for evaluation only): at every call the prediction is compared with the environment's
current subtask and the programmatic memory label of the subtasks done so far.

With the scripted expert as the low level, the expert is replaced by `SubtaskExpert`, which executes only the
subtask it is given (privileged object poses, as the expert always has): the upper bound of the hierarchy with a
perfect executor. Which low level ran is reported in `summary()["low_level"]`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import numpy as np

from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.memory import (DONE, EMPTY, InvalidMemoryError, TaskMemory, advance_memory, canonical,
                                           model_context, records_outcome)
from vla_stack.planners.mem.model import HighLevelModel, load_model, prepare_images
from vla_stack.policy.scripted import ScriptedExpert
from vla_stack.sim.robots import RobotSpec
from vla_stack.sim.tasks import TaskInstance

log = logging.getLogger("vla_stack.planners.mem")
TRACE_CALLS = 1000  # per-call records kept per episode (a node left running on a real arm must not grow)
HELD_CLOSURE = (0.2, 0.8)  # gripper closure on a cube (panda 0.46, so101 0.50); empty closed is ~1.0
HELD_STEPS = 3  # consecutive steps steady (change < HELD_STEADY) inside that band
HELD_STEADY = 0.02
RECENT_RELEASE = 40  # steps: a completion call overruled by the head needs the cube let go of this recently


class SubtaskExpert(ScriptedExpert):
    """Scripted executor of one subtask at a time, chosen by the text in `instruction` ('done' holds still): it
    leaves a goal that already holds alone, lets go of and backs away from a cube it just placed before the next
    subtask starts, and starts over when given the same subtask again after finishing it."""

    name = "expert-subtask"
    accepts_done = True

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.park_position = self.p_cmd.copy()  # the grasp site at the start: clear of the scene
        self._instruction: str | None = None
        self._running: str | None = None
        self._finished = False
        self.unknown_subtasks = 0

    @property
    def instruction(self) -> str | None:
        return self._instruction

    @instruction.setter
    def instruction(self, text: str | None) -> None:
        """A new subtask starts a new script; the running one given again after its script finished (a re-plan
        that found it not done) starts over, as a VLA given the same instruction would keep trying."""
        if text == self._running and self._finished:
            self._script = None
        self._instruction = text

    def select_action(self, observation: dict | None = None) -> np.ndarray:
        if (self._instruction != self._running or self._script is None) and not self._retreating():
            self._running, self._finished = self._instruction, False
            self._script = self._run_subtask(self._instruction)
        return next(self._script)

    def _retreating(self) -> bool:
        """The running subtask's goal holds and its script still opens the gripper and parks: the next subtask
        waits for that, as an arm does not leave a released cube at speed (it would drag it out of the bin)."""
        goal = next((s.goal for s in self.env.task.subtasks if s.text == self._running), None)
        return self._script is not None and not self._finished and goal is not None and self.sim.goal_reached(goal)

    def _run_subtask(self, text: str | None):
        goal = next((s.goal for s in self.env.task.subtasks if s.text == text), None)
        if goal is None and text not in (None, DONE):
            self.unknown_subtasks += 1
        if goal is not None and not self.sim.goal_reached(goal):
            yield from self._achieve(goal)
            # Park clear of the scene, as at the start: held over a bin the gripper hides the outcome from the
            # front camera that the high level reads next.
            yield from self._move(self.park_position, self.yaw_cmd, tolerance=0.02)
        self._finished = True
        while True:
            yield self._action()


def _gripper(obs: dict) -> float | None:
    """Gripper closure (the state's last entry), None when the observation has no state."""
    state = obs.get("state")
    return float(np.asarray(state).reshape(-1)[-1]) if state is not None and np.size(state) else None


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class MemPlanner:
    """Wraps a low-level policy (or, with policy=None and env=None, runs the high level alone, as the ROS
    planner node does: `set_scene`, then `update(image, goal)` each control step)."""

    def __init__(self, policy, env, model: HighLevelModel, use_memory: bool = True, check_every: int = 1,
                 replan_steps: int = 100, threshold: float = 0.5, low_level: str | None = None, confirm: int = 1,
                 settle: int = 0, stall_threshold: float = 0.5, holding_closure: float | None = 0.25,
                 min_subtask_steps: int = 40, grasp_gate: bool = True, head_decides: str = "carried",
                 carry_steps: int = 10):
        if check_every < 1 or replan_steps < 1 or confirm < 1 or settle < 0 or min_subtask_steps < 0:
            raise VlaStackError("check_every, replan_steps and confirm must be at least 1, settle and "
                                "min_subtask_steps at least 0")
        if not 0.0 <= stall_threshold <= 1.0:
            raise VlaStackError(f"stall_threshold must be a probability, got {stall_threshold}")
        self.confirm, self.settle, self.min_subtask_steps = confirm, settle, min_subtask_steps
        self.stall_threshold = stall_threshold
        if head_decides not in ("stall", "carried"):
            raise VlaStackError(f"head_decides must be stall or carried, got {head_decides!r}")
        if carry_steps < 1:
            raise VlaStackError(f"carry_steps must be at least 1, got {carry_steps}")
        self.head_decides, self.carry_steps = head_decides, carry_steps
        self.holding_closure = holding_closure
        self.grasp_gate = grasp_gate
        self._carried: dict[str, int] = {}  # per subtask text: steps the gripper held something while it ran
        self._last_held: int | None = None  # the last step the gripper held something
        self._blind, self._grip_prev, self._grip_steady = False, None, 0
        self._settle_at: int | None = None
        self._positives = 0
        self.policy, self.env, self.model = policy, env, model
        # checkpoints trained with running_subtask read the memory together with the subtask being executed
        self.running_input = bool(getattr(model, "checkpoint_meta", {}).get("running_subtask_input", False))
        self.use_memory, self.check_every, self.replan_steps, self.threshold = use_memory, check_every, replan_steps, threshold
        self.warn = log.warning  # where rejected memories and subtasks are reported (the ROS node: its logger)
        self.low_level = low_level or (getattr(policy, "name", type(policy).__name__) if policy is not None else "none")
        self.name = f"mem({self.low_level})"
        self.totals: dict[str, float] = {}
        self.call_ms: list[float] = []
        self.check_ms: list[float] = []
        self.boundary_delays: list[int] = []
        self.episodes = 0
        self.memory, self.subtask = EMPTY, None
        self.scene: TaskMemory | None = None
        self._last_call: int | None = None  # the stall clock (the holding gate winds it on)
        self._last_accepted = 0  # the last call whose memory was adopted: the minimum subtask time runs from it
        self._known_done = 0
        self._pending_boundary: int | None = None
        self._episode = self._new_episode()

    @staticmethod
    def _new_episode() -> dict:
        return {"steps": 0, "calls": 0, "checks": 0, "subtask_correct": 0, "memory_correct": 0, "invalid_memory": 0,
                "invalid_subtask": 0, "stall_calls": 0, "false_alarms": 0, "misread_memories": 0, "missed_boundaries": 0,
                "holding_steps": 0, "ungrasped_outcomes": 0, "trace": deque(maxlen=TRACE_CALLS), "completions": []}

    # -- policy interface ---------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        if self.policy is not None:
            self.policy.reset(seed)
        self.set_scene(getattr(self.env, "task", None), getattr(self.env, "robot", None))

    def select_action(self, obs: dict) -> np.ndarray:
        goal = obs.get("instruction") or (self.env.task.instruction if self.scene else "")
        self.update(self._front(obs), goal, _gripper(obs))
        return self.policy.select_action(obs)

    @property
    def n_action_steps(self) -> int:
        return self.policy.n_action_steps

    def observe(self, obs: dict) -> bool:
        """Chunk mode (the ROS policy node with planner:=mem), one control step: the high level's step and the
        low level's video memory. True when the high level changed the subtask: the running chunk is for the old
        one, so ask for a new one (`predict_action_chunk(obs, observe=False)`)."""
        goal = obs.get("instruction") or (self.env.task.instruction if self.scene else "")
        before = self.subtask
        called = self.update(self._front(obs), goal, _gripper(obs))
        self.policy.observe(obs)
        return called and self.subtask != before

    def predict_action_chunk(self, obs: dict, observe: bool = True) -> np.ndarray:
        """Chunk mode: the low level's chunk for the current subtask; with `observe` this is also the step's
        high-level update."""
        if observe:
            goal = obs.get("instruction") or (self.env.task.instruction if self.scene else "")
            self.update(self._front(obs), goal, _gripper(obs))
        return self.policy.predict_action_chunk(obs, observe=observe)

    def set_scene(self, task: TaskInstance | None, robot: RobotSpec | None) -> None:
        """Start an episode without an environment (the ROS node): memories are then checked against this
        scene; with None only against the grammar. Forgets the memory."""
        if self._episode["steps"]:
            self._finish_episode()
        self._episode = self._new_episode()
        self.memory, self.subtask = EMPTY, None
        self.scene = TaskMemory(task, robot) if task is not None else None
        self._last_call, self._last_accepted = None, 0
        self._known_done = 0
        self._pending_boundary = None
        self._positives, self._settle_at = 0, None
        self._carried.clear()
        self._last_held = None
        self._blind, self._grip_prev, self._grip_steady = False, None, 0

    def update(self, image: np.ndarray, goal: str, gripper: float | None = None) -> bool:
        """One control step of the high level; True when it was called (subtask and memory were rewritten).
        `gripper` (closure in [0, 1], the last joint of the state) gates the calls: every subtask of these tasks
        ends with the cube let go, so while the gripper is closed on something no outcome can have happened and
        neither the completion head nor a stall re-plan may call (the head otherwise fires on a cube carried over
        its bowl and the memory records an outcome that never happens)."""
        ep = self._episode
        step = ep["steps"]
        self._track_boundaries(step)
        self._track_grasp(gripper)
        holding = (self.holding_closure is not None and gripper is not None and self._last_call is not None
                   and float(gripper) > self.holding_closure)
        if holding:
            ep["holding_steps"] += 1
            self._positives = 0
            if step - self._last_call >= self.replan_steps:
                self._last_call = step  # a cube carried this long is no stall: the low level is still at work
            ep["steps"] += 1
            return False
        call = self._last_call is None or step - self._last_call >= self.replan_steps
        stall = call and self._last_call is not None
        ep["stall_calls"] += stall
        if not call and self._settle_at is not None:
            call = step >= self._settle_at
        elif not call and step % self.check_every == 0:
            if self.use_memory and step - self._last_accepted < self.min_subtask_steps:
                self._positives = 0  # too soon after the last call for any subtask to have finished
            elif self.use_memory:
                start = time.perf_counter()
                p = float(self.model.completion_probability(prepare_images(image[None], self.model.config.image_size),
                                                            [goal], [self._model_memory()])[0])
                self.check_ms.append((time.perf_counter() - start) * 1000)
                ep["checks"] += 1
                self._positives = self._positives + 1 if p > self.threshold else 0
                call = self._positives >= self.confirm  # debounce: `confirm` consecutive positive checks
                if call and self.settle:  # let the running subtask finish what the head saw coming, then read
                    self._settle_at, call = step + self.settle, False
            else:
                call = True
        if call:
            self._positives, self._settle_at = 0, None
            self._call(image, goal, step, stall)
        ep["steps"] += 1
        return call

    def _track_grasp(self, gripper: float | None) -> None:
        if gripper is None:  # no gripper reading (a node without joint states): no evidence to ask for
            self._blind = True
            return
        g = float(gripper)
        steady = self._grip_prev is not None and abs(g - self._grip_prev) < HELD_STEADY
        self._grip_steady = self._grip_steady + 1 if steady and HELD_CLOSURE[0] < g < HELD_CLOSURE[1] else 0
        if self._grip_steady >= HELD_STEPS and self.subtask:
            self._carried[self.subtask] = self._carried.get(self.subtask, 0) + 1
            self._last_held = self._episode["steps"]
        self._grip_prev = g

    def _held(self) -> bool:
        """Whether the running subtask may have an outcome: the gripper held something for `carry_steps` while it
        ran."""
        return self._blind or self._carried.get(self.subtask, 0) >= self.carry_steps

    def _just_released(self, step: int) -> bool:
        """The running subtask carried a cube and let go of it within RECENT_RELEASE steps (never without a gripper
        reading: no evidence, no overruling)."""
        return (not self._blind and self._carried.get(self.subtask, 0) >= self.carry_steps
                and self._last_held is not None and step - self._last_held <= RECENT_RELEASE)

    # -- the high level ------------------------------------------------------------------------------------
    def _call(self, image: np.ndarray, goal: str, step: int, stall: bool = False) -> None:
        ep = self._episode
        start = time.perf_counter()
        images = prepare_images(image[None], self.model.config.image_size)
        subtasks, memories, stale = self.model.generate(images, [goal],
                                                        [self._model_memory() if self.use_memory else EMPTY])
        subtask, memory = subtasks[0], memories[0]
        raw_subtask, raw_memory = subtask, memory
        previous = self.memory
        advanced = advance_memory(previous, self.subtask) if self.use_memory else None
        head_decides = stall or (self.head_decides == "carried" and self._just_released(step))
        if head_decides and advanced is not None and canonical(memory) != canonical(advanced):
            # A stall re-plan, or a completion call right after a carry, whose memory is unchanged or names an
            # outcome the running subtask cannot have produced (a misread image): the completion head on the kept
            # memory decides, at its own 0.5, between "nothing new" and "the running subtask is done" (the debounced
            # trigger guards against firing mid-carry; after `replan_steps` the subtask has long stopped moving),
            # and the subtask is decoded again from that memory.
            ep["misread_memories"] += canonical(memory) != canonical(previous)
            memory = advanced if float(stale[0]) > self.stall_threshold else previous
            if memory != previous:
                subtask = self.model.generate(images, [goal], [model_context(memory, self.subtask)
                                                                if self.running_input else memory])[0][0]
        ungrasped = (self.grasp_gate and self.use_memory and not self._held() and self.subtask not in (None, DONE)
                     and records_outcome(memory, self.subtask) and not records_outcome(previous, self.subtask))
        if ungrasped:  # nothing was held while this subtask ran: it cannot be done yet
            ep["ungrasped_outcomes"] += 1
            memory, subtask = previous, self.subtask
        self.call_ms.append((time.perf_counter() - start) * 1000)
        ep["calls"] += 1
        last_call, self._last_call = self._last_call, step
        if self._pending_boundary is not None:
            self.boundary_delays.append(step - self._pending_boundary)
            self._pending_boundary = None
        done = None
        if self.scene is not None and self.env is not None:  # privileged scoring against the scene's detectors
            done = self._true_done()
            ep["subtask_correct"] += raw_subtask in self.scene.valid_next(done)  # the decoder's own outputs
            ep["memory_correct"] += canonical(raw_memory) == canonical(self.scene.label_set(done))
        trace = {"step": step, "stall": stall, "false_alarm": False, "memory_in": previous,
                 "decoded": [raw_subtask, raw_memory], "completed": None if done is None else sorted(done),
                 "p_done": round(float(stale[0]), 4),  # the completion head on the kept memory
                 "held": self._held(), "ungrasped": bool(ungrasped),  # grasp evidence, and whether it blocked
                 "carried_steps": self._carried.get(self.subtask, 0),
                 "since_held": None if self._last_held is None else step - self._last_held}
        ep["trace"].append(trace)
        if (self.use_memory and not stall and previous != EMPTY and self.subtask not in (None, DONE)
                and (canonical(memory) == canonical(previous) or records_outcome(memory, self.subtask) is False)):
            # a false alarm: no new outcome, or one that is not the running subtask's (a misread image)
            ep["false_alarms"] += 1
            # It does not restart the stall clock either: a head that keeps firing at an outcome the decoder
            # keeps missing would otherwise hold the stall rule off for the rest of the episode.
            self._last_call = last_call
            trace.update(false_alarm=True, memory=self.memory, subtask=self.subtask)
            return
        self._last_accepted = step
        self.set_memory(memory)
        try:
            subtask = self.scene.check_subtask(subtask) if self.scene else _subtask_grammar_checked(subtask)
        except InvalidMemoryError as exc:
            ep["invalid_subtask"] += 1
            self.warn(f"high level wrote an invalid subtask, keeping the previous one: {exc}")
            subtask = self.subtask or goal
        self.subtask = subtask
        trace.update(memory=self.memory, subtask=subtask)
        if self.policy is not None and (subtask != DONE or getattr(self.policy, "accepts_done", False)):
            self.policy.instruction = subtask

    def _model_memory(self) -> str:
        return model_context(self.memory, self.subtask) if self.running_input else self.memory

    def _true_done(self) -> set[int]:
        """Completed subtasks by the scene's detectors (sort: in any order)."""
        return {i for i in self.env.completed_subtasks() if i < self.scene.n}

    def set_memory(self, text: object) -> str:
        """Adopt `text` as the memory if it is well formed for the scene; otherwise log it and reset to empty."""
        try:
            self.memory = self.scene.check_memory(text) if self.scene else _grammar_checked(text)
        except InvalidMemoryError as exc:
            self._episode["invalid_memory"] += 1
            self.warn(f"memory reset: {exc}")
            self.memory = EMPTY
        return self.memory

    def reset_memory(self) -> None:
        self.memory = EMPTY
        self._last_call = None  # the next step re-plans from the image

    def _front(self, obs: dict) -> np.ndarray:
        images = obs.get("images") or {}
        if "front" in images:
            return np.asarray(images["front"], np.uint8)
        if self.env is not None and hasattr(self.env, "sim"):
            return self.env.sim.render("front")  # the scripted expert's env renders nothing by itself
        raise VlaStackError("the MEM planner needs obs['images']['front']")

    def _track_boundaries(self, step: int) -> None:
        if self.scene is None or self.env is None:
            return
        completions = self._episode["completions"]  # the step the scene first had k subtasks done, k = 1, 2, ...
        completions += [step] * (len(self.env.completed_subtasks()) - len(completions))
        done = self.env.subtask_index
        if done > self._known_done:
            if self._pending_boundary is not None:
                self._episode["missed_boundaries"] += 1
            self._known_done, self._pending_boundary = done, step

    # -- metrics -------------------------------------------------------------------------------------------
    def _finish_episode(self) -> None:
        ep = self._episode
        self.episodes += 1
        for key in ("steps", "calls", "checks", "subtask_correct", "memory_correct", "invalid_memory",
                    "invalid_subtask", "stall_calls", "false_alarms", "misread_memories", "missed_boundaries",
                    "holding_steps", "ungrasped_outcomes"):
            self.totals[key] = self.totals.get(key, 0) + ep[key]

    def episode_metrics(self) -> dict:
        """This episode's counts, and `calls`: one record per high-level call (step; stall re-plan or not; false
        alarm or not; memory in; what the decoder wrote; memory and subtask after the planner's rules; the scene's
        completed subtasks by its detectors when an environment is attached, else None), the per-call trace that
        finds where a failed episode went wrong; the last TRACE_CALLS calls; and `scene_completions`, the steps at
        which the scene first had 1, 2, ... subtasks done (privileged, None without an environment), against which
        `vla-stack mem failures` times each handover."""
        ep = self._episode
        calls = max(1, ep["calls"])
        return {
            "high_level_calls": ep["calls"], "completion_checks": ep["checks"], "stall_calls": ep["stall_calls"],
            "holding_steps": ep["holding_steps"], "ungrasped_outcomes": ep["ungrasped_outcomes"],
            "false_alarms": ep["false_alarms"], "misread_memories": ep["misread_memories"],
            "subtask_accuracy": round(ep["subtask_correct"] / calls, 4),
            "memory_exact_match": round(ep["memory_correct"] / calls, 4),
            "invalid_memory": ep["invalid_memory"], "invalid_subtask": ep["invalid_subtask"],
            "final_memory": self.memory, "subtasks": [call["subtask"] for call in ep["trace"]],
            "calls": list(ep["trace"]),
            "scene_completions": list(ep["completions"]) if self.env is not None else None,
        }

    def latency_p50(self) -> float | None:
        """Median high-level call latency (ms) over the last 200 calls."""
        return _percentile(self.call_ms[-200:], 50)

    def summary(self) -> dict:
        if self._episode["steps"]:
            self._finish_episode()
            self._episode = self._new_episode()
        t = self.totals
        calls = max(1, t.get("calls", 0))
        return {
            "low_level": self.low_level, "use_memory": self.use_memory, "episodes": self.episodes,
            "check_every": self.check_every, "replan_steps": self.replan_steps, "confirm": self.confirm,
            "settle": self.settle, "min_subtask_steps": self.min_subtask_steps,
            "threshold": self.threshold,
            "high_level_calls": int(t.get("calls", 0)), "completion_checks": int(t.get("checks", 0)),
            "stall_calls": int(t.get("stall_calls", 0)), "false_alarms": int(t.get("false_alarms", 0)),
            "holding_closure": self.holding_closure, "holding_steps": int(t.get("holding_steps", 0)),
            "grasp_gate": self.grasp_gate, "ungrasped_outcomes": int(t.get("ungrasped_outcomes", 0)),
            "misread_memories": int(t.get("misread_memories", 0)),
            "steps": int(t.get("steps", 0)),
            "calls_per_episode": round(t.get("calls", 0) / max(1, self.episodes), 2),
            "steps_per_call": round(t.get("steps", 0) / calls, 1),
            "subtask_accuracy": round(t.get("subtask_correct", 0) / calls, 4),
            "memory_exact_match": round(t.get("memory_correct", 0) / calls, 4),
            "invalid_memory": int(t.get("invalid_memory", 0)), "invalid_subtask": int(t.get("invalid_subtask", 0)),
            "high_level_ms_p50": _percentile(self.call_ms, 50), "high_level_ms_p90": _percentile(self.call_ms, 90),
            "completion_check_ms_p50": _percentile(self.check_ms, 50),
            "boundary_detection_delay_steps_p50": _percentile(self.boundary_delays, 50),
            "boundaries_detected": len(self.boundary_delays), "missed_boundaries": int(t.get("missed_boundaries", 0)),
        }


class OracleHighLevel:
    """Diagnosis only (privileged): hands the low level the first subtask whose goal does not hold by the scene's
    detectors, so the low level's own success on the subtask texts, the ceiling of any high level over it, is
    measured apart from the planner's errors. Reports how long each finished subtask ran and how often a done
    subtask came undone (a placed cube knocked out)."""

    def __init__(self, policy, env):
        self.policy, self.env = policy, env
        self.low_level = getattr(policy, "name", type(policy).__name__)
        self.name = f"oracle({self.low_level})"
        self.episodes, self.undone = 0, 0
        self.subtask_steps: list[int] = []
        self._episode = self._new_episode()

    @staticmethod
    def _new_episode() -> dict:
        return {"running": None, "started": 0, "steps": 0, "switches": 0, "undone": 0, "done": set(),
                "subtask_steps": []}

    def reset(self, seed: int | None = None) -> None:
        self._finish_episode()
        self.policy.reset(seed)

    def _finish_episode(self) -> None:
        ep = self._episode
        if ep["steps"]:
            self.episodes += 1
            self.undone += ep["undone"]
            self.subtask_steps += ep["subtask_steps"]
        self._episode = self._new_episode()

    def select_action(self, obs: dict) -> np.ndarray:
        ep, task = self._episode, self.env.task
        done = self.env.completed_subtasks()
        ep["undone"] += len(ep["done"] - done)
        ep["done"] = done
        pending = [i for i in range(len(task.subtasks)) if i not in done]
        if pending and pending[0] != ep["running"]:
            if ep["running"] is not None:
                ep["switches"] += 1
                if ep["running"] in done:
                    ep["subtask_steps"].append(ep["steps"] - ep["started"])
            ep["running"], ep["started"] = pending[0], ep["steps"]
            self.policy.instruction = task.subtasks[pending[0]].text
        ep["steps"] += 1
        return self.policy.select_action(obs)

    def episode_metrics(self) -> dict:
        ep = self._episode
        return {"high_level": "oracle", "subtask_switches": ep["switches"], "subtasks_undone": ep["undone"],
                "steps_per_finished_subtask": list(ep["subtask_steps"])}

    def summary(self) -> dict:
        self._finish_episode()
        return {"high_level": "oracle (privileged: the scene's next unfinished subtask)", "low_level": self.low_level,
                "episodes": self.episodes, "subtasks_undone": self.undone,
                "steps_per_finished_subtask_p50": _percentile(self.subtask_steps, 50),
                "steps_per_finished_subtask_p90": _percentile(self.subtask_steps, 90)}


def _grammar_checked(text: object) -> str:
    from vla_stack.planners.mem.memory import is_memory_text

    if not is_memory_text(text):
        raise InvalidMemoryError(f"not a memory string: {text!r}")
    return text


def _subtask_grammar_checked(text: str) -> str:
    from vla_stack.planners.mem.memory import is_subtask_text

    if not is_subtask_text(text):
        raise InvalidMemoryError(f"not a subtask: {text!r}")
    return text


def default_checkpoint() -> Path:
    from vla_stack.paths import share_dir

    return share_dir("policies") / "mem_tiny"


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise VlaStackError(f"planner option {name} must be on or off, got {value!r}")


def trigger_settings(model, threshold=None, confirm=None) -> tuple[float, int]:
    """The completion head's firing threshold and debounce: given ones, else those the checkpoint was
    calibrated with (config.json "trigger"), else 0.5 and 1."""
    saved = model.checkpoint_meta.get("trigger", {}) if hasattr(model, "checkpoint_meta") else {}
    return (float(saved.get("threshold", 0.5) if threshold is None else threshold),
            int(saved.get("confirm", 1) if confirm is None else confirm))


def make_policy(policy, env, checkpoint: Path | None = None, memory="on", check_every=1, replan_steps=100,
                threshold=None, confirm=None, settle=0, high_level="model", stall_threshold=0.5,
                holding_closure="0.25", min_subtask_steps=40, grasp_gate="on", head_decides="carried",
                carry_steps=10, **unknown) -> MemPlanner | OracleHighLevel:
    """The `--planner mem` entry point (see vla_stack.planners.wrap_policy). Options arrive as strings from the
    command line: memory=on|off, check_every=N (default 1: the low level finishes fewer put-backs handed over
    later; the head costs ~5 ms a step), replan_steps=N, threshold=P, settle=N (steps from the head firing
    to the call), confirm=N (consecutive positive completion checks before a call); threshold and confirm default
    to the checkpoint's; stall_threshold=P, the completion probability at which a stall re-plan adds the running
    subtask's outcome to an unchanged memory; holding_closure=C, the gripper closure above which no call is made
    (off: no gate); min_subtask_steps=N, steps after an accepted call before the completion head is consulted
    again; grasp_gate=on|off, whether an outcome needs the gripper to have held something while its subtask
    ran for carry_steps=N steps; head_decides=stall|carried, which calls let the completion head overrule a
    decoded memory that misses the running subtask's outcome (carried: completion calls right after a carry too).
    high_level=oracle replaces the model by OracleHighLevel (evaluation only)."""
    if unknown:
        raise VlaStackError(f"unknown mem planner option(s) {sorted(unknown)} "
                            "(known: memory, check_every, replan_steps, threshold, confirm, settle, stall_threshold, "
                            "holding_closure, min_subtask_steps, grasp_gate, head_decides, carry_steps, high_level)")
    if high_level not in ("model", "oracle"):
        raise VlaStackError(f"planner option high_level must be model or oracle, got {high_level!r}")
    if high_level == "oracle":
        if env is None or not hasattr(env, "completed_subtasks") or type(policy) is ScriptedExpert:
            raise VlaStackError("high_level=oracle needs a simulated scene and a learned low level")
        return OracleHighLevel(policy, env)
    try:
        check_every, replan_steps, settle = int(check_every), int(replan_steps), int(settle)
        min_subtask_steps, carry_steps = int(min_subtask_steps), int(carry_steps)
        threshold = None if threshold is None else float(threshold)
        stall_threshold = float(stall_threshold)
        holding_closure = None if str(holding_closure).lower() == "off" else float(holding_closure)
        confirm = None if confirm is None else int(confirm)
    except ValueError as exc:
        raise VlaStackError(f"bad mem planner option: {exc}") from None
    model = load_model(Path(checkpoint) if checkpoint else default_checkpoint())
    threshold, confirm = trigger_settings(model, threshold, confirm)
    use_memory = _flag(memory, "memory") and bool(model.checkpoint_meta.get("use_memory", True))
    low_level = None
    if type(policy) is ScriptedExpert:
        policy = SubtaskExpert(env)
        low_level = "scripted-subtask-executor (privileged object poses)"
    return MemPlanner(policy, env, model, use_memory=use_memory, check_every=check_every,
                      replan_steps=replan_steps, threshold=threshold, low_level=low_level, confirm=confirm,
                      settle=settle, stall_threshold=stall_threshold, holding_closure=holding_closure,
                      min_subtask_steps=min_subtask_steps, grasp_gate=_flag(grasp_gate, "grasp_gate"),
                      head_decides=str(head_decides), carry_steps=carry_steps)
