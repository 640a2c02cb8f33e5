"""The `hf` high level: a pretrained transformers VLM (SmolVLM / Idefics3 class, loaded from a local directory,
never the hub) fine-tuned to write the next subtask and the updated memory, as Hi Robot and MemER do with
3B-7B VLMs. Same interface as the tiny HighLevelModel (loss, generate, completion_probability, save), so
training, scoring, the planner loop and the ROS node take either.

Sequence: [image tokens of the front image] "goal: <goal> memory: <memory> next:" then the target
"<subtask> | <memory>" and the tokenizer's EOS, in the VLM's own tokenizer. The LM loss covers the target
only; the completion head reads the hidden state of the last prompt token ("next:"), which has seen the
image, the goal and the memory, so a completion check is one prompt pass without decoding. Greedy decoding
reuses the VLM's KV cache.

A checkpoint is a directory: `config.json` (vla_stack.mem/1, backbone "hf"), `vlm/` (the fine-tuned VLM and its
tokenizer, loadable by transformers on its own) and `head.safetensors` (the completion head).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vla_stack.errors import VlaStackError
from vla_stack.planners.mem.model import FORMAT, CheckpointError, clean_decoded

SEPARATOR = " | "


@dataclass
class HFMemConfig:
    hf_path: str
    backbone: str = "hf"
    hf_dtype: str = "float32"
    image_size: int = 0  # the vision tower's input size (filled in from the VLM)
    max_prompt_tokens: int = 96
    max_target_tokens: int = 64

    @classmethod
    def from_dict(cls, data: dict) -> HFMemConfig:
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise CheckpointError(f"unknown hf high-level config keys: {sorted(set(data) - known)}")
        if not data.get("hf_path"):
            raise CheckpointError("the hf high level needs model.hf_path (a local VLM directory)")
        return cls(**data)


class HFHighLevelModel(nn.Module):
    def __init__(self, config: HFMemConfig, vlm_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        path = str(vlm_dir or config.hf_path)
        try:
            self.vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, config.hf_dtype),
                                                                   local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise VlaStackError(f"cannot load the high-level VLM from {path}: {exc}") from None
        if self.tokenizer.eos_token_id is None:
            raise VlaStackError(f"the tokenizer in {path} has no EOS token: the decoder could not stop")
        vcfg = self.vlm.config.vision_config
        config.image_size = vcfg.image_size
        self.config = config
        self.image_seq_len = (vcfg.image_size // vcfg.patch_size) ** 2 // self.vlm.config.scale_factor ** 2
        self.image_token_id = self.vlm.config.image_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.completion = nn.Linear(self.vlm.config.text_config.hidden_size, 1)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- sequences ----------------------------------------------------------------------------------------
    def _ids(self, text: str, limit: int) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]

    def _prompt(self, goal: str, memory: str) -> list[int]:
        text = self._ids(f"goal: {goal} memory: {memory} next:", self.config.max_prompt_tokens)
        return [self.image_token_id] * self.image_seq_len + text

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Prepared images (B, 3, S, S), (x - 0.5) / 0.25 -> the VLM's [-1, 1] pixels, one image per row."""
        x = images * 0.5
        if x.shape[-1] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
        return x.to(self.vlm.dtype)[:, None]

    def _run(self, images: torch.Tensor, rows: list[list[int]], **kwargs):
        """Right-padded rows -> the VLM's output and the attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        out = self.vlm(input_ids=ids, attention_mask=mask, pixel_values=self._pixels(images),
                       output_hidden_states=True, **kwargs)
        return out, mask

    def _completion_logits(self, out, last: torch.Tensor) -> torch.Tensor:
        states = out.hidden_states[-1][torch.arange(len(last)), last]
        return self.completion(states.float()).squeeze(-1)

    # -- training and inference ----------------------------------------------------------------------------
    def loss(self, images: torch.Tensor, goals: list[str], memories_in: list[str], subtasks: list[str],
             memories_out: list[str], stale: torch.Tensor, completion_weight: float = 0.5) -> dict:
        prompts = [self._prompt(g, m) for g, m in zip(goals, memories_in)]
        targets = [self._ids(s + SEPARATOR + m, self.config.max_target_tokens - 1) + [self.tokenizer.eos_token_id]
                   for s, m in zip(subtasks, memories_out)]
        out, mask = self._run(images, [p + t for p, t in zip(prompts, targets)])
        labels = torch.full(mask.shape, -100, dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
        logits = out.logits[:, :-1].float()
        text_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        last = torch.tensor([len(p) - 1 for p in prompts])
        completion_loss = F.binary_cross_entropy_with_logits(self._completion_logits(out, last), stale.float())
        return {"loss": text_loss + completion_weight * completion_loss, "text_loss": text_loss,
                "completion_loss": completion_loss}

    @torch.inference_mode()
    def completion_probability(self, images: torch.Tensor, goals: list[str], memories: list[str]) -> torch.Tensor:
        prompts = [self._prompt(g, m) for g, m in zip(goals, memories)]
        out, _ = self._run(images, prompts)
        return torch.sigmoid(self._completion_logits(out, torch.tensor([len(p) - 1 for p in prompts])))

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, goals: list[str], memories: list[str],
                 use_cache: bool = True) -> tuple[list[str], list[str], torch.Tensor]:
        """Greedy decoding, one row at a time (the planner calls with one image; prompts differ in length).
        Returns (subtasks, memories, completion probabilities)."""
        subtasks, new_memories, probabilities = [], [], []
        for i, (goal, memory) in enumerate(zip(goals, memories)):
            prompt = self._prompt(goal, memory)
            out, mask = self._run(images[i:i + 1], [prompt], use_cache=use_cache)
            probabilities.append(torch.sigmoid(self._completion_logits(out, torch.tensor([len(prompt) - 1]))))
            ids, past, written = list(prompt), out.past_key_values, []
            nxt = int(out.logits[0, -1].argmax())
            while nxt != self.tokenizer.eos_token_id and len(written) < self.config.max_target_tokens:
                written.append(nxt)
                ids.append(nxt)
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                if use_cache:
                    out = self.vlm(input_ids=torch.tensor([[nxt]]), attention_mask=mask, past_key_values=past,
                                   use_cache=True)
                    past = out.past_key_values
                else:
                    out = self.vlm(input_ids=torch.tensor([ids]), attention_mask=mask,
                                   pixel_values=self._pixels(images[i:i + 1]))
                nxt = int(out.logits[0, -1].argmax())
            text = self.tokenizer.decode(written, skip_special_tokens=True)
            subtask, _, new_memory = text.partition(SEPARATOR.strip())
            subtasks.append(clean_decoded(subtask))
            new_memories.append(clean_decoded(new_memory))
        return subtasks, new_memories, torch.cat(probabilities)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, directory: Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vlm.save_pretrained(directory / "vlm")
        self.tokenizer.save_pretrained(directory / "vlm")
        save_file({k: v.detach().contiguous() for k, v in self.completion.state_dict().items()},
                  str(directory / "head.safetensors"))
        meta = {"format": FORMAT, "config": asdict(self.config), **(extra or {})}
        (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory


def load_hf_model(directory: Path, meta: dict) -> HFHighLevelModel:
    """A saved hf high level: its own fine-tuned VLM under vlm/, not the base it was trained from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = HFMemConfig.from_dict(meta["config"])
    head = directory / "head.safetensors"
    if not (directory / "vlm").is_dir() or not head.is_file():
        raise CheckpointError(f"hf high-level checkpoint {directory} lacks vlm/ or head.safetensors")
    try:
        model = HFHighLevelModel(config, vlm_dir=directory / "vlm")
        model.completion.load_state_dict(load_file(str(head)))
    except (VlaStackError, SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"hf high-level checkpoint {directory} is unusable ({exc})") from None
    model.checkpoint_meta = meta
    return model.eval()
