"""Training data for the high level: episode stores -> (goal, memory in, front image) -> (subtask, memory out).

Episodes come from ordinary zarr episode stores (any store with `images.front`, `subtask_index` and episode
seeds works, e.g. one written by `vla-stack collect`). `collect_mem` writes stores made for this: the front
camera only, the *unclamped* number of completed subtasks per frame, the terminal observation as a last frame
(so "done" is learnable), and, in a chosen fraction of episodes, an injected failure: while the expert carries
the cube of a random subtask, the gripper is forced open, the cube drops, and the expert re-grasps it. These
perturbed episodes teach that a failed attempt changes nothing in the memory (MEM's train/test mismatch:
demonstrations alone rarely show failures). With `pause_steps` the episode is run the way the hierarchical loop
runs it: the subtask executor (`policy.SubtaskExpert`) gets one subtask at a time, parks the arm after each, and
the next subtask arrives after a random pause of up to `pause_steps` steps (the high level's detection delay).
The flat expert goes straight on to the next cube, so in its demos the arm's motion alone gives a boundary away;
with pauses the high level has to read the outcome from the scene.

Labels are programmatic (`memory.TaskMemory`), rebuilt from each episode's seed. Sample kinds per episode:
- boundary ("stale") samples: the first frames after a subtask finished, fed the *previous* memory (or the empty
  memory at the episode start); target = next subtask + updated memory; completion label 1.
- steady samples: frames inside a subtask (perturbed frames included) fed the current memory; target unchanged
  memory and the same subtask; completion label 0.
- post-call samples (`post_call_frames`): the boundary's frames again, fed the *updated* memory and the next
  subtask as running, not stale: what the planner's completion checks see right after a call, while the arm
  still parks (without them the head fires again on the same outcome and the decoder invents another). `steady_before_boundary` more of them come from the
  16 frames before a completion (cube carried over or dropped into its goal, the gripper still closed or just
  opening): the hard negatives of the completion head, which otherwise fires while the cube is still carried.
- stale samples (`stale_per_subtask`): frames after the boundary window, anywhere until the next completion (the
  arm parked, paused or already at the next cube), still fed the previous memory: completion label 1. Without
  them a stale memory is only ever seen while the arm is still at the goal, so the head learns the arm's pose,
  and a boundary missed in that window is never detected afterwards (the parked arm reads as "nothing new").
- reset samples (sort only, where the scene shows all outcomes): a frame fed the empty memory; target the true
  memory, so a memory reset after a garbled string recovers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.memory import DONE, EMPTY, TaskMemory
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import TABLE_Z, get_robot
from vla_stack.sim.tasks import generate

CAMERA = "front"


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    goal: str
    memory_in: str
    subtask: str
    memory_out: str
    stale: bool  # completion label: memory_in is out of date for this image
    episode: int
    kind: str  # boundary | steady | reset
    after_failure: bool = False  # an injected drop happened earlier in this episode
    valid_subtasks: tuple[str, ...] = ()  # every correct next subtask (sort: any unsorted cube)
    family: str = ""
    running: str = ""  # the subtask being executed when the frame was taken ("" at the start and for resets)


# ------------------------------------------------------------------------------------------- collection
class DropInjector:
    """Forces the gripper open for a few steps while the cube of one chosen subtask is carried."""

    def __init__(self, env: TabletopEnv, subtask: int, hold_steps: int, open_steps: int = 8):
        self.env, self.subtask, self.hold_steps, self.open_steps = env, subtask, hold_steps, open_steps
        self.held = 0
        self.opened = 0
        self.drop_step: int | None = None

    def __call__(self, action: np.ndarray) -> np.ndarray:
        env, sim = self.env, self.env.sim
        if self.drop_step is None and env.subtask_index == self.subtask:
            cube = env.task.subtasks[self.subtask].goal.cube
            lifted = sim.cube_pos(cube)[2] > TABLE_Z + sim.robot.cube_half + 0.02
            self.held = self.held + 1 if lifted and sim.cube_touching_robot(cube) else 0
            if self.held >= self.hold_steps:
                self.drop_step = env.steps
        if self.drop_step is not None and self.opened < self.open_steps:
            self.opened += 1
            action = np.array(action, np.float32)
            action[-1] = 0.0
        return action


def store_features(image_size: int, n_joints: int, names: list[str]) -> dict:
    return {
        f"images.{CAMERA}": {"dtype": "uint8", "shape": [image_size, image_size, 3], "names": ["height", "width", "channel"]},
        "state": {"dtype": "float32", "shape": [n_joints], "names": names},
        "action": {"dtype": "float32", "shape": [n_joints], "names": names},
        "subtask_index": {"dtype": "int64", "shape": [], "names": None},
        "done_mask": {"dtype": "int64", "shape": [], "names": None},
    }


def _done_mask(env: TabletopEnv) -> np.int64:
    return np.int64(sum(1 << i for i in env.completed_subtasks()))


def collect_mem(task: str, robot: str, episodes: int, store_path: Path, seed_start: int = 0, image_size: int = 128,
                drop_fraction: float = 0.4, pause_steps: int = 0, executor: str = "expert",
                progress: bool = True) -> dict:
    """Record `episodes` episodes (successes and failures, perturbed or not) for high-level training.
    `subtask_index` here counts completed subtasks in order (it reaches n on the terminal frame) and `done_mask`
    holds the completed set by the scene's detectors (sort cubes may be sorted out of order). `executor` is
    "expert" (the flat scripted expert, or with `pause_steps` the subtask executor) or a VLA checkpoint: the VLA
    runs the subtasks handed over as the planner would (`SubtaskHandOff`, pauses of up to `pause_steps`), so the
    high level learns the states a learned low level produces: cubes carried over a bowl, missed grasps, placed
    cubes nudged, arms that never park."""
    from vla_stack.data.collect import SubtaskHandOff
    from vla_stack.policy.scripted import ScriptedExpert
    from vla_stack.sim.tabletop import CAMERAS

    if episodes < 1:
        raise VlaStackError("episodes must be at least 1")
    if not 0.0 <= drop_fraction <= 1.0:
        raise VlaStackError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
    if pause_steps < 0:
        raise VlaStackError(f"pause_steps must be at least 0, got {pause_steps}")
    learned = executor != "expert"
    env = TabletopEnv(task, robot, image_size=image_size, cameras=CAMERAS if learned else (CAMERA,))
    rng = np.random.default_rng(seed_start)
    counts = {"episodes": 0, "successes": 0, "perturbed": 0, "drops_happened": 0}
    try:
        names = list(env.robot.joint_names)
        store = EpisodeStore.open_or_create(store_path, robot=robot, fps=int(env.control_hz),
                                            features=store_features(image_size, len(names), names))
        used = [m.seed for i in store.episode_indices() if (m := store.episode_meta(i)).seed is not None]
        seed = max(seed_start, max(used, default=seed_start - 1) + 1)
        if learned:
            from vla_stack.evaluation import load_policy

            handoff = SubtaskHandOff(env, pause_steps, executor=load_policy(executor, env))
        else:
            handoff = SubtaskHandOff(env, pause_steps) if pause_steps else None
        expert = handoff.expert if handoff else ScriptedExpert(env)
        for _ in tqdm(range(episodes), desc=f"collect-mem {task}/{robot}", disable=not progress, unit="ep"):
            obs, info = env.reset(seed=seed)
            (handoff or expert).reset(seed=seed)
            inject = None
            if rng.random() < drop_fraction:
                inject = DropInjector(env, int(rng.integers(len(env.task.subtasks))), int(rng.integers(2, 10)))
            with store.begin_episode(instruction=env.instruction, subtasks=info["subtasks"], task=task,
                                     seed=seed) as writer:
                done, action = False, None
                while True:
                    if not done:
                        if handoff:
                            handoff.subtask_index()
                        action = expert.select_action(obs)
                        if inject is not None:
                            action = inject(action)
                    writer.add_frame({f"images.{CAMERA}": obs["images"][CAMERA], "state": obs["state"],
                                      "action": np.asarray(action, np.float32),
                                      "subtask_index": np.int64(env.subtask_index), "done_mask": _done_mask(env)})
                    if done:  # the terminal observation was just stored (its action repeats the last one)
                        break
                    obs, _, terminated, truncated, info = env.step(action)
                    done = terminated or truncated
                success = bool(info["success"])
                writer.commit(success=success, extra={
                    "steps": env.steps, "terminal_frame": True, "subtask_index": "completed",
                    "perturbation": None if inject is None else "drop",
                    "perturbed_subtask": None if inject is None else inject.subtask,
                    "drop_step": None if inject is None else inject.drop_step,
                    "executor": executor if learned else ("subtask" if pause_steps else "flat"),
                    "pause_steps": pause_steps})
            counts["episodes"] += 1
            counts["successes"] += success
            counts["perturbed"] += inject is not None
            counts["drops_happened"] += inject is not None and inject.drop_step is not None
            seed += 1
    finally:
        env.close()
    return {"store": str(store_path), **counts, "episodes_in_store": len(store)}


# ------------------------------------------------------------------------------------------- samples
def _completed(store: EpisodeStore, index: int, arrays, n: int) -> list[frozenset[int]]:
    """Completed subtasks per frame. Stores from `collect_mem` record the set (`done_mask`) or, earlier, the
    in-order count; `vla-stack collect` stores record the current subtask index clamped to n-1 and no terminal
    frame, which is the same count there."""
    if "done_mask" in arrays:
        return [frozenset(i for i in range(n) if int(m) >> i & 1) for m in arrays["done_mask"][...]]
    counts = np.asarray(arrays["subtask_index"][...], dtype=np.int64)
    if store.episode_meta(index).extra.get("subtask_index") != "completed":
        counts = np.minimum(counts, n - 1)
    return [frozenset(range(int(k))) for k in counts]


LATE_WINDOW, LATE_GAP = 16, 2  # hard negatives: frames [completion - 16, completion - 2)


def episode_samples(store: EpisodeStore, index: int, rng: np.random.Generator, boundary_frames: int = 4,
                    steady_per_subtask: int = 4, reset_samples: int = 2,
                    steady_before_boundary: int = 0, post_call_frames: int = 0,
                    stale_per_subtask: int = 0) -> list[Sample]:
    meta = store.episode_meta(index)
    if meta.seed is None:
        raise VlaStackError(f"episode {index} of {store.path} has no seed: its memory labels cannot be rebuilt")
    robot = get_robot(store.robot)
    task = generate(meta.task, robot, int(meta.seed))
    if list(task.subtask_texts) != list(meta.subtasks):
        raise VlaStackError(f"episode {index} of {store.path}: subtasks {meta.subtasks} do not match the scene "
                            f"regenerated from seed {meta.seed}")
    arrays = store.episode_arrays(index)
    if f"images.{CAMERA}" not in arrays or "subtask_index" not in arrays:
        raise VlaStackError(f"{store.path} lacks images.{CAMERA} or subtask_index")
    mem = TaskMemory(task, robot)
    done = _completed(store, index, arrays, mem.n)
    images = arrays[f"images.{CAMERA}"]
    goal = meta.instruction
    samples: list[Sample] = []

    drop_step = meta.extra.get("drop_step")
    label = lambda d: mem.label_set(set(d))
    next_subtask = lambda d: mem.valid_next(set(d))[0]

    def add(t: int, memory_in: str, d: frozenset[int], stale: bool, kind: str, running: str) -> None:
        samples.append(Sample(np.asarray(images[t]), goal, memory_in, next_subtask(d), label(d), stale, index, kind,
                              after_failure=drop_step is not None and t >= drop_step,
                              valid_subtasks=tuple(mem.valid_next(set(d))), family=task.family,
                              running=running))

    starts = [0] + [t for t in range(1, len(done)) if done[t] != done[t - 1]]
    for start in starts:
        d = done[start]
        stop = next((t for t in range(start + 1, len(done)) if done[t] != d), len(done))
        previous = EMPTY if start == 0 else label(done[start - 1])
        finished = sorted(d - done[start - 1]) if start else []  # what ran until this boundary
        finished = mem.subtask(finished[0]) if len(finished) == 1 else ""
        for t in range(start, min(stop, start + boundary_frames)):
            add(t, previous, d, True, "boundary", finished)
        later = np.arange(start + boundary_frames, stop)
        if start > 0 and stale_per_subtask and len(later):
            for t in rng.choice(later, size=min(stale_per_subtask, len(later)), replace=False):
                add(int(t), previous, d, True, "stale", finished)
        if start > 0:
            for t in range(start, min(stop, start + post_call_frames)):
                add(t, label(d), d, False, "post_call", next_subtask(d))
        if stop - start > 1:
            for t in rng.choice(np.arange(start, stop), size=min(steady_per_subtask, stop - start), replace=False):
                add(int(t), label(d), d, False, "steady", next_subtask(d))
        late = np.arange(max(start + 1, stop - LATE_WINDOW), stop - LATE_GAP)
        if steady_before_boundary and stop < len(done) and len(late):
            for t in rng.choice(late, size=min(steady_before_boundary, len(late)), replace=False):
                add(int(t), label(d), d, False, "late", next_subtask(d))
    if task.family == "sort":
        for t in rng.choice(len(done), size=min(reset_samples, len(done)), replace=False):
            add(int(t), EMPTY, done[t], True, "reset", "")
    return samples


def build_samples(stores: list[Path], seed: int = 0, max_episodes: int | None = None, progress: bool = True,
                  last: int | None = None, skip_last: int = 0, **kwargs) -> list[Sample]:
    """Samples of every store's episodes; `skip_last`/`last` hold out or take only each store's last episodes
    (a held-out split by scene seed)."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for path in stores:
        store = EpisodeStore.open(path)
        indices = store.episode_indices()
        indices = indices[-last:] if last else indices[:len(indices) - skip_last]
        indices = indices[:max_episodes]
        if not indices:
            raise VlaStackError(f"{path} holds no episodes")
        for index in tqdm(indices, desc=f"samples {Path(path).name}", disable=not progress, unit="ep"):
            samples.extend(episode_samples(store, index, rng, **kwargs))
    return samples
