"""Writer process for the SIGKILL tests (run as a script), and the deterministic episode data that the
test regenerates to check what survived.

    python episode_writer_child.py STORE midway N   commit seeds 0..N-1, print MIDWAY inside episode N,
                                                    then keep adding frames until killed
    python episode_writer_child.py STORE forever S  commit episodes with seeds S, S+1, ... until killed (prints
                                                    COMMITTING after the first one)
"""

from __future__ import annotations

import sys
from itertools import count

import numpy as np

from vla_stack.data.episode_store import EpisodeStore

FEATURES = {
    "images.front": {"dtype": "uint8", "shape": [32, 32, 3]},
    "images.wrist": {"dtype": "uint8", "shape": [32, 32, 3]},
    "state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "grip"]},
    "action": {"dtype": "float32", "shape": [3]},
    "subtask_index": {"dtype": "int64", "shape": []},
}


def make_episode(seed: int) -> dict[str, np.ndarray]:
    """Frames that depend only on the seed, so a test can regenerate exactly what was written."""
    rng = np.random.default_rng(seed)
    length = 4 + seed % 4
    return {
        "images.front": rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8),
        "images.wrist": rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8),
        "state": rng.normal(size=(length, 4)).astype(np.float32),
        "action": rng.normal(size=(length, 3)).astype(np.float32),
        "subtask_index": np.arange(length, dtype=np.int64) // 2,
    }


def write_episode(store: EpisodeStore, seed: int) -> int:
    data = make_episode(seed)
    with store.begin_episode(instruction=f"episode {seed}", task="place", subtasks=["reach", "place"],
                             seed=seed) as writer:
        for t in range(len(data["state"])):
            writer.add_frame({name: values[t] for name, values in data.items()})
        return writer.commit(success=True, extra={"seed_again": seed})


def main(path: str, mode: str, number: int) -> None:
    store = EpisodeStore.open_or_create(path, robot="panda", fps=10, features=FEATURES)
    if mode == "forever":
        for seed in count(number):
            write_episode(store, seed)
            if seed == number:  # the killer's random delay starts once writing is under way, however slow startup is
                print("COMMITTING", flush=True)
    for seed in range(number):
        write_episode(store, seed)
    data = make_episode(number)
    with store.begin_episode(instruction="never committed", task="place", seed=number) as writer:
        for t in count():
            writer.add_frame({name: values[t % len(values)] for name, values in data.items()})
            if t == 2:
                print("MIDWAY", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
