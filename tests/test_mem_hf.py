"""The `hf` high level with a tiny random SmolVLM (the real transformers classes, saved to and loaded from a
local directory, no hub): it learns the subtask/memory targets of a real episode, decodes them greedily with
the VLM's KV cache, and round-trips through a checkpoint the planner loads."""

import re

import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.data import build_samples, collect_mem
from vla_stack.planners.mem.hf_model import HFHighLevelModel, HFMemConfig
from vla_stack.planners.mem.model import CheckpointError, build_model, grammar_texts, load_model
from vla_stack.planners.mem.train import SampleSet, fit, score

from vla_helpers import save_tiny_smolvlm


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_smolvlm_lm")
    words = sorted({w for t in grammar_texts() + ["goal: memory: next: | empty"] for w in re.findall(r"\w+|[^\w\s]", t)})
    save_tiny_smolvlm(path, words, with_lm_head=True)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem_hf") / "sort.zarr"
    collect_mem("sort", "panda", 1, path, seed_start=5, image_size=32, drop_fraction=0.0, progress=False)
    return path


def test_hf_high_level_learns_decodes_and_round_trips(vlm_dir, store, tmp_path):
    torch.manual_seed(0)
    model = build_model({"backbone": "hf", "hf_path": str(vlm_dir)})
    assert isinstance(model, HFHighLevelModel) and model.config.image_size == 32
    samples = build_samples([store], progress=False)
    data = SampleSet(samples, model.config.image_size)
    result = fit(model, data, {"steps": 150, "batch_size": 8, "lr": 3e-3, "warmup_steps": 10, "image_shift": 0},
                 np.random.default_rng(0))
    assert result["final_loss"] < 0.2 * result["first_loss"], result
    model.eval()
    heldout = score(model, data)["all"]  # one episode: this checks the decoder writes the targets it learnt
    assert heldout["subtask_accuracy"] >= 0.8 and heldout["memory_accuracy"] >= 0.6, heldout
    batch = (data.images[:3].float(), data.goals[:3], data.memories_in[:3])
    cached = model.generate(*batch)
    assert cached[:2] == model.generate(*batch, use_cache=False)[:2]  # the KV cache changes nothing
    p = model.completion_probability(*batch)
    torch.testing.assert_close(p, cached[2])
    loaded = load_model(model.save(tmp_path / "hf_mem", extra={"use_memory": True}))
    assert isinstance(loaded, HFHighLevelModel)
    assert loaded.generate(*batch)[:2] == cached[:2]
    torch.testing.assert_close(loaded.completion_probability(*batch), p)


def test_hf_high_level_errors_are_clear(vlm_dir, tmp_path):
    with pytest.raises(VlaStackError, match="cannot load the high-level VLM"):
        build_model({"backbone": "hf", "hf_path": str(tmp_path / "nothing")})
    with pytest.raises(CheckpointError, match="hf_path"):
        HFMemConfig.from_dict({"backbone": "hf"})
    model = build_model({"backbone": "hf", "hf_path": str(vlm_dir)})
    path = model.save(tmp_path / "broken")
    (path / "head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unusable"):
        load_model(path)
