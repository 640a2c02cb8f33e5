"""The training-only auxiliary localisation loss: privileged labels regenerated from a demo's seed, the head's
masked loss, that it learns a position from pixels, and relative data paths in training configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vla_stack.errors import VlaStackError
from vla_stack.paths import resolve_data_path
from vla_stack.policy.vla.dataset import AUX_DIM, aux_labels
from vla_stack.policy.vla.modeling_vla import VlaModel
from vla_stack.policy.vla.train import load_yaml
from vla_stack.sim.robots import get_robot
from vla_stack.sim.tasks import generate

from vla_helpers import tiny_batch, tiny_config


def _scaled(robot: str, xy) -> np.ndarray:
    (x0, x1), (y0, y1) = get_robot(robot).workspace
    return (np.asarray(xy) - [(x0 + x1) / 2, (y0 + y1) / 2]) / [(x1 - x0) / 2, (y1 - y0) / 2]


def test_aux_labels_regenerate_the_scene_and_stop_the_cube_label_at_the_grasp():
    inst = generate("place", get_robot("panda"), 7)
    gripper = np.array([0, 0, 0, 1, 1, 1, 0], np.float32)
    labels, mask = aux_labels("place", "panda", 7, inst.instruction, gripper)
    assert labels.shape == mask.shape == (7, AUX_DIM)
    np.testing.assert_allclose(labels[0, :2], _scaled("panda", inst.cubes[0].xy), atol=1e-6)
    np.testing.assert_allclose(labels[0, 2:], _scaled("panda", inst.receptacles[0].xy), atol=1e-6)
    assert np.all(np.abs(labels) <= 1.0)
    # the cube is labelled up to and including the frame the gripper closes; the bowl on every frame
    np.testing.assert_array_equal(mask[:, 0], [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(mask[:, 2], np.ones(7))


def test_aux_labels_pick_has_no_destination_and_unknown_scenes_have_no_labels():
    inst = generate("pick", get_robot("so101"), 3)
    labels, mask = aux_labels("pick", "so101", 3, inst.instruction, np.zeros(5))
    assert mask[:, :2].all() and not mask[:, 2:].any()
    stack = generate("stack", get_robot("so101"), 3)
    labels, mask = aux_labels("stack", "so101", 3, stack.instruction, np.zeros(5))
    np.testing.assert_allclose(labels[0, 2:], _scaled("so101", stack.cubes[1].xy), atol=1e-6)
    assert aux_labels("pick", "so101", None, inst.instruction, np.zeros(5)) is None  # imported, no seed
    assert aux_labels("pick", "so101", 3, "pick up the chartreuse cube", np.zeros(5)) is None  # not this scene
    assert aux_labels("juggle", "so101", 3, inst.instruction, np.zeros(5)) is None
    assert aux_labels("pick", "ur5", 3, inst.instruction, np.zeros(5)) is None


def test_aux_loss_is_masked_and_off_when_the_weight_is_zero():
    torch.manual_seed(0)
    model = VlaModel(tiny_config(aux_weight=1.0))
    batch = tiny_batch(model)
    batch["aux"] = torch.zeros(2, AUX_DIM)
    batch["aux_mask"] = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    loss, logs = model(batch, generator=g())
    assert set(logs) == {"flow", "aux", "loss"} and logs["aux"] > 0
    torch.testing.assert_close(loss, logs["flow"] + logs["aux"])
    changed = {**batch, "aux": batch["aux"].clone()}
    changed["aux"][0, 2:] = 100.0  # masked entries: no effect
    torch.testing.assert_close(model(changed, generator=g())[1]["aux"], logs["aux"])
    changed["aux"][1, 2] = 100.0  # a labelled entry: it counts
    assert model(changed, generator=g())[1]["aux"] > logs["aux"] + 1
    loss.backward()
    assert model.aux_head.query.grad is not None and model.backbone.layers[0].q.weight.grad.abs().sum() > 0

    plain = VlaModel(tiny_config())
    assert not hasattr(plain, "aux_head")
    loss, logs = plain(batch, generator=g())
    assert "aux" not in logs
    with pytest.raises(VlaStackError, match="no auxiliary head"):
        plain.predict_aux(batch)
    with pytest.raises(VlaStackError, match="aux_weight"):
        tiny_config(aux_weight=-1.0)


def test_aux_head_fits_where_a_bright_square_is():
    """Gradients reach the pixels: prefix + head fit the positions of a square in 16 images (error far below
    the positions' variance, i.e. better than predicting their mean)."""
    torch.manual_seed(0)
    cfg = tiny_config(aux_weight=1.0, cameras=("front",))
    model = VlaModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    n = 16
    pos = torch.randint(2, cfg.image_size - 6, (n, 2), generator=torch.Generator().manual_seed(0))
    images = torch.zeros(n, 1, 3, cfg.image_size, cfg.image_size)
    for i, (r, c) in enumerate(pos.tolist()):
        images[i, 0, :, r:r + 4, c:c + 4] = 1.0
    batch = {"images": images, "text": model.backbone.encode_text(["pick up the red cube"] * n)}
    target = (pos.float() + 2) / cfg.image_size * 2 - 1

    def error():
        return (model.predict_aux.__wrapped__(model, batch)[:, :2] - target).square().mean()

    for _ in range(60):
        loss = error()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.05 * target.var(0).mean()


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
