"""World-model training: `vla-stack train-wm --config policies/wm_tiny.yaml`.

YAML sections: `model:` (WmConfig fields), `data:` (zarr episode stores: expert demos and the non-expert
rollouts of collect.py; failures included), `train:` (TrainConfig). Episodes of every 20th scene (seed 19 mod 20;
without a seed, every 20th episode of its store) are held out for the prediction-quality report written at the end
(quality.json next to the checkpoint): by scene, because stores may share seeds (the demos and the VLA rollouts
of one family do), and a model that has seen a scene is not tested by it."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from vla_stack.control.kinematics import grasp_site_fk
from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.paths import resolve_data_path
from vla_stack.planners.world_model.model import WmConfig, WorldModel, param_count, save_world_model

VAL_EVERY = 20


@dataclass
class TrainConfig:
    output_dir: str = "wm/runs/wm"  # relative paths are under the user data dir
    export_dir: str | None = None  # also write the final weights here as fp16 (the shipped checkpoint)
    steps: int = 3000
    batch_size: int = 48
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    save_every: int = 250
    seed: int = 0
    num_threads: int = 1
    max_minutes: float | None = None
    max_episodes_per_store: int | None = None
    branch_batch_size: int = 32  # branched-rollout samples per step (stores of collect_branched; 0: ignore them)
    # goal_offset models: the keypoint reader trains after the world model on every keypoint_every-th frame of
    # the stores (at the model's keypoint_image_size; its labels need no world model, so it trains apart)
    keypoint_steps: int = 3000
    keypoint_every: int = 4
    keypoint_batch_size: int = 32
    keypoint_lr: float = 2e-3
    # value-ensemble models (value_heads > 1): the extra heads are fitted after the world model, on its frozen
    # encoder and predictor (the spread of heads fitted to one fixed representation is what the search reads)
    ensemble_steps: int = 2000


@dataclass
class WmEpisode:
    instruction: str
    images: np.ndarray  # (T, cams, S, S, 3) uint8
    state: np.ndarray  # (T, D)
    action: np.ndarray  # (T, D)
    value: np.ndarray  # (T,) gamma**(steps to success), 0 for failed episodes
    progress: np.ndarray  # (T,) in [0, 1]
    success: bool
    source: str
    seed: int | None
    branches: list[dict] = dataclasses.field(default_factory=list)  # collect_branched's tried candidates
    # goal_offset models: target - goal cube in the table plane (T, 2) m, from the replay; where the grasp site
    # is at each frame (T, 3) and where each action commands it (T, 3), by forward kinematics
    offset: np.ndarray | None = None
    ee_state: np.ndarray | None = None
    ee_action: np.ndarray | None = None


def targets(subtask_index: np.ndarray, n_subtasks: int, success: bool, gamma: float,
            success_step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Value: gamma**(steps until the success detector fired) for successful episodes (`success_step`, the end
    when the demo was not recorded past it; 1 on the frames after it), 0 otherwise.
    Progress: completed subtasks / n; inside a successful episode's subtask segment it rises linearly to the
    next boundary (a failed episode gets no credit for time spent)."""
    T = len(subtask_index)
    n = max(n_subtasks, 1)
    steps_left = np.maximum((success_step or T) - np.arange(T), 0)
    value = gamma ** steps_left if success else np.zeros(T)
    progress = np.minimum(subtask_index, n).astype(np.float64) / n
    if success:
        bounds = [0] + [int(np.argmax(subtask_index >= j)) if (subtask_index >= j).any() else T for j in range(1, n)] + [T]
        for j in range(n):
            a, b = bounds[j], max(bounds[j + 1], bounds[j] + 1)
            seg = np.arange(a, min(b, T))
            progress[seg] = (j + (seg - a + 1) / (b - a)) / n
    return value.astype(np.float32), np.clip(progress, 0, 1).astype(np.float32)


class GoalDistanceReplay:
    """Per-frame distance (m, table plane) of the task's final-goal cube to its target and, for placement goals,
    the offset target - cube (m, table plane), by replaying an episode's stored actions from its scene seed,
    blind (the simulator is deterministic per seed; a replay that does not end as the episode did is an error)."""

    def __init__(self, robot: str):
        self.robot, self.envs = robot, {}

    def __call__(self, task: str, seed: int, actions: np.ndarray, success: bool,
                 where: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(distance (T,), offset (T, 2) or None for a lift goal)."""
        from vla_stack.sim.env import TabletopEnv

        if task not in self.envs:
            self.envs[task] = TabletopEnv(task, self.robot, cameras=())
        env = self.envs[task]
        env.reset(seed=seed)
        goal = env.task.final_goals[-1]
        distance, offset, ended = np.zeros(len(actions), np.float32), np.zeros((len(actions), 2), np.float32), False
        for t, action in enumerate(actions):
            distance[t], offset[t] = self.measure(env.sim, goal)
            if not ended:
                ended = any(env.step_unobserved(action))
        if bool(env.success()) != success:
            raise VlaStackError(f"{where}: replaying seed {seed} ends {'without' if success else 'with'} success, "
                                "the stored episode did not (recorded with another simulator version?)")
        return distance, (None if goal.kind == "lift" else offset)

    @staticmethod
    def measure(sim, goal) -> tuple[float, np.ndarray]:
        """(distance, offset target - cube) of `goal` in the simulator's current state (also critic_check's truth)."""
        from vla_stack.sim.robots import TABLE_Z

        pos = sim.cube_pos(goal.cube)
        if goal.kind == "lift":  # the height still missing to the lift detector's
            half = sim.robot.cube_half
            return max(0.0, 2 * half + 0.01 - (pos[2] - TABLE_Z - half)), np.zeros(2)
        target = (sim.receptacle_pos(goal.target) if goal.kind in ("in", "centre") else
                  sim.cube_pos(goal.target) if goal.kind == "on" else np.asarray(goal.xy))
        offset = np.asarray(target[:2], np.float64) - pos[:2]
        return float(np.hypot(*offset)), offset

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def load_episodes(paths: list[str], cfg: WmConfig, max_per_store: int | None = None,
                  progress: bool = True) -> tuple[list[WmEpisode], list[WmEpisode]]:
    """(train, held-out) episodes of cfg.robot from the stores, images resized to cfg.image_size."""
    replay = GoalDistanceReplay(cfg.robot) if cfg.progress_target == "goal_distance" else None
    try:
        train, val = _load_stores(paths, cfg, max_per_store, progress, replay)
    finally:
        if replay is not None:
            replay.close()
    if not train:
        raise VlaStackError("no training episodes in " + ", ".join(paths))
    return train, val


def _load_stores(paths: list[str], cfg: WmConfig, max_per_store: int | None, progress: bool,
                 replay: GoalDistanceReplay | None) -> tuple[list[WmEpisode], list[WmEpisode]]:
    from vla_stack.policy.vla.dataset import resize_images

    train, val = [], []
    for path in paths:
        store = EpisodeStore.open(path)
        if store.robot != cfg.robot:
            raise VlaStackError(f"{path} holds robot '{store.robot}', the world model is for '{cfg.robot}'")
        need = [f"images.{c}" for c in cfg.cameras] + ["state", "action", "subtask_index"]
        missing = [f for f in need if f not in store.features]
        if missing:
            raise VlaStackError(f"{path} lacks features {', '.join(missing)}")
        indices = store.episode_indices()[:max_per_store]
        for n, i in enumerate(tqdm(indices, desc=f"load {Path(path).name}", disable=not progress, unit="ep")):
            meta, data = store.episode_meta(i), store.read_episode(i)
            if len(data["action"]) < 2:
                continue
            images = np.stack([resize_images(data[f"images.{c}"], cfg.image_size) for c in cfg.cameras], 1)
            success = bool(meta.success)
            value, prog = targets(np.asarray(data["subtask_index"]), len(meta.subtasks), success, cfg.gamma,
                                  meta.extra.get("success_step"))
            if replay is not None:
                if meta.seed is None or not meta.task or meta.extra.get("arm_noise", 0.0) > 0:
                    raise VlaStackError(f"{path}: episode {i} cannot be replayed for goal distances (no scene seed "
                                        "or task, or DART demos: their stored actions are not the executed ones)")
                distance, offset = replay(meta.task, meta.seed, data["action"], success, f"{path} episode {i}")
                prog = np.exp(-distance / cfg.goal_distance_scale).astype(np.float32)
            ep = WmEpisode(meta.instruction, images, data["state"].astype(np.float32),
                           data["action"].astype(np.float32), value, prog, success, Path(path).name, meta.seed,
                           _branches(meta.extra.get("branches", []), len(data["action"]), cfg, path))
            if cfg.goal_offset:
                if offset is None:
                    raise VlaStackError(f"{path}: episode {i} ({meta.task}) ends in a lift goal; goal_offset "
                                        "models are for placement tasks")
                fk = grasp_site_fk(cfg.robot)
                ep.offset = offset
                ep.ee_state = fk.positions(ep.state[:, :fk.arm_dof]).astype(np.float32)
                ep.ee_action = fk.positions(ep.action[:, :fk.arm_dof]).astype(np.float32)
                for b in ep.branches:
                    b["ee_chunk"] = fk.positions(b["chunk"][:, :fk.arm_dof]).astype(np.float32)
            index = n if meta.seed is None else meta.seed
            (val if index % VAL_EVERY == VAL_EVERY - 1 else train).append(ep)
    return train, val


def _branches(entries: list[dict], length: int, cfg: WmConfig, path: str) -> list[dict]:
    """collect_branched's entries with their value target at the chunk's end (the latent the critic scores):
    gamma**(steps from there to success), 0 for a failed branch."""
    out = []
    for b in entries:
        chunk = np.asarray(b["chunk"], np.float32)
        if chunk.shape != (cfg.chunk, cfg.action_dim) or not 0 <= b["t"] < length:
            raise VlaStackError(f"{path}: a branch at t={b['t']} (episode of {length} steps) has a {chunk.shape} "
                                f"chunk; the world model takes ({cfg.chunk}, {cfg.action_dim}) chunks")
        value = cfg.gamma ** max(b["steps_to_success"] - cfg.chunk, 0) if b["success"] else 0.0
        out.append({"t": int(b["t"]), "chunk": chunk, "value": np.float32(value), "success": bool(b["success"])})
    return out


class ChunkSampler:
    """Random (episode, t) samples: frames [t, t+k, t+H, t+2H] (k uniform in 1..H), actions t..t+2H-1;
    anything past the episode end is masked (the episode ended: success fired or time ran out)."""

    def __init__(self, episodes: list[WmEpisode], cfg: WmConfig):
        self.cfg = cfg
        self.images = np.concatenate([e.images for e in episodes])
        self.state = torch.from_numpy(np.concatenate([e.state for e in episodes]))
        self.action = torch.from_numpy(np.concatenate([e.action for e in episodes]))
        self.value = torch.from_numpy(np.concatenate([e.value for e in episodes]))
        self.progress = torch.from_numpy(np.concatenate([e.progress for e in episodes]))
        lengths = np.array([len(e.action) for e in episodes])
        self.start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.length = lengths
        self.instructions = [e.instruction for e in episodes]
        self.success = np.array([e.success for e in episodes])
        # every frame but the last of each episode can start a sample
        self.ep_of = np.concatenate([np.full(n - 1, i) for i, n in enumerate(lengths)])
        self.t_of = np.concatenate([np.arange(n - 1) for n in lengths])
        branches = [(i, b) for i, e in enumerate(episodes) for b in e.branches]
        self.branch_frame = np.array([self.start[i] + b["t"] for i, b in branches], dtype=np.int64)
        self.branch_episode = np.array([i for i, _ in branches], dtype=np.int64)
        self.branch_chunk = torch.from_numpy(np.stack([b["chunk"] for _, b in branches])) if branches else None
        self.branch_value = torch.tensor([float(b["value"]) for _, b in branches])
        if cfg.goal_offset:
            self.offset = torch.from_numpy(np.concatenate([e.offset for e in episodes]))
            self.ee_state = torch.from_numpy(np.concatenate([e.ee_state for e in episodes]))
            self.ee_action = torch.from_numpy(np.concatenate([e.ee_action for e in episodes]))
            self.branch_ee = torch.from_numpy(np.stack([b["ee_chunk"] for _, b in branches])) if branches else None

    def __len__(self) -> int:
        return len(self.ep_of)

    def batch(self, size: int, rng: np.random.Generator, branch_size: int = 0) -> dict:
        H = self.cfg.chunk
        pick = rng.integers(0, len(self.ep_of), size)
        ep, t = self.ep_of[pick], self.t_of[pick]
        k = rng.integers(1, H + 1, size)
        offsets = np.stack([np.zeros(size, int), k, np.full(size, H), np.full(size, 2 * H)], 1)  # (B, 4)
        last = self.length[ep][:, None] - 1
        frame_mask = (t[:, None] + offsets) <= last
        frames = self.start[ep][:, None] + np.minimum(t[:, None] + offsets, last)
        steps = t[:, None] + np.arange(2 * H)[None]
        action_mask = steps <= last
        act_idx = self.start[ep][:, None] + np.minimum(steps, last)
        images = torch.from_numpy(self.images[frames.reshape(-1)]).view(size, 4, *self.images.shape[1:])
        before = self.start[ep][:, None] + t[:, None] + offsets - 1  # the command that led to each frame
        first = (t[:, None] + offsets == 0) | ~frame_mask
        command = self.action[torch.from_numpy(np.where(first, 0, before))]
        command[torch.from_numpy(first)] = self.state[torch.from_numpy(frames[first])]
        out = {
            "images": images.permute(0, 1, 2, 5, 3, 4).float() / 255.0,
            "state": self.state[torch.from_numpy(frames)],
            "command": command,
            "frame_mask": torch.from_numpy(frame_mask.astype(np.float32)),
            "k": torch.from_numpy(k),
            "actions": self.action[torch.from_numpy(act_idx)],
            "action_mask": torch.from_numpy(action_mask.astype(np.float32)),
            "value": self.value[torch.from_numpy(frames)],
            "progress": self.progress[torch.from_numpy(frames)],
            "prior_weight": torch.from_numpy(self.success[ep].astype(np.float32)),
            "instructions": [self.instructions[i] for i in ep],
        }
        if self.cfg.goal_offset:
            out.update(offset=self.offset[torch.from_numpy(frames)], ee_state=self.ee_state[torch.from_numpy(frames[:, 0])],
                       ee_actions=self.ee_action[torch.from_numpy(act_idx)])
        if branch_size and len(self.branch_frame):
            pick = rng.integers(0, len(self.branch_frame), branch_size)
            frames = self.branch_frame[pick]
            at = torch.from_numpy(frames)
            first = frames == self.start[self.branch_episode[pick]]
            command = self.action[torch.from_numpy(np.maximum(frames - 1, 0))]
            command[torch.from_numpy(first)] = self.state[at[torch.from_numpy(first)]]
            out["branch"] = {
                "images": torch.from_numpy(self.images[frames]).permute(0, 1, 4, 2, 3).float() / 255.0,
                "state": self.state[at],
                "command": command,
                "actions": self.branch_chunk[torch.from_numpy(pick)],
                "value": self.branch_value[torch.from_numpy(pick)],
                "instructions": [self.instructions[i] for i in self.branch_episode[pick]],
            }
            if self.cfg.goal_offset:
                out["branch"].update(offset=self.offset[at], ee_state=self.ee_state[at],
                                     ee_actions=self.branch_ee[torch.from_numpy(pick)])
        return out


def load_yaml(path: str | Path) -> tuple[WmConfig, list[str], TrainConfig]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VlaStackError(f"world-model config {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise VlaStackError(f"world-model config {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not {"model", "data", "train"} <= set(doc):
        raise VlaStackError(f"{path} needs the sections model:, data: and train:")
    try:
        train = TrainConfig(**doc["train"])
        train.output_dir = str(resolve_data_path(train.output_dir))
        return WmConfig.from_dict(doc["model"]), [str(resolve_data_path(p)) for p in doc["data"]], train
    except TypeError as exc:
        raise VlaStackError(f"{path}: bad section ({exc})") from None


def train_model(model: WorldModel, sampler: ChunkSampler, tc: TrainConfig, progress: bool = True,
                on_save=None) -> list[dict]:
    """The optimisation loop (AdamW, warmup + cosine, gradient clipping); returns the logged history."""
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(tc.warmup_steps, 1)) *
                                              0.5 * (1 + math.cos(math.pi * min(s / max(tc.steps, 1), 1.0))))
    model.train()
    history, start = [], time.perf_counter()
    bar = tqdm(range(tc.steps), desc="train wm", disable=not progress, mininterval=10)
    running: dict[str, float] = {}
    for step in bar:
        loss, info = model.loss(sampler.batch(tc.batch_size, rng, tc.branch_batch_size), gen)
        if not torch.isfinite(loss):
            raise VlaStackError(f"world-model loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        sched.step()
        for key, v in info.items():
            running[key] = running.get(key, 0.0) + float(v)
        done = step + 1 == tc.steps or (tc.max_minutes and time.perf_counter() - start > 60 * tc.max_minutes)
        if (step + 1) % 50 == 0 or done:
            n = (step % 50) + 1
            row = {"step": step + 1, "minutes": round((time.perf_counter() - start) / 60, 2),
                   **{k: round(v / n, 5) for k, v in running.items()}}
            history.append(row)
            running = {}
            bar.set_postfix(loss=row["loss"], pred=row["pred"], sigreg=row["sigreg"])
            if progress:
                print(json.dumps(row), flush=True)
        if on_save is not None and ((step + 1) % tc.save_every == 0 or done):
            on_save(step + 1, history)
        if done:
            break
    model.eval()
    return history


def train(config: str | Path, progress: bool = True) -> dict:
    cfg, data, tc = load_yaml(config)
    torch.set_num_threads(tc.num_threads)
    train_eps, val_eps = load_episodes(data, cfg, tc.max_episodes_per_store, progress)
    model = WorldModel(cfg)
    model.set_stats(np.concatenate([e.state for e in train_eps]), np.concatenate([e.action for e in train_eps]))
    sampler = ChunkSampler(train_eps, cfg)
    out = Path(tc.output_dir)
    meta = {"data": data, "train": dataclasses.asdict(tc), "train_episodes": len(train_eps),
            "val_episodes": len(val_eps), "train_frames": int(sum(len(e.action) for e in train_eps)),
            "train_branches": int(sum(len(e.branches) for e in train_eps)),
            "parameters": param_count(model)}
    print(json.dumps(meta), flush=True)

    def save(step: int, history: list[dict]) -> None:
        save_world_model(out, model, {**meta, "step": step, "last": history[-1] if history else {}})

    if cfg.value_heads > 1:
        model.value_ensemble.requires_grad_(False)
    history = train_model(model, sampler, tc, progress, on_save=save)
    if cfg.value_heads > 1:
        meta["value_ensemble"] = fit_value_ensemble(model, sampler, tc, progress)
    from vla_stack.planners.world_model.quality import branch_choice, prediction_quality

    quality = prediction_quality(model, val_eps) if val_eps else None
    if quality is not None:
        quality["branch_choice"] = branch_choice(model, val_eps)
    meta.update(step=history[-1]["step"], last=history[-1], quality=quality)
    if cfg.goal_offset:
        meta["keypoint_reader"] = fit_keypoint_reader(model, data, tc, progress)
    save_world_model(out, model, meta)
    (out / "history.json").write_text(json.dumps(history))
    if quality is not None:
        (out / "quality.json").write_text(json.dumps(quality, indent=1))
    if tc.export_dir:
        save_world_model(tc.export_dir, model, meta, dtype=torch.float16)
    return {"output_dir": str(out), "export_dir": tc.export_dir, "steps": history[-1]["step"],
            "last": history[-1], "quality": quality, "keypoint_reader": meta.get("keypoint_reader")}


def fit_value_ensemble(model: WorldModel, sampler: ChunkSampler, tc: TrainConfig, progress: bool = True) -> dict:
    """Train the extra value heads alone (everything else frozen), each on bootstrap halves of the batches."""
    model.requires_grad_(False)
    model.value_ensemble.requires_grad_(True)
    try:
        history = train_model(model, sampler, dataclasses.replace(tc, steps=tc.ensemble_steps, seed=tc.seed + 1,
                                                                   max_minutes=None), progress)
    finally:
        model.requires_grad_(True)
    return {"heads": model.config.value_heads, "steps": tc.ensemble_steps, "last": history[-1]}


def fit_keypoint_reader(model: WorldModel, paths: list[str], tc: TrainConfig, progress: bool = True) -> dict:
    """Train a goal_offset model's keypoint reader on the stores' frames (the same scene-seed hold-out as the
    episodes) and measure it on the held-out ones (keypoints.reader_errors)."""
    from vla_stack.planners.world_model.keypoints import (KeypointOffsetReader, held_drop_of, keypoint_frames,
                                                          reader_errors, train_keypoints)

    cfg = model.config
    frames = keypoint_frames(paths, cfg.robot, tc.keypoint_every, cfg.keypoint_image_size, progress)
    held_out = np.asarray(frames["episode"]) % VAL_EVERY == VAL_EVERY - 1

    def part(mask: np.ndarray) -> dict:
        return {k: [v[i] for i in np.flatnonzero(mask)] if k == "instruction" else v[mask] for k, v in frames.items()}

    train_frames, val_frames = part(~held_out), part(held_out)
    model.keypoints.held_drop.fill_(held_drop_of(train_frames, cfg.robot))
    losses = train_keypoints(model.keypoints, train_frames, tc.keypoint_steps, tc.keypoint_batch_size,
                             tc.keypoint_lr, tc.seed, progress)
    out = {"train_frames": int((~held_out).sum()), "steps": tc.keypoint_steps,
           "loss_last_100": round(float(np.mean(losses[-100:])), 4), "held_drop_m": float(model.keypoints.held_drop)}
    if held_out.any():
        out["held_out"] = reader_errors(KeypointOffsetReader(model.keypoints, cfg.robot), val_frames)
    print(json.dumps({"keypoint_reader": out}), flush=True)
    return out
