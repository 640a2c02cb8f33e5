"""Tiny VLA configs and synthetic inputs shared by the tests/test_vla_*.py files."""

import numpy as np
import torch

from vla_stack.policy.vla.configuration_vla import VlaConfig
from vla_stack.policy.vla.normalize import Normalizer, compute_stats

EMBODIMENTS = {"panda": [f"panda_joint{i}" for i in range(1, 8)] + ["gripper"],
               "so101": ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]}


def tiny_config(**overrides) -> VlaConfig:
    base = dict(image_size=32, width=32, expert_width=32, depth=2, num_heads=2, head_dim=16, patch_grid=2,
                chunk_size=4, n_action_steps=2, num_inference_steps=4, max_text_tokens=8,
                embodiments=EMBODIMENTS)
    return VlaConfig(**{**base, **overrides})


def tiny_normalizer(mode: str = "mean_std") -> Normalizer:
    rng = np.random.default_rng(0)
    return Normalizer({r: {f: compute_stats(rng.normal(size=(50, len(j)))) for f in ("state", "action")}
                       for r, j in EMBODIMENTS.items()}, mode)


def tiny_batch(model, b: int = 2) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    return {"images": torch.rand(b, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g),
            "text": model.backbone.encode_text(["pick up the red cube", "put the blue cube in the green bowl"][:b]),
            "state": torch.randn(b, 32, generator=g), "state_mask": torch.ones(b, 32),
            "embodiment": torch.zeros(b, dtype=torch.long),
            "actions": torch.randn(b, cfg.chunk_size, 32, generator=g),
            "action_mask": torch.ones(b, cfg.chunk_size, 32)}


def observation(robot: str = "panda", size: int = 48) -> dict:
    rng = np.random.default_rng(2)
    return {"images": {c: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for c in ("front", "wrist")},
            "state": rng.normal(size=len(EMBODIMENTS[robot])).astype(np.float32),
            "instruction": "pick up the red cube"}


def save_tiny_smolvlm(path, words: list[str], with_lm_head: bool = False) -> None:
    """A random SmolVLM (the real transformers classes, ~100k parameters) and a word-level tokenizer over
    `words`, saved to `path` as a local VLM directory: the hf code paths run offline, no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMModel

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<image>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(path)
    config = SmolVLMConfig(
        image_token_id=vocab["<image>"], scale_factor=2,
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 256, "pad_token_id": 0})
    torch.manual_seed(0)
    (SmolVLMForConditionalGeneration if with_lm_head else SmolVLMModel)(config).save_pretrained(path)
