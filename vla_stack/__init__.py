"""vla_stack: teleop demos -> VLA training -> MuJoCo evaluation -> ROS 2 deployment, in one package."""

import os

# Offscreen rendering without a display: EGL (Mesa llvmpipe on CPU, the NVIDIA driver on a GPU). MuJoCo reads
# this when it is first imported, so it is set before any submodule imports mujoco.
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"
