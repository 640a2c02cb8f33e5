"""The `hf` backbone with a tiny random SmolVLM (the real transformers class, saved to and loaded from a
local directory, no hub): token layout, padding mask, KV cache and dtype go through the real model code."""

import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.configuration_vla import VlaConfig
from vla_stack.policy.vla.modeling_vla import VlaModel, euler_sample

from vla_helpers import save_tiny_smolvlm

WORDS = ["pick", "up", "the", "red", "blue", "cube", "put", "in", "bowl"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_smolvlm")
    save_tiny_smolvlm(path, WORDS)
    return path


def _batch(model, b=2):
    return {"images": torch.rand(b, 2, 3, 40, 40),
            "text": model.backbone.encode_text(["pick up the red cube", "put the blue cube in the red bowl"][:b]),
            "state": torch.randn(b, 32), "state_mask": torch.ones(b, 32),
            "embodiment": torch.zeros(b, dtype=torch.long),
            "actions": torch.randn(b, 4, 32), "action_mask": torch.ones(b, 4, 32)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_backbone_trains_and_samples(vlm_dir, dtype):
    config = VlaConfig(backbone="hf", hf_path=str(vlm_dir), hf_dtype=dtype, chunk_size=4, n_action_steps=2,
                       expert_width=32, max_text_tokens=8, embodiments={"panda": list("abcdefgh")})
    model = VlaModel(config)
    assert model.backbone.vlm.dtype == getattr(torch, dtype)
    batch = _batch(model)
    cache = model.encode_prefix(batch)
    # 2 cameras x (32/8)^2/2^2 = 4 image tokens each, 8 text tokens, then the state token
    assert cache.keys[0].shape == (2, 2, 2 * 4 + 8 + 1, 16) and len(cache.keys) == 2
    assert cache.mask[0, :8].all() and cache.mask[0].sum() < cache.mask[1].sum()  # shorter text is padded
    loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.vlm.text_model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.expert.layers[0].q.weight.grad is not None
    model.eval()
    noise = torch.randn(2, 4, 32)
    with_cache = model.sample_actions(batch, num_steps=3, noise=noise)
    without = model.sample_actions(batch, num_steps=3, noise=noise, use_kv_cache=False)
    assert with_cache.shape == (2, 4, 32)
    torch.testing.assert_close(with_cache, without, atol=1e-4, rtol=1e-4)
    # the fused inference weights compute the training path's velocity (grouped-query attention, padding)
    with torch.no_grad():
        reference = euler_sample(lambda x, t: model.expert.velocity(cache, x, t), noise, 3)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(with_cache, reference, atol=tolerance, rtol=tolerance)


def test_hf_backbone_missing_dir_is_clear(tmp_path):
    config = VlaConfig(backbone="hf", hf_path=str(tmp_path / "nothing"))
    with pytest.raises(VlaStackError, match="cannot load the VLM"):
        VlaModel(config)
