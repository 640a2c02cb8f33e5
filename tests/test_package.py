"""The ament_python package: package.xml format 3, and `colcon build` installs what ROS tools look for."""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_xml_is_format_3_ament_python():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "vla_stack"
    assert root.find("export/build_type").text == "ament_python"
    assert (ROOT / "resource" / "vla_stack").is_file()


def test_design_card_layout():
    for folder in ("vla_stack", "sim", "launch", "policies", "datasets", "tests"):
        assert (ROOT / folder).is_dir(), folder


@pytest.mark.skipif(shutil.which("colcon", path=str(Path(sys.executable).parent)) is None, reason="colcon not installed")
def test_colcon_build_and_test(tmp_path):
    colcon = shutil.which("colcon", path=str(Path(sys.executable).parent))
    workspace = tmp_path / "ws"
    (workspace / "src").mkdir(parents=True)
    source = workspace / "src" / "vla_stack"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "install", "log", "out",
                                                                 "__pycache__", "*.egg-info"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([colcon, "build", "--base-paths", "src"], cwd=workspace, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    install = workspace / "install" / "vla_stack"
    assert (install / "lib" / "vla_stack" / "vla-stack").is_file()
    assert (install / "share" / "ament_index" / "resource_index" / "packages" / "vla_stack").is_file()
    assert (install / "share" / "vla_stack" / "package.xml").is_file()
    assert (install / "share" / "vla_stack" / "sim" / "scenes" / "tabletop.xml").is_file()
    # colcon test runs our pytest suite (a light selection here: the suite itself is what `make test` runs)
    result = subprocess.run([colcon, "test", "--base-paths", "src", "--pytest-args", "-k", "design_card or package_xml"],
                            cwd=workspace, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = subprocess.run([colcon, "test-result", "--all"], cwd=workspace, capture_output=True, text=True,
                             timeout=60, env=env).stdout
    assert "0 errors, 0 failures" in summary and "Summary: 0 tests" not in summary, summary
