"""The command line: --help everywhere, one-name-per-line listings, one-line errors for bad input."""

import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from vla_stack.cli import app
from vla_stack.errors import VlaStackError
from vla_stack.sim.robots import ROBOTS
from vla_stack.sim.tasks import FAMILIES

runner = CliRunner()


def _all_command_paths(command, prefix=()):
    yield prefix
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _all_command_paths(sub, (*prefix, name))


def test_help_on_every_command():
    root = typer.main.get_command(app)
    paths = list(_all_command_paths(root))
    assert ("collect",) in paths and ("eval",) in paths and ("export", "lerobot") in paths and ("bench", "sim") in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_list_prints_one_name_per_line():
    assert runner.invoke(app, ["list", "robots"]).output.splitlines() == list(ROBOTS)
    assert runner.invoke(app, ["list", "tasks"]).output.splitlines() == list(FAMILIES)
    assert {"panda", "so101"} <= set(ROBOTS)
    assert list(FAMILIES) == ["pick", "place", "place_centre", "stack", "sort", "restore"]


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vla_stack", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.mark.parametrize("args, message", [
    (["eval", "--policy", "expert", "--task", "juggle", "--robot", "panda"], "unknown task 'juggle'"),
    (["collect", "--task", "pick", "--robot", "ur5", "--episodes", "1"], "unknown robot 'ur5'"),
    (["eval", "--policy", "/nonexistent/ckpt", "--task", "pick", "--robot", "panda"], "neither 'expert'"),
    (["wm-collect", "--behaviour", "dance", "--store", "/nonexistent/x.zarr"], "unknown behaviour 'dance'"),
    (["wm-collect", "--seed-start", "999999", "--episodes", "2", "--store", "/nonexistent/x.zarr"],
     "training seeds must stay below 1000000"),
])
def test_bad_names_give_one_line_errors(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_unwritable_data_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = _cli("collect", "--task", "pick", "--robot", "panda", "--episodes", "1", "--data-dir", str(blocker / "data"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_corrupt_store_is_a_one_line_error(tmp_path):
    store = tmp_path / "broken.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{ this is not json")
    result = _cli("dataset", "info", "--store", str(store))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "broken.zarr" in result.stderr


def test_eval_writes_json_with_wilson_interval(tmp_path):
    out = tmp_path / "eval.json"
    result = _cli("eval", "--policy", "expert", "--task", "pick", "--robot", "panda", "--episodes", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(out.read_text())
    assert data["episodes"] == 3 and len(data["per_episode"]) == 3
    assert 0.0 <= data["wilson_95"][0] <= data["success_rate"] <= data["wilson_95"][1] <= 1.0
    assert {"seed", "success", "steps"} <= set(data["per_episode"][0])
    assert all(e["seed"] >= 1_000_000 for e in data["per_episode"])  # held-out seeds


def test_shipped_policies_resolve_by_name(tmp_path):
    from vla_stack.paths import resolve_checkpoint, share_dir

    assert resolve_checkpoint("vla_tiny") == share_dir("policies") / "vla_tiny"
    assert resolve_checkpoint(tmp_path) == tmp_path
    with pytest.raises(VlaStackError, match="shipped policy name"):
        resolve_checkpoint("no_such_policy")
