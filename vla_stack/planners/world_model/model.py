"""The latent world model, in one file (TD-MPC2 / LeWorldModel style).

    z_t        = encode(front image, wrist image, joint state)             JEPA encoder, latent_dim floats
    z_{t+1..t+H} = z_t + predict(z_t, a_t..a_{t+H-1})                        one call per action chunk of H steps
    value(z, g), progress(z, g)                                              heads, g = instruction embedding
    prior(z, g) -> N(mu, sigma) over a normalised H-step chunk               latent proposal for deep tree nodes

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
    # loss weights
    sigreg_weight: float = 0.1
    sigreg_projections: int = 128
    value_weight: float = 1.0
    progress_weight: float = 0.5
    prior_weight: float = 0.05
    branch_weight: float = 1.0  # value on predicted latents of branched rollouts (batch["branch"], when given)

    def __post_init__(self) -> None:
        self.cameras, self.channels = tuple(self.cameras), tuple(self.channels)
        if self.image_size % (2 ** len(self.channels)):
            raise VlaStackError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels)}")
        if self.progress_target not in ("subtasks", "goal_distance"):
            raise VlaStackError(f"progress_target must be 'subtasks' or 'goal_distance', got '{self.progress_target}'")
        if self.chunk < 1 or self.latent_dim < 2:
            raise VlaStackError("chunk must be >= 1 and latent_dim >= 2")

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
        C = A if cfg.heads_command else 0
        self.value_head = _mlp([D + G + C, cfg.hidden, cfg.hidden, 1])
        self.progress_head = _mlp([D + G + C, cfg.hidden, 1])
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
        cfg = self.config
        tokens = [goal_tokens(s, cfg.goal_buckets) for s in instructions]
        flat = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
        offsets = torch.tensor(np.cumsum([0] + [len(ts) for ts in tokens[:-1]]), dtype=torch.long)
        return self.goal(flat, offsets)

    def predict(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z (B, D), normalised actions (B, H, A) -> latents after each of the H steps (B, H, D)."""
        cfg = self.config
        delta = self.predictor(torch.cat([z, actions.flatten(1)], -1)).view(-1, cfg.chunk, cfg.latent_dim)
        return z[:, None] + delta

    def head_input(self, z: torch.Tensor, g: torch.Tensor, command: torch.Tensor | None = None) -> torch.Tensor:
        """What the value / progress heads read: latent, goal and (heads_command) the normalised last command."""
        if not self.config.heads_command:
            return torch.cat([z, g], -1)
        if command is None:
            raise VlaStackError("this world model's heads read the last commanded action; pass it")
        return torch.cat([z, g, command], -1)

    def value(self, z: torch.Tensor, g: torch.Tensor, command: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.value_head(self.head_input(z, g, command))[:, 0])

    def progress(self, z: torch.Tensor, g: torch.Tensor, command: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.progress_head(self.head_input(z, g, command))[:, 0])

    def prior(self, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian over normalised chunks: mean (B, H, A), log-std (B, H, A) in [-3, 1]."""
        cfg = self.config
        out = self.prior_head(torch.cat([z, g], -1)).view(-1, 2, cfg.chunk, cfg.action_dim)
        return out[:, 0], out[:, 1].clamp(-3.0, 1.0)

    # ---- training loss --------------------------------------------------------------------------------
    def loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """batch (see train.py ChunkSampler): images (B, F, cams, 3, S, S) for frames [t, t+k, t+H, t+2H],
        state (B, F, state_dim), command (B, F, A) raw (the action before each frame), frame_mask (B, F), k (B,) in
        1..H, actions (B, 2H, A) raw, action_mask
        (B, 2H), value / progress targets (B, F), prior_weight (B,), instruction list."""
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
        zz_logits = self.head_input(zz, gg, cc)
        v_loss = (F.binary_cross_entropy_with_logits(self.value_head(zz_logits)[:, 0], v_t, reduction="none") * mm).sum() / mm.sum()
        p_loss = (F.binary_cross_entropy_with_logits(self.progress_head(zz_logits)[:, 0], p_t, reduction="none") * mm).sum() / mm.sum()
        mu, log_std = self.prior(z[:, 0].detach(), g)
        nll = (0.5 * ((a[:, :H] - mu) / log_std.exp()).square() + log_std).mean((1, 2))
        w = batch["prior_weight"] * batch["action_mask"][:, :H].mean(1)
        prior_loss = (nll * w).sum() / w.sum().clamp_min(1.0)
        total = (pred_loss + cfg.sigreg_weight * reg + cfg.value_weight * v_loss + cfg.progress_weight * p_loss
                 + cfg.prior_weight * prior_loss)
        info = {"pred": pred_loss.detach(), "sigreg": reg.detach(), "value": v_loss.detach(),
                "progress": p_loss.detach(), "prior": prior_loss.detach()}
        if "branch" in batch:  # Q(z, chunk) = value(predict(z, chunk)): which chunk from this state is better
            br = batch["branch"]
            ab = self.norm_action(br["actions"])
            zb = self.predict(self.encode(br["images"], br["state"]), ab)[:, -1]
            logits = self.value_head(self.head_input(zb, self.embed_goal(br["instructions"]), ab[:, -1]))[:, 0]
            b_loss = F.binary_cross_entropy_with_logits(logits, br["value"])
            total = total + cfg.branch_weight * b_loss
            info["branch"] = b_loss.detach()
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
    For a model whose heads read the last command (heads_command), a search latent is [z, last normalised
    command]: `root(z, command)` builds the root's, and dynamics carries each chunk's last step along."""

    model: WorldModel
    goal: torch.Tensor  # (1, G) embedding of the current instruction
    progress_weight: float = 0.25
    temperature: float = 1.5
    stats: dict = field(default_factory=lambda: {"dynamics_calls": 0, "rollouts": 0})

    def root(self, z: np.ndarray, command: np.ndarray | None = None) -> np.ndarray:
        """The search latent of an encoded observation; `command` = the last action sent (raw; None: the
        joint state, as at an episode's start)."""
        if not self.model.config.heads_command:
            return np.asarray(z, np.float32)
        if command is None:
            raise VlaStackError("this world model's heads read the last commanded action; pass it")
        with torch.inference_mode():
            c = self.model.norm_action(torch.as_tensor(np.asarray(command, np.float32))).numpy()
        return np.concatenate([np.asarray(z, np.float32), c], -1)

    def _split(self, latents: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(np.ascontiguousarray(latents, np.float32))
        D = self.model.config.latent_dim
        return (x[:, :D], x[:, D:]) if self.model.config.heads_command else (x, None)

    @torch.inference_mode()
    def dynamics(self, latents: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        z, _ = self._split(latents)
        a = torch.from_numpy(np.ascontiguousarray(chunks, np.float32))
        self.stats["dynamics_calls"] += 1
        self.stats["rollouts"] += len(z)
        nxt = self.model.predict(z, a)[:, -1]
        return (torch.cat([nxt, a[:, -1]], -1) if self.model.config.heads_command else nxt).numpy()

    @torch.inference_mode()
    def evaluate(self, latents: np.ndarray) -> np.ndarray:
        z, command = self._split(latents)
        x = self.model.head_input(z, self.goal.expand(len(z), -1), command)
        score = torch.sigmoid(self.model.value_head(x)[:, 0])
        if self.progress_weight:
            score = score + self.progress_weight * torch.sigmoid(self.model.progress_head(x)[:, 0])
        return score.numpy()

    @torch.inference_mode()
    def propose(self, latents: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, _ = self._split(latents)
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
