"""The world model's keypoint reader: its maps use the cameras' pixel convention, the geometry puts exact
detections back where the objects are (target on the table, a cube on the table or held), the network learns
to find the named object among distractors, and the training frames are labelled with the replayed scene."""

import numpy as np
import pytest
import torch

from vla_stack.errors import VlaStackError
from vla_stack.planners.world_model.keypoints import (KeypointNet, KeypointOffsetReader, held_drop_of,
                                                      keypoint_frames, keypoint_loss, locate, train_keypoints)

torch.set_num_threads(1)


def test_maps_use_the_cameras_pixel_convention():
    """A map peaked on one cell reads as that cell's centre in image coordinates ([-1, 1] = the image's edges),
    and the loss is lowest where the label is."""
    logits = torch.full((1, 2, 8, 8), -30.0)
    logits[0, 0, 2, 5] = logits[0, 1, 7, 0] = 30.0
    coords, spread = locate(logits)
    assert torch.allclose(coords[0], torch.tensor([[11 / 8 - 1, 5 / 8 - 1], [1 / 8 - 1, 15 / 8 - 1]]), atol=1e-5)
    assert spread.max() < 1e-3
    label = coords.clone()
    assert keypoint_loss(logits, label, torch.ones(1, 2)) < keypoint_loss(logits, label + 0.25, torch.ones(1, 2))


@pytest.fixture(scope="module")
def scene():
    from vla_stack.sim.env import TabletopEnv

    env = TabletopEnv("place_centre", "panda", image_size=64)
    env.reset(seed=3)
    yield env
    env.close()


def _exact(env, points):
    import mujoco

    from vla_stack.sim.tabletop import camera_coords

    sim = env.sim
    mujoco.mj_forward(sim.model, sim.data)
    views = [camera_coords(sim.model, sim.data, cam, points) for cam in ("front", "wrist")]
    return np.stack([v[0] for v in views]), np.stack([v[1] for v in views])


def test_geometry_places_exact_detections_on_the_table_and_in_the_hand(scene):
    import mujoco

    sim, goal = scene.sim, scene.task.final_goals[-1]
    net = KeypointNet()
    net.held_drop.fill_(0.0125)
    reader = KeypointOffsetReader(net, "panda")
    state = np.r_[sim.arm_qpos(), 0.0]
    points = np.stack([sim.receptacle_pos(goal.target), sim.cube_pos(goal.cube)])
    coords, visible = _exact(scene, points)
    assert visible[0].all()
    spread = np.where(visible, 0.04, 1.0)
    pos = reader.positions(coords, spread, state)
    assert np.abs(pos - points[:, :2]).max() < 2e-4
    # the cube held: it hangs held_drop below the grasp site, the wrist camera sees it between the fingers
    site = reader.fk.positions(sim.arm_qpos())
    adr = sim.model.jnt_qposadr[sim.model.joint(f"cube{goal.cube}_joint").id]
    sim.data.qpos[adr:adr + 3] = site - [0.004, -0.003, 0.0125]
    mujoco.mj_forward(sim.model, sim.data)
    points[1] = sim.cube_pos(goal.cube)
    coords, visible = _exact(scene, points)
    assert visible[:, 1].all()
    held = np.r_[sim.arm_qpos(), 0.45]
    pos = reader.positions(coords, np.full((2, 2), 0.04), held)  # both cameras: their rays meet at the held height
    assert np.abs(pos[1] - points[1, :2]).max() < 2e-4
    wrist_only = np.array([[1.0, 1.0], [0.04, 0.04]])
    assert np.abs(reader.positions(coords, wrist_only, held)[1] - points[1, :2]).max() < 2e-4  # gripper closed
    opened = reader.positions(coords, wrist_only, state)[1]  # gripper open: taken for a cube on the table
    assert np.abs(opened - points[1, :2]).max() > 5e-3
    assert np.isnan(reader.positions(coords, np.ones((2, 2)), held)).all()  # no sharp map: no reading
    with pytest.raises(VlaStackError, match="front and wrist"):
        reader.detect(np.zeros((1, 1, 32, 32, 3), np.uint8), ["x"])


def _synthetic(n, rng, size=32):
    """Two bowls (red, blue; 7 px) and a green cube (3 px) at random places on a noisy grey table; the
    instruction names one bowl: the target keypoint is that bowl's centre, the cube keypoint the cube's."""
    images = rng.integers(90, 140, (n, 2, size, size, 3)).astype(np.uint8)
    coords, instructions = np.zeros((n, 2, 2, 2), np.float32), []
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for i in range(n):
        corners = []
        while len(corners) < 3:  # non-overlapping
            c = rng.integers(1, size - 8, 2)
            if all(np.abs(c - o).max() > 8 for o in corners):
                corners.append(c)
        named = str(rng.choice(list(colours)))
        for (x, y), name in zip(corners[:2], colours):
            images[i, :, y:y + 7, x:x + 7] = colours[name]
            if name == named:
                coords[i, :, 0] = ((x + 3.5) / size * 2 - 1, (y + 3.5) / size * 2 - 1)
        x, y = corners[2]
        images[i, :, y:y + 3, x:x + 3] = (30, 200, 30)
        coords[i, :, 1] = ((x + 1.5) / size * 2 - 1, (y + 1.5) / size * 2 - 1)
        instructions.append(f"put the cube in the {named} bowl")
    return {"images": images, "coords": coords, "mask": np.ones((n, 2, 2), np.float32), "instruction": instructions}


def test_network_finds_the_named_bowl_and_the_cube_in_new_scenes():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = KeypointNet(goal_dim=16, goal_buckets=64, channels=16)
    losses = train_keypoints(net, _synthetic(512, rng), steps=300, batch=16, lr=3e-3, progress=False)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    test = _synthetic(64, rng)
    x = torch.from_numpy(test["images"]).flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    g = net.embed(test["instruction"]).repeat_interleave(2, 0)
    with torch.no_grad():
        coords, _ = locate(net(x, g, torch.arange(2).repeat(64)))
    pixels = (coords - torch.from_numpy(test["coords"]).flatten(0, 1)).norm(dim=-1) * 16  # 32 px images
    assert pixels[:, 0].median() < 1.0 and pixels[:, 1].median() < 1.0, pixels.median(0)
    assert (pixels[:, 0] < 3.5).float().mean() > 0.9  # the named bowl, not the other one (8+ px away)


def test_training_frames_carry_the_replayed_scene(tmp_path):
    from vla_stack.data.collect import collect
    from vla_stack.sim.robots import get_robot
    from vla_stack.sim.tabletop import front_camera_coords

    store = tmp_path / "demo.zarr"
    collect("place_centre", "panda", 1, store, image_size=64, progress=False)
    frames = keypoint_frames([str(store)], "panda", every=2, image_size=32, progress=False)
    n = len(frames["images"])
    assert frames["images"].shape == (n, 2, 32, 32, 3) and n > 10 and frames["episode"][0] == 0
    assert np.ptp(frames["points"][:, 0], axis=0).max() < 1e-9  # the bowl stays put
    assert np.ptp(frames["points"][:, 1, :2], axis=0).max() > 0.05  # the cube travels to it
    front = front_camera_coords(get_robot("panda"), frames["points"])
    assert np.allclose(frames["coords"][:, 0], front, atol=1e-6) and frames["mask"][:, 0].all()
    assert 0.0 < held_drop_of(frames, "panda") < 0.04
    with pytest.raises(VlaStackError, match="no so101 placement episodes"):
        keypoint_frames([str(store)], "so101", progress=False)
