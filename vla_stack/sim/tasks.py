"""Language task families: a seeded generator of scene layouts, instructions and subtask sequences.

Every subtask carries a machine-checkable goal, so the environment (not the expert) decides when a subtask is
done and when the episode succeeded; policies, planners and the expert are all judged by the same detector.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from vla_stack.errors import UnknownNameError
from vla_stack.sim.robots import RobotSpec

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.12, 0.30, 0.85),
    "yellow": (0.95, 0.80, 0.10),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.98, 0.50, 0.08),
}


@dataclass(frozen=True)
class Cube:
    color: str
    rgba: tuple[float, float, float, float]
    xy: tuple[float, float]
    yaw: float


@dataclass(frozen=True)
class Receptacle:
    kind: str  # "bowl" or "bin"
    color: str
    rgba: tuple[float, float, float, float]
    xy: tuple[float, float]


@dataclass(frozen=True)
class Goal:
    """What makes a subtask done. kind: lift | in (receptacle) | centre (in a receptacle, within half a cube's
    half-width of its centre) | on (cube) | at (a table position)."""

    kind: str
    cube: int
    target: int | None = None
    xy: tuple[float, float] | None = None


@dataclass(frozen=True)
class Subtask:
    text: str
    goal: Goal


@dataclass(frozen=True)
class TaskInstance:
    family: str
    seed: int
    instruction: str
    cubes: tuple[Cube, ...]
    receptacles: tuple[Receptacle, ...]
    subtasks: tuple[Subtask, ...]
    final_goals: tuple[Goal, ...]  # must all hold at the end, after the subtasks were done in order
    max_steps: int

    @property
    def subtask_texts(self) -> list[str]:
        return [s.text for s in self.subtasks]


@dataclass(frozen=True)
class TaskFamily:
    name: str
    description: str
    receptacle_kind: str | None
    max_seconds: float
    templates: tuple[str, ...] = field(default=())

    def n_cubes(self, robot: RobotSpec) -> int:
        return {"pick": 3, "place": 2, "place_centre": 2, "stack": 3, "sort": 3 if robot.name == "panda" else 2,
                "restore": 2}[self.name]

    def n_receptacles(self, robot: RobotSpec) -> int:
        return {"pick": 0, "place": 2, "place_centre": 2, "stack": 0, "sort": self.n_cubes(robot),
                "restore": 1}[self.name]


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily("pick", "pick up one named cube among distractors", None, 12.0,
                   ("pick up the {a} cube", "lift the {a} cube", "grab the {a} cube and lift it")),
        TaskFamily("place", "put a named cube into a named bowl", "bowl", 18.0,
                   ("put the {a} cube in the {b} bowl", "place the {a} cube into the {b} bowl",
                    "move the {a} cube to the {b} bowl")),
        # A tight target (1 cm on the panda): where the cube is released decides the outcome, so candidate
        # chunks that look alike differ in success (the world-model planner's test family, issue 6).
        TaskFamily("place_centre", "put a named cube into the centre of a named bowl", "bowl", 18.0,
                   ("put the {a} cube in the centre of the {b} bowl", "place the {a} cube in the middle of the {b} bowl",
                    "move the {a} cube to the centre of the {b} bowl")),
        TaskFamily("stack", "stack one named cube on another", None, 18.0,
                   ("stack the {a} cube on the {b} cube", "put the {a} cube on top of the {b} cube",
                    "place the {a} cube onto the {b} cube")),
        TaskFamily("sort", "long horizon: every cube into the bin of its colour, one at a time", "bin", 45.0,
                   ("sort the cubes into the bins of the same colour", "put each cube in the bin that matches its colour",
                    "put every cube into its matching bin")),
        TaskFamily("restore", "long horizon: move a cube into a bowl, then put it back where it was", "bowl", 36.0,
                   ("put the {a} cube in the {b} bowl, then put it back where it was",
                    "move the {a} cube into the {b} bowl and afterwards return it to where it was")),
    )
}


def get_family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownNameError(f"unknown task '{name}' (known: {', '.join(FAMILIES)})") from None


def _rgba(rng: np.random.Generator, color: str) -> tuple[float, float, float, float]:
    base = np.asarray(COLORS[color])
    jittered = np.clip(base + rng.uniform(-0.06, 0.06, size=3), 0.0, 1.0)
    return (*map(float, jittered), 1.0)


def _place_objects(rng: np.random.Generator, robot: RobotSpec, radii: list[float]) -> list[tuple[float, float]]:
    """Rejection-sample non-overlapping xy positions (objects as discs of the given radii) in the workspace."""
    (x0, x1), (y0, y1) = robot.workspace
    margin = 0.25 * robot.cube_half
    for _ in range(2000):
        points: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(200):
                p = (float(rng.uniform(x0 + r, x1 - r)) if x1 - x0 > 2 * r else (x0 + x1) / 2,
                     float(rng.uniform(y0 + r, y1 - r)))
                from_base = np.hypot(p[0] - robot.base_pos[0], p[1] - robot.base_pos[1])
                if not robot.reach[0] + r / 2 <= from_base <= robot.reach[1] - r / 2:
                    continue
                if all(np.hypot(p[0] - q[0], p[1] - q[1]) > r + rq + margin for q, rq in zip(points, radii)):
                    points.append(p)
                    break
            else:
                break
        if len(points) == len(radii):
            return points
    raise RuntimeError(f"cannot place {len(radii)} objects in the {robot.name} workspace")


def generate(family_name: str, robot: RobotSpec, seed: int, control_hz: float = 10.0) -> TaskInstance:
    """Sample one task instance. Deterministic in (family, robot, seed)."""
    family = get_family(family_name)
    rng = np.random.default_rng([seed, zlib.crc32(f"{family.name}/{robot.name}".encode())])
    n_cubes, n_rec = family.n_cubes(robot), family.n_receptacles(robot)
    colors = list(rng.permutation(list(COLORS)))
    cube_colors = colors[:n_cubes]
    if family.name == "sort":
        rec_colors = list(cube_colors)
        rng.shuffle(rec_colors)
    else:
        rec_colors = colors[n_cubes:n_cubes + n_rec]

    cube_r = robot.cube_half * 1.9
    rec_r = robot.receptacle_half + 0.006 + robot.cube_half * 0.5
    xys = _place_objects(rng, robot, [rec_r] * n_rec + [cube_r] * n_cubes)
    receptacles = tuple(Receptacle(family.receptacle_kind or "bowl", c, _rgba(rng, c), xy)
                        for c, xy in zip(rec_colors, xys[:n_rec]))
    cubes = tuple(Cube(c, _rgba(rng, c), xy, float(rng.uniform(-np.pi / 4, np.pi / 4)))
                  for c, xy in zip(cube_colors, xys[n_rec:]))

    template = str(rng.choice(family.templates))
    a = cubes[0].color
    kind = family.receptacle_kind
    if family.name == "pick":
        instruction = template.format(a=a)
        subtasks = [Subtask(f"pick up the {a} cube", Goal("lift", 0))]
    elif family.name == "place":
        b = receptacles[0].color
        instruction = template.format(a=a, b=b)
        subtasks = [Subtask(f"pick up the {a} cube", Goal("lift", 0)),
                    Subtask(f"put the {a} cube in the {b} {kind}", Goal("in", 0, target=0))]
    elif family.name == "place_centre":
        b = receptacles[0].color
        instruction = template.format(a=a, b=b)
        subtasks = [Subtask(f"pick up the {a} cube", Goal("lift", 0)),
                    Subtask(f"put the {a} cube in the centre of the {b} {kind}", Goal("centre", 0, target=0))]
    elif family.name == "stack":
        b = cubes[1].color
        instruction = template.format(a=a, b=b)
        subtasks = [Subtask(f"pick up the {a} cube", Goal("lift", 0)),
                    Subtask(f"put the {a} cube on the {b} cube", Goal("on", 0, target=1))]
    elif family.name == "sort":
        instruction = template
        order = rng.permutation(n_cubes)
        subtasks = [Subtask(f"put the {cubes[i].color} cube in the {cubes[i].color} {kind}",
                            Goal("in", int(i), target=rec_colors.index(cubes[i].color))) for i in order]
    else:  # restore
        b = receptacles[0].color
        instruction = template.format(a=a, b=b)
        subtasks = [Subtask(f"put the {a} cube in the {b} {kind}", Goal("in", 0, target=0)),
                    Subtask(f"put the {a} cube back where it was", Goal("at", 0, xy=cubes[0].xy))]
    # A sorted cube knocked out again is no success; restore's intermediate "in the bowl" must not hold at the end.
    final_goals = tuple(s.goal for s in subtasks) if family.name == "sort" else (subtasks[-1].goal,)
    return TaskInstance(
        family=family.name, seed=int(seed), instruction=instruction, cubes=cubes, receptacles=receptacles,
        subtasks=tuple(subtasks), final_goals=final_goals, max_steps=int(round(family.max_seconds * control_hz)),
    )
