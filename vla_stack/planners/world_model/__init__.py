"""World-model planner (`--planner wm`): a JEPA-style latent world model (model.py, trained by train.py with
next-latent prediction + SIGReg) and MCTS over action chunks proposed by the VLA (mcts.py), scored by the
model's value/progress heads. `make_policy` wraps a VLA policy with the same reset/select_action interface."""

from __future__ import annotations


def make_policy(policy, env, checkpoint=None, **options):
    from vla_stack.planners.world_model.policy import make_policy as _make

    return _make(policy, env, checkpoint=checkpoint, **options)
