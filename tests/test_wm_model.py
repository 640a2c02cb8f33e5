"""World model: SIGReg keeps a JEPA from collapsing where plain MSE collapses, a tiny world model's loss drops
in a few steps, checkpoints round-trip and corrupt ones fail clearly, and the planner runs in the env."""

import json

import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.planners.world_model.model import (WmConfig, WorldModel, WorldModelCheckpointError, load_world_model,
                                                  save_world_model)
from vla_stack.planners.world_model.sigreg import effective_rank, sigreg
from vla_stack.planners.world_model.train import ChunkSampler, TrainConfig, WmEpisode, targets, train_model

torch.set_num_threads(1)


def _jepa(use_sigreg: bool, steps: int = 300, dim: int = 8) -> torch.Tensor:
    """Encoder + predictor trained to predict the embedding of x' = x rotated, from the embedding of x."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))
    pred = torch.nn.Linear(dim, dim)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    opt = torch.optim.Adam([*enc.parameters(), *pred.parameters()], lr=3e-3)
    for _ in range(steps):
        x = torch.randn(128, 16, generator=g)
        z, z_next = enc(x), enc(x @ rot)
        loss = (pred(z) - z_next).square().mean()
        if use_sigreg:
            loss = loss + 0.5 * sigreg(torch.cat([z, z_next]), 64, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return enc(torch.randn(2000, 16, generator=g))


def test_sigreg_prevents_the_collapse_plain_mse_finds():
    collapsed, healthy = _jepa(False), _jepa(True)
    c, h = effective_rank(collapsed), effective_rank(healthy)
    assert c["trace"] < 0.01 * h["trace"], (c, h)  # MSE alone shrinks the embedding towards a point
    assert h["rank"] >= 6 and h["entropy_rank"] >= 5, h  # SIGReg keeps it spread over (nearly) all 8 dims
    assert 4 < h["trace"] < 16  # ~isotropic unit variance: trace ~ dim


def test_sigreg_statistic_orders_gaussian_below_degenerate():
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(512, 16, generator=g)
    line = torch.randn(512, 1, generator=g).repeat(1, 16)
    assert sigreg(gauss, 64, g) < 0.5 * sigreg(line, 64, g)
    assert sigreg(gauss, 64, g) < sigreg(gauss * 0.1, 64, g)
    with pytest.raises(ValueError):
        sigreg(torch.zeros(1, 4))


def _tiny_config() -> WmConfig:
    return WmConfig(robot="panda", state_dim=3, action_dim=3, image_size=16, channels=(8, 8), chunk=4,
                    latent_dim=8, hidden=32, predictor_hidden=64, goal_dim=8, goal_buckets=32, sigreg_projections=32)


def _episodes(n: int = 6, T: int = 20, seed: int = 0) -> list[WmEpisode]:
    """A bright square moved by the actions across a dark 16 px image: the state is its position."""
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(n):
        pos = rng.uniform(3, 12, 2)
        actions = rng.normal(0, 1, (T, 3)).astype(np.float32)
        states, images = [], []
        for t in range(T):
            img = np.zeros((2, 16, 16, 3), np.uint8)
            x, y = np.clip(pos.round().astype(int), 1, 14)
            img[:, y - 1:y + 2, x - 1:x + 2] = 255
            images.append(img)
            states.append(np.array([pos[0], pos[1], actions[t, 2]], np.float32))
            pos = np.clip(pos + actions[t, :2], 1, 14)
        success = e % 2 == 0
        value, progress = targets(np.zeros(T, int), 1, success, 0.98)
        eps.append(WmEpisode("pick up the red cube", np.stack(images), np.stack(states), actions, value, progress,
                             success, "synthetic", e))
    return eps


def test_tiny_world_model_loss_drops():
    cfg = _tiny_config()
    eps = _episodes()
    torch.manual_seed(0)
    model = WorldModel(cfg)
    model.set_stats(np.concatenate([e.state for e in eps]), np.concatenate([e.action for e in eps]))
    sampler = ChunkSampler(eps, cfg)
    batch = sampler.batch(8, np.random.default_rng(0))
    assert batch["images"].shape == (8, 4, 2, 3, 16, 16) and batch["actions"].shape == (8, 8, 3)
    history = train_model(model, sampler, TrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10),
                          progress=False)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    assert history[-1]["pred"] < history[0]["pred"]


def test_heads_that_read_the_command_see_each_chunks_last_step():
    from vla_stack.planners.world_model.mcts import SearchConfig, search
    from vla_stack.planners.world_model.model import LatentSearchModel

    cfg = WmConfig(**{**_tiny_config().to_dict(), "heads_command": True})
    eps = _episodes()
    model = WorldModel(cfg)
    model.set_stats(np.concatenate([e.state for e in eps]), np.concatenate([e.action for e in eps]))
    sampler = ChunkSampler(eps, cfg)
    batch = sampler.batch(64, np.random.default_rng(1))
    H, inside = cfg.chunk, batch["frame_mask"] > 0
    # the command before frame t+H is the chunk's last action (t+2H: the second chunk's)
    assert torch.equal(batch["command"][:, 2][inside[:, 2]], batch["actions"][:, H - 1][inside[:, 2]])
    assert torch.equal(batch["command"][:, 3][inside[:, 3]], batch["actions"][:, 2 * H - 1][inside[:, 3]])
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss)
    lsm = LatentSearchModel(model, model.embed_goal(["pick up the red cube"]))
    with pytest.raises(VlaStackError, match="last commanded action"):
        lsm.root(np.zeros(cfg.latent_dim, np.float32))
    root = lsm.root(np.zeros(cfg.latent_dim, np.float32), eps[0].state[0])
    chunks = np.random.default_rng(0).normal(size=(3, H, cfg.action_dim)).astype(np.float32)
    nxt = lsm.dynamics(np.repeat(root[None], 3, 0), chunks)
    assert nxt.shape == (3, cfg.latent_dim + cfg.action_dim) and np.allclose(nxt[:, cfg.latent_dim:], chunks[:, -1])
    assert lsm.evaluate(nxt).shape == (3,)
    result = search(root, chunks, lsm.dynamics, lsm.evaluate, lsm.propose,
                    SearchConfig(deadline_s=None, max_simulations=40, batch_size=8))
    assert result.stats["max_depth"] >= 2 and 0 <= result.index < 3


def test_branched_rollouts_teach_the_value_to_rank_chunks_from_one_state():
    """Two chunks tried from the same states, one succeeded (moving the square right), one failed (left). The
    recorded episodes alone teach the opposite (those ending on the left succeeded): only the branch loss makes
    the planner's score of the predicted latents pick the chunk that worked (held-out states)."""
    from vla_stack.planners.world_model.quality import branch_choice

    cfg = _tiny_config()
    H = cfg.chunk
    right, left = np.zeros((H, 3), np.float32), np.zeros((H, 3), np.float32)
    right[:, 0], left[:, 0] = 1.0, -1.0

    def with_branches(eps):
        for ep in eps:
            ep.success = bool(ep.state[-1, 0] < 8)
            ep.value, ep.progress = targets(np.zeros(len(ep.action), int), 1, ep.success, cfg.gamma)
            for t in range(0, len(ep.action) - 1, 3):
                ep.branches += [{"t": t, "chunk": right, "value": np.float32(cfg.gamma ** 10), "success": True},
                                {"t": t, "chunk": left, "value": np.float32(0.0), "success": False}]
        return eps

    train, held = with_branches(_episodes(8)), with_branches(_episodes(4, seed=1))
    picked = {}
    for branch_batch in (0, 16):
        torch.manual_seed(0)
        model = WorldModel(cfg)
        model.set_stats(np.concatenate([e.state for e in train]), np.concatenate([e.action for e in train]))
        train_model(model, ChunkSampler(train, cfg), TrainConfig(steps=200, batch_size=16, lr=3e-3, warmup_steps=10,
                                                                branch_batch_size=branch_batch), progress=False)
        result = branch_choice(model, held)
        assert result["points"] == 28 and result["mixed_points"] == 28 and result["success_random"] == 0.5
        picked[branch_batch] = result["success_picked"]
    assert picked[16] >= 0.9 and picked[0] <= 0.6, picked


def test_value_ensemble_disagrees_off_the_data_and_pessimism_scores_below_the_mean(tmp_path):
    """As train-wm does it: the world model trains with its first value head, then the extra heads are fitted
    alone on bootstrap halves of the batches. They agree on the data's latents far more than on latents no
    episode reaches, and the search's score subtracts `pessimism` standard deviations of theirs."""
    from vla_stack.planners.world_model.model import LatentSearchModel
    from vla_stack.planners.world_model.train import fit_value_ensemble

    cfg = WmConfig(**{**_tiny_config().to_dict(), "value_heads": 4})
    eps = _episodes(8)
    torch.manual_seed(0)
    model = WorldModel(cfg)
    model.set_stats(np.concatenate([e.state for e in eps]), np.concatenate([e.action for e in eps]))
    sampler, tc = ChunkSampler(eps, cfg), TrainConfig(steps=200, batch_size=16, lr=3e-3, warmup_steps=10,
                                                      ensemble_steps=200)
    model.value_ensemble.requires_grad_(False)
    train_model(model, sampler, tc, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_value_ensemble(model, sampler, tc, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("value_ensemble.") for k in changed), changed
    with torch.inference_mode():
        images = torch.from_numpy(np.concatenate([e.images for e in eps])).permute(0, 1, 4, 2, 3).float() / 255
        z = model.encode(images, torch.from_numpy(np.concatenate([e.state for e in eps])))
    far = z + 4 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    lsm = LatentSearchModel(model, model.embed_goal(["pick up the red cube"]), progress_weight=0.0)
    with torch.inference_mode():
        g = lsm.goal.expand(len(z), -1)
        std_data = torch.sigmoid(model.value_logits(model.head_input(z, g))).std(0).mean()
        std_far = torch.sigmoid(model.value_logits(model.head_input(far, g))).std(0).mean()
        values = torch.sigmoid(model.value_logits(model.head_input(far, g))).numpy()
    assert values.shape == (4, len(z)) and std_far > 2 * std_data, (std_data, std_far)
    lsm.pessimism = 1.0
    np.testing.assert_allclose(lsm.evaluate(far.numpy()), values.mean(0) - values.std(0, ddof=1), atol=1e-5)
    loaded, _ = load_world_model(save_world_model(tmp_path / "wm", model))
    assert len(loaded.value_ensemble) == 3
    with pytest.raises(VlaStackError, match="value_heads"):
        WmConfig(value_heads=0)


def test_value_and_progress_targets():
    value, progress = targets(np.array([0, 0, 1, 1]), 2, True, 0.5)
    np.testing.assert_allclose(value, [0.0625, 0.125, 0.25, 0.5])
    np.testing.assert_allclose(progress, [0.25, 0.5, 0.75, 1.0])
    value, progress = targets(np.array([0, 0, 1, 1]), 2, False, 0.5)
    assert not value.any() and progress.tolist() == [0, 0, 0.5, 0.5]
    # a demo recorded past success: the value counts to the detector's step and is 1 after it
    value, _ = targets(np.array([0, 0, 1, 1, 1]), 2, True, 0.5, success_step=3)
    np.testing.assert_allclose(value, [0.125, 0.25, 0.5, 1.0, 1.0])


def test_checkpoint_round_trip_and_corruption(tmp_path):
    cfg = _tiny_config()
    model = WorldModel(cfg)
    path = save_world_model(tmp_path / "wm", model, {"note": "test"})
    loaded, meta = load_world_model(path)
    assert meta == {"note": "test"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(WorldModelCheckpointError, match="corrupt or truncated"):
        load_world_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(WorldModelCheckpointError, match="corrupt"):
        load_world_model(path)
    (path / "config.json").write_text(json.dumps({"kind": "vla_stack.vla", "format": 1}))
    with pytest.raises(WorldModelCheckpointError, match="not a vla_stack world-model"):
        load_world_model(path)
    with pytest.raises(WorldModelCheckpointError, match="not a directory"):
        load_world_model(tmp_path / "missing")
    other = save_world_model(tmp_path / "other", WorldModel(WmConfig(**{**cfg.to_dict(), "latent_dim": 4})))
    (path / "config.json").write_text((other / "config.json").read_text())
    save_world_model(tmp_path / "wm2", model)
    (path / "model.safetensors").write_bytes((tmp_path / "wm2" / "model.safetensors").read_bytes())
    with pytest.raises(WorldModelCheckpointError, match="do not match"):
        load_world_model(path)


def test_goal_distance_progress_replays_the_stored_episode(tmp_path):
    from vla_stack.data.collect import collect
    from vla_stack.planners.world_model.train import GoalDistanceReplay, load_episodes

    store = tmp_path / "demo.zarr"
    collect("place_centre", "panda", 1, store, image_size=32, progress=False)
    cfg = WmConfig(**{**_tiny_config().to_dict(), "progress_target": "goal_distance", "goal_distance_scale": 0.01})
    (episode,), _ = load_episodes([str(store)], cfg, progress=False)
    # the cube starts across the table from the bowl and ends within a centimetre of its centre
    assert episode.success and episode.progress[0] < 1e-3 and episode.progress[-1] > np.exp(-1.5)
    assert np.argmax(episode.progress > 0.1) > len(episode.progress) // 2
    replay = GoalDistanceReplay("panda")
    with pytest.raises(VlaStackError, match="replaying seed 0 ends with success"):
        replay("place_centre", 0, episode.action, False, "demo")
    replay.close()
    with pytest.raises(VlaStackError, match="progress_target"):
        WmConfig(progress_target="distance")
    # goal_offset: the replayed offsets agree with the distances, the hand's positions come with every frame and
    # the sampled batches train
    cfg = WmConfig(**{**cfg.to_dict(), "state_dim": 8, "action_dim": 8, "heads_command": True, "goal_offset": True})
    (episode,), _ = load_episodes([str(store)], cfg, progress=False)
    T = len(episode.action)
    assert episode.offset.shape == (T, 2) and episode.ee_state.shape == episode.ee_action.shape == (T, 3)
    assert np.allclose(np.exp(-np.linalg.norm(episode.offset, axis=1) / 0.01), episode.progress, atol=1e-5)
    model = WorldModel(cfg)
    model.set_stats(episode.state, episode.action)
    batch = ChunkSampler([episode], cfg).batch(16, np.random.default_rng(0))
    loss, info = model.loss(batch)
    assert torch.isfinite(loss) and batch["offset"].shape == (16, 4, 2)


def test_goal_offset_moves_with_the_held_cube_and_stays_once_released():
    from vla_stack.control.kinematics import grasp_site_fk
    from vla_stack.planners.world_model.model import LatentSearchModel

    cfg = WmConfig(robot="panda", state_dim=8, action_dim=8, image_size=16, channels=(8, 8), chunk=4, latent_dim=8,
                   hidden=32, predictor_hidden=64, goal_dim=8, goal_buckets=32, heads_command=True,
                   progress_target="goal_distance", goal_offset=True)
    model = WorldModel(cfg).eval()
    lsm = LatentSearchModel(model, model.embed_goal(["place the red cube in the centre of the blue bowl"]))
    fk = grasp_site_fk("panda")
    home = np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8, 1.0], np.float32)  # gripper closed: holding
    with pytest.raises(VlaStackError, match="measured joint state"):
        lsm.root(np.zeros(8, np.float32), home, home)
    with pytest.raises(VlaStackError, match="2 finite numbers"):
        lsm.root(np.zeros(8, np.float32), home, home, np.array([np.nan, 0.0]))
    offset = np.array([0.05, -0.02], np.float32)
    root = lsm.root(np.zeros(8, np.float32), home, home, offset)
    assert root.shape == (cfg.search_dim,) == (8 + 8 + 5,)
    assert np.allclose(root[-3:], fk.positions(home[:7]), atol=1e-6) and np.array_equal(root[16:18], offset)
    chunk = np.repeat(home[None], 4, 0)
    chunk[:, 0] += np.linspace(0.05, 0.2, 4)  # the base joint swings the hand sideways
    release = chunk.copy()
    release[2:, -1] = 0.0  # the gripper opens at step 2: the cube drops where the hand was at step 1
    opened = chunk.copy()
    opened[:, -1] = 0.0
    norm = model.norm_action(torch.from_numpy(np.stack([chunk, release, opened]))).numpy()
    nxt = lsm.dynamics(np.repeat(root[None], 3, 0), norm)
    ee, ee0 = fk.positions(chunk[:, :7]), root[-3:]
    assert np.allclose(nxt[0, 16:18], offset - (ee[3] - ee0)[:2], atol=1e-5)
    assert np.allclose(nxt[1, 16:18], offset - (ee[1] - ee0)[:2], atol=1e-5)
    assert np.allclose(nxt[2, 16:18], offset, atol=1e-6)  # released before the chunk moved: the cube stays
    assert np.allclose(nxt[:, -3:], ee[3], atol=1e-5)  # the next reference: where the chunk's last step puts the hand
    assert np.abs(nxt[0, 16:18] - offset).max() > 0.02
    assert lsm.evaluate(nxt).shape == (3,)
    with pytest.raises(VlaStackError, match="goal_offset needs"):
        WmConfig(goal_offset=True)


def test_train_fits_the_keypoint_reader_of_a_goal_offset_model(tmp_path):
    from vla_stack.data.collect import collect
    from vla_stack.planners.world_model.train import train

    store = tmp_path / "demo.zarr"
    collect("place_centre", "panda", 1, store, image_size=32, progress=False)
    config = tmp_path / "wm.yaml"
    config.write_text(json.dumps({
        "model": {**_tiny_config().to_dict(), "state_dim": 8, "action_dim": 8, "heads_command": True,
                  "progress_target": "goal_distance", "goal_offset": True, "keypoint_channels": 8,
                  "keypoint_image_size": 32},
        "data": [str(store)],
        "train": {"output_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 4, "keypoint_steps": 4,
                  "keypoint_every": 2, "keypoint_batch_size": 4}}))
    result = train(config, progress=False)
    reader = result["keypoint_reader"]
    assert reader["steps"] == 4 and reader["train_frames"] > 10 and 0 < reader["held_drop_m"] < 0.04
    model, meta = load_world_model(tmp_path / "run")
    assert meta["keypoint_reader"] == reader
    assert float(model.keypoints.held_drop) == pytest.approx(reader["held_drop_m"])
    offset, positions = model.read_goal_offset(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(8), "put it in the bowl")
    assert offset.shape == (2,) and positions.shape == (2, 2)
    with pytest.raises(VlaStackError, match="divisible by 4"):
        WmConfig(keypoint_image_size=30)
