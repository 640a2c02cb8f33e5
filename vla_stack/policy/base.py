"""The policy interface every controller in the stack implements (LeRobot's method names)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Policy(Protocol):
    name: str

    def reset(self, seed: int | None = None) -> None:
        """Forget the previous episode (queued actions, internal state); a seed makes sampling reproducible."""

    def select_action(self, observation: dict) -> np.ndarray:
        """The next action: arm joint position targets + gripper command in [0, 1]."""
