"""Chunk execution at the control rate (LeRobot's interface: reset / select_action / predict_action_chunk).

Every `n_action_steps` a new chunk is requested for the current observation. With `async_inference` it is
computed on a worker thread while the previous chunk keeps executing, and takes over `delay` steps later
(1 step = 100 ms at 10 Hz, four times the model's latency budget). Switching is deterministic: if the worker
is late the runner waits, so evaluation is reproducible. Two ways to join consecutive chunks:

- "rtc" (real-time chunking): the `delay` steps that will still run from the old chunk are inpainted into the
  new chunk's sampling, so the new chunk starts exactly where the old one is and continues it.
- "ensemble" (ACT temporal ensembling): overlapping predictions for the same time step are averaged.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vla_stack.errors import VlaStackError
from vla_stack.policy.vla.checkpoint import load_checkpoint
from vla_stack.policy.vla.dataset import resize_images
from vla_stack.policy.vla.modeling_vla import VlaModel
from vla_stack.policy.vla.normalize import Normalizer, dim_mask, pad

EXECUTION_MODES = ("rtc", "ensemble")


class InvalidObservationError(VlaStackError):
    """An observation is malformed or holds NaN/inf; it never reaches the model."""


def validate_observation(obs: dict, cameras: tuple[str, ...], state_dim: int) -> None:
    if not isinstance(obs, dict) or "state" not in obs or "images" not in obs:
        raise InvalidObservationError("observation needs 'state' and 'images'")
    state = np.asarray(obs["state"])
    if state.shape != (state_dim,):
        raise InvalidObservationError(f"state has shape {state.shape}, expected ({state_dim},)")
    if not np.all(np.isfinite(state)):
        raise InvalidObservationError(f"state contains NaN or inf: {state.tolist()}")
    for cam in cameras:
        if cam not in obs["images"]:
            raise InvalidObservationError(f"observation lacks camera '{cam}'")
        image = np.asarray(obs["images"][cam])
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidObservationError(f"image '{cam}' has shape {image.shape}, expected (H, W, 3)")
        if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
            raise InvalidObservationError(f"image '{cam}' contains NaN or inf")


class VlaPolicy:
    name = "vla"

    def __init__(self, model: VlaModel, normalizer: Normalizer, robot: str, *, execution: str = "rtc",
                 async_inference: bool = True, delay: int = 1, n_action_steps: int | None = None,
                 num_steps: int | None = None, instruction: str | None = None):
        if execution not in EXECUTION_MODES:
            raise VlaStackError(f"unknown execution mode '{execution}' (known: {', '.join(EXECUTION_MODES)})")
        self.model, self.normalizer, self.robot = model.eval(), normalizer, robot
        self.config = model.config
        self.embodiment = self.config.embodiment_id(robot)
        self.action_dim = len(self.config.embodiments[robot])
        self.execution, self.async_inference = execution, async_inference
        self.n_action_steps = n_action_steps or self.config.n_action_steps
        self.delay = delay if async_inference else 0
        if not 0 <= self.delay < self.config.chunk_size - self.n_action_steps + 1:
            raise VlaStackError(f"delay {delay} leaves no overlap between chunks of {self.config.chunk_size}")
        self.num_steps = num_steps or self.config.num_inference_steps
        self.instruction = instruction
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vla-infer") if async_inference else None
        self._lock = threading.Lock()
        self.reset()

    # -- LeRobot interface -----------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> None:
        self._generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self._plan = np.zeros((0, self.config.max_action_dim), np.float32)  # normalised, padded; plan[0] = now
        self._weights = np.zeros(0, np.float32)  # ensemble: how many chunks each planned step averages
        self._since_request = 0
        self._pending: Future | None = None
        self._frames: list[np.ndarray] = []  # video memory: recent first-camera frames at the model's size
        self._first_frame: np.ndarray | None = None
        self._steps = 0

    def warm_up(self) -> None:
        """One chunk on a blank observation, then reset: loads what loads lazily (the frozen text tower, ~4 s),
        builds the fused inference weights and runs every kernel once, so the first real observation is not
        seconds late (a node would hold on stale inputs meanwhile)."""
        size = self.config.image_size
        obs = {"images": {c: np.zeros((size, size, 3), np.uint8) for c in self.config.cameras},
               "state": np.zeros(self.action_dim, np.float32), "instruction": self.instruction or "warm up"}
        self._sample(self.batch(obs), None)
        self.reset()

    def predict_action_chunk(self, obs: dict, observe: bool = True) -> np.ndarray:
        """(chunk_size, action_dim) absolute joint targets + gripper for this observation (recorded as this
        step's frame for the video memory unless `observe` is False: the caller already observed it)."""
        if observe:
            self.observe(obs)
        chunk = self._sample(self.batch(obs), None)
        return self.to_robot(chunk)

    def observe(self, obs: dict) -> None:
        """Record this control step's observation for the video memory (no-op without one). select_action and
        predict_action_chunk call it; planners that sample through `batch` call it once per step."""
        validate_observation(obs, self.config.cameras, self.action_dim)
        if self.config.memory_offsets:
            frame = resize_images(np.asarray(obs["images"][self.config.cameras[0]], np.uint8), self.config.image_size)
            if self._steps == 0:
                self._first_frame = frame
            self._frames.append(frame)
            del self._frames[:-max(self.config.memory_offsets) - 1]  # one frame per step, up to the oldest offset
        self._steps += 1

    def memory_snapshot(self) -> dict:
        """The video memory and step count: a planner that branches the episode (tries several futures from
        one state, sampling through `batch`) restores them with restore_memory() before each branch."""
        return {"frames": list(self._frames), "first_frame": self._first_frame, "steps": self._steps}

    def restore_memory(self, snapshot: dict) -> None:
        self._frames, self._first_frame = list(snapshot["frames"]), snapshot["first_frame"]
        self._steps = snapshot["steps"]

    def _memory_images(self, obs: dict) -> np.ndarray:
        """(K, S, S, 3): the frame `offset` steps before the newest observed one, or the episode's first frame
        when the episode is younger than that (training clamps the same way)."""
        if not self._frames:  # nothing observed yet: the current image is all the memory there is
            frame = resize_images(np.asarray(obs["images"][self.config.cameras[0]], np.uint8), self.config.image_size)
            return np.stack([frame] * len(self.config.memory_offsets))
        return np.stack([self._frames[-o - 1] if o < self._steps else self._first_frame
                         for o in self.config.memory_offsets])

    def select_action(self, obs: dict) -> np.ndarray:
        self.observe(obs)  # validates every step, even without inference
        if len(self._plan) == 0:  # episode start: nothing to execute while waiting
            self._adopt(self._sample(self.batch(obs), None), offset=0)
        elif self._pending is not None and self._since_request == self.delay:
            self._adopt(self._pending.result(), offset=self.delay)
            self._pending = None
        if self._pending is None and self._since_request >= self.n_action_steps:
            self._request(self.batch(obs))
        action = self._plan[0]
        self._plan, self._weights = self._plan[1:], self._weights[1:]
        self._since_request += 1
        return self.to_robot(action[None])[0]

    # -- internals -----------------------------------------------------------------------------------------

    def _request(self, batch: dict) -> None:
        known = self._plan[:self.delay] if self.execution == "rtc" and self.delay else None
        self._since_request = 0
        if self._executor is None:
            self._adopt(self._sample(batch, known), offset=0)
        else:
            self._pending = self._executor.submit(self._sample, batch, known)

    def _adopt(self, chunk: np.ndarray, offset: int) -> None:
        new = chunk[offset:]
        if self.execution == "ensemble" and len(self._plan):
            n = min(len(self._plan), len(new))
            w = self._weights[:n, None]
            merged = (self._plan[:n] * w + new[:n]) / (w + 1)
            self._plan = np.concatenate([merged, new[n:]])
            self._weights = np.concatenate([self._weights[:n] + 1, np.ones(len(new) - n, np.float32)])
        else:
            self._plan, self._weights = new, np.ones(len(new), np.float32)

    def batch(self, obs: dict) -> dict:
        """Model inputs for one observation, validated first (NaN/inf raise InvalidObservationError), with the
        video memory as last recorded by `observe`. Public for planners that sample several chunks from one
        prefix (the world-model planner)."""
        cfg = self.config
        validate_observation(obs, cfg.cameras, self.action_dim)
        images = resize_images(np.stack([np.asarray(obs["images"][c], np.uint8) for c in cfg.cameras]), cfg.image_size)
        state = self.normalizer.normalize(self.robot, "state", obs["state"])
        instruction = self.instruction or obs.get("instruction", "")
        batch = {
            "images": torch.from_numpy(images).permute(0, 3, 1, 2)[None].float() / 255.0,
            "text": self.model.backbone.encode_text([instruction]),
            "state": torch.from_numpy(pad(state, cfg.max_state_dim))[None],
            "state_mask": torch.from_numpy(dim_mask(self.action_dim, cfg.max_state_dim))[None],
            "embodiment": torch.tensor([self.embodiment]),
        }
        if cfg.memory_offsets:
            memory = self._memory_images(obs)
            batch["memory_images"] = torch.from_numpy(memory).permute(0, 3, 1, 2)[None].float() / 255.0
        return batch

    def _sample(self, batch: dict, known: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        with self._lock:  # one sampler at a time; the generator keeps episodes reproducible
            noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=self._generator)
            inpaint = None
            if known is not None:
                inpaint = (torch.from_numpy(pad(known, cfg.max_action_dim))[None], len(known))
            with torch.inference_mode():
                chunk = self.model.sample_actions(batch, self.num_steps, noise=noise, inpaint=inpaint)
        return chunk[0].numpy()

    def to_robot(self, actions: np.ndarray) -> np.ndarray:
        """Normalised, padded actions -> this robot's joint targets and gripper command in [0, 1]."""
        out = self.normalizer.unnormalize(self.robot, "action", actions[:, :self.action_dim])
        out[:, -1] = np.clip(out[:, -1], 0.0, 1.0)  # gripper command
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def load_vla_policy(path: str | Path, robot: str, **kwargs) -> VlaPolicy:
    """A checkpoint directory as a runnable policy for `robot` (kwargs: see VlaPolicy)."""
    model, normalizer, _ = load_checkpoint(path)
    return VlaPolicy(model, normalizer, robot, **kwargs)
