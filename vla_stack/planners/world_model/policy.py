"""`--planner wm`: at every chunk boundary, sample K action chunks from the VLA's flow-matching head (K noise
draws sharing one prefix KV cache), search over them in the world model's latent space, execute the chosen
chunk's first H steps (H = the world model's chunk), repeat. Same interface as any policy (reset /
select_action), plus episode_metrics() and summary() for the evaluation JSON.

Modes: `mcts` (tree search, mcts.search; with `follow_vla` each candidate's node tries the rest of its own VLA
chunk first: the VLA samples chunk_size steps and executes H; off by default, see the README), `best_of_k` (one
latent step per candidate, best value: the no-search baseline), `first` (the first VLA sample executed H steps
open loop: the VLA alone at the same re-planning rate, to separate planning from the execution schedule).

The deadline (`deadline_s`) is the whole decision's: sampling the K proposals and encoding the observation come
out of it, and the search gets what is left, so a decision ends within it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vla_stack.errors import VlaStackError
from vla_stack.planners.world_model.mcts import SearchConfig, best_of_k, search
from vla_stack.planners.world_model.model import LatentSearchModel, load_world_model

MODES = ("mcts", "best_of_k", "first")
# Kept back from the search's share of the deadline for what follows it: freeing the tree (refcounting its
# nodes takes ~3.5 ms after a 100 ms search here, growing with the nodes, i.e. with the search time) and
# copying the chosen chunk.
TEARDOWN_FRACTION, DECISION_RESERVE_S = 0.05, 0.001


def default_checkpoint() -> Path:
    from vla_stack.paths import share_dir

    return share_dir("policies") / "wm_tiny"


def sample_vla_chunks(vla, obs: dict, k: int, generator: torch.Generator) -> np.ndarray:
    """K chunks (K, chunk_size, action_dim) in robot units from one observation: the prefix (images, text,
    state) is encoded once and serves all K rows; each row gets its own noise."""
    cfg = vla.config
    batch = vla.batch(obs)  # validates the observation (NaN/inf -> InvalidObservationError)
    with torch.inference_mode():
        noise = torch.randn(k, cfg.chunk_size, cfg.max_action_dim, generator=generator)
        x = vla.model.sample_actions(batch, vla.num_steps, noise=noise)
    return np.stack([vla.to_robot(c) for c in x.numpy()])


class WorldModelPlanner:
    name = "vla+wm"

    def __init__(self, vla, world_model, robot: str, *, k: int = 8, mode: str = "mcts",
                 search_config: SearchConfig | None = None, progress_weight: float = 0.25,
                 temperature: float = 1.5, threads: int | None = None, deadline_s: float | None = 0.15,
                 follow_vla: bool = False, pessimism: float = 0.0):
        if mode not in MODES:
            raise VlaStackError(f"unknown wm planner mode '{mode}' (known: {', '.join(MODES)})")
        for attr in ("model", "config", "batch", "observe", "to_robot", "num_steps"):
            if not hasattr(vla, attr):
                raise VlaStackError("the wm planner needs a VLA checkpoint policy (it samples the VLA's "
                                    "flow-matching head); got " + type(vla).__name__)
        cfg = world_model.config
        if robot != cfg.robot:
            raise VlaStackError(f"the world model was trained for '{cfg.robot}', the env's robot is '{robot}'")
        if vla.config.chunk_size < cfg.chunk:
            raise VlaStackError(f"VLA chunks ({vla.config.chunk_size}) are shorter than the world model's ({cfg.chunk})")
        if k < 1:
            raise VlaStackError("k must be at least 1")
        if deadline_s is not None and deadline_s <= 0:
            raise VlaStackError(f"deadline_s must be positive (or None: no deadline), got {deadline_s}")
        self.deadline_s = deadline_s
        self.vla, self.wm, self.robot, self.k, self.mode = vla, world_model, robot, k, mode
        self.search_config = search_config or SearchConfig()
        if pessimism < 0:
            raise VlaStackError(f"pessimism must be >= 0, got {pessimism}")
        self.progress_weight, self.temperature, self.pessimism = progress_weight, temperature, pessimism
        self.follow_vla = follow_vla  # mcts: each candidate's node tries the rest of its VLA chunk first
        if threads:
            torch.set_num_threads(threads)
        self._episodes: list[dict] = []
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.vla.reset(seed=seed)
        self._seed = 0 if seed is None else int(seed)
        self._generator = torch.Generator().manual_seed(self._seed)
        self._queue: list[np.ndarray] = []
        self._decisions: list[dict] = []
        self._goal_for: str | None = None
        self._command: np.ndarray | None = None  # the last action sent (the heads of some models read it)
        self._positions: np.ndarray | None = None  # goal_offset models: last read (target, cube) positions, m

    def _encode(self, obs: dict) -> np.ndarray:
        from vla_stack.policy.vla.dataset import resize_images

        cfg = self.wm.config
        images = resize_images(np.stack([np.asarray(obs["images"][c], np.uint8) for c in cfg.cameras]), cfg.image_size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        state = torch.from_numpy(np.asarray(obs["state"], np.float32))[None]
        with torch.inference_mode():
            return self.wm.encode(x[None], state)[0].numpy()

    def read_offset(self, obs: dict, instruction: str) -> np.ndarray | None:
        """goal_offset models: target - goal cube (2,) m from this observation's cameras; a point the reader
        cannot place now (hidden, outside both images) keeps its last reading this episode; None until both
        have been read once."""
        from vla_stack.planners.world_model.keypoints import CAMERAS
        from vla_stack.policy.vla.dataset import resize_images

        missing = [c for c in CAMERAS if c not in obs["images"]]
        if missing:
            raise VlaStackError(f"the world model's keypoint reader needs the {', '.join(missing)} camera(s)")
        frames = resize_images(np.stack([np.asarray(obs["images"][c], np.uint8) for c in CAMERAS]),
                               self.wm.config.keypoint_image_size)
        _, positions = self.wm.read_goal_offset(frames, np.asarray(obs["state"]), instruction)
        self._positions = positions if self._positions is None else np.where(np.isnan(positions), self._positions,
                                                                            positions)
        return None if np.isnan(self._positions).any() else self._positions[0] - self._positions[1]

    def root(self, obs: dict, lsm: LatentSearchModel, instruction: str,
             command: np.ndarray | None) -> np.ndarray | None:
        """The search latent of an observation after `command` (the last action sent; None at an episode's
        start); None: a goal_offset model has not read its offset yet."""
        offset = self.read_offset(obs, instruction) if self.wm.config.goal_offset else None
        if self.wm.config.goal_offset and offset is None:
            return None
        return lsm.root(self._encode(obs), obs["state"] if command is None else command, obs["state"], offset)

    def _plan(self, obs: dict) -> np.ndarray:
        t0 = time.perf_counter()
        chunks = sample_vla_chunks(self.vla, obs, self.k, self._generator)  # (K, chunk_size, A) robot units
        t1 = time.perf_counter()
        H = self.wm.config.chunk
        instruction = self.vla.instruction or obs.get("instruction", "")
        if instruction != self._goal_for:
            with torch.inference_mode():
                self._goal = self.wm.embed_goal([instruction])
            self._goal_for = instruction
        record = {"proposal_ms": (t1 - t0) * 1e3}
        lsm = LatentSearchModel(self.wm, self._goal, self.progress_weight, self.temperature, self.pessimism)
        z = None if self.mode == "first" else self.root(obs, lsm, instruction, self._command)
        if z is None:  # the VLA alone, or nothing to score with yet: its own first sample
            index = 0
            record["unscored"] = self.mode != "first"
        else:
            follow = chunks.shape[1] // H - 1 if self.follow_vla else 0  # whole H-step chunks after the first
            with torch.inference_mode():
                norm = self.wm.norm_action(torch.from_numpy(chunks[:, :H * (1 + follow)])).numpy()
            norm, continuations = norm[:, :H], norm[:, H:].reshape(len(norm), follow, H, norm.shape[-1])
            if self.mode == "best_of_k":
                result = best_of_k(z, norm, lsm.dynamics, lsm.evaluate)
            else:
                left = None if self.deadline_s is None else max(
                    0.0, (self.deadline_s - (time.perf_counter() - t0)) * (1 - TEARDOWN_FRACTION) - DECISION_RESERVE_S)
                cfg = SearchConfig(**{**self.search_config.__dict__, "deadline_s": left,
                                      "seed": self._seed * 1000 + len(self._decisions)})
                result = search(z, norm, lsm.dynamics, lsm.evaluate, lsm.propose, cfg,
                                root_continuations=continuations if follow else None)
                values = [-np.inf if v is None else v for v in result.stats["root"]["value"]]
                record.update(simulations=result.stats["simulations"], depth=result.stats["max_depth"],
                              stopped_by=result.stats["stopped_by"],
                              search_deadline_ms=None if left is None else left * 1e3,
                              # lookahead overruled the one-step scores (best_of_k's pick)
                              departed=bool(np.isfinite(max(values)) and values[result.index] < max(values)))
            index = result.index
            record["rollouts"] = result.stats["rollouts"]
        record["search_ms"] = (time.perf_counter() - t1) * 1e3
        record["decision_ms"] = (time.perf_counter() - t0) * 1e3
        record["index"] = index
        self._decisions.append(record)
        self._queue = list(chunks[index, :H])
        self._command = chunks[index, H - 1]
        return chunks[index, :H]

    @property
    def n_action_steps(self) -> int:
        """Steps of one decision's chunk: the world model's chunk length."""
        return self.wm.config.chunk

    def observe(self, obs: dict) -> bool:
        """A control step without a decision (the ROS node between chunks): the VLA's video memory only."""
        self.vla.observe(obs)
        return False

    def predict_action_chunk(self, obs: dict, observe: bool = True) -> np.ndarray:
        """One planning decision: the chosen chunk's first H steps (H, action_dim), robot units (the ROS node
        sends whole chunks and asks again every H steps)."""
        if observe:
            self.vla.observe(obs)
        return self._plan(obs)

    def select_action(self, obs: dict) -> np.ndarray:
        self.vla.observe(obs)  # validates the observation and feeds the VLA's video memory, every step
        if not self._queue:
            self._plan(obs)
        return self._queue.pop(0)

    def episode_metrics(self) -> dict:
        d = self._decisions
        out = {"mode": self.mode, "k": self.k, "decisions": len(d),
               "decision_ms_p50": _pct([r["decision_ms"] for r in d], 50),
               "search_ms_p50": _pct([r["search_ms"] for r in d], 50),
               "proposal_ms_p50": _pct([r["proposal_ms"] for r in d], 50),
               "non_first_choice": sum(r["index"] != 0 for r in d),
               "unscored": sum(r.get("unscored", False) for r in d)}
        scored = [r for r in d if "rollouts" in r]
        if scored:
            out["rollouts_mean"] = round(float(np.mean([r["rollouts"] for r in scored])), 1)
        if scored and "simulations" in scored[0]:
            out["simulations_mean"] = round(float(np.mean([r["simulations"] for r in scored])), 1)
            out["depth_max"] = int(max(r["depth"] for r in scored))
            out["departed_from_one_step"] = sum(r["departed"] for r in scored)
        self._episodes.append({"decisions": d})
        return out

    def summary(self) -> dict:
        allds = [r for e in self._episodes for r in e["decisions"]]
        if not allds:
            return {"mode": self.mode, "k": self.k, "decisions": 0}
        out = {"mode": self.mode, "k": self.k, "decisions": len(allds),
               "deadline_s": self.deadline_s if self.mode == "mcts" else None,
               "decisions_over_deadline": (sum(r["decision_ms"] > self.deadline_s * 1e3 for r in allds)
                                           if self.mode == "mcts" and self.deadline_s else None),
               "decision_ms_p50": _pct([r["decision_ms"] for r in allds], 50),
               "decision_ms_p99": _pct([r["decision_ms"] for r in allds], 99),
               "search_ms_p50": _pct([r["search_ms"] for r in allds], 50),
               "search_ms_p99": _pct([r["search_ms"] for r in allds], 99),
               "proposal_ms_p50": _pct([r["proposal_ms"] for r in allds], 50)}
        scored = [r["rollouts"] for r in allds if "rollouts" in r]
        if scored:
            out["rollouts_p50"] = _pct(scored, 50)
            out["rollouts_min"] = int(min(scored))
        out["unscored_decisions"] = sum(r.get("unscored", False) for r in allds)
        if self.mode == "mcts":
            out["departed_from_one_step"] = sum(r.get("departed", False) for r in allds)
        return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def make_policy(policy, env, checkpoint=None, **options) -> WorldModelPlanner:
    """The `--planner wm` entry point (vla_stack.planners.wrap_policy). options (values may be strings, as
    `--planner-option KEY=VALUE` gives them): k, mode, deadline_s (of the whole decision; none: no deadline),
    batch_size, max_depth, children, c_puct, discount, pw_k, pw_alpha, max_simulations, backup (mean / max),
    root_tolerance (none: unrestricted), progress_weight, temperature, pessimism (value-ensemble models), threads,
    follow_vla (true / false)."""
    kinds = {"k": int, "threads": int, "batch_size": int, "max_depth": int, "children": int, "max_simulations": int,
             "progress_weight": float, "temperature": float, "pessimism": float, "c_puct": float, "discount": float,
             "pw_k": float, "pw_alpha": float, "deadline_s": _optional_float, "mode": str, "backup": str,
             "follow_vla": _bool, "root_tolerance": _optional_float}
    unknown = set(options) - set(kinds)
    if unknown:
        raise VlaStackError(f"unknown wm planner option(s): {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(kinds))})")
    try:
        options = {key: kinds[key](value) for key, value in options.items()}
    except ValueError as exc:
        raise VlaStackError(f"bad wm planner option: {exc}") from None
    wm, meta = load_world_model(checkpoint or default_checkpoint())
    if options.get("pessimism", 0.0) > 0:
        if wm.config.value_heads < 2:
            raise VlaStackError("pessimism needs a world model with an ensemble of value heads (value_heads > 1)")
        if "value_ensemble" not in meta:  # a checkpoint saved before train-wm's ensemble stage ended
            raise VlaStackError("this world model's extra value heads were never fitted (no value_ensemble in its "
                                "meta): finish train-wm before planning with pessimism")
    search_keys = {"batch_size", "max_depth", "children", "c_puct", "discount", "pw_k", "pw_alpha",
                   "max_simulations", "backup", "root_tolerance"}
    try:
        search_config = SearchConfig(**{k: v for k, v in options.items() if k in search_keys})
    except ValueError as exc:
        raise VlaStackError(f"bad wm planner option: {exc}") from None
    rest = {k: v for k, v in options.items() if k not in search_keys}
    return WorldModelPlanner(policy, wm, env.robot.name, search_config=search_config, **rest)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _optional_float(value) -> float | None:
    return None if value is None or str(value).lower() == "none" else float(value)
