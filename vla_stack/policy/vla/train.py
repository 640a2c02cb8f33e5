"""Training loop: AdamW + warmup/cosine, EMA, gradient clipping, periodic checkpoints, resume, fine-tuning from a
checkpoint (`init_from`), and DDP under torchrun (gloo on CPU, nccl on GPU). Config is one YAML file: `policy:`
(VlaConfig), `data:` (store paths), `train:` (TrainConfig)."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vla_stack.errors import VlaStackError
from vla_stack.paths import resolve_data_path
from vla_stack.policy.vla.checkpoint import load_checkpoint, save_checkpoint
from vla_stack.policy.vla.configuration_vla import VlaConfig
from vla_stack.policy.vla.dataset import ChunkDataset, dataset_stats, load_source
from vla_stack.policy.vla.modeling_vla import VlaModel
from vla_stack.policy.vla.normalize import Normalizer

TRAIN_STATE = "train_state.pt"


@dataclass
class TrainConfig:
    output_dir: str = "outputs/vla"
    export_dir: str | None = None  # also write the final EMA weights here as fp16 (the shipped checkpoint)
    steps: int = 3000
    batch_size: int = 32  # per process
    noise_samples: int = 2  # flow-matching draws per observation; they share one prefix pass
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    # DrQ random shift, as a fraction of the image size. Off by default: targets are absolute joint angles,
    # so where a cube sits in the fixed front camera is the signal (a +-4 px shift of a 64 px image moves it
    # by several cm, and held-out error stopped improving with it on).
    image_shift: float = 0.0
    save_every: int = 500
    seed: int = 0
    num_threads: int | None = None  # torch threads per process (default: cores / processes)
    max_minutes: float | None = None  # stop (and save) after this wall time, e.g. on a shared machine
    # Fine-tune: start from this checkpoint's weights and normalisation (e.g. policies/vla_tiny on your own
    # demos) instead of from scratch. Relative to the working directory, like export_dir.
    init_from: str | None = None


def load_yaml(path: str | Path, data_dir: str | Path | None = None) -> tuple[VlaConfig, list[str], TrainConfig]:
    """(policy config, data sources, train config). Data sources and output_dir resolve against the data dir
    (see resolve_data_path); export_dir stays relative to the working directory (the shipped checkpoint goes
    into the repo's policies/)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VlaStackError(f"training config {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise VlaStackError(f"training config {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not {"policy", "data", "train"} <= set(doc):
        raise VlaStackError(f"{path} needs the sections policy:, data: and train:")
    try:
        train = TrainConfig(**doc["train"])
    except TypeError as exc:
        raise VlaStackError(f"{path}: bad train: section ({exc})") from None
    if not isinstance(doc["data"], list) or not doc["data"]:
        raise VlaStackError(f"{path}: data: must be a non-empty list of episode stores or LeRobot folders")
    train.output_dir = str(resolve_data_path(train.output_dir, data_dir))
    sources = [str(resolve_data_path(str(s), data_dir)) for s in doc["data"]]
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise VlaStackError(f"{path}: data source(s) not found: {', '.join(missing)} (relative paths are under the "
                            "data dir: pass --data-dir or set VLA_STACK_DATA_DIR)")
    return VlaConfig.from_dict(doc["policy"]), sources, train


# Fields a fine-tune may change: they steer inference or the training loss, not the weights' shapes.
RUNTIME_FIELDS = {"n_action_steps", "num_inference_steps", "hf_path", "aux_weight"}


def start_from_checkpoint(policy_cfg: VlaConfig, path: str) -> tuple[VlaModel, Normalizer]:
    """The checkpoint's model (fp32, train mode) and normaliser, after checking the YAML's policy: section
    describes the same network: a silent mismatch would train something else than the user asked for. The one
    change allowed is adding video memory (`memory_offsets`) to a checkpoint without it: the memory reuses the
    first camera's trained encoder, only its token positions start fresh."""
    model, normalizer, _ = load_checkpoint(path, {k: getattr(policy_cfg, k) for k in RUNTIME_FIELDS})
    ours, theirs = policy_cfg.to_dict(), model.config.to_dict()
    differ = sorted(k for k in ours if k not in RUNTIME_FIELDS | {"embodiments"} and ours[k] != theirs[k])
    if differ == ["memory_offsets"] and not theirs["memory_offsets"]:
        grown = VlaModel(VlaConfig.from_dict({**theirs, "memory_offsets": ours["memory_offsets"]}))
        loaded = grown.load_state_dict(model.state_dict(), strict=False)
        if loaded.unexpected_keys or any(not k.startswith("backbone.memory_") for k in loaded.missing_keys):
            raise VlaStackError(f"init_from {path}: adding video memory left weights unmatched: "
                                f"{loaded.unexpected_keys + loaded.missing_keys}")
        model, differ = grown, []
    if differ:
        raise VlaStackError(f"init_from {path}: the policy: section differs from the checkpoint in "
                            f"{', '.join(f'{k} ({ours[k]!r} vs {theirs[k]!r})' for k in differ)}")
    return model.float().train(), normalizer


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: a process group on nccl (GPU) or gloo (CPU)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on norms, biases and embeddings' 1-d parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warmup, then cosine down to 5%. `time_fraction` (elapsed / max_minutes) advances the cosine too,
    so a run stopped by max_minutes still ends at the low learning rate instead of being cut mid-schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), time_fraction)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train(config_path: str | Path, resume: bool = False, progress: bool = True,
          data_dir: str | Path | None = None) -> dict:
    policy_cfg, sources, cfg = load_yaml(config_path, data_dir)
    rank, world, device = setup_distributed()
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.output_dir)

    episodes = [e for s in sources for e in load_source(s, policy_cfg.cameras, policy_cfg.image_size)]
    if cfg.init_from:
        model, normalizer = start_from_checkpoint(policy_cfg, cfg.init_from)
        policy_cfg = model.config
        unknown = sorted({e.robot for e in episodes} - set(policy_cfg.embodiments))
        if unknown:
            raise VlaStackError(f"init_from {cfg.init_from} knows robots {', '.join(policy_cfg.embodiments)}; "
                                f"the data also has {', '.join(unknown)} (train that embodiment from scratch)")
    else:
        if not policy_cfg.embodiments:
            from vla_stack.sim.robots import get_robot

            policy_cfg.embodiments = {r: list(get_robot(r).joint_names)
                                      for r in sorted({e.robot for e in episodes})}
        normalizer = Normalizer(dataset_stats(episodes), policy_cfg.normalization)
        model = VlaModel(policy_cfg)
    data = ChunkDataset(episodes, policy_cfg, normalizer)
    del episodes

    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    step = 0
    if resume and (out / TRAIN_STATE).is_file():
        state = torch.load(out / TRAIN_STATE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    # The hf VLM's final norm and last MLP feed nothing the expert reads (it reads keys/values only).
    trainer = DistributedDataParallel(model, find_unused_parameters=policy_cfg.backbone == "hf") if world > 1 else model
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank + step)

    def save(final: bool = False) -> None:
        if rank != 0:
            return
        meta = {"step": step, "train_config": dataclasses.asdict(cfg), "sources": sources,
                "frames_per_robot": {r: int((data.embodiment == policy_cfg.embodiment_id(r)).sum())
                                       for r in policy_cfg.embodiments},
                "aux_labelled_episodes": data.labelled_episodes}
        save_checkpoint(out / "checkpoint", ema, normalizer, meta=meta)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step}, out / f".{TRAIN_STATE}.tmp")
        (out / f".{TRAIN_STATE}.tmp").replace(out / TRAIN_STATE)
        if final and cfg.export_dir:
            save_checkpoint(cfg.export_dir, ema, normalizer, dtype=torch.float16, meta=meta)

    start, start_step, samples = time.perf_counter(), step, 0
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    model.train()
    while step < cfg.steps:
        time_fraction = (time.perf_counter() - start) / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        if world > 1:  # every rank must use the same learning rate
            frac = torch.tensor([time_fraction], device=device)
            dist.all_reduce(frac, op=dist.ReduceOp.MAX)
            time_fraction = float(frac.item())
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg, time_fraction)
        idx = data.trainable[torch.randint(len(data.trainable), (cfg.batch_size,), generator=generator)]
        batch = {k: (v.to(device) if torch.is_tensor(v) else {n: t.to(device) for n, t in v.items()})
                 for k, v in data.batch(idx, model.backbone, cfg.image_shift, generator).items()}
        loss, logs = trainer(batch, noise_samples=cfg.noise_samples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        samples += cfg.batch_size * world
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **({"aux": f"{logs['aux'].item():.4f}"} if "aux" in logs else {}),
                        gnorm=f"{grad_norm.item():.2f}", samples_s=f"{samples / elapsed:.1f}")
        out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        if world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item())
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save(final=step == cfg.steps or out_of_time)
        if out_of_time:
            break
    bar.close()
    result = {"steps": step, "samples_per_s": round(samples / max(1e-9, time.perf_counter() - start), 2),
              "resumed_from": start_step, "initialised_from": cfg.init_from,
              "parameters": sum(p.numel() for p in model.parameters()),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "checkpoint": str(out / "checkpoint"), "world_size": world, "rank": rank}
    if world > 1:
        dist.barrier()
    return result
