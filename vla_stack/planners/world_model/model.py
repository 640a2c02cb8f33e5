"""The latent world model, in one file (TD-MPC2 / LeWorldModel style).

    z_t        = encode(front image, wrist image, joint state)             JEPA encoder, latent_dim floats
    z_{t+1..t+H} = z_t + predict(z_t, a_t..a_{t+H-1})                        one call per action chunk of H steps
    value(z, g), progress(z, g)                                              heads, g = instruction embedding
    prior(z, g) -> N(mu, sigma) over a normalised H-step chunk               latent proposal for deep tree nodes
    goal offset (goal_offset models)                                          target - cube, read from the images
                                                                             (keypoints.py), moved with the held
                                                                             cube by kinematics

Trained end to end with next-latent MSE (at a random offset inside the chunk, at the chunk end and one chunk
further, through the predictor's own output) plus SIGReg on the embeddings (LeWorldModel's single
regulariser: no EMA target, no stop-gradient, no reconstruction), value/progress regression on encoded and
predicted latents, the prior's Gaussian NLL on successful episodes' chunks and, where the data has branched
rollouts (several chunks tried from one saved state, each continued to an outcome), value regression on the
latent each tried chunk is predicted to reach: the only signal that ranks chunks from the same state.

The instruction is embedded by hashing its words into buckets (an EmbeddingBag): enough for templated task
instructions ("pick up the red cube"); the latent itself describes the world, not the goal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vla_stack.checkpoint_files import CONFIG, read_header, write_atomic
from vla_stack.errors import VlaStackError
from vla_stack.planners.world_model.sigreg import sigreg

FORMAT = 1
KIND = "vla_stack.world_model"
WEIGHTS = "model.safetensors"


class WorldModelCheckpointError(VlaStackError):
    """A world-model checkpoint is missing, corrupt or does not match its config."""


@dataclass
class WmConfig:
    robot: str = "panda"
    state_dim: int = 8  # arm joints + gripper
    action_dim: int = 8
    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 64
    chunk: int = 8  # actions per predictor call (= executed steps between planning decisions)
    latent_dim: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 256
    predictor_hidden: int = 512
    goal_dim: int = 32
    goal_buckets: int = 512
    gamma: float = 0.98  # per control step, for the value target gamma**(steps to success)
    # progress head target: "subtasks" (completed fraction, rising through a successful episode's segments) or
    # "goal_distance" (exp(-d / goal_distance_scale), d = the final goal's cube to its target in the table plane,
    # from replaying each stored episode in the simulator: a dense privileged label used only in training, for
    # tasks whose outcome is a matter of centimetres)
    progress_target: str = "subtasks"
    goal_distance_scale: float = 0.01
    # value / progress heads also read the last commanded action (the chunk's last step for an imagined latent):
    # a position-controlled arm ends where it was commanded, so the heads need not recover centimetres of
    # end-effector motion from the latent alone
    heads_command: bool = False
    # the search latent also carries the goal cube's offset from its target in the table plane (m): read from
    # the cameras by a keypoint reader (keypoints.py: pixel keypoints + camera geometry, trained on replayed
    # positions after the world model), moved with the commanded grasp-site motion (the robot model's forward
    # kinematics) while the gripper holds, frozen once it opens; the heads read it. Candidate chunks from one
    # state differ by millimetres where they release; a latent alone does not resolve that (needs
    # heads_command and progress_target goal_distance)
    goal_offset: bool = False
    offset_label_noise: float = 0.003  # m: the heads train on labelled offsets blurred by about the reader's error
    keypoint_channels: int = 32  # the keypoint reader's CNN width
    keypoint_image_size: int = 128  # it reads the cameras at this size (millimetres need more than the latent's)
    # loss weights
    sigreg_weight: float = 0.1
    sigreg_projections: int = 128
    value_weight: float = 1.0
    progress_weight: float = 0.5
    prior_weight: float = 0.05
    branch_weight: float = 1.0  # value on predicted latents of branched rollouts (batch["branch"], when given)
    # value heads: more than one makes an ensemble (train-wm fits the extra heads after the world model, on
    # bootstrap halves of the batches); their disagreement tells the search how far an imagined latent can be
    # trusted (the planner's `pessimism`)
    value_heads: int = 1

    def __post_init__(self) -> None:
        self.cameras, self.channels = tuple(self.cameras), tuple(self.channels)
        if self.image_size % (2 ** len(self.channels)):
            raise VlaStackError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels)}")
        if self.progress_target not in ("subtasks", "goal_distance"):
            raise VlaStackError(f"progress_target must be 'subtasks' or 'goal_distance', got '{self.progress_target}'")
        if self.chunk < 1 or self.latent_dim < 2:
            raise VlaStackError("chunk must be >= 1 and latent_dim >= 2")
        if self.goal_offset and not (self.heads_command and self.progress_target == "goal_distance"):
            raise VlaStackError("goal_offset needs heads_command: true and progress_target: goal_distance")
        if self.keypoint_image_size % 4:
            raise VlaStackError(f"keypoint_image_size {self.keypoint_image_size} must be divisible by 4")
        if self.value_heads < 1:
            raise VlaStackError(f"value_heads must be at least 1, got {self.value_heads}")

    @property
    def search_dim(self) -> int:
        """Width of a search latent: z, then the last normalised command (heads_command), then the goal offset
        (2, m) and the grasp-site position it was last measured from (3, m) (goal_offset)."""
        return self.latent_dim + self.action_dim * self.heads_command + 5 * self.goal_offset

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cameras"], d["channels"] = list(self.cameras), list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> WmConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VlaStackError(f"unknown world-model config keys: {', '.join(unknown)}")
        return cls(**data)


def goal_tokens(instruction: str, buckets: int) -> list[int]:
    words = re.findall(r"[a-z0-9]+", instruction.lower()) or ["<empty>"]
    return [zlib.crc32(w.encode()) % buckets for w in words]


def embed_instructions(bag: nn.EmbeddingBag, instructions: list[str]) -> torch.Tensor:
    """(B, G): each instruction's words hashed into the bag's buckets and averaged."""
    tokens = [goal_tokens(s, bag.num_embeddings) for s in instructions]
    flat = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [len(ts) for ts in tokens[:-1]]), dtype=torch.long)
    return bag(flat, offsets)


GRIP_CLOSED = 0.5  # normalised gripper command above which the hand holds what it grasped


def held_steps(prev_grip: torch.Tensor, grip: torch.Tensor) -> torch.Tensor:
    """(B,) steps of a chunk through which the hand keeps what it held at the chunk's start: the gripper was
    commanded closed before the chunk and stays closed up to the first opening. prev_grip (B,), grip (B, H)."""
    closed = torch.cat([prev_grip[:, None], grip], 1) > GRIP_CLOSED
    return torch.cumprod(closed.long(), 1)[:, 1:].sum(1)


def carry_offset(offset: torch.Tensor, ref: torch.Tensor, held: torch.Tensor, ee_held: torch.Tensor) -> torch.Tensor:
    """The goal offset (target - cube, B x 2) after a chunk: a held cube moves with the grasp site from `ref`
    to `ee_held` (its position at the chunk's last held step); a cube not held stays put."""
    moved = torch.where((held > 0)[:, None], ee_held - ref, torch.zeros_like(ref))
    return offset - moved[:, :2]


def _mlp(sizes: list[int], out_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or out_act:
            layers += [nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Per camera a small strided CNN (shared weights), flattened; fused with the normalised state."""

    def __init__(self, cfg: WmConfig):
        super().__init__()
        convs, c_in = [], 3
        for c in cfg.channels:
            convs += [nn.Conv2d(c_in, c, 4, 2, 1), nn.GroupNorm(max(1, c // 8), c), nn.GELU()]
            c_in = c
        self.cnn = nn.Sequential(*convs)
        side = cfg.image_size // 2 ** len(cfg.channels)
        feat = len(cfg.cameras) * c_in * side * side
        self.fuse = _mlp([feat + cfg.state_dim, cfg.hidden, cfg.hidden, cfg.latent_dim])

    def forward(self, images: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """images (B, cams, 3, S, S) float in [0, 1], state (B, state_dim) normalised -> (B, latent_dim)."""
        b, c = images.shape[:2]
        f = self.cnn(images.flatten(0, 1) * 2 - 1).reshape(b, -1)
        return self.fuse(torch.cat([f, state], -1))


class WorldModel(nn.Module):
    def __init__(self, cfg: WmConfig):
        super().__init__()
        self.config = cfg
        D, G, H, A = cfg.latent_dim, cfg.goal_dim, cfg.chunk, cfg.action_dim
        self.encoder = Encoder(cfg)
        self.predictor = _mlp([D + H * A, cfg.predictor_hidden, cfg.predictor_hidden, H * D])
        self.goal = nn.EmbeddingBag(cfg.goal_buckets, G, mode="mean")
        C = (A if cfg.heads_command else 0) + (3 if cfg.goal_offset else 0)
        self.value_head = _mlp([D + G + C, cfg.hidden, cfg.hidden, 1])
        if cfg.value_heads > 1:
            self.value_ensemble = nn.ModuleList(_mlp([D + G + C, cfg.hidden, cfg.hidden, 1])
                                                for _ in range(cfg.value_heads - 1))
        self.progress_head = _mlp([D + G + C, cfg.hidden, 1])
        if cfg.goal_offset:
            from vla_stack.planners.world_model.keypoints import KeypointNet

            self.keypoints = KeypointNet(G, cfg.goal_buckets, cfg.keypoint_channels)
        self.prior_head = _mlp([D + G, cfg.hidden, cfg.hidden, 2 * H * A])
        # normalisation of raw joint states / actions (set from the training data, saved with the weights)
        for name, dim in (("state", cfg.state_dim), ("action", cfg.action_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    # ---- normalisation --------------------------------------------------------------------------------
    def set_stats(self, state: np.ndarray, action: np.ndarray) -> None:
        for name, x in (("state", state), ("action", action)):
            x = torch.as_tensor(np.asarray(x, np.float32))
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(1e-2))

    def norm_state(self, s: torch.Tensor) -> torch.Tensor:
        return (s - self.state_mean) / self.state_std

    def norm_action(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.action_mean) / self.action_std

    def unnorm_action(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.action_std + self.action_mean

    # ---- pieces ---------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """images (B, cams, 3, S, S) in [0, 1], raw state (B, state_dim) -> latents (B, D)."""
        return self.encoder(images, self.norm_state(state))

    def embed_goal(self, instructions: list[str]) -> torch.Tensor:
        return embed_instructions(self.goal, instructions)

    def predict(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z (B, D), normalised actions (B, H, A) -> latents after each of the H steps (B, H, D)."""
        cfg = self.config
        delta = self.predictor(torch.cat([z, actions.flatten(1)], -1)).view(-1, cfg.chunk, cfg.latent_dim)
        return z[:, None] + delta

    def head_input(self, z: torch.Tensor, g: torch.Tensor, command: torch.Tensor | None = None,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
        """What the value / progress heads read: latent, goal, (heads_command) the normalised last command and
        (goal_offset) the goal offset as tanh(offset / 3 scale) and exp(-|offset| / scale), scale =
        goal_distance_scale: the progress target's own form, resolved where it matters (the last centimetres)."""
        cfg = self.config
        parts = [z, g]
        if cfg.heads_command:
            if command is None:
                raise VlaStackError("this world model's heads read the last commanded action; pass it")
            parts.append(command)
        if cfg.goal_offset:
            if offset is None:
                raise VlaStackError("this world model's heads read the goal offset; pass it")
            s = cfg.goal_distance_scale
            parts += [torch.tanh(offset / (3 * s)), torch.exp(-offset.norm(dim=-1, keepdim=True) / s)]
        return torch.cat(parts, -1)

    def read_goal_offset(self, frames: np.ndarray, state: np.ndarray,
                         instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """(offset target - goal cube (2,) m, positions (target, cube) (2, 2) m; NaN where unread) from one
        observation: camera frames (front, wrist) (2, S, S, 3) uint8 at keypoint_image_size and the measured
        joint state (goal_offset models; see keypoints.KeypointOffsetReader)."""
        if not self.config.goal_offset:
            raise VlaStackError("this world model has no goal-offset reader (goal_offset: false)")
        if getattr(self, "_reader", None) is None:
            from vla_stack.planners.world_model.keypoints import KeypointOffsetReader

            self._reader = KeypointOffsetReader(self.keypoints, self.config.robot)
        return self._reader.read(frames, state, instruction)

    def value(self, z: torch.Tensor, g: torch.Tensor, command: torch.Tensor | None = None,
              offset: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.value_head(self.head_input(z, g, command, offset))[:, 0])

    def value_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every value head's logit on head inputs x (B, ...) -> (value_heads, B); row 0 is `value_head`."""
        heads = [self.value_head, *getattr(self, "value_ensemble", [])]
        return torch.stack([head(x)[:, 0] for head in heads])

    def _value_loss(self, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
        """BCE per value head (value_heads,); the ensemble's extra heads each see a random half of the rows."""
        bce = F.binary_cross_entropy_with_logits(self.value_logits(x), target.expand(self.config.value_heads, -1),
                                                 reduction="none")
        w = weight.expand_as(bce).clone()
        if len(w) > 1:
            w[1:] = w[1:] * (torch.rand(w[1:].shape, generator=generator) < 0.5)
        return (bce * w).sum(1) / w.sum(1).clamp_min(1.0)

    def progress(self, z: torch.Tensor, g: torch.Tensor, command: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.progress_head(self.head_input(z, g, command, offset))[:, 0])

    def prior(self, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian over normalised chunks: mean (B, H, A), log-std (B, H, A) in [-3, 1]."""
        cfg = self.config
        out = self.prior_head(torch.cat([z, g], -1)).view(-1, 2, cfg.chunk, cfg.action_dim)
        return out[:, 0], out[:, 1].clamp(-3.0, 1.0)

    @staticmethod
    def carry_through(offset: torch.Tensor, ref: torch.Tensor, prev_grip: torch.Tensor, raw_chunk: torch.Tensor,
                      ee_chunk: torch.Tensor) -> torch.Tensor:
        """carry_offset over a raw chunk (B, H, A) whose grasp-site positions (B, H, 3) are known."""
        held = held_steps(prev_grip, raw_chunk[..., -1])
        ee_held = ee_chunk[torch.arange(len(held)), (held - 1).clamp_min(0)]
        return carry_offset(offset, ref, held, ee_held)

    # ---- training loss --------------------------------------------------------------------------------
    def loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """batch (see train.py ChunkSampler): images (B, F, cams, 3, S, S) for frames [t, t+k, t+H, t+2H],
        state (B, F, state_dim), command (B, F, A) raw (the action before each frame), frame_mask (B, F), k (B,) in
        1..H, actions (B, 2H, A) raw, action_mask
        (B, 2H), value / progress targets (B, F), prior_weight (B,), instruction list; for goal_offset models also
        offset (B, F, 2) m labels, ee_state (B, 3) the grasp site's position at frame t, ee_actions (B, 2H, 3)
        where each action puts it (forward kinematics)."""
        cfg = self.config
        B, F_ = batch["images"].shape[:2]
        z = self.encode(batch["images"].flatten(0, 1), batch["state"].flatten(0, 1)).view(B, F_, -1)
        a = self.norm_action(batch["actions"]) * batch["action_mask"][..., None]
        H = cfg.chunk
        pred1 = self.predict(z[:, 0], a[:, :H])
        pred2 = self.predict(pred1[:, -1], a[:, H:])
        k = batch["k"]
        pk = pred1[torch.arange(B), k - 1]
        m = batch["frame_mask"]

        def masked_mse(p, target, mask):
            return ((p - target).square().mean(-1) * mask).sum() / mask.sum().clamp_min(1.0)

        pred_loss = (masked_mse(pk, z[:, 1], m[:, 1]) + masked_mse(pred1[:, -1], z[:, 2], m[:, 2])
                     + masked_mse(pred2[:, -1], z[:, 3], m[:, 3])) / 3
        reg = sigreg(z.flatten(0, 1)[m.flatten() > 0], cfg.sigreg_projections, generator)
        g = self.embed_goal(batch["instructions"])
        # heads on encoded latents (all frames) and on the predicted latents of the chunk ends
        zz = torch.cat([z.flatten(0, 1), pred1[:, -1], pred2[:, -1]])
        gg = torch.cat([g.repeat_interleave(F_, 0), g, g])
        cc = torch.cat([self.norm_action(batch["command"]).flatten(0, 1), a[:, H - 1], a[:, -1]])
        mm = torch.cat([m.flatten(), m[:, 2], m[:, 3]])
        v_t = torch.cat([batch["value"].flatten(), batch["value"][:, 2], batch["value"][:, 3]])
        p_t = torch.cat([batch["progress"].flatten(), batch["progress"][:, 2], batch["progress"][:, 3]])
        oo = None
        if cfg.goal_offset:  # the heads read the labelled offsets (blurred), carried through the chunks
            offsets = batch["offset"]  # (B, F, 2) m
            noisy = offsets + cfg.offset_label_noise * torch.randn(offsets.shape, generator=generator)
            raw, ee = batch["actions"], batch["ee_actions"]  # (B, 2H, A) raw, (B, 2H, 3)
            o1 = self.carry_through(noisy[:, 0], batch["ee_state"], batch["command"][:, 0, -1], raw[:, :H], ee[:, :H])
            o2 = self.carry_through(o1, ee[:, H - 1], raw[:, H - 1, -1], raw[:, H:], ee[:, H:])
            oo = torch.cat([noisy.flatten(0, 1), o1, o2])
        heads_in = self.head_input(zz, gg, cc, oo)
        v_loss = self._value_loss(heads_in, v_t, mm, generator)
        p_loss = (F.binary_cross_entropy_with_logits(self.progress_head(heads_in)[:, 0], p_t, reduction="none") * mm).sum() / mm.sum()
        mu, log_std = self.prior(z[:, 0].detach(), g)
        nll = (0.5 * ((a[:, :H] - mu) / log_std.exp()).square() + log_std).mean((1, 2))
        w = batch["prior_weight"] * batch["action_mask"][:, :H].mean(1)
        prior_loss = (nll * w).sum() / w.sum().clamp_min(1.0)
        total = (pred_loss + cfg.sigreg_weight * reg + cfg.value_weight * v_loss.sum() + cfg.progress_weight * p_loss
                 + cfg.prior_weight * prior_loss)
        info = {"pred": pred_loss.detach(), "sigreg": reg.detach(), "value": v_loss.detach()[0],
                "progress": p_loss.detach(), "prior": prior_loss.detach()}
        if cfg.value_heads > 1:
            info["value_ensemble"] = v_loss.detach()[1:].mean()
        if "branch" in batch:  # Q(z, chunk) = value(predict(z, chunk)): which chunk from this state is better
            br = batch["branch"]
            ab = self.norm_action(br["actions"])
            zb = self.predict(self.encode(br["images"], br["state"]), ab)[:, -1]
            ob = None
            if cfg.goal_offset:
                noisy = br["offset"] + cfg.offset_label_noise * torch.randn(br["offset"].shape, generator=generator)
                ob = self.carry_through(noisy, br["ee_state"], br["command"][:, -1], br["actions"], br["ee_actions"])
            xb = self.head_input(zb, self.embed_goal(br["instructions"]), ab[:, -1], ob)
            b_loss = self._value_loss(xb, br["value"], torch.ones_like(br["value"]), generator)
            total = total + cfg.branch_weight * b_loss.sum()
            info["branch"] = b_loss.detach()[0]
        return total, {"loss": total.detach(), **info}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: config.json + model.safetensors
# ----------------------------------------------------------------------------------------------------------

def save_world_model(path: str | Path, model: WorldModel, meta: dict | None = None,
                     dtype: torch.dtype = torch.float32) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    write_atomic(path / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"format": str(FORMAT)}))
    doc = {"format": FORMAT, "kind": KIND, "config": model.config.to_dict(), "meta": meta or {}}
    write_atomic(path / CONFIG, lambda p: p.write_text(json.dumps(doc, indent=1)))
    return path


def load_world_model(path: str | Path) -> tuple[WorldModel, dict]:
    """(model in eval mode, fp32; meta). Every problem is a WorldModelCheckpointError naming the file."""
    path = Path(path)
    cfg, meta = read_header(path, KIND, FORMAT, WmConfig.from_dict, WorldModelCheckpointError, "world-model")
    file = path / WEIGHTS
    if not file.is_file():
        raise WorldModelCheckpointError(f"world-model weights {file} are missing")
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WorldModelCheckpointError(f"world-model weights {file} are corrupt or truncated: {exc}") from None
    model = WorldModel(cfg)
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(weights)) + sorted(k for k in set(expected) & set(weights)
                                                        if expected[k].shape != weights[k].shape)
    if bad:
        raise WorldModelCheckpointError(f"weights in {file} do not match its config ({', '.join(bad[:4])}"
                                        f"{' ...' if len(bad) > 4 else ''})")
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise WorldModelCheckpointError(f"weights in {file} contain NaN or inf")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    return model.eval(), meta


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LatentSearchModel:
    """The world model as the three numpy callables the tree search takes (mcts.py knows no torch):
    dynamics(latents, chunks) -> next latents, evaluate(latents) -> scores, propose(latents, n, rng) ->
    (chunks, log_pi, log_beta). Chunks here are *normalised* H-step action chunks. `temperature` widens the
    prior for sampling (beta); pi is the prior itself, so Sampled MuZero's correction is non-trivial.
    With an ensemble of value heads a latent scores the heads' mean less `pessimism` standard deviations: a lower
    confidence bound, so a search that maximises over many imagined latents does not pick the ones the model
    merely overrates (the optimiser's curse grows with the tree).
    A search latent is z, then for heads_command models the last normalised command (dynamics carries each
    chunk's last step along), then for goal_offset models the goal offset and the grasp-site position it refers
    to (dynamics moves the offset with the held cube, carry_offset): `root(z, command, state, offset)` builds
    the root's."""

    model: WorldModel
    goal: torch.Tensor  # (1, G) embedding of the current instruction
    progress_weight: float = 0.25
    temperature: float = 1.5
    pessimism: float = 0.0  # ensemble models: a latent's value is the heads' mean minus this many standard deviations
    stats: dict = field(default_factory=lambda: {"dynamics_calls": 0, "rollouts": 0})

    def root(self, z: np.ndarray, command: np.ndarray | None = None, state: np.ndarray | None = None,
             offset: np.ndarray | None = None) -> np.ndarray:
        """The search latent of an encoded observation; `command` = the last action sent (raw; None: the
        joint state, as at an episode's start); goal_offset models also take the goal `offset` (2,) m as read
        (WorldModel.read_goal_offset) and the measured joint `state` (raw), whose grasp-site position it refers to."""
        cfg = self.model.config
        z = np.asarray(z, np.float32)
        if not cfg.heads_command:
            return z
        if command is None:
            raise VlaStackError("this world model's heads read the last commanded action; pass it")
        parts = [z]
        with torch.inference_mode():
            parts.append(self.model.norm_action(torch.as_tensor(np.asarray(command, np.float32))).numpy())
        if cfg.goal_offset:
            if state is None or offset is None:
                raise VlaStackError("this world model's search latent holds the goal offset and the grasp site it "
                                    "was read at: pass the offset and the measured joint state")
            offset = np.asarray(offset, np.float32).reshape(-1)
            if offset.shape != (2,) or not np.all(np.isfinite(offset)):
                raise VlaStackError(f"the goal offset must be 2 finite numbers (m), got {offset}")
            position = self._fk.positions(np.asarray(state, np.float64)[: self._fk.arm_dof])
            parts += [offset, position.astype(np.float32)]
        return np.concatenate(parts, -1)

    @property
    def _fk(self):
        from vla_stack.control.kinematics import grasp_site_fk

        return grasp_site_fk(self.model.config.robot)

    def _split(self, latents: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(z, command, offset, ee_ref), the last three None where the model does not carry them."""
        cfg = self.model.config
        x = torch.from_numpy(np.ascontiguousarray(latents, np.float32))
        if x.shape[-1] != cfg.search_dim:
            raise VlaStackError(f"search latents of this world model have {cfg.search_dim} values, got {x.shape[-1]}")
        D, A = cfg.latent_dim, cfg.action_dim
        if not cfg.heads_command:
            return x, None, None, None
        if not cfg.goal_offset:
            return x[:, :D], x[:, D:], None, None
        return x[:, :D], x[:, D:D + A], x[:, D + A:D + A + 2], x[:, D + A + 2:]

    @torch.inference_mode()
    def dynamics(self, latents: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        z, command, offset, ref = self._split(latents)
        a = torch.from_numpy(np.ascontiguousarray(chunks, np.float32))
        self.stats["dynamics_calls"] += 1
        self.stats["rollouts"] += len(z)
        nxt = self.model.predict(z, a)[:, -1]
        if command is None:
            return nxt.numpy()
        parts = [nxt, a[:, -1]]
        if offset is not None:  # forward kinematics only where it is needed: the last held step and the last step
            raw = self.model.unnorm_action(a)
            held = held_steps(self.model.unnorm_action(command)[:, -1], raw[..., -1])
            rows = torch.arange(len(raw))
            arm = self._fk.arm_dof
            ee = torch.from_numpy(self._fk.positions(torch.stack(
                [raw[rows, (held - 1).clamp_min(0), :arm], raw[:, -1, :arm]], 1).numpy()).astype(np.float32))
            parts += [carry_offset(offset, ref, held, ee[:, 0]), ee[:, 1]]
        return torch.cat(parts, -1).numpy()

    @torch.inference_mode()
    def evaluate(self, latents: np.ndarray) -> np.ndarray:
        z, command, offset, _ = self._split(latents)
        x = self.model.head_input(z, self.goal.expand(len(z), -1), command, offset)
        values = torch.sigmoid(self.model.value_logits(x))
        score = values.mean(0)
        if self.pessimism and len(values) > 1:
            score = score - self.pessimism * values.std(0)
        if self.progress_weight:
            score = score + self.progress_weight * torch.sigmoid(self.model.progress_head(x)[:, 0])
        return score.numpy()

    @torch.inference_mode()
    def propose(self, latents: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = self._split(latents)[0]
        mu, log_std = self.model.prior(z, self.goal.expand(len(z), -1))
        mu, log_std = mu.numpy()[:, None], log_std.numpy()[:, None]  # (B, 1, H, A)
        eps = rng.standard_normal((len(z), n, *mu.shape[2:]), dtype=np.float32)
        chunks = mu + (self.temperature * np.exp(log_std)) * eps
        # log densities of the drawn chunks up to the constant they share (it cancels in the normalised prior):
        # pi = N(mu, sigma), beta = N(mu, temperature * sigma), chunk = mu + temperature * sigma * eps
        sq = np.einsum("bnha,bnha->bn", eps, eps)
        log_det = log_std.sum((2, 3))
        log_pi = -0.5 * self.temperature ** 2 * sq - log_det
        log_beta = -0.5 * sq - log_det - eps[0, 0].size * math.log(self.temperature)
        return chunks, log_pi, log_beta
