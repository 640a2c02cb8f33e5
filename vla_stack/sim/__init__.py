"""MuJoCo tabletop scenes, language task families and their Gymnasium environments."""

from vla_stack.sim.env import TabletopEnv, env_id, register_envs

register_envs()

__all__ = ["TabletopEnv", "env_id", "register_envs"]
