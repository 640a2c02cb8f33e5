"""MEM-style compressed language memory: programmatic labels and validation.

The memory keeps *outcomes*, not a log of actions ("2 of 3 cubes sorted; red is in the red bin, ..."), so a
dropped and re-grasped cube leaves it unchanged: only a subtask goal that the scene's detector confirmed moves
it on. The labels are a pure function of (task instance, number of subtasks done), so they can be rebuilt for any
recorded episode from its seed and its per-frame subtask index, and compared exactly with what a model writes.

Memory strings by family (k = subtasks done, n = subtasks):
- sort:    "k of n cubes sorted" + "; red is in the red bin, blue is in the blue bin" for the sorted ones
- restore: "the red cube started at the far left", then "the red cube is in the blue bowl; it started at the
           far left", then "the red cube is back at the far left"
- others:  "k of n steps done" + "; " + the done subtasks' texts joined by ", "
The empty string is the memory before the first high-level call (and what a reset returns to).

`check_memory` / `check_subtask` decide whether a string is well formed *for this scene* (right grammar, colours
of this scene, counts that add up); the planner resets a memory that fails the check instead of feeding it on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vla_stack.errors import VlaStackError
from vla_stack.sim.robots import RobotSpec
from vla_stack.sim.tasks import COLORS, TaskInstance

EMPTY = ""
DONE = "done"
ROWS = ("near", "middle", "far")  # distance from the robot base (world +x)
COLUMNS = ("right", "centre", "left")  # world -y .. +y as seen from the robot


class InvalidMemoryError(VlaStackError):
    """A memory or subtask string that is not well formed for the current scene."""


def region_name(robot: RobotSpec, xy: tuple[float, float]) -> str:
    """A 3x3 cell of the robot's object workspace, e.g. 'far left'; the centre cell is 'middle centre'."""
    (x0, x1), (y0, y1) = robot.workspace
    row = min(2, max(0, int((xy[0] - x0) / (x1 - x0) * 3)))
    col = min(2, max(0, int((xy[1] - y0) / (y1 - y0) * 3)))
    return f"{ROWS[row]} {COLUMNS[col]}"


REGIONS = tuple(f"{r} {c}" for r in ROWS for c in COLUMNS)


@dataclass(frozen=True)
class TaskMemory:
    """The memory labels and validators of one task instance."""

    task: TaskInstance
    robot: RobotSpec

    @property
    def n(self) -> int:
        return len(self.task.subtasks)

    # ------------------------------------------------------------------------------------------- labels
    def label(self, done: int) -> str:
        """The memory after `done` subtasks were completed (0 <= done <= n)."""
        if not 0 <= done <= self.n:
            raise ValueError(f"done must be in [0, {self.n}], got {done}")
        family = self.task.family
        if family == "sort":
            colors = [self.task.cubes[s.goal.cube].color for s in self.task.subtasks[:done]]
            text = f"{done} of {self.n} cubes sorted"
            return text + ("; " + ", ".join(f"{c} is in the {c} bin" for c in colors) if colors else "")
        if family == "restore":
            cube = self.task.cubes[self.task.subtasks[0].goal.cube]
            bowl = self.task.receptacles[self.task.subtasks[0].goal.target].color
            where = region_name(self.robot, cube.xy)
            return (f"the {cube.color} cube started at the {where}",
                    f"the {cube.color} cube is in the {bowl} bowl; it started at the {where}",
                    f"the {cube.color} cube is back at the {where}")[done]
        done_texts = [s.text for s in self.task.subtasks[:done]]
        return f"{done} of {self.n} steps done" + ("; " + ", ".join(done_texts) if done_texts else "")

    def label_set(self, done: set[int]) -> str:
        """The memory for an arbitrary set of completed subtask indices (sort cubes can be sorted in any order;
        for the ordered families the set must be a prefix)."""
        if self.task.family == "sort":
            colors = [self.task.cubes[s.goal.cube].color for i, s in enumerate(self.task.subtasks) if i in done]
            return f"{len(done)} of {self.n} cubes sorted" + \
                ("; " + ", ".join(f"{c} is in the {c} bin" for c in colors) if colors else "")
        return self.label(len(done))

    def valid_next(self, done: set[int]) -> list[str]:
        """Subtasks that are a correct next step: any unsorted cube for sort (the scene does not fix an order),
        the next one in order otherwise; ['done'] when all are done."""
        if self.task.family == "sort":
            return [s.text for i, s in enumerate(self.task.subtasks) if i not in done] or [DONE]
        return [self.subtask(len(done))]

    def subtask(self, done: int) -> str:
        """The subtask to run after `done` completed ones ('done' when all are)."""
        return self.task.subtasks[done].text if done < self.n else DONE

    def labels(self) -> list[str]:
        return [self.label(k) for k in range(self.n + 1)]

    # ------------------------------------------------------------------------------------------- checks
    def check_memory(self, text: object) -> str:
        """`text` if it is a well-formed memory for this scene, else InvalidMemoryError with the reason."""
        if not isinstance(text, str):
            raise InvalidMemoryError(f"memory must be a string, got {type(text).__name__}")
        if text == EMPTY:
            return text
        family = self.task.family
        colors = {c.color for c in self.task.cubes}
        if family == "sort":
            m = re.fullmatch(r"(\d+) of (\d+) cubes sorted(?:; (.+))?", text)
            if not m:
                raise InvalidMemoryError(f"not a sort memory: {text!r}")
            k, n = int(m[1]), int(m[2])
            items = m[3].split(", ") if m[3] else []
            if n != self.n or k > n:
                raise InvalidMemoryError(f"counts {k} of {n} do not fit a scene with {self.n} cubes: {text!r}")
            sorted_colors = []
            for item in items:
                im = re.fullmatch(r"(\w+) is in the (\w+) bin", item)
                if not im or im[1] != im[2] or im[1] not in colors:
                    raise InvalidMemoryError(f"bad sorted-cube entry {item!r} in {text!r}")
                sorted_colors.append(im[1])
            if len(items) != k or len(set(sorted_colors)) != k:
                raise InvalidMemoryError(f"{k} cubes counted but {len(set(sorted_colors))} distinct listed: {text!r}")
            return text
        if family == "restore":
            region = "|".join(REGIONS)
            bowls = {r.color for r in self.task.receptacles}
            patterns = (rf"the (\w+) cube started at the ({region})",
                        rf"the (\w+) cube is in the (\w+) bowl; it started at the ({region})",
                        rf"the (\w+) cube is back at the ({region})")
            for i, pattern in enumerate(patterns):
                m = re.fullmatch(pattern, text)
                if m:
                    if m[1] not in colors or (i == 1 and m[2] not in bowls):
                        raise InvalidMemoryError(f"names an object that is not in the scene: {text!r}")
                    return text
            raise InvalidMemoryError(f"not a restore memory: {text!r}")
        m = re.fullmatch(r"(\d+) of (\d+) steps done(?:; (.+))?", text)
        if not m or int(m[2]) != self.n or int(m[1]) > self.n:
            raise InvalidMemoryError(f"not a memory for this {family} task: {text!r}")
        return text

    def check_subtask(self, text: object) -> str:
        """`text` if it is a subtask this scene can run ('done' included), else InvalidMemoryError."""
        if not isinstance(text, str):
            raise InvalidMemoryError(f"subtask must be a string, got {type(text).__name__}")
        if text == DONE or text in self.task.subtask_texts:
            return text
        raise InvalidMemoryError(f"not a subtask of this scene: {text!r}")

    def done_from_memory(self, text: str) -> int | None:
        """How many subtasks a well-formed memory says are done (None for the empty memory)."""
        text = self.check_memory(text)
        if text == EMPTY:
            return None
        for k, label in enumerate(self.labels()):
            if label == text:
                return k
        return None  # well formed but not this scene's exact history (e.g. another sort order)


def is_subtask_text(text: str) -> bool:
    """Whether `text` follows the subtask grammar of any task family (scene-independent)."""
    color = "|".join(COLORS)
    return text == DONE or any(re.fullmatch(p, text) for p in (
        rf"pick up the ({color}) cube",
        rf"put the ({color}) cube in the ({color}) (bin|bowl)",
        rf"put the ({color}) cube on the ({color}) cube",
        rf"put the ({color}) cube back where it was",
    ))


def is_memory_text(text: object) -> bool:
    """Whether `text` follows the memory grammar of any task family (scene-independent: used where no scene is
    known, e.g. a ROS planner node without a task instance)."""
    if not isinstance(text, str):
        return False
    if text == EMPTY:
        return True
    color, region = "|".join(COLORS), "|".join(REGIONS)
    item = rf"({color}) is in the \1 bin"
    return any(re.fullmatch(p, text) for p in (
        rf"\d of \d cubes sorted(?:; {item}(?:, (?:{color}) is in the (?:{color}) bin)*)?",
        rf"the ({color}) cube started at the ({region})",
        rf"the ({color}) cube is in the ({color}) bowl; it started at the ({region})",
        rf"the ({color}) cube is back at the ({region})",
        r"\d of \d steps done(?:; .+)?",
    ))


def records_outcome(memory: str, subtask: str | None) -> bool | None:
    """Whether `memory` records `subtask` as done (grammar only, no scene needed); None when the memory's family
    cannot say (the empty memory, no running subtask). A completion-triggered call must record the outcome of
    the subtask that was running: a memory that instead names another cube is a misread image, not an outcome."""
    if not memory or not subtask or subtask == DONE:
        return None
    head, _, items = memory.partition("; ")
    if re.fullmatch(r"\d+ of \d+ cubes sorted", head):
        m = re.fullmatch(r"put the (\w+) cube in the \1 bin", subtask)
        return bool(m) and f"{m[1]} is in the {m[1]} bin" in (items.split(", ") if items else [])
    if re.fullmatch(r"\d+ of \d+ steps done", head):
        return subtask in (items.split(", ") if items else [])
    m = re.fullmatch(r"the (\w+) cube (started at|is in the (\w+) bowl; it started at|is back at) the .+", memory)
    if m:
        put = re.fullmatch(r"put the (\w+) cube in the (\w+) bowl", subtask)
        back = re.fullmatch(r"put the (\w+) cube back where it was", subtask)
        if put:
            return put[1] == m[1] and (m[2] == "is back at" or m[3] == put[2])
        if back:
            return back[1] == m[1] and m[2] == "is back at"
        return False
    return None


def advance_memory(memory: str, subtask: str | None) -> str | None:
    """The memory after `subtask`'s outcome is added to `memory` (grammar only), or None where the two do not fit
    together (the empty memory, the outcome already recorded, another family's subtask)."""
    if not memory or not subtask or subtask == DONE or records_outcome(memory, subtask) is not False:
        return None
    head, _, items = memory.partition("; ")
    listed = items.split(", ") if items else []
    m = re.fullmatch(r"(\d+) of (\d+) (cubes sorted|steps done)", head)
    if m:
        k, n = int(m[1]), int(m[2])
        cube = re.fullmatch(r"put the (\w+) cube in the \1 bin", subtask)
        if k >= n or (m[3] == "cubes sorted" and not cube):
            return None
        item = f"{cube[1]} is in the {cube[1]} bin" if m[3] == "cubes sorted" else subtask
        return f"{k + 1} of {n} {m[3]}; " + ", ".join(listed + [item])
    start = re.fullmatch(r"the (\w+) cube started at the (.+)", memory)
    put = re.fullmatch(r"put the (\w+) cube in the (\w+) bowl", subtask)
    if start and put and put[1] == start[1]:
        return f"the {start[1]} cube is in the {put[2]} bowl; it started at the {start[2]}"
    inside = re.fullmatch(r"the (\w+) cube is in the \w+ bowl; it started at the (.+)", memory)
    if inside and subtask == f"put the {inside[1]} cube back where it was":
        return f"the {inside[1]} cube is back at the {inside[2]}"
    return None


def canonical(text: str) -> str:
    """A memory with the order of its listed outcomes normalised ('2 of 3 cubes sorted; a, b' == '...; b, a'):
    exact match is judged on this, since which cube is sorted first is not fixed by the scene."""
    head, sep, items = text.partition("; ")
    if not sep or not re.fullmatch(r"\d+ of \d+ cubes sorted", head):
        return text
    return head + sep + ", ".join(sorted(items.split(", ")))


def model_context(memory: str, running: str | None) -> str:
    """The memory as a model input together with the subtask that was running when the image was taken.

    Which subtask was being executed is what turns "read every outcome off the image" (colour confusions between
    orange, yellow and red bins at 128 px) into "did *this* attempt succeed": the update is then the old memory
    plus at most the running subtask's outcome. Passed only alongside a non-empty memory: at the episode start
    and after a memory reset the model reads the whole scene."""
    return f"{memory} | now: {running}" if memory and running else memory
