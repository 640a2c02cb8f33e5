"""Where the goal cube and its target are, in metres: two pixel keypoints per camera (the target's centre, the
cube's centre) found by a small instruction-conditioned CNN, turned into table-plane positions with the
cameras' geometry (the fixed front camera's calibrated pose, the wrist camera's through the arm's forward
kinematics): where each camera's ray meets the plane the point rests in (KeypointOffsetReader).

Why not regress metres from the images: a world model's heads must rank candidate releases that differ by
millimetres, and a network that maps whole images to metres learns every scene layout separately (on ~500
training scenes it read held-out offsets to ~1.4 cm and barely followed the truth along new episodes). Finding
a point in an image is translation-equivariant and the geometry is exact, so what generalises is learned and
what is known is computed. Supervision is the simulator's own projection of the replayed positions
(camera_coords), through the same cross-entropy-to-a-Gaussian map loss as the VLA's grounding queries."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.modeling_vla import grounding_loss, keypoint_positions

KEYPOINTS = ("target", "cube")
CAMERAS = ("front", "wrist")


def _block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation), nn.GroupNorm(max(1, c_out // 8), c_out), nn.GELU()]


class KeypointNet(nn.Module):
    """Per camera image (shared trunk, FiLM on the instruction and the camera): a map over half-resolution
    cells for each keypoint. Dilated convolutions at quarter resolution see a whole bowl; a skip at half
    resolution keeps the detail the centre needs."""

    def __init__(self, goal_dim: int = 32, goal_buckets: int = 512, channels: int = 32):
        super().__init__()
        c = channels
        self.goal = nn.EmbeddingBag(goal_buckets, goal_dim, mode="mean")
        self.camera = nn.Embedding(len(CAMERAS), goal_dim)
        self.fine = nn.Sequential(*_block(3, c, 2), *_block(c, c))
        self.coarse = nn.Sequential(*_block(c, 2 * c, 2), *_block(2 * c, 2 * c, dilation=2),
                                     *_block(2 * c, 2 * c, dilation=4), *_block(2 * c, 2 * c, dilation=8))
        self.film = nn.Linear(goal_dim, 4 * c)
        self.up = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Sequential(*_block(c, c), nn.Conv2d(c, len(KEYPOINTS), 1))
        # how far below the grasp site a held cube's centre hangs (m): set from the training frames
        self.register_buffer("held_drop", torch.tensor(0.0))

    def embed(self, instructions: list[str]) -> torch.Tensor:
        from vla_stack.planners.world_model.model import embed_instructions

        return embed_instructions(self.goal, instructions)

    def forward(self, images: torch.Tensor, g: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [0, 1], instruction embeddings (B, G), camera index (B,) -> logits
        (B, keypoints, S/2, S/2)."""
        fine = self.fine(images * 2 - 1)
        coarse = self.coarse(fine)
        scale, shift = self.film(g + self.camera(camera))[..., None, None].chunk(2, 1)
        coarse = coarse * (1 + scale) + shift
        x = fine + self.up(F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.head(x)


def to_grid(coords: torch.Tensor, cells: int) -> torch.Tensor:
    """Image coordinates ([-1, 1] = the image's edges, camera_coords') -> the map's ([-1, 1] = the centres of
    its first and last cells, keypoint_positions' and grounding_loss')."""
    return coords * cells / (cells - 1)


def from_grid(coords: torch.Tensor, cells: int) -> torch.Tensor:
    return coords * (cells - 1) / cells


def locate(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logits (B, K, h, w) -> (image coordinates (B, K, 2), spread (B, K): the map's standard deviation in
    image coordinates, large where the point is hidden or outside the image)."""
    b, k, h, w = logits.shape
    mean = keypoint_positions(logits)
    gy, gx = torch.meshgrid(torch.linspace(-1.0, 1.0, h), torch.linspace(-1.0, 1.0, w), indexing="ij")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1).to(logits)
    p = logits.flatten(2).softmax(-1)
    var = (p @ grid.square()) - mean.square()
    return from_grid(mean, w), from_grid(var.clamp_min(0).sum(-1).sqrt(), w)


def keypoint_loss(logits: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (B, K, h, w), true image coordinates (B, K, 2), mask (B, K) 1 where the point is in the image."""
    return grounding_loss(logits, to_grid(coords, logits.shape[-1]), mask)


class KeypointOffsetReader:
    """KeypointNet + camera geometry for one robot: `read` gives the target and cube positions (table plane)
    and the offset target - cube from a frame's images and measured joint state.

    Each camera whose map is sharp casts a ray through its keypoint; the point is where the ray meets the
    horizontal plane at the point's height, the cameras' points averaged with weights 1 / (depth * spread /
    focal)^2 (the wrist camera, ~10-30 cm away, reads millimetres; the front camera, ~75 cm away at 128 px,
    reads about half a centimetre). The target rests on the table. The cube rests on the table, or is held:
    then it hangs `held_drop` below the grasp site (the median over training frames). Which one is decided by
    the two cameras where both see it (only at the right height do their rays meet the plane at one point),
    else by the gripper (closed on something: held)."""

    def __init__(self, net: KeypointNet, robot: str, max_spread: float = 0.1):
        from vla_stack.control.kinematics import grasp_site_fk
        from vla_stack.sim.robots import TABLE_Z, get_robot
        from vla_stack.sim.tabletop import front_camera_frame

        self.net, self.fk = net.eval(), grasp_site_fk(robot)
        spec = get_robot(robot)
        self.front = front_camera_frame(spec)
        self.table, self.resting = TABLE_Z, TABLE_Z + spec.cube_half
        self.max_spread = max_spread  # image units (1 = half the image): wider maps are not trusted

    @torch.inference_mode()
    def detect(self, images: np.ndarray, instructions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """images (B, cameras, S, S, 3) uint8 (front, wrist) -> image coordinates (B, cameras, K, 2), spreads
        (B, cameras, K)."""
        b, cams = images.shape[:2]
        if cams != len(CAMERAS):
            raise VlaStackError(f"the keypoint reader takes the {' and '.join(CAMERAS)} cameras, got {cams} images")
        x = torch.from_numpy(np.ascontiguousarray(images)).flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        g = self.net.embed(instructions).repeat_interleave(cams, 0)
        coords, spread = locate(self.net(x, g, torch.arange(cams).repeat(b)))
        return coords.view(b, cams, -1, 2).numpy(), spread.view(b, cams, -1).numpy()

    def positions(self, coords: np.ndarray, spread: np.ndarray, state: np.ndarray) -> np.ndarray:
        """One frame's detections (cameras, K, 2), (cameras, K) and joint state (arm joints, gripper) -> (K, 2)
        table-plane positions (NaN where no camera trusts its map)."""
        from vla_stack.sim.tabletop import camera_rays

        state = np.asarray(state, np.float64)
        q = state[: self.fk.arm_dof]
        frames = (self.front, self.fk.camera_frame(q, "wrist"))
        held = max(self.resting, float(self.fk.positions(q)[2]) - float(self.net.held_drop))
        out = np.full((len(KEYPOINTS), 2), np.nan)
        for k, name in enumerate(KEYPOINTS):
            rays = [(pos, camera_rays(pos, rot, focal, coords[c, k]), spread[c, k] / focal)
                    for c, (pos, rot, focal) in enumerate(frames)
                    if spread[c, k] < self.max_spread and np.all(np.abs(coords[c, k]) < 1.0)]
            if not rays:
                continue
            if name == "target":
                height = self.table
            elif len(rays) == 2:
                height = min((self.resting, held), key=lambda h: np.linalg.norm(np.subtract(*_on_plane(rays, h)[0])))
            else:
                height = held if GRIPPER_HOLDING[0] < state[-1] < GRIPPER_HOLDING[1] else self.resting
            points, weights = _on_plane(rays, height)
            if weights.sum() > 0:
                out[k] = (weights[:, None] * points).sum(0) / weights.sum()
        return out

    def read(self, images: np.ndarray, state: np.ndarray, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """One frame: images (cameras, S, S, 3) uint8, joint state -> (offset target - cube (2,) m or NaN,
        positions (K, 2))."""
        coords, spread = self.detect(np.asarray(images)[None], [instruction])
        pos = self.positions(coords[0], spread[0], state)
        return pos[0] - pos[1], pos


# the measured gripper state (0 open, 1 closed) between these: closed on something (the panda closes on a 4 cm
# cube at 0.33-0.6)
GRIPPER_HOLDING = (0.1, 0.9)


def _on_plane(rays: list, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Where rays (origin, direction, angular spread) meet the plane z = height: points (n, 2) and their
    weights (n,) 1 / (distance * spread)^2, 0 for rays that do not reach it."""
    points, weights = np.zeros((len(rays), 2)), np.zeros(len(rays))
    for i, (origin, direction, angular) in enumerate(rays):
        t = (height - origin[2]) / direction[2] if direction[2] < -1e-3 else -1.0
        if t > 0:
            points[i] = (origin + t * direction)[:2]
            weights[i] = 1.0 / max(t * angular, 1e-5) ** 2
    return points, weights


def keypoint_frames(paths: list[str], robot: str, every: int = 4, image_size: int = 128,
                    progress: bool = True) -> dict:
    """Training frames from episode stores: every `every`-th frame of each `robot` episode of a placement task,
    its images at `image_size`, joint state and instruction, and its labels from replaying the episode in the
    simulator (the stored scene seed and actions; images render the state the replay reaches): each keypoint's
    image coordinates per camera, in-image mask, and world positions."""
    from tqdm import tqdm

    from vla_stack.data.episode_store import EpisodeStore
    from vla_stack.policy.vla.dataset import resize_images
    from vla_stack.sim.env import TabletopEnv
    from vla_stack.sim.tabletop import camera_coords

    out = {k: [] for k in ("images", "state", "coords", "mask", "points", "instruction", "episode")}
    envs, n = {}, 0
    for path in paths:
        store = EpisodeStore.open(path)
        for i in tqdm(store.episode_indices(), desc=f"keypoint labels {path}", disable=not progress):
            meta = store.episode_meta(i)
            if meta.robot != robot or meta.seed is None or meta.extra.get("arm_noise", 0.0) > 0:
                continue  # DART episodes store the expert's actions, not the executed ones: no replay
            if meta.task not in envs:
                envs[meta.task] = TabletopEnv(meta.task, robot, cameras=())
            env = envs[meta.task]
            env.reset(seed=meta.seed)
            goal = env.task.final_goals[-1]
            if goal.kind not in ("in", "centre"):
                continue
            data, sim = store.read_episode(i), env.sim
            for t, action in enumerate(data["action"]):
                if t % every == 0:
                    points = np.stack([sim.receptacle_pos(goal.target), sim.cube_pos(goal.cube)])
                    views = [camera_coords(sim.model, sim.data, c, points) for c in CAMERAS]
                    out["images"].append(resize_images(np.stack([data[f"images.{c}"][t] for c in CAMERAS]), image_size))
                    out["state"].append(data["state"][t])
                    out["coords"].append(np.stack([v[0] for v in views]))
                    out["mask"].append(np.stack([v[1] for v in views]))
                    out["points"].append(points)
                    out["instruction"].append(meta.instruction)
                    out["episode"].append(meta.seed)
                if any(env.step_unobserved(action)):
                    break
            if bool(env.success()) != bool(meta.success):
                raise VlaStackError(f"{path}: replaying episode {i} (seed {meta.seed}) does not end as it was "
                                    "stored (recorded with another simulator version?): no labels from it")
            n += 1
    for env in envs.values():
        env.close()
    if not n:
        raise VlaStackError(f"no {robot} placement episodes with scene seeds in {', '.join(paths)}")
    return {k: (np.asarray(v) if k != "instruction" else v) for k, v in out.items()}


def train_keypoints(net: KeypointNet, frames: dict, steps: int, batch: int = 32, lr: float = 2e-3,
                    seed: int = 0, progress: bool = True) -> list[float]:
    """AdamW with a one-cycle schedule on keypoint_loss over both cameras of random frames; returns the losses.
    Where the CPU has bfloat16 units (AMX / AVX512-BF16) the convolutions run in bfloat16, channels-last
    (3.4x faster here); the weights and the loss stay float32."""
    from tqdm import trange

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    if bf16:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    cams, losses = len(CAMERAS), []
    net.train()
    for _ in trange(steps, desc="keypoints", disable=not progress):
        idx = rng.choice(len(frames["images"]), batch)
        x = torch.from_numpy(frames["images"][idx]).flatten(0, 1).permute(0, 3, 1, 2).float() / 255
        g = net.embed([frames["instruction"][i] for i in idx]).repeat_interleave(cams, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x.contiguous(memory_format=torch.channels_last) if bf16 else x, g,
                         torch.arange(cams).repeat(batch))
        loss = keypoint_loss(logits.float(), torch.from_numpy(frames["coords"][idx]).flatten(0, 1).float(),
                             torch.from_numpy(frames["mask"][idx]).flatten(0, 1).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.to(memory_format=torch.contiguous_format)
    net.eval()
    return losses


def held_drop_of(frames: dict, robot: str) -> float:
    """Median height of the grasp site above a held cube's centre over the frames where the cube is off the
    table and the gripper closed on it (KeypointNet.held_drop)."""
    from vla_stack.control.kinematics import grasp_site_fk
    from vla_stack.sim.robots import TABLE_Z, get_robot

    fk, resting = grasp_site_fk(robot), TABLE_Z + get_robot(robot).cube_half
    state, cube_z = frames["state"], frames["points"][:, 1, 2]
    held = (cube_z > resting + 0.01) & (state[:, -1] > GRIPPER_HOLDING[0]) & (state[:, -1] < GRIPPER_HOLDING[1])
    if not held.any():
        raise VlaStackError("no frames with a held cube to measure how it hangs in the gripper")
    return float(np.median(fk.positions(state[held, : fk.arm_dof])[:, 2] - cube_z[held]))


def reader_errors(reader: KeypointOffsetReader, frames: dict, near: float = 0.03) -> dict:
    """How well the reader reads held-out frames: per camera and keypoint the median image error (pixels of
    the stored images, where the point is in the image), per keypoint the median / p90 position error (mm) and
    the fraction of frames it gives no position, and the offset's median / p90 error (mm) overall and where the
    cube is within `near` of its target."""
    n, size = len(frames["images"]), frames["images"].shape[-2]
    coords, spread = [], []
    for i in range(0, n, 64):
        c, s = reader.detect(frames["images"][i:i + 64], frames["instruction"][i:i + 64])
        coords.append(c)
        spread.append(s)
    coords, spread = np.concatenate(coords), np.concatenate(spread)
    pixels = np.linalg.norm(coords - frames["coords"], axis=-1) * size / 2
    out: dict = {"frames": n}
    for c, cam in enumerate(CAMERAS):
        for k, name in enumerate(KEYPOINTS):
            m = frames["mask"][:, c, k].astype(bool)
            out[f"{cam}_{name}_px_median"] = round(float(np.median(pixels[m, c, k])), 3) if m.any() else None
    pos = np.stack([reader.positions(coords[i], spread[i], frames["state"][i]) for i in range(n)])
    true = frames["points"][..., :2]
    for k, name in enumerate(KEYPOINTS):
        err = np.linalg.norm(pos[:, k] - true[:, k], axis=-1) * 1e3
        out[f"{name}_unread"] = round(float(np.isnan(err).mean()), 4)
        out[f"{name}_mm_median"] = round(float(np.nanmedian(err)), 2)
        out[f"{name}_mm_p90"] = round(float(np.nanpercentile(err, 90)), 2)
    true_offset = true[:, 0] - true[:, 1]
    err = np.linalg.norm(pos[:, 0] - pos[:, 1] - true_offset, axis=-1) * 1e3
    close = np.linalg.norm(true_offset, axis=-1) < near
    for tag, m in (("offset", np.ones(n, bool)), ("offset_near", close)):
        e = err[m]
        out[f"{tag}_mm_median"] = round(float(np.nanmedian(e)), 2) if np.isfinite(e).any() else None
        out[f"{tag}_mm_p90"] = round(float(np.nanpercentile(e, 90)), 2) if np.isfinite(e).any() else None
        out[f"{tag}_unread"] = round(float(np.isnan(e).mean()), 4) if len(e) else None
    out["near_frames"] = int(close.sum())
    return out
