"""Hierarchical MEM-style planner (issue 5): a high-level model reads (goal, memory text, front image) and writes
(next subtask, updated memory text) at subtask boundaries; the low-level policy runs the subtask text.

- memory.py: programmatic, outcome-compressed memory labels and their validation
- data.py:   training samples from episode stores (with injected failed grasps)
- model.py:  the tiny high-level model (conv-stem image encoder + frozen MiniLM + small encoder/decoder, WordPiece decoding)
- train.py:  training and held-out scoring
- policy.py: `make_policy`, the wrapper `vla-stack eval --planner mem` uses
"""

from vla_stack.planners.mem.policy import MemPlanner, make_policy

__all__ = ["MemPlanner", "make_policy"]
