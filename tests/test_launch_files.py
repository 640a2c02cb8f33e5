"""Tier B: every launch file, parsed (not executed, launch_ros is not installable here): each Node names an
executable of this package's console_scripts, every parameter file exists, is installed by setup.py and is keyed
by the names of the nodes that load it; every LaunchConfiguration used is declared."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))


def console_scripts() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return {ast.literal_eval(item).split("=")[0].strip() for item in value.elts}
    raise AssertionError("setup.py has no console_scripts")


def installed_folders() -> set[str]:
    """Top-level folders setup.py installs under share/vla_stack through tree(...)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tree"}


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def nodes(tree: ast.Module) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            (getattr(n.func, "id", None) == "Node" or getattr(n.func, "attr", None) == "Node")]


def constants(tree: ast.Module) -> dict[str, str]:
    return {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
            for t in n.targets if isinstance(t, ast.Name)}


def yaml_files(tree: ast.Module) -> list[str]:
    """Parameter files referenced as PathJoinSubstitution([FindPackageShare(...), "config", NAME])."""
    names = constants(tree)
    found = []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "PathJoinSubstitution":
            parts = [names.get(e.id) if isinstance(e, ast.Name) else e.value for e in call.args[0].elts[1:]]
            found.append("/".join(parts))
    return found


def test_there_are_the_three_launch_files():
    assert {p.name for p in LAUNCH_FILES} >= {"sim_eval.launch.py", "teleop_record.launch.py", "real_arm.launch.py"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_structure(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    scripts = console_scripts()
    launched = nodes(tree)
    assert launched, "no Node actions"
    names = set()
    for call in launched:
        assert ast.literal_eval(keyword(call, "package")) == "vla_stack"
        executable = ast.literal_eval(keyword(call, "executable"))
        assert executable in scripts, f"{executable} is not a console script of vla_stack"
        names.add(ast.literal_eval(keyword(call, "name")))
        assert keyword(call, "parameters") is not None
    configs = yaml_files(tree)
    assert configs, "no parameter file"
    for rel in configs:
        file = ROOT / rel
        assert file.is_file(), f"{rel} missing"
        assert rel.split("/")[0] in installed_folders(), f"setup.py does not install {rel}"
        keys = set(yaml.safe_load(file.read_text()))
        assert keys <= names, f"{rel} configures nodes this launch file does not start: {keys - names}"
        for key in keys:
            assert set(yaml.safe_load(file.read_text())[key]) == {"ros__parameters"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_arguments_are_declared(path):
    tree = ast.parse(path.read_text())
    declared = {ast.literal_eval(n.args[0]) for n in ast.walk(tree)
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "DeclareLaunchArgument"}
    used = {ast.literal_eval(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args and
            (getattr(n.func, "id", None) in ("LaunchConfiguration", "arg"))}
    assert used <= declared, f"undeclared launch arguments {used - declared}"
    assert {"robot", "use_sim_time", "controller"} <= declared


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_node_parameters_exist(path):
    """Every parameter a launch file or its YAML sets is one the node declares (names read from the node source)."""
    tree = ast.parse(path.read_text())
    declared = {}
    for module in (ROOT / "vla_stack" / "ros").glob("*.py"):
        src = ast.parse(module.read_text())
        declared[module.stem] = {ast.literal_eval(n.args[1]) for n in ast.walk(src) if isinstance(n, ast.Call)
                                 and getattr(n.func, "id", None) == "param" and isinstance(n.args[1], ast.Constant)}
    gate = declared["safety_gate"]
    for call in nodes(tree):
        name = ast.literal_eval(keyword(call, "name"))
        allowed = declared[ast.literal_eval(keyword(call, "executable"))] | {"use_sim_time"}
        if name != "sim_node":
            allowed |= gate
        given = set()
        for item in keyword(call, "parameters").elts:
            if isinstance(item, ast.Dict):
                given |= {k.value for k in item.keys}
            elif isinstance(item, ast.Name) and item.id != "config":
                value = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                             and any(getattr(t, "id", None) == item.id for t in n.targets))
                given |= {k.value for k in value.keys}
        for rel in yaml_files(tree):
            given |= set(yaml.safe_load((ROOT / rel).read_text()).get(name, {}).get("ros__parameters", {}))
        assert given <= allowed, f"{path.name}: {name} does not declare {given - allowed}"
