"""Grounding: privileged labels of where the named cube and its destination are in the front camera, the
text-queried image encoder, and its masked loss. The labels must land on the right pixels and the encoder
must find the object the instruction names among distractors on images it never trained on."""

import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.dataset import AUX_OBJECTS, aux_labels
from vla_stack.policy.vla.modeling_vla import VlaModel, grounding_loss, keypoint_positions
from vla_stack.sim.env import TabletopEnv
from vla_stack.sim.robots import get_robot
from vla_stack.sim.tasks import generate

from vla_helpers import tiny_batch, tiny_config


@pytest.mark.parametrize("robot", ["panda", "so101"])
def test_labels_land_on_the_named_objects_in_the_rendered_images(robot):
    """Segmentation renders of both cameras while the expert approaches: each labelled pixel shows the named
    cube / bowl (or the arm in front of it), and an object outside the wrist image is not labelled there."""
    import mujoco

    from vla_stack.policy.scripted import ScriptedExpert

    env = TabletopEnv("place", robot, image_size=128, cameras=())
    expert = ScriptedExpert(env)
    renderer = mujoco.Renderer(env.sim.model, 128, 128)
    renderer.enable_segmentation_rendering()
    checked = {"front": 0, "wrist": 0}
    robot_bodies = env.sim._robot_bodies
    try:
        for seed in (3, 4, 5):
            env.reset(seed=seed)
            expert.reset(seed=seed)
            for step in range(12):  # home pose, then on the way to the cube
                if step % 4 == 0:
                    q = env.sim.arm_qpos()[None]
                    labels, mask, _ = aux_labels("place", robot, seed, env.instruction, np.zeros(1), arm_qpos=q)
                    m = env.sim.model
                    for c, camera in enumerate(("front", "wrist")):
                        renderer.update_scene(env.sim.data, camera=camera)
                        geoms = renderer.render()[..., 0]
                        for (col, row), body, labelled in zip(labels[0, c], ("cube0", "receptacle0"), mask[0, c]):
                            if not labelled:
                                assert camera == "wrist" and not (abs(col) <= 1 and abs(row) <= 1)
                                continue
                            r, cc = int(round((row + 1) / 2 * 127)), int(round((col + 1) / 2 * 127))
                            seen = m.geom_bodyid[geoms[r, cc]]
                            assert seen == m.body(body).id or seen in robot_bodies, (camera, body, step)
                            checked[camera] += seen == m.body(body).id
                env.step(expert.select_action(None))
    finally:
        renderer.close()
        env.close()
    assert checked["front"] >= 12 and checked["wrist"] >= 3


def test_labels_stop_at_the_grasp_and_skip_unknown_scenes():
    inst = generate("place", get_robot("panda"), 7)
    labels, mask, until = aux_labels("place", "panda", 7, inst.instruction, np.array([0, 0, 0, 1, 1, 1, 0], np.float32))
    assert labels.shape == (7, 2, AUX_OBJECTS, 2) and mask.shape == (7, 2, AUX_OBJECTS)
    assert np.all(np.abs(labels[:, 0]) <= 1.0)
    np.testing.assert_array_equal(mask[:, 0, 0], [1, 1, 1, 1, 0, 0, 0])  # the cube moves with the hand after
    np.testing.assert_array_equal(mask[:, 0, 1], np.ones(7))
    assert not mask[:, 1].any()  # no arm joint positions given: no wrist labels
    np.testing.assert_array_equal(until, np.full(7, 3))
    pick = generate("pick", get_robot("so101"), 3)
    _, mask, _ = aux_labels("pick", "so101", 3, pick.instruction, np.zeros(5))
    assert mask[:, 0, 0].all() and not mask[:, 0, 1].any()  # pick has no destination
    assert aux_labels("pick", "so101", None, pick.instruction, np.zeros(5)) is None  # imported, no seed
    assert aux_labels("pick", "so101", 3, "pick up the chartreuse cube", np.zeros(5)) is None  # not this scene
    assert aux_labels("juggle", "so101", 3, pick.instruction, np.zeros(5)) is None
    assert aux_labels("pick", "ur5", 3, pick.instruction, np.zeros(5)) is None


def test_subtask_labels_follow_each_subtask_and_forget_a_moved_cube():
    """restore: 'put the X cube in the Y bowl' labels cube X and bowl Y; 'put it back where it was' has no
    destination to see and the cube (now in the bowl) is no longer where its label says."""
    inst = generate("restore", get_robot("panda"), 11)
    gripper = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0], np.float32)
    subtask = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    labels, mask, until = aux_labels("restore", "panda", 11, inst.instruction, gripper, subtask)
    np.testing.assert_array_equal(mask[:, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[:, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0])
    assert (until == 2).all()  # memory frames up to the first grasp still show where the cube started
    np.testing.assert_allclose(labels[5, 0, 0], labels[0, 0, 0])
    sort = generate("sort", get_robot("panda"), 2)
    gripper = np.array([0, 1, 0, 0, 1, 0], np.float32)
    labels, mask, until = aux_labels("sort", "panda", 2, sort.instruction, gripper, np.array([0, 0, 0, 1, 1, 1]))
    first, second = sort.subtasks[0].goal, sort.subtasks[1].goal
    assert first.cube != second.cube and mask[:, 0, 1].all()
    np.testing.assert_array_equal(mask[:, 0, 0], [1, 1, 0, 1, 1, 0])  # each subtask's own cube, until its grasp
    np.testing.assert_array_equal(until, [1, 1, 1, 4, 4, 4])
    assert not np.allclose(labels[0, 0, 1], labels[3, 0, 1])  # a different bin


def test_memory_frames_are_the_same_in_training_and_at_run_time():
    """ChunkDataset and VlaPolicy pick the same past frames (clamped to the episode's first frame)."""
    from vla_stack.policy.vla.dataset import ChunkDataset, Episode
    from vla_stack.policy.vla.runner import VlaPolicy

    from vla_helpers import tiny_normalizer

    cfg = tiny_config(image_encoder="query", memory_offsets=(2, 100))
    T = 6
    images = np.zeros((T, 2, 32, 32, 3), np.uint8)
    images[:, :, 0, 0, 0] = np.arange(T)[:, None] * 10  # frame t is marked 10 * t in one pixel
    rng = np.random.default_rng(0)
    episode = Episode("panda", "pick up the red cube", images, rng.normal(size=(T, 8)).astype(np.float32),
                      rng.normal(size=(T, 8)).astype(np.float32))
    data = ChunkDataset([episode, episode], cfg, tiny_normalizer())
    model = VlaModel(cfg)
    batch = data.batch(torch.tensor([0, 3, 11]), model.backbone)  # frames 0, 3 and 5 (second episode)
    marks = (batch["memory_images"][:, :, 0, 0, 0] * 255).round().tolist()
    assert marks == [[0, 0], [10, 0], [30, 0]]
    assert batch["memory_aux_mask"].sum() == 0  # no scene seed: nothing labelled
    policy = VlaPolicy(model, tiny_normalizer(), "panda", async_inference=False)
    for t in range(T):
        obs = {"images": {"front": images[t, 0], "wrist": images[t, 1]}, "state": np.zeros(8, np.float32)}
        policy.observe(obs)
        live = (policy.batch(obs)["memory_images"][0, :, 0, 0, 0] * 255).round().tolist()
        assert live == [10 * max(0, t - 2), 0]
    loss, logs = model(batch)
    assert torch.isfinite(loss)
    with pytest.raises(VlaStackError, match="video memory"):
        model.backbone(batch["images"], batch["text"])
    with pytest.raises(VlaStackError, match="memory_offsets"):
        tiny_config(memory_offsets=(4,))


def test_grounding_loss_is_masked_and_needs_the_query_encoder():
    torch.manual_seed(0)
    model = VlaModel(tiny_config(image_encoder="query", aux_weight=1.0))
    batch = tiny_batch(model)
    batch["aux"] = torch.zeros(2, 2, AUX_OBJECTS, 2)
    batch["aux_mask"] = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    loss, logs = model(batch, generator=g())
    assert set(logs) == {"flow", "aux", "loss"} and logs["aux"] > 0
    torch.testing.assert_close(loss, logs["flow"] + logs["aux"])
    changed = {**batch, "aux": batch["aux"].clone()}
    changed["aux"][0, :, 1] = 0.9  # masked entries: no effect
    changed["aux"][1, 1, 1] = 0.9
    torch.testing.assert_close(model(changed, generator=g())[1]["aux"], logs["aux"])
    changed["aux"][1, 1, 0] = 0.9  # a labelled entry (the wrist camera's cube): it counts
    assert model(changed, generator=g())[1]["aux"] != logs["aux"]
    loss.backward()
    assert all(camera.queries.query.grad.abs().sum() > 0 for camera in model.backbone.cameras)
    # a map peaked where the label is costs less than a flat one
    target, ones = torch.tensor([[[0.5, -0.5]]]), torch.ones(1, 1)
    peaked = torch.zeros(1, 1, 8, 8)
    peaked[0, 0, 2, 5] = 3.0  # row 2 of 8 ~ -0.43, column 5 ~ 0.43
    elsewhere = torch.zeros(1, 1, 8, 8)
    elsewhere[0, 0, 6, 1] = 3.0
    flat = torch.zeros(1, 1, 8, 8)
    assert grounding_loss(peaked, target, ones) < grounding_loss(flat, target, ones) < grounding_loss(elsewhere, target, ones)
    torch.testing.assert_close(keypoint_positions(peaked * 10)[0, 0], torch.tensor([3 / 7, -3 / 7]), atol=1e-4, rtol=0)
    with pytest.raises(VlaStackError, match="needs backbone 'tiny' with image_encoder 'query'"):
        tiny_config(aux_weight=1.0)
    with pytest.raises(VlaStackError, match="only the 'query' image encoder"):
        VlaModel(tiny_config()).locate(batch)


def test_instruction_changes_what_the_image_tokens_are():
    torch.manual_seed(0)
    model = VlaModel(tiny_config(image_encoder="query"))
    batch = tiny_batch(model)
    images = batch["images"][:1].expand(2, -1, -1, -1, -1)  # same image, two instructions
    cache = model.backbone(images, batch["text"])
    assert (cache.keys[0][0] - cache.keys[0][1]).abs().max() > 1e-3


COLOURS = {"red": (1.0, 0.1, 0.1), "blue": (0.1, 0.2, 1.0)}


def _squares(n: int, size: int, seed: int):
    """n images with a red and a blue 4 px square at random places; the instruction names one of them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 1, 3, size, size), 0.4)
    targets, texts = torch.zeros(n, 2), []
    for i in range(n):
        spots = torch.randint(1, size - 5, (2, 2), generator=g)
        while (spots[0] - spots[1]).abs().max() < 6:
            spots = torch.randint(1, size - 5, (2, 2), generator=g)
        for (r, c), rgb in zip(spots.tolist(), COLOURS.values()):
            images[i, 0, :, r:r + 4, c:c + 4] = torch.tensor(rgb)[:, None, None]
        named = int(torch.randint(2, (1,), generator=g))
        texts.append(f"pick up the {list(COLOURS)[named]} cube")
        targets[i] = (spots[named].float().flip(0) + 1.5) / (size - 1) * 2 - 1  # (column, row) in [-1, 1]
    return images, texts, targets


def test_query_encoder_finds_the_named_square_on_unseen_images():
    torch.manual_seed(0)
    cfg = tiny_config(image_encoder="query", aux_weight=1.0, cameras=("front",), keypoints=2)
    model = VlaModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, texts, targets = _squares(96, cfg.image_size, seed=0)
    test_images, test_texts, test_targets = _squares(48, cfg.image_size, seed=1)

    def maps(imgs, txt):
        return model.backbone(imgs, model.backbone.encode_text(txt)).grounding[:, 0, :1]

    for step in range(60):
        idx = torch.randint(len(images), (32,), generator=torch.Generator().manual_seed(step))
        loss = grounding_loss(maps(images[idx], [texts[i] for i in idx]), targets[idx][:, None], torch.ones(32, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        found = keypoint_positions(maps(test_images, test_texts))[:, 0]
    pixels = (found - test_targets).norm(dim=-1) * (cfg.image_size - 1) / 2
    assert pixels.median() < 2.0  # the named square, not the other one (>= 6 px away) or the middle
