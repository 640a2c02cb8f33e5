"""Training configs: data paths relative to the data dir, and the learning-rate schedule."""

from pathlib import Path

import pytest
import yaml

from vla_stack.errors import VlaStackError
from vla_stack.paths import resolve_data_path
from vla_stack.policy.vla.train import load_yaml


def test_relative_data_paths_resolve_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("VLA_STACK_DATA_DIR", raising=False)
    data = tmp_path / "data"
    (data / "vla" / "pick-panda.zarr").mkdir(parents=True)
    doc = {"policy": {"image_size": 32}, "data": ["vla/pick-panda.zarr", str(data / "vla" / "pick-panda.zarr")],
           "train": {"output_dir": "vla/runs/x", "export_dir": "policies/x"}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(doc))
    _, sources, train_cfg = load_yaml(config, data_dir=data)
    assert sources == [str(data / "vla" / "pick-panda.zarr")] * 2
    assert train_cfg.output_dir == str(data / "vla" / "runs" / "x") and train_cfg.export_dir == "policies/x"
    monkeypatch.setenv("VLA_STACK_DATA_DIR", str(data))
    assert resolve_data_path("vla/a.zarr") == data / "vla" / "a.zarr"
    assert resolve_data_path(Path("/abs/a.zarr"), tmp_path) == Path("/abs/a.zarr")
    doc["data"] = ["vla/missing.zarr"]
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(VlaStackError, match="not found.*missing.zarr.*--data-dir"):
        load_yaml(config, data_dir=data)
    doc["data"] = []
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(VlaStackError, match="non-empty list"):
        load_yaml(config, data_dir=data)


def test_shipped_config_uses_relative_data_paths():
    doc = yaml.safe_load((Path(__file__).parent.parent / "policies" / "vla_tiny.yaml").read_text())
    assert doc["data"] and not any(Path(p).is_absolute() for p in doc["data"])
    assert not Path(doc["train"]["output_dir"]).is_absolute()


def test_lr_schedule_follows_whichever_budget_runs_out_first():
    from vla_stack.policy.vla.train import TrainConfig, lr_factor

    cfg = TrainConfig(steps=1000, warmup_steps=10, max_minutes=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(1000, cfg) == pytest.approx(0.05)
    assert lr_factor(100, cfg, time_fraction=1.0) == pytest.approx(0.05)  # out of time: already annealed
    assert lr_factor(100, cfg, time_fraction=0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(505, cfg, time_fraction=0.1) == pytest.approx(0.05 + 0.95 * 0.5)  # steps lead
