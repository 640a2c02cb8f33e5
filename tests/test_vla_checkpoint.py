"""Checkpoints round-trip exactly; broken ones fail with CheckpointError; bad observations never reach the model."""

import json

import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.evaluation import load_policy
from vla_stack.policy.vla.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vla_stack.policy.vla.modeling_vla import VlaModel
from vla_stack.policy.vla.runner import InvalidObservationError, VlaPolicy

from vla_helpers import observation, tiny_config, tiny_normalizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = VlaModel(tiny_config()).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "vla", model, tiny_normalizer())
    return path, model


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_save_load_gives_identical_actions(checkpoint):
    path, model = checkpoint
    loaded, normalizer, _ = load_checkpoint(path)
    obs = observation()
    a = VlaPolicy(model, tiny_normalizer(), "panda", async_inference=False)
    b = VlaPolicy(loaded, normalizer, "panda", async_inference=False)
    for policy in (a, b):
        policy.reset(seed=7)
    np.testing.assert_array_equal(a.predict_action_chunk(obs), b.predict_action_chunk(obs))
    for policy in (a, b):
        policy.reset(seed=3)
    assert [a.select_action(obs).tolist() for _ in range(5)] == [b.select_action(obs).tolist() for _ in range(5)]


def test_warm_up_leaves_the_policy_as_it_was(checkpoint):
    _, model = checkpoint
    obs = observation()
    cold = VlaPolicy(model, tiny_normalizer(), "panda", async_inference=False)
    warm = VlaPolicy(model, tiny_normalizer(), "panda", async_inference=False)
    warm.warm_up()
    assert [cold.select_action(obs).tolist() for _ in range(3)] == [warm.select_action(obs).tolist() for _ in range(3)]


def test_fp16_checkpoint_loads_close(checkpoint, tmp_path):
    path, model = checkpoint
    half = save_checkpoint(tmp_path / "half", model, tiny_normalizer(), dtype=torch.float16)
    loaded, _, _ = load_checkpoint(half)
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(v, w, atol=2e-3, rtol=2e-3, msg=k)


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:500]), "corrupt"),
    (lambda p: (p / "model.safetensors").unlink(), "missing"),
    (lambda p: (p / "config.json").write_text("{not json"), "corrupt"),
    (lambda p: (p / "normalization.safetensors").write_bytes(b"\x00" * 16), "corrupt"),
    (lambda p: _edit_config(p, width=48), "do not match"),
    (lambda p: _edit_config(p, embodiments={"ur5": ["a"]}), "do not match|no stats"),
    (lambda p: _edit_config(p, format=99), "format"),
])
def test_broken_checkpoint_is_a_clear_error(checkpoint, tmp_path, damage, match):
    path = _copy(checkpoint[0], tmp_path / "broken")
    damage(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    assert issubclass(CheckpointError, VlaStackError)


def _edit_config(path, format=None, **config):
    doc = json.loads((path / "config.json").read_text())
    doc["config"].update(config)
    if format is not None:
        doc["format"] = format
    (path / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("field, value", [("state", np.nan), ("state", np.inf), ("image", np.nan)])
def test_non_finite_observations_never_reach_the_model(checkpoint, field, value):
    _, model = checkpoint
    policy = VlaPolicy(model, tiny_normalizer(), "panda", async_inference=False)

    def fail(*args, **kwargs):
        raise AssertionError("the model was called")

    model_sample = model.sample_actions
    model.sample_actions = fail
    try:
        obs = observation()
        if field == "state":
            obs["state"][2] = value
        else:
            obs["images"]["front"] = obs["images"]["front"].astype(np.float32)
            obs["images"]["front"][0, 0, 0] = value
        with pytest.raises(InvalidObservationError, match="NaN or inf"):
            policy.select_action(obs)
        with pytest.raises(InvalidObservationError):
            policy.predict_action_chunk({"images": {}, "state": np.zeros(8, np.float32)})
    finally:
        model.sample_actions = model_sample


def test_runner_modes_execute_chunks(checkpoint):
    _, model = checkpoint
    obs = observation("so101")
    for kwargs in ({"execution": "rtc"}, {"execution": "ensemble"}, {"async_inference": False}):
        policy = VlaPolicy(model, tiny_normalizer(), "so101", **kwargs)
        policy.reset(seed=1)
        actions = np.stack([policy.select_action(obs) for _ in range(7)])
        assert actions.shape == (7, 6) and np.isfinite(actions).all()
        assert (0 <= actions[:, -1]).all() and (actions[:, -1] <= 1).all()
        policy.close()
    with pytest.raises(VlaStackError, match="not trained for robot"):
        VlaPolicy(model, tiny_normalizer(), "ur5")


def test_evaluation_loads_checkpoint_directories(checkpoint, tmp_path):
    class Env:
        class robot:
            name = "so101"

    assert isinstance(load_policy(str(checkpoint[0]), Env()), VlaPolicy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlaStackError, match="not a VLA checkpoint"):
        load_policy(str(tmp_path / "empty"), Env())


def test_evaluation_runs_the_requested_euler_steps(checkpoint):
    class Env:
        class robot:
            name = "so101"

    policy = load_policy(str(checkpoint[0]), Env(), "sync", inference_steps=2)
    steps = []
    sample = policy.model.sample_actions
    policy.model.sample_actions = lambda batch, num_steps=None, **kw: steps.append(num_steps) or sample(
        batch, num_steps, **kw)
    policy.reset(seed=0)
    policy.select_action(observation("so101"))
    assert steps == [2]
    assert load_policy(str(checkpoint[0]), Env(), "sync").num_steps == policy.model.config.num_inference_steps
    with pytest.raises(VlaStackError, match="at least 1"):
        load_policy(str(checkpoint[0]), Env(), inference_steps=0)


def test_shipped_mem_low_level_reads_its_video_memory():
    """policies/vla_mem_tiny (the MEM planner's low level) loads by name and acts on where things were: the same
    current observation with another episode-start frame gives another chunk ("put it back where it was")."""
    from vla_stack.paths import resolve_checkpoint
    from vla_stack.policy.vla.runner import load_vla_policy

    policy = load_vla_policy(resolve_checkpoint("vla_mem_tiny"), "panda", async_inference=False)
    assert tuple(policy.config.memory_offsets) == (8, 1000)
    rng = np.random.default_rng(0)
    now = {"images": {c: rng.integers(0, 255, (128, 128, 3), np.uint8) for c in ("front", "wrist")},
           "state": np.zeros(8, np.float32), "instruction": "put the red cube back where it was"}
    chunks = []
    for start in (np.zeros((128, 128, 3), np.uint8), np.full((128, 128, 3), 255, np.uint8)):
        policy.reset(seed=0)
        policy.observe({**now, "images": {**now["images"], "front": start}})
        chunks.append(policy.predict_action_chunk(now))
    assert np.all(np.isfinite(chunks)) and np.abs(chunks[0] - chunks[1]).max() > 1e-3
