"""Planners sit between the task and the low-level policy: they wrap a policy and keep its interface
(`reset`, `select_action`), so evaluation, the ROS policy node and the one-process mode run them unchanged.

- `mem`: hierarchical MEM-style planner (language memory + subtasks) over the VLA.
- `wm`: MCTS over VLA action chunks scored in a learned latent world model.

A wrapped policy may also offer `episode_metrics() -> dict` (merged into each evaluation record) and
`summary() -> dict` (added to the evaluation result)."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from vla_stack.errors import VlaStackError

PLANNERS = {"none": None, "mem": "vla_stack.planners.mem", "wm": "vla_stack.planners.world_model"}


def wrap_policy(planner: str, policy, env, checkpoint: Path | None = None, **options):
    """The policy to run: `policy` itself for 'none', else the planner built around it. Each planner module
    exposes `make_policy(policy, env, checkpoint=None, **options)`."""
    if planner not in PLANNERS:
        raise VlaStackError(f"unknown planner '{planner}' (known: {', '.join(PLANNERS)})")
    if PLANNERS[planner] is None:
        return policy
    return import_module(PLANNERS[planner]).make_policy(policy, env, checkpoint=checkpoint, **options)
