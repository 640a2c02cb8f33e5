"""Training data: zarr episode stores or LeRobot v3 datasets -> in-RAM tensors -> padded, normalised action
chunks with masks. The demo sets are small (a few hundred episodes at 64 px is ~1-2 GB), so everything is
decoded once and batches are gathered by index: no dataloader workers competing for the two cores."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np
import torch
import torch.nn.functional as F

from vla_stack.data.episode_store import EpisodeStore
from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.configuration_vla import VlaConfig
from vla_stack.policy.vla.normalize import Normalizer, compute_stats, dim_mask, pad


@dataclass
class Episode:
    robot: str
    instruction: str
    images: np.ndarray  # (T, cameras, S, S, 3) uint8 at the model's image size
    state: np.ndarray  # (T, D)
    action: np.ndarray  # (T, D)
    # Privileged grounding labels for the training-only loss (see aux_labels): (T, cameras, AUX_OBJECTS, 2) in
    # the model's camera order, their (T, cameras, AUX_OBJECTS) 0/1 mask and, per frame, the last frame at which the named cube still sat where the
    # label puts it (memory frames are labelled up to there). None when the episode cannot be regenerated.
    aux: np.ndarray | None = None
    aux_mask: np.ndarray | None = None
    cube_until: np.ndarray | None = None
    # Per-frame instruction: the episode's instruction, or for SUBTASK_FAMILIES the frame's subtask text
    # (those long-horizon tasks run under a planner that hands the low level one subtask at a time).
    texts: list[str] | None = None
    # Leading frames whose actions are not to be imitated: a learner ran them before the expert took over
    # (collect --learner); they stay as video-memory context.
    learn_from: int = 0

    def frame_texts(self) -> list[str]:
        return self.texts if self.texts is not None else [self.instruction] * len(self.action)


# Grounding targets per frame: where the named cube and its destination appear in each camera of
# LABELLED_CAMERAS, (cameras, AUX_OBJECTS, 2) as (column, row) in [-1, 1] (the wrist camera through the arm's
# forward kinematics at that frame; unlabelled where the object is outside its image). The destination is the named bowl or bin, or the cube to stack
# on; pick and "put it back where it was" have none (the empty spot is nothing to see in the current image).
AUX_OBJECTS = 2
LABELLED_CAMERAS = ("front", "wrist")
GRIPPER_CLOSED = 0.5
SUBTASK_FAMILIES = ("sort", "restore")


@functools.cache
def _kinematics(robot: str):
    """A scene of `robot` for forward kinematics of its cameras: (model, data, arm qpos addresses)."""
    from vla_stack.sim.tabletop import TabletopSim

    sim = TabletopSim(robot, 1, None, 0, (64, 64))
    return sim.model, mujoco.MjData(sim.model), sim._arm_qpos


def aux_labels(task: str, robot: str, seed: int | None, instruction: str, gripper: np.ndarray,
               subtask_index: np.ndarray | None = None, arm_qpos: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Regenerate the episode's scene from its seed (tasks.generate is deterministic in family, robot, seed)
    and label every frame with where its named cube started and where its destination is, in each of
    LABELLED_CAMERAS (the wrist camera needs the frame's measured `arm_qpos`; without it, front only).
    With `subtask_index` (SUBTASK_FAMILIES) the named cube and destination are those of each frame's subtask,
    else those of the whole instruction. A cube is labelled until the gripper first closes in a subtask that
    moves it (after that it is in the hand or elsewhere); `cube_until` is that frame, for memory frames.
    None when the scene cannot be regenerated or does not match the instruction."""
    from vla_stack.sim.robots import TABLE_Z, get_robot
    from vla_stack.sim.tabletop import camera_coords, front_camera_coords
    from vla_stack.sim.tasks import FAMILIES, generate

    if seed is None or task not in FAMILIES:
        return None
    try:
        spec = get_robot(robot)
    except VlaStackError:
        return None
    inst = generate(task, spec, int(seed))
    if inst.instruction != instruction:
        return None
    T = len(gripper)
    cube_z = TABLE_Z + spec.cube_half
    if subtask_index is None:
        per_frame = np.zeros(T, int)
        goals = [(inst.subtasks[0].goal.cube, inst.subtasks[-1].goal)]
    else:
        per_frame = np.clip(np.asarray(subtask_index, int), 0, len(inst.subtasks) - 1)
        goals = [(s.goal.cube, s.goal) for s in inst.subtasks]
    closed = np.asarray(gripper) > GRIPPER_CLOSED
    grasped_at: dict[int, int] = {}  # cube -> first frame the gripper closed while a subtask on it ran
    for t in range(T):
        cube = goals[per_frame[t]][0]
        if closed[t] and cube not in grasped_at:
            grasped_at[cube] = t
    labels = np.zeros((T, len(LABELLED_CAMERAS), AUX_OBJECTS, 2), np.float32)
    mask = np.zeros((T, len(LABELLED_CAMERAS), AUX_OBJECTS), np.float32)
    cube_until = np.full(T, -1, np.int64)
    points = np.zeros((T, AUX_OBJECTS, 3))
    for t in range(T):
        cube, goal = goals[per_frame[t]]
        points[t, 0] = (*inst.cubes[cube].xy, cube_z)
        cube_until[t] = grasped_at.get(cube, T - 1)
        mask[t, :, 0] = float(t <= cube_until[t])
        if goal.kind in ("in", "centre") and goal.target is not None:
            points[t, 1] = (*inst.receptacles[goal.target].xy, TABLE_Z)
        elif goal.kind == "on" and goal.target is not None:
            points[t, 1] = (*inst.cubes[goal.target].xy, cube_z)
        else:
            continue
        mask[t, :, 1] = 1.0
    labels[:, 0] = front_camera_coords(spec, points)
    if arm_qpos is None:
        mask[:, 1] = 0.0
    else:
        model, data, qpos_adr = _kinematics(robot)
        for t in range(T):
            data.qpos[qpos_adr] = arm_qpos[t]
            mujoco.mj_kinematics(model, data)
            mujoco.mj_camlight(model, data)
            labels[t, 1], visible = camera_coords(model, data, "wrist", points[t])
            mask[t, 1] *= visible
    return labels, mask, cube_until


def resize_images(frames: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., size, size, 3). Integer down-scales average pixel blocks, so a 128 px
    render seen at 64 px is the same whether it was stored at 128 px (training) or rendered live (eval)."""
    h, w = frames.shape[-3:-1]
    if (h, w) == (size, size):
        return frames
    lead = frames.shape[:-3]
    x = torch.from_numpy(np.ascontiguousarray(frames).reshape(-1, h, w, 3)).permute(0, 3, 1, 2).float()
    if h == w and h % size == 0:
        out = F.avg_pool2d(x, h // size)
    else:
        out = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out.reshape(*lead, size, size, 3)


def _cached_images(store: EpisodeStore, index: int, cameras: tuple[str, ...], image_size: int,
                   frames: int, decode) -> np.ndarray:
    """(T, cameras, S, S, 3) images of one episode at the model's size, decoded once per machine: zarr reads
    frame by frame (~0.15 s per episode here, 15-20 min for a few thousand episodes); the cache (in the user
    cache dir, keyed on the episode's identity) loads in milliseconds. A damaged cache file is rebuilt."""
    import hashlib

    import platformdirs

    key = hashlib.sha1(f"{store.episode_identity(index)}:{','.join(cameras)}:{image_size}".encode()).hexdigest()
    path = Path(platformdirs.user_cache_dir("vla_stack")) / "episodes" / f"{key}.npy"
    shape = (frames, len(cameras), image_size, image_size, 3)
    try:
        images = np.load(path)
        if images.shape == shape and images.dtype == np.uint8:
            return images
    except (OSError, ValueError):
        pass
    images = decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, images)
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache dir only costs speed
    return images


def load_store(path: str | Path, cameras: tuple[str, ...], image_size: int) -> list[Episode]:
    """Every episode of a store, images resized to the model's size. Episodes of SUBTASK_FAMILIES get their
    per-frame subtask texts as instructions (the store's `subtask_index`)."""
    store = EpisodeStore.open(path)
    missing = [c for c in cameras if f"images.{c}" not in store.features]
    if missing or "state" not in store.features or "action" not in store.features:
        raise VlaStackError(f"{path} lacks features needed for training: "
                            f"{', '.join([f'images.{c}' for c in missing] or ['state/action'])}")
    episodes = []
    low_dim = [name for name in store.features if not name.startswith("images.")]
    for i in store.episode_indices():
        meta = store.episode_meta(i)
        data = store.read_episode(i, low_dim)

        def decode(i=i) -> np.ndarray:
            frames = store.read_episode(i, [f"images.{c}" for c in cameras])
            return np.stack([resize_images(frames[f"images.{c}"], image_size) for c in cameras], 1)

        images = _cached_images(store, i, cameras, image_size, len(data["action"]), decode)
        action = data["action"].astype(np.float32)
        subtask_index, texts = None, None
        if meta.task in SUBTASK_FAMILIES and meta.subtasks and "subtask_index" in data:
            subtask_index = np.clip(data["subtask_index"].astype(int), 0, len(meta.subtasks) - 1)
            texts = [meta.subtasks[k] for k in subtask_index]
        state = data["state"].astype(np.float32)
        aux = aux_labels(meta.task, store.robot, meta.seed, meta.instruction, action[:, -1], subtask_index,
                         arm_qpos=state[:, :-1])
        if aux is not None:  # labels in the model's camera order; cameras without labels get none
            labels, mask, until = aux
            order = [LABELLED_CAMERAS.index(c) if c in LABELLED_CAMERAS else None for c in cameras]
            aux = (np.stack([labels[:, i] if i is not None else np.zeros_like(labels[:, 0]) for i in order], 1),
                   np.stack([mask[:, i] if i is not None else np.zeros_like(mask[:, 0]) for i in order], 1), until)
        episodes.append(Episode(store.robot, meta.instruction, images, state, action,
                                *(aux or (None, None, None)), texts=texts,
                                learn_from=int(meta.extra.get("learner_steps", 0))))
    return episodes


def load_source(source: str | Path, cameras: tuple[str, ...], image_size: int) -> list[Episode]:
    """A zarr episode store, or a LeRobot v3 dataset folder (meta/info.json), imported through vla_stack's
    converter into a temporary store so both formats share one reader."""
    source = Path(source)
    if (source / "meta" / "info.json").is_file():
        from vla_stack.data.lerobot_format import import_lerobot

        with tempfile.TemporaryDirectory() as tmp:
            import_lerobot(source, None, Path(tmp) / "store.zarr")
            return load_store(Path(tmp) / "store.zarr", cameras, image_size)
    return load_store(source, cameras, image_size)


def dataset_stats(episodes: list[Episode]) -> dict:
    """Per-robot state/action stats over all frames (the normaliser's input)."""
    stats = {}
    for robot in sorted({e.robot for e in episodes}):
        eps = [e for e in episodes if e.robot == robot]
        stats[robot] = {"state": compute_stats(np.concatenate([e.state for e in eps])),
                        "action": compute_stats(np.concatenate([e.action for e in eps]))}
    return stats


class ChunkDataset:
    """Every frame of every episode is a sample: its images, state, instruction and the next chunk_size
    actions. Chunks running past the episode end repeat the last action and are masked out of the loss; frames
    before an episode's `learn_from` are context only (`trainable` lists the samples to draw)."""

    def __init__(self, episodes: list[Episode], config: VlaConfig, normalizer: Normalizer):
        if not episodes:
            raise VlaStackError("no training episodes")
        self.config = config
        H, A, S = config.chunk_size, config.max_action_dim, config.max_state_dim
        self.images = torch.from_numpy(np.concatenate([e.images for e in episodes]))  # (N, cams, S, S, 3)
        self.instructions = sorted({t for e in episodes for t in e.frame_texts()})
        text_id = {t: i for i, t in enumerate(self.instructions)}
        states, actions, steps_mask, dims_mask, emb, instr, aux, aux_mask = [], [], [], [], [], [], [], []
        frame, until, trainable = [], [], []
        for e in episodes:
            T, D = e.action.shape
            if D != len(config.embodiments.get(e.robot, ())):
                raise VlaStackError(f"episodes of robot '{e.robot}' have {D} action dims; config.embodiments "
                                    f"lists {len(config.embodiments.get(e.robot, ()))} joints for it")
            act = pad(normalizer.normalize(e.robot, "action", e.action), A)
            idx = np.minimum(np.arange(T)[:, None] + np.arange(H)[None], T - 1)
            actions.append(act[idx])
            steps_mask.append((np.arange(T)[:, None] + np.arange(H)[None] < T).astype(np.float32))
            trainable.append(np.arange(T) >= e.learn_from)
            states.append(pad(normalizer.normalize(e.robot, "state", e.state), S))
            dims_mask.append(np.repeat(dim_mask(D, A)[None], T, 0))
            emb.append(np.full(T, config.embodiment_id(e.robot)))
            instr.append(np.array([text_id[t] for t in e.frame_texts()]))
            C = len(config.cameras)
            aux.append(e.aux if e.aux is not None else np.zeros((T, C, AUX_OBJECTS, 2), np.float32))
            aux_mask.append(e.aux_mask if e.aux_mask is not None else np.zeros((T, C, AUX_OBJECTS), np.float32))
            frame.append(np.arange(T))
            until.append(e.cube_until if e.cube_until is not None else np.full(T, -1))
        self.actions = torch.from_numpy(np.concatenate(actions))  # (N, H, A)
        self.step_mask = torch.from_numpy(np.concatenate(steps_mask))  # (N, H)
        self.dim_mask = torch.from_numpy(np.concatenate(dims_mask))  # (N, A); state uses the same real dims
        self.states = torch.from_numpy(np.concatenate(states))
        self.embodiment = torch.from_numpy(np.concatenate(emb)).long()
        self.instruction_ids = torch.from_numpy(np.concatenate(instr)).long()
        self.aux = torch.from_numpy(np.concatenate(aux))  # (N, cameras, AUX_OBJECTS, 2)
        self.aux_mask = torch.from_numpy(np.concatenate(aux_mask))
        self.labelled_episodes = sum(e.aux_mask is not None for e in episodes)
        self.frame = torch.from_numpy(np.concatenate(frame)).long()  # index of each sample in its episode
        self.cube_until = torch.from_numpy(np.concatenate(until)).long()
        self.trainable = torch.from_numpy(np.flatnonzero(np.concatenate(trainable)))
        if len(self.trainable) == 0:
            raise VlaStackError("no training frames: every frame comes before its episode's expert takeover")

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, indices: torch.Tensor, backbone, shift: float = 0.0,
              generator: torch.Generator | None = None) -> dict:
        images = self.images[indices].permute(0, 1, 4, 2, 3).float() / 255.0  # (B, cams, 3, S, S)
        if shift > 0:
            images = random_shift(images, shift, generator)
        dmask = self.dim_mask[indices]
        S = self.config.max_state_dim
        return {
            "images": images,
            "text": backbone.encode_text([self.instructions[i] for i in self.instruction_ids[indices].tolist()]),
            "state": self.states[indices],
            "state_mask": dmask[:, :S],
            "embodiment": self.embodiment[indices],
            "actions": self.actions[indices],
            "action_mask": self.step_mask[indices][:, :, None] * dmask[:, None, :],
            "aux": self.aux[indices],
            "aux_mask": self.aux_mask[indices],
            **self._memory(indices),
        }

    def _memory(self, indices: torch.Tensor) -> dict:
        """Short-term video memory: the first camera `memory_offsets` frames back, clamped to the episode's
        first frame; labelled with where the frame's named cube started while that past frame still showed it
        there (the first camera is the fixed one, so the label does not depend on the arm's pose)."""
        offsets = self.config.memory_offsets
        if not offsets:
            return {}
        frame = self.frame[indices]
        past = (frame[:, None] - torch.tensor(offsets)[None]).clamp_min(0)  # (B, K) index in the episode
        rows = indices[:, None] - frame[:, None] + past
        images = self.images[rows, 0].permute(0, 1, 4, 2, 3).float() / 255.0  # (B, K, 3, S, S)
        return {"memory_images": images,
                "memory_aux": self.aux[indices, 0, 0][:, None].expand(-1, len(offsets), -1),
                "memory_aux_mask": (past <= self.cube_until[indices, None]).float()}


def random_shift(images: torch.Tensor, pad_frac: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ-style augmentation: translate each image by up to pad_frac of its size (edge pixels repeat).
    One grid_sample call for the whole batch."""
    b, c, ch, h, w = images.shape
    flat = images.reshape(b * c, ch, h, w)
    shift = (torch.rand(b * c, 2, generator=generator) * 2 - 1) * (2 * pad_frac)
    theta = torch.zeros(b * c, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, flat.shape, align_corners=False)
    return F.grid_sample(flat, grid, padding_mode="border", align_corners=False).reshape(b, c, ch, h, w)
