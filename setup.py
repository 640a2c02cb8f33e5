"""ament_python package: installable with pip (pip install -e .) and buildable with colcon."""

from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "vla_stack"
HERE = Path(__file__).parent


def tree(folder: str) -> list[tuple[str, list[str]]]:
    """data_files entries that install a shipped folder under share/vla_stack/, keeping its layout."""
    entries: dict[str, list[str]] = {}
    for path in sorted((HERE / folder).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(HERE)
            entries.setdefault(f"share/{PACKAGE}/{rel.parent}", []).append(str(rel))
    return list(entries.items())


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        *tree("sim"),
        *tree("launch"),
        *tree("config"),
        *tree("policies"),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    python_requires=">=3.10",
    description="Vision-language-action robot stack with MuJoCo tasks, zarr episodes and ROS 2 nodes",
    license="Apache-2.0",
    extras_require={"test": ["pytest"]},  # how colcon test picks pytest (setuptools dropped tests_require)
    entry_points={
        "console_scripts": [
            "vla-stack = vla_stack.cli:main",
            "sim_node = vla_stack.ros.sim_node:main",
            "policy_node = vla_stack.ros.policy_node:main",
            "teleop_node = vla_stack.ros.teleop_node:main",
            "recorder_node = vla_stack.ros.recorder_node:main",
            "safety_node = vla_stack.ros.safety_node:main",
            "planner_node = vla_stack.ros.planner_node:main",
        ],
    },
)
