"""VLA network: loss masking, the flow-matching sampler, the prefix KV cache and attention structure."""

import numpy as np
import torch
from torch import nn

from vla_stack.policy.vla.dataset import ChunkDataset, Episode
from vla_stack.policy.vla.modeling_vla import VlaModel, euler_sample, flow_matching_loss, sample_flow_time

from vla_helpers import tiny_batch, tiny_config, tiny_normalizer


def test_padded_dims_and_steps_get_no_gradient():
    torch.manual_seed(0)
    model = VlaModel(tiny_config())
    batch = tiny_batch(model)
    mask = torch.zeros_like(batch["action_mask"])
    mask[:, :3, :8] = 1  # 8 real dims, last chunk step padded
    batch["action_mask"] = mask
    captured = {}
    velocity = model.expert.velocity

    def spy(cache, x_t, t):
        captured["v"] = v = velocity(cache, x_t, t)
        v.retain_grad()
        return v

    model.expert.velocity = spy
    loss, _ = model(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad = captured["v"].grad
    assert grad[mask == 0].abs().max() == 0
    assert grad[mask == 1].abs().min() > 0
    # the loss is a mean over real entries only: padding values cannot change it
    v = torch.randn(2, 4, 32)
    actions = torch.randn(2, 4, 32)
    loss_a = flow_matching_loss(lambda x, t: v, actions, mask, torch.Generator().manual_seed(3))
    junk = actions + (1 - mask) * 100
    loss_b = flow_matching_loss(lambda x, t: v + (1 - mask) * 50, junk, mask, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_a, loss_b)


def test_dataset_masks_padded_dims_and_steps():
    cfg = tiny_config(chunk_size=4)
    rng = np.random.default_rng(0)
    episodes = [Episode("so101", "pick up the red cube", rng.integers(0, 255, (3, 2, 32, 32, 3), dtype=np.uint8),
                        rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32))]
    data = ChunkDataset(episodes, cfg, tiny_normalizer())

    class Text:
        @staticmethod
        def encode_text(instructions):
            return {}

    batch = data.batch(torch.tensor([0, 2]), Text())
    assert batch["action_mask"].shape == (2, 4, 32)
    assert batch["action_mask"][0, :3, :6].all() and batch["action_mask"][0, 3].sum() == 0  # step 3 is past the end
    assert batch["action_mask"][1, 0, :6].all() and batch["action_mask"][1, 1:].sum() == 0
    assert batch["action_mask"][:, :, 6:].sum() == 0 and batch["state"][:, 6:].abs().sum() == 0
    assert batch["embodiment"].tolist() == [1, 1]


def test_flow_time_is_beta_1_5_1():
    t = sample_flow_time(200_000, torch.Generator().manual_seed(0))
    assert 0.001 <= t.min() and t.max() <= 1.0
    # Beta(1.5, 1) has mean 0.6; scaled by 0.999 and shifted by 0.001
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 0.005


def test_flow_sampler_recovers_bimodal_distribution():
    """Train a small velocity net on a 1-D mixture 0.3*N(-1, 0.1) + 0.7*N(1, 0.1) with the policy's loss and
    sample with the policy's Euler integrator: both modes come back with their weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def velocity(x, t):
        return net(torch.cat([x, t.view(-1, 1, 1).expand_as(x)], -1))

    for _ in range(1500):
        mode = torch.rand(256, 1, 1, generator=g) < 0.3
        x = torch.where(mode, -1.0, 1.0) + 0.1 * torch.randn(256, 1, 1, generator=g)
        loss = flow_matching_loss(velocity, x, torch.ones_like(x), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        samples = euler_sample(velocity, torch.randn(4000, 1, 1, generator=g), num_steps=10).flatten()
    left, right = samples[samples < 0], samples[samples >= 0]
    assert abs(len(left) / len(samples) - 0.3) < 0.05
    assert abs(left.median().item() + 1) < 0.15 and abs(right.median().item() - 1) < 0.15
    assert ((samples.abs() - 1).abs() < 0.4).float().mean() > 0.9  # little mass between the modes


def test_kv_cache_gives_the_same_actions_and_prefix_ignores_suffix():
    torch.manual_seed(0)
    model = VlaModel(tiny_config()).eval()
    batch = tiny_batch(model)
    noise = torch.randn(2, 4, 32)
    cached = model.sample_actions(batch, noise=noise)
    uncached = model.sample_actions(batch, noise=noise, use_kv_cache=False)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    # the prefix (and the state token) never see the action tokens
    c1 = model.encode_prefix(batch)
    model.expert.velocity(c1, torch.randn(2, 4, 32), torch.rand(2))
    c2 = model.encode_prefix(batch)
    torch.testing.assert_close(c1.keys[-1], c2.keys[-1])


def _reference_sample(model, batch, noise, rows=None):
    """The training path's math: encode_prefix + ActionExpert.velocity, no fused weights."""
    cache = model.encode_prefix(batch)
    cache = cache.repeat(rows) if rows else cache
    return euler_sample(lambda x, t: model.expert.velocity(cache, x, t), noise, model.config.num_inference_steps)


def test_fused_inference_computes_what_the_training_path_computes():
    torch.manual_seed(0)
    model = VlaModel(tiny_config(image_encoder="query", keypoints=4)).eval()
    batch = tiny_batch(model)  # two instructions of different length: padded text, masked attention
    noise = torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.sample_actions(batch, noise=noise), _reference_sample(model, batch, noise),
                                   atol=1e-4, rtol=1e-4)
        one = tiny_batch(model, b=1)  # one observation: its padding is dropped instead of masked
        torch.testing.assert_close(model.sample_actions(one, noise=noise[:1]), _reference_sample(model, one, noise[:1]),
                                   atol=1e-4, rtol=1e-4)
        many = torch.randn(3, 4, 32)  # several samples of one observation share its prefix
        torch.testing.assert_close(model.sample_actions(one, noise=many), _reference_sample(model, one, many, rows=3),
                                   atol=1e-4, rtol=1e-4)
    # a training step changes the weights: the fused copy follows
    before = model.sample_actions(one, noise=noise[:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(tiny_batch(model))[0].backward()
    optimizer.step()
    after = model.sample_actions(one, noise=noise[:1])
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, _reference_sample(model, one, noise[:1]), atol=1e-4, rtol=1e-4)


def test_inpainted_steps_are_kept():
    torch.manual_seed(0)
    model = VlaModel(tiny_config()).eval()
    batch = tiny_batch(model)
    known = torch.randn(2, 4, 32)
    out = model.sample_actions(batch, inpaint=(known, 2))
    torch.testing.assert_close(out[:, :2], known[:, :2])
