"""`vla-stack bench policy`: what the shipped VLA costs on this machine. Chunk latency is the full
observation -> action chunk path (resize, normalise, prefix, 10 Euler steps) at batch 1 with both cameras,
with and without the prefix KV cache in the same run; plus train samples/s, parameters and peak memory."""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path

import numpy as np
import torch

from vla_stack.bench import MachineLoad, cpu_model
from vla_stack.paths import share_dir
from vla_stack.policy.vla.checkpoint import load_checkpoint
from vla_stack.policy.vla.runner import VlaPolicy

DEFAULT_CHECKPOINT = "vla_tiny"  # under the shipped policies/ folder


def default_checkpoint() -> Path:
    return share_dir("policies") / DEFAULT_CHECKPOINT


def _percentiles(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "n": len(samples)}


def _observation(robot: str, size: int) -> dict:
    """A real rendered observation of the pick task (128 px cameras, as in evaluation)."""
    from vla_stack.sim.env import TabletopEnv

    env = TabletopEnv("pick", robot, image_size=size)
    try:
        obs, _ = env.reset(seed=1_000_000)
    finally:
        env.close()
    return obs


def bench_policy(checkpoint: str | Path | None = None, robot: str = "panda", iterations: int = 100,
                 train_steps: int = 10, threads: int = 1, image_size: int = 128) -> dict:
    """Inference is timed on `threads` torch threads (default 1: at batch 1 every op is small, and on 2 cores
    a second thread costs more in synchronisation than it gains, 29.7 vs 12.8 ms p50 measured); training
    uses all cores."""
    train_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    path = Path(checkpoint) if checkpoint else default_checkpoint()
    model, normalizer, meta = load_checkpoint(path)
    policy = VlaPolicy(model, normalizer, robot, async_inference=False)
    obs = _observation(robot, image_size)
    cfg = model.config

    # end_to_end: observation -> chunk (resize, normalise, tokens, prefix, Euler steps); model: sampling only
    latency: dict = {}
    with MachineLoad() as load:
        for name, use_cache in (("with_kv_cache", True), ("without_kv_cache", False)):
            e2e, sampling = [], []
            for i in range(iterations + 5):  # 5 warm-up calls
                start = time.perf_counter()
                batch = policy.batch(obs)
                mid = time.perf_counter()
                with torch.inference_mode():
                    model.sample_actions(batch, use_kv_cache=use_cache)
                if i >= 5:
                    e2e.append(time.perf_counter() - start)
                    sampling.append(time.perf_counter() - mid)
            latency[name] = {"end_to_end": _percentiles(e2e), "model": _percentiles(sampling)}
    speedup = {kind: round(latency["without_kv_cache"][kind]["p50_ms"] / latency["with_kv_cache"][kind]["p50_ms"], 2)
               for kind in ("end_to_end", "model")}

    torch.set_num_threads(train_threads)
    train_cfg = meta.get("train_config", {})
    batch_size, noise_samples = train_cfg.get("batch_size", 32), train_cfg.get("noise_samples", 2)
    trainee = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n_emb = len(cfg.embodiments)
    train_batch = {
        "images": torch.rand(batch_size, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g),
        "text": trainee.backbone.encode_text([obs["instruction"]] * batch_size),
        "state": torch.randn(batch_size, cfg.max_state_dim, generator=g),
        "state_mask": torch.ones(batch_size, cfg.max_state_dim),
        "embodiment": torch.arange(batch_size) % n_emb,
        "actions": torch.randn(batch_size, cfg.chunk_size, cfg.max_action_dim, generator=g),
        "action_mask": torch.ones(batch_size, cfg.chunk_size, cfg.max_action_dim),
    }
    step_times = []
    for i in range(train_steps + 2):
        start = time.perf_counter()
        loss, _ = trainee(train_batch, noise_samples=noise_samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            step_times.append(time.perf_counter() - start)

    return {
        "checkpoint": str(path),
        "robot": robot,
        "backbone": cfg.backbone,
        "cameras": list(cfg.cameras),
        "camera_image_px": image_size,
        "model_image_px": cfg.image_size,
        "chunk_size": cfg.chunk_size,
        "num_inference_steps": cfg.num_inference_steps,
        "batch_size": 1,
        "chunk_latency": latency,
        "kv_cache_speedup_p50": speedup,
        "train": {"batch_size": batch_size, "noise_samples": noise_samples,
                  "samples_per_s": round(batch_size / float(np.median(step_times)), 1),
                  "step_ms_p50": round(float(np.median(step_times)) * 1000, 1)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round(sum(f.stat().st_size for f in path.iterdir()) / 2**20, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "inference_threads": threads,
        "train_threads": train_threads,
        "cpu": cpu_model(),
        "machine_load_during_latency": load.summary(),
        "trained_steps": meta.get("step"),
    }
