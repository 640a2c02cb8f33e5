"""Training end to end on a small synthetic episode store: checkpoints, resume, fp16 export, DDP."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from vla_stack.data.episode_store import EpisodeStore
from vla_stack.policy.vla.checkpoint import load_checkpoint
from vla_stack.policy.vla.train import train

from vla_helpers import EMBODIMENTS

TESTS = Path(__file__).parent


def _store(path: Path, robot: str = "so101", episodes: int = 2, length: int = 6) -> Path:
    d = len(EMBODIMENTS[robot])
    features = {f"images.{c}": {"dtype": "uint8", "shape": [64, 64, 3]} for c in ("front", "wrist")}
    features.update(state={"dtype": "float32", "shape": [d]}, action={"dtype": "float32", "shape": [d]})
    rng = np.random.default_rng(0)
    with EpisodeStore.create(path, robot=robot, fps=10, features=features) as store:
        for e in range(episodes):
            with store.begin_episode(instruction=f"pick up the {['red', 'blue'][e % 2]} cube", task="pick") as w:
                for _ in range(length):
                    w.add_frame({"images.front": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                                 "images.wrist": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                                 "state": rng.normal(size=d).astype(np.float32),
                                 "action": rng.normal(size=d).astype(np.float32)})
                w.commit(success=True)
    return path


def _config(tmp_path: Path, steps: int, **train_overrides) -> Path:
    doc = {"policy": {"image_size": 32, "width": 32, "expert_width": 32, "depth": 2, "num_heads": 2,
                      "head_dim": 16, "patch_grid": 2, "chunk_size": 4, "n_action_steps": 2,
                      "max_text_tokens": 8},
           "data": [str(_store(tmp_path / "so101.zarr")) if not (tmp_path / "so101.zarr").exists()
                    else str(tmp_path / "so101.zarr")],
           "train": {"output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "export"), "steps": steps,
                     "batch_size": 4, "warmup_steps": 1, "save_every": 2, "num_threads": 1, **train_overrides}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_train_checkpoints_resumes_and_exports(tmp_path):
    result = train(_config(tmp_path, steps=2), progress=False)
    assert result["steps"] == 2 and result["samples_per_s"] > 0 and result["parameters"] > 0
    model, normalizer, meta = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert meta["step"] == 2 and list(model.config.embodiments) == ["so101"]
    assert model.config.embodiments["so101"][-1] == "gripper"
    resumed = train(_config(tmp_path, steps=4), resume=True, progress=False)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    exported, _, meta = load_checkpoint(tmp_path / "export")
    assert meta["step"] == 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype.itemsize == 2 for k in list(f.keys())[:5])


def test_fine_tune_starts_from_the_checkpoint_and_keeps_its_normalisation(tmp_path):
    import pytest
    import torch

    from vla_stack.errors import VlaStackError

    train(_config(tmp_path, steps=2), progress=False)
    base, base_norm, _ = load_checkpoint(tmp_path / "export")
    # New demos with other statistics; lr 0 so the weights must come through the fine-tune unchanged.
    other = _store(tmp_path / "other.zarr", episodes=3, length=8)
    doc = yaml.safe_load(_config(tmp_path, steps=1).read_text())
    doc["data"] = [str(other)]
    doc["train"].update(init_from=str(tmp_path / "export"), lr=0.0, output_dir=str(tmp_path / "ft"),
                        export_dir=str(tmp_path / "ft_export"))
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(doc))
    result = train(tmp_path / "ft.yaml", progress=False)
    assert result["initialised_from"] == str(tmp_path / "export")
    tuned, tuned_norm, _ = load_checkpoint(tmp_path / "ft_export")
    for k, v in base.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v)
    for stat, v in base_norm.to_tensors().items():
        torch.testing.assert_close(tuned_norm.to_tensors()[stat], v)

    doc["policy"]["width"] = 64  # another network than the checkpoint's
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(VlaStackError, match="width"):
        train(tmp_path / "bad.yaml", progress=False)
    doc["policy"]["width"] = 32
    doc["data"] = [str(_store(tmp_path / "panda.zarr", robot="panda"))]
    (tmp_path / "panda.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(VlaStackError, match="panda"):
        train(tmp_path / "panda.yaml", progress=False)


def test_fine_tune_can_add_video_memory_to_a_checkpoint(tmp_path):
    import torch

    query = {"image_encoder": "query", "keypoints": 2}
    base_doc = yaml.safe_load(_config(tmp_path, steps=1).read_text())
    base_doc["policy"].update(query)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_doc))
    train(tmp_path / "base.yaml", progress=False)
    base, _, _ = load_checkpoint(tmp_path / "export")
    doc = yaml.safe_load((tmp_path / "base.yaml").read_text())
    doc["policy"]["memory_offsets"] = [2, 100]
    doc["train"].update(init_from=str(tmp_path / "export"), lr=0.0, output_dir=str(tmp_path / "mem"),
                        export_dir=str(tmp_path / "mem_export"))
    (tmp_path / "mem.yaml").write_text(yaml.safe_dump(doc))
    train(tmp_path / "mem.yaml", progress=False)
    grown, _, _ = load_checkpoint(tmp_path / "mem_export")
    assert grown.config.memory_offsets == (2, 100)
    new = {k for k in grown.state_dict() if k not in base.state_dict()}
    assert new == {"backbone.memory_pos"}
    for k, v in base.state_dict().items():  # lr 0: every trained weight came through unchanged
        torch.testing.assert_close(grown.state_dict()[k], v)


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    config = _config(tmp_path, steps=2)
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), str(TESTS / "vla_ddp_worker.py"),
                           str(config)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("in sync") == 2


def test_lerobot_format_source_matches_the_store(tmp_path):
    from vla_stack.data.lerobot_format import export_lerobot
    from vla_stack.policy.vla.dataset import load_source

    store_path = _store(tmp_path / "so101.zarr")
    export_lerobot(EpisodeStore.open(store_path), tmp_path / "lerobot", "local/so101", use_videos=False)
    from_store = load_source(store_path, ("front", "wrist"), 32)
    from_lerobot = load_source(tmp_path / "lerobot", ("front", "wrist"), 32)
    assert len(from_store) == len(from_lerobot) == 2
    for a, b in zip(from_store, from_lerobot):
        assert (a.robot, a.instruction) == (b.robot, b.instruction)
        np.testing.assert_array_equal(a.action, b.action)
        np.testing.assert_array_equal(a.images, b.images)


def test_decoded_episodes_are_cached_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    """The second load reads the decoded images from the cache, not zarr; a corrupt cache file is rebuilt."""
    import numpy as np

    from vla_stack.policy.vla import dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = _store(tmp_path / "s.zarr")
    first = dataset.load_store(store, ("front", "wrist"), 32)
    files = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == len(first)
    calls = []
    original = dataset.resize_images
    monkeypatch.setattr(dataset, "resize_images", lambda *a: calls.append(1) or original(*a))
    second = dataset.load_store(store, ("front", "wrist"), 32)
    assert not calls and all(np.array_equal(a.images, b.images) for a, b in zip(first, second))
    files[0].write_bytes(b"not an array")
    third = dataset.load_store(store, ("front", "wrist"), 32)
    assert calls and np.array_equal(third[0].images, first[0].images)
