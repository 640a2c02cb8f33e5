"""Failed hierarchical episodes by their first high-level error, from an evaluation record with per-call traces
(`vla-stack eval --planner mem --json`): the breakdown that found the stall-clock and minimum-subtask-time
defects. Per failed episode, the first call whose kept memory disagrees with the scene's completed subtasks
decides: an outcome recorded that did not happen, an outcome missed, or none (the memory was right at every
call, so the low level failed). Outcomes are read off the memory by grammar (`records_outcome`), so restore's
start-region wording, which the low level never sees, does not count as an error. Each failure also gets its
handover delays (steps from the scene finishing its k-th subtask to the first accepted call whose memory records
k outcomes): the low level takes a subtask handed over late worse, so a "low level" failure with a late handover
is partly the high level's timing."""

from __future__ import annotations

from collections import Counter

from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.memory import records_outcome
from vla_stack.sim.robots import get_robot
from vla_stack.sim.tasks import generate

RECORDED, MISSED, LOW_LEVEL = "outcome recorded that did not happen", "outcome missed", "low level"
LATE_HANDOVER = 20  # steps: the low level's demos pause at most this long after a subtask (collect --pause-steps)


def claimed_outcomes(memory: str, subtasks: list[str]) -> set[int]:
    """Indices of the subtasks `memory` records as done."""
    return {i for i, text in enumerate(subtasks) if records_outcome(memory, text)}


def first_error(calls: list[dict], subtasks: list[str]) -> dict:
    """The first call whose kept memory disagrees with the scene: {kind, step, call} with call 'stall',
    'completion' or 'first'; kind LOW_LEVEL (step None) when none does."""
    for call in calls:
        if call.get("completed") is None:
            raise VlaStackError("the trace has no completed subtasks (recorded without a simulated scene)")
        claimed, done = claimed_outcomes(call["memory"], subtasks), set(call["completed"])
        if claimed != done:
            kind = RECORDED if claimed - done else MISSED
            how = "stall" if call["stall"] else "completion" if call["step"] else "first"
            return {"kind": kind, "step": call["step"], "call": how}
    return {"kind": LOW_LEVEL, "step": None, "call": None}


def handover_delays(calls: list[dict], completions: list[int], subtasks: list[str]) -> list[int | None]:
    """Per scene completion (the step it first had k subtasks done), the steps until the first accepted call whose
    memory records k outcomes; None where none did."""
    delays = []
    for k, done_at in enumerate(completions, 1):
        caught = next((call["step"] for call in calls if call["step"] >= done_at and not call.get("false_alarm")
                       and len(claimed_outcomes(call["memory"], subtasks)) >= k), None)
        delays.append(None if caught is None else caught - done_at)
    return delays


def failure_breakdown(record: dict) -> dict:
    """Counts by (kind, call) over the failed episodes of one `vla-stack eval --planner mem` record, and the
    per-episode rows (seed, subtasks completed, first error)."""
    episodes = record.get("per_episode")
    if not isinstance(episodes, list) or "task" not in record or "robot" not in record:
        raise VlaStackError("not an evaluation record (needs task, robot and per_episode)")
    robot = get_robot(record["robot"])
    rows = []
    for episode in episodes:
        if episode.get("success"):
            continue
        calls = (episode.get("planner") or {}).get("calls")
        if calls is None:
            raise VlaStackError(f"episode {episode.get('seed')} has no per-call trace: evaluate with --planner mem")
        subtasks = [s.text for s in generate(record["task"], robot, int(episode["seed"])).subtasks]
        completions = episode["planner"].get("scene_completions")  # None in records from before it was kept
        delays = None if completions is None else handover_delays(calls, completions, subtasks)
        rows.append({"seed": episode["seed"], "subtasks_completed": episode.get("subtasks_completed"),
                     **first_error(calls, subtasks), "handover_delays": delays})
    counts = Counter(row["kind"] if row["call"] is None else f"{row['kind']} ({row['call']} call)" for row in rows)
    late = sum(row["kind"] == LOW_LEVEL and any(d is None or d > LATE_HANDOVER for d in row["handover_delays"] or [])
               for row in rows)
    return {"task": record["task"], "robot": record["robot"], "episodes": len(episodes), "failures": len(rows),
            "by_first_error": dict(counts.most_common()), "low_level_after_late_handover": late, "per_failure": rows}
