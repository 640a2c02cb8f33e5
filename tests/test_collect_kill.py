"""SIGKILL a real `vla-stack collect` mid-episode: every episode committed before the kill is intact."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vla_stack.data.collect import collect
from vla_stack.data.episode_store import EpisodeStore


def _committed(store: Path) -> int:
    episodes = store / "episodes"
    return len([p for p in episodes.iterdir() if p.is_dir()]) if episodes.is_dir() else 0


def test_sigkill_mid_episode_keeps_every_finished_episode(tmp_path):
    store = tmp_path / "pick.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "vla_stack", "collect", "--task", "pick", "--robot", "panda",
                             "--episodes", "50", "--image-size", "32", "--store", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while _committed(store) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert _committed(store) >= 2, proc.stderr.read().decode() if proc.poll() is not None else "too slow"
        time.sleep(0.3)  # an episode takes ~1 s here: the kill lands inside the next one
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    survivor = EpisodeStore.open(store)
    n = len(survivor)
    assert n >= 2 and survivor.verify() == {}
    # Rebuild the same episodes (same seeds) in a fresh store: the survivors must be bit-identical.
    reference = tmp_path / "reference.zarr"
    collect("pick", "panda", n, reference, image_size=32, progress=False)
    expected = EpisodeStore.open(reference)
    for i in range(n):
        got, want = survivor.read_episode(i), expected.read_episode(i)
        assert survivor.episode_meta(i).seed == expected.episode_meta(i).seed
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"episode {i} {key}")
    # The store accepts new episodes after the crash, continuing with the next seed.
    collect("pick", "panda", 1, store, image_size=32, progress=False)
    reopened = EpisodeStore.open(store)
    assert len(reopened) == n + 1
    assert reopened.episode_meta(n).seed == n
