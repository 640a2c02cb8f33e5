"""Train the high-level model from episode stores (see data.py for the samples) and score it on held-out stores.

YAML config (policies/mem_tiny.yaml):
    model: {width, encoder_layers, decoder_layers, heads, image_size, patch, ...}   (MemConfig fields), or
           {backbone: hf, hf_path: <local VLM dir>, hf_dtype, ...}                  (HFMemConfig fields)
    data:  {train: [stores], heldout: [stores], boundary_frames, steady_per_subtask, reset_samples,
            steady_before_boundary, post_call_frames, stale_per_subtask, running_subtask}
    train: {output_dir, export_dir, steps, batch_size, lr, warmup_steps, weight_decay, grad_clip, image_shift,
            use_memory, seed, max_minutes, eval_every, init_from}
    init_from: fine-tune from this checkpoint (relative to the working directory, like export_dir); its model
             configuration must equal the model: section.
    trigger: {threshold, confirm}   (optional) the completion head's firing threshold and debounce stored with
             the checkpoint, the planner's defaults (calibrated closed loop on validation seeds)
`use_memory: false` trains the no-memory ablation: every sample is fed the empty memory.
`running_subtask: true` feeds the model the memory together with the subtask that was running
(memory.model_context); the checkpoint records it and the planner then does the same.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from vla_stack.errors import VlaStackError
from vla_stack.paths import resolve_data_path
from vla_stack.planners.mem.data import Sample, build_samples
from vla_stack.planners.mem.memory import EMPTY, canonical, model_context
from vla_stack.planners.mem.hf_model import HFMemConfig
from vla_stack.planners.mem.model import HighLevelModel, MemConfig, build_model, load_model, prepare_images

TRAIN_DEFAULTS = {"output_dir": None, "export_dir": None, "steps": 3000, "batch_size": 64, "lr": 1e-3,
                  "warmup_steps": 100, "weight_decay": 1e-4, "grad_clip": 1.0, "image_shift": 4, "use_memory": True,
                  "seed": 0, "max_minutes": 30.0, "eval_every": 0, "completion_weight": 0.5, "init_from": None}
DATA_DEFAULTS = {"train": [], "heldout": [], "heldout_last": 0, "boundary_frames": 4, "steady_per_subtask": 4,
                 "reset_samples": 2, "steady_before_boundary": 0, "post_call_frames": 0,
                 "stale_per_subtask": 0, "max_episodes": None, "running_subtask": False}


def load_config(path: Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise VlaStackError(f"cannot read high-level training config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise VlaStackError(f"{path}: expected model:, data:, train: sections")
    unknown = set(raw) - {"model", "data", "train", "trigger"}
    if unknown:
        raise VlaStackError(f"{path}: unknown sections {sorted(unknown)}")
    config = {"model": raw.get("model") or {}, "data": {**DATA_DEFAULTS, **(raw.get("data") or {})},
              "train": {**TRAIN_DEFAULTS, **(raw.get("train") or {})}, "trigger": raw.get("trigger") or {}}
    if set(config["trigger"]) - {"threshold", "confirm"}:
        raise VlaStackError(f"{path}: trigger takes threshold and confirm only")
    for section, defaults in (("data", DATA_DEFAULTS), ("train", TRAIN_DEFAULTS)):
        bad = set(config[section]) - set(defaults)
        if bad:
            raise VlaStackError(f"{path}: unknown {section} keys {sorted(bad)}")
    if config["model"].get("backbone") == "hf":
        HFMemConfig.from_dict(dict(config["model"]))
    else:
        MemConfig.from_dict(config["model"])
    if not config["data"]["train"]:
        raise VlaStackError(f"{path}: data.train lists no episode stores")
    return config


class SampleSet:
    """Samples with their images resized once (float16, model resolution)."""

    def __init__(self, samples: list[Sample], image_size: int, use_memory: bool = True, running: bool = False):
        if not samples:
            raise VlaStackError("no training samples")
        self.samples = samples
        chunks = [prepare_images(np.stack([s.image for s in samples[i:i + 256]]), image_size).half()
                  for i in range(0, len(samples), 256)]
        self.images = torch.cat(chunks)
        self.goals = [s.goal for s in samples]
        self.memories_in = [(model_context(s.memory_in, s.running) if running else s.memory_in) if use_memory else EMPTY
                            for s in samples]
        self.subtasks = [s.subtask for s in samples]
        self.memories_out = [s.memory_out for s in samples]
        # Without memory input "stale" is undefined; the ablation's planner calls on a fixed period instead.
        self.stale = torch.tensor([s.stale if use_memory else False for s in samples])

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, idx: np.ndarray, shift: int = 0, rng: np.random.Generator | None = None) -> dict:
        images = self.images[idx].float()
        if shift:
            padded = F.pad(images, (shift,) * 4, mode="replicate")
            size = images.shape[-1]
            offsets = rng.integers(0, 2 * shift + 1, size=(len(idx), 2))
            images = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])
        pick = lambda xs: [xs[i] for i in idx]
        return {"images": images, "goals": pick(self.goals), "memories_in": pick(self.memories_in),
                "subtasks": pick(self.subtasks), "memories_out": pick(self.memories_out), "stale": self.stale[idx]}


def score(model: HighLevelModel, data: SampleSet, batch_size: int = 128) -> dict:
    """Greedy decoding on every sample, by sample kind: subtask accuracy (a correct next subtask; sort accepts any
    unsorted cube, `subtask_exact` is the recorded order), memory exact match (up to the order of listed sorted
    cubes), completion accuracy."""
    model.eval()
    hits: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(idx)
        subtasks, memories, p = model.generate(batch["images"], batch["goals"], batch["memories_in"])
        for j, i in enumerate(idx):
            s = data.samples[i]
            groups = ["all", s.kind, s.family] + (["after_failure"] if s.after_failure else [])
            subtask_ok = subtasks[j] in (s.valid_subtasks or (s.subtask,))
            memory_ok = canonical(memories[j]) == canonical(s.memory_out)
            for g in groups:
                hits[f"{g}/subtask"].append(subtask_ok)
                hits[f"{g}/subtask_exact"].append(subtasks[j] == s.subtask)
                hits[f"{g}/memory"].append(memory_ok)
                hits[f"{g}/both"].append(subtask_ok and memory_ok)
                hits[f"{g}/completion"].append(bool(p[j] > 0.5) == bool(data.stale[i]))
    model.train()
    out: dict = {}
    for key, values in sorted(hits.items()):
        group, metric = key.split("/")
        out.setdefault(group, {"n": len(values)})[f"{metric}_accuracy"] = round(float(np.mean(values)), 4)
    return out


def train(config_path: Path, progress: bool = True) -> dict:
    config = load_config(config_path)
    tcfg, dcfg = config["train"], config["data"]
    torch.manual_seed(tcfg["seed"])
    rng = np.random.default_rng(tcfg["seed"])
    output_dir = resolve_data_path(tcfg["output_dir"] or Path("mem/runs") / Path(config_path).stem)
    model = build_model(config["model"]) if not tcfg["init_from"] else start_from_checkpoint(config, tcfg["init_from"])
    sample_kwargs = {k: dcfg[k] for k in ("boundary_frames", "steady_per_subtask", "reset_samples",
                                          "steady_before_boundary", "post_call_frames", "stale_per_subtask")}
    train_stores = [resolve_data_path(p) for p in dcfg["train"]]
    train_set = SampleSet(build_samples(train_stores, seed=tcfg["seed"], max_episodes=dcfg["max_episodes"],
                                        skip_last=dcfg["heldout_last"], progress=progress, **sample_kwargs),
                          model.config.image_size, tcfg["use_memory"], dcfg["running_subtask"])
    heldout_samples = []
    if dcfg["heldout_last"]:  # each training store's last episodes (other scene seeds)
        heldout_samples += build_samples(train_stores, seed=tcfg["seed"] + 1, last=dcfg["heldout_last"],
                                         progress=progress, **sample_kwargs)
    if dcfg["heldout"]:
        heldout_samples += build_samples([resolve_data_path(p) for p in dcfg["heldout"]], seed=tcfg["seed"] + 1,
                                         progress=progress, **sample_kwargs)
    heldout = (SampleSet(heldout_samples, model.config.image_size, tcfg["use_memory"], dcfg["running_subtask"])
               if heldout_samples else None)
    result = fit(model, train_set, tcfg, rng, heldout=heldout, progress=progress)
    result["train_samples"] = len(train_set)
    result["heldout_samples"] = len(heldout) if heldout else 0
    result["train_stores"] = dcfg["train"]
    result["heldout_stores"] = dcfg["heldout"]
    result["heldout_last_episodes_per_train_store"] = dcfg["heldout_last"]
    extra = {"use_memory": bool(tcfg["use_memory"]), "running_subtask_input": bool(dcfg["running_subtask"]),
             "trigger": config["trigger"],
             "train": {k: v for k, v in result.items() if k != "history"}}
    model.save(output_dir, extra=extra)
    (output_dir / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    if tcfg["export_dir"]:
        model.save(Path(tcfg["export_dir"]), extra=extra)
    result["output_dir"] = str(output_dir)
    return result


def start_from_checkpoint(config: dict, path: str | Path) -> HighLevelModel:
    """The checkpoint's weights under the config's model; a differing model section is an error, not a silent
    partial load."""
    from dataclasses import asdict

    model = load_model(Path(path))
    config_class = HFMemConfig if config["model"].get("backbone") == "hf" else MemConfig
    ours, theirs = asdict(config_class.from_dict(dict(config["model"]))), asdict(model.config)
    derived = {"vocab"}  # filled from the grammar when a model is built
    differ = sorted(k for k in set(ours) | set(theirs) if k not in derived and ours.get(k) != theirs.get(k))
    if differ:
        raise VlaStackError(f"init_from {path}: the model: section differs from the checkpoint in "
                            f"{', '.join(f'{k} ({ours.get(k)!r} vs {theirs.get(k)!r})' for k in differ)}")
    return model.float().train()


def fit(model: HighLevelModel, data: SampleSet, tcfg: dict, rng: np.random.Generator,
        heldout: SampleSet | None = None, progress: bool = False) -> dict:
    """The training loop (AdamW, warmup + cosine), stopping at `steps` or `max_minutes`."""
    tcfg = {**TRAIN_DEFAULTS, **tcfg}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    steps, warmup = int(tcfg["steps"]), int(tcfg["warmup_steps"])
    schedule = lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    history, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="train mem", disable=not progress)
    step = 0
    for step in bar:
        idx = rng.choice(len(data), size=min(tcfg["batch_size"], len(data)), replace=False)
        batch = data.batch(idx, shift=int(tcfg["image_shift"]), rng=rng)
        losses = model.loss(batch["images"], batch["goals"], batch["memories_in"], batch["subtasks"],
                            batch["memories_out"], batch["stale"], completion_weight=tcfg["completion_weight"])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        record = {k: round(float(v.detach()), 5) for k, v in losses.items()}
        history.append({"step": step, **record})
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if tcfg["eval_every"] and heldout is not None and step and step % tcfg["eval_every"] == 0:
            history[-1]["heldout"] = score(model, heldout)
        if (time.perf_counter() - start) / 60 > tcfg["max_minutes"]:
            break
    model.eval()
    first = float(np.mean([h["loss"] for h in history[:10]]))
    last = float(np.mean([h["loss"] for h in history[-10:]]))
    result = {"steps_done": step + 1, "minutes": round((time.perf_counter() - start) / 60, 2),
              "first_loss": round(first, 4), "final_loss": round(last, 4),
              "trainable_parameters": model.trainable_parameters(), "history": history[::max(1, len(history) // 200)]}
    if heldout is not None:
        result["heldout"] = score(model, heldout)
    return result
