"""The tree search on hand-built toy models (no torch): it finds the branch only lookahead reveals, honours its
deadline (on an injected clock), applies the Sampled MuZero correction and is deterministic given a seed."""

import gc

import numpy as np
import pytest

from vla_stack.planners.world_model.mcts import SearchConfig, best_of_k, sampled_prior, search

# A 1-D corridor: latent = position x; a chunk of 2 steps moves x by the sum of its actions.
# Moving right pays a little at once (+1 scores 0.6); moving left dips first but leads to the goal at x = -3.
VALUES = {1: 0.6, 2: 0.5, 3: 0.4, 0: 0.2, -1: 0.1, -2: 0.3, -3: 1.0}
RIGHT, LEFT = np.full((2, 1), 0.5, np.float32), np.full((2, 1), -0.5, np.float32)


class Corridor:
    def __init__(self, clock=None, tick=0.0):
        self.calls, self.clock, self.tick = 0, clock, tick

    def dynamics(self, z, a):
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.tick  # each model call costs `tick` seconds of (fake) time
        return z + a.sum(axis=(1, 2))[:, None]

    def evaluate(self, z):
        return np.array([VALUES.get(int(round(x)), 0.0) for x in z[:, 0]])

    def propose(self, z, n, rng):
        base = np.stack([RIGHT, LEFT])
        chunks = np.stack([base[np.arange(n) % 2] for _ in z])
        return chunks, np.zeros((len(z), n)), np.zeros((len(z), n))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_search_finds_the_branch_only_lookahead_reveals():
    toy = Corridor()
    root = np.zeros(1, np.float32)
    cfg = SearchConfig(deadline_s=None, max_simulations=400, batch_size=8, max_depth=3, children=2, discount=0.9)
    result = search(root, np.stack([RIGHT, LEFT]), toy.dynamics, toy.evaluate, toy.propose, cfg)
    assert result.index == 1, result.stats["root"]
    assert np.array_equal(result.chunk, LEFT)
    assert result.stats["max_depth"] == 3
    assert result.stats["simulations"] == 400
    # one-step greedy (best-of-K without search) takes the bait
    assert best_of_k(root, np.stack([RIGHT, LEFT]), toy.dynamics, toy.evaluate).index == 0


def test_search_is_deterministic_given_a_seed():
    def noisy_propose(z, n, rng):
        chunks = rng.normal(0, 0.5, (len(z), n, 2, 1)).astype(np.float32)
        return chunks, np.zeros((len(z), n)), np.zeros((len(z), n))

    toy = Corridor()
    roots = np.random.default_rng(0).normal(0, 0.5, (6, 2, 1)).astype(np.float32)
    runs = [search(np.zeros(1, np.float32), roots, toy.dynamics, toy.evaluate, noisy_propose,
                   SearchConfig(deadline_s=None, max_simulations=200, seed=s)) for s in (3, 3, 4)]
    assert runs[0].stats["root"] == runs[1].stats["root"]
    assert runs[0].index == runs[1].index
    assert runs[0].stats["root"]["visits"] != runs[2].stats["root"]["visits"]


def test_deadline_is_honoured_on_an_injected_clock():
    clock = FakeClock()
    toy = Corridor(clock, tick=0.01)  # every batched model call takes 10 ms
    cfg = SearchConfig(deadline_s=0.155, max_simulations=10**6, batch_size=4, max_depth=6, children=2)
    result = search(np.zeros(1, np.float32), np.stack([RIGHT, LEFT]), toy.dynamics, toy.evaluate, toy.propose, cfg,
                    clock=clock)
    assert result.stats["stopped_by"] == "deadline"
    assert result.stats["elapsed_s"] <= 0.155
    assert toy.calls == 15  # a 16th round of 10 ms would end at 160 ms: it is not started
    assert result.stats["simulations"] > 0


def test_garbage_collector_paused_during_the_search_only():
    seen = []

    class Watched(Corridor):
        def dynamics(self, z, a):
            seen.append(gc.isenabled())
            return super().dynamics(z, a)

    toy = Watched()
    search(np.zeros(1, np.float32), np.stack([RIGHT, LEFT]), toy.dynamics, toy.evaluate, toy.propose,
           SearchConfig(deadline_s=None, max_simulations=20, batch_size=4))
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(ValueError):  # restored on errors too
        search(np.zeros(1, np.float32), np.full((1, 2, 1), np.nan, np.float32), toy.dynamics, toy.evaluate,
               toy.propose)
    assert gc.isenabled()


def test_zero_deadline_still_returns_a_choice():
    toy = Corridor(FakeClock(), 0.01)
    result = search(np.zeros(1, np.float32), np.stack([RIGHT, LEFT]), toy.dynamics, toy.evaluate, toy.propose,
                    SearchConfig(deadline_s=0.0), clock=toy.clock)
    assert result.index in (0, 1) and result.stats["simulations"] == 0 and toy.calls == 0


def test_sampled_muzero_prior_correction():
    # samples drawn from beta with policy pi: prior ~ pi/beta for distinct samples
    log_pi = np.log(np.array([0.5, 0.25, 0.25]))
    log_beta = np.log(np.array([0.25, 0.25, 0.5]))
    np.testing.assert_allclose(sampled_prior(log_pi - log_beta), np.array([2, 1, 0.5]) / 3.5)
    np.testing.assert_allclose(sampled_prior(np.zeros(4)), np.full(4, 0.25))


def test_progressive_widening_limits_children():
    toy = Corridor()
    roots = np.stack([RIGHT * s for s in np.linspace(-1, 1, 8)])
    cfg = SearchConfig(deadline_s=None, max_simulations=4, batch_size=1, pw_k=1.0, pw_alpha=0.5, max_depth=1)
    result = search(np.zeros(1, np.float32), roots, toy.dynamics, toy.evaluate, toy.propose, cfg)
    assert sum(v > 0 for v in result.stats["root"]["visits"]) <= 2  # ceil(1 * 3**0.5) = 2 before the 4th pick


def test_bad_input_is_refused():
    toy = Corridor()
    with pytest.raises(ValueError, match="NaN"):
        search(np.array([np.nan], np.float32), np.stack([RIGHT]), toy.dynamics, toy.evaluate, toy.propose)
    with pytest.raises(ValueError, match="root_chunks"):
        search(np.zeros(1, np.float32), np.zeros((0, 2, 1)), toy.dynamics, toy.evaluate, toy.propose)


class Needle:
    """From x = 10: RIGHT reaches a safe plateau (0.6 everywhere beyond 10); LEFT reaches 9 (0.3), from where one
    of the sixteen proposed moves (-1.0) reaches the goal at 8 (1.0) and the others score 0."""

    def dynamics(self, z, a):
        return z + a.sum(axis=(1, 2))[:, None]

    def evaluate(self, z):
        x = np.round(z[:, 0] * 4) / 4
        return np.select([x == 8.0, x == 9.0, x > 10, x == 10.0], [1.0, 0.3, 0.6, 0.5], 0.0)

    def propose(self, z, n, rng):  # away from the start: left of it further left, right of it further right
        chunks = np.zeros((len(z), n, 2, 1), np.float32)
        chunks[:, :, 0, 0] = np.sign(z[:, :1] - 10) * 0.25 * (np.arange(n) + 1)
        return chunks, np.zeros((len(z), n)), np.zeros((len(z), n))


def test_max_backups_find_the_one_good_continuation_mean_backups_average_away():
    toy, root, chunks = Needle(), np.full(1, 10.0, np.float32), np.stack([RIGHT, LEFT])
    picks = {}
    for backup in ("mean", "max"):
        cfg = SearchConfig(deadline_s=None, max_simulations=64, batch_size=1, max_depth=2, children=16, backup=backup)
        result = search(root, chunks, toy.dynamics, toy.evaluate, toy.propose, cfg)
        picks[backup] = result.index
    assert picks == {"mean": 0, "max": 1}, picks
    # max backups never rank below the one-step values: with nothing found below, best_of_k's pick
    cfg = SearchConfig(deadline_s=None, max_simulations=64, batch_size=1, max_depth=1, backup="max")
    assert search(root, chunks, toy.dynamics, toy.evaluate, toy.propose, cfg).index == \
        best_of_k(root, chunks, toy.dynamics, toy.evaluate).index == 0
    with pytest.raises(ValueError, match="backup"):
        SearchConfig(backup="median")


def test_a_root_childs_own_continuation_is_tried_first():
    """Proposals only lead away from the goal; LEFT's continuation (the rest of its proposer's plan) reaches it."""

    class Away(Needle):
        def evaluate(self, z):  # the goal is a region past 8: once there, small moves keep it
            return np.where((z[:, 0] >= 8.0) & (z[:, 0] < 8.9), 1.0, super().evaluate(z))

        def propose(self, z, n, rng):
            chunks = np.zeros((len(z), n, 2, 1), np.float32)
            chunks[:, :, 0, 0] = 0.25 * (np.arange(n) + 1)
            return chunks, np.zeros((len(z), n)), np.zeros((len(z), n))

    toy, root, chunks = Away(), np.full(1, 10.0, np.float32), np.stack([RIGHT, LEFT])
    continuations = np.zeros((2, 1, 2, 1), np.float32)
    continuations[1, 0, 0, 0] = -1.0  # 9 -> 8, the goal
    for backup in ("mean", "max"):
        cfg = SearchConfig(deadline_s=None, max_simulations=64, batch_size=4, max_depth=3, children=8, backup=backup)
        plain = search(root, chunks, toy.dynamics, toy.evaluate, toy.propose, cfg)
        followed = search(root, chunks, toy.dynamics, toy.evaluate, toy.propose, cfg,
                          root_continuations=continuations)
        assert (plain.index, followed.index) == (0, 1), (backup, plain.stats["root"], followed.stats["root"])
    with pytest.raises(ValueError, match="root_continuations"):
        search(root, chunks, toy.dynamics, toy.evaluate, toy.propose, cfg, root_continuations=continuations[:1])


def test_root_tolerance_lets_lookahead_decide_only_among_one_step_ties():
    """A (+1) scores best one step ahead (0.6); B (+2) all but ties with it (0.595) and leads on to 0.9; C (-1)
    scores 0.3 and leads on to 1.0. Unrestricted max backups go for C; within a 0.01 tolerance the search may
    only refine the one-step choice and takes B; a zero tolerance is best_of_k's pick."""
    values = {0: 0.2, 1: 0.6, 2: 0.595, 3: 0.9, -1: 0.3, -2: 1.0}

    class Ties(Corridor):
        def evaluate(self, z):
            return np.array([values.get(int(round(x)), 0.0) for x in z[:, 0]])

    toy, root = Ties(), np.zeros(1, np.float32)
    chunks = np.stack([np.full((2, 1), d / 2, np.float32) for d in (1, 2, -1)])
    picks = {}
    for tolerance in (None, 0.01, 0.0):
        cfg = SearchConfig(deadline_s=None, max_simulations=200, batch_size=4, max_depth=3, children=2,
                           backup="max", root_tolerance=tolerance)
        result = search(root, chunks, toy.dynamics, toy.evaluate, toy.propose, cfg)
        picks[tolerance] = result.index
        if tolerance is not None:  # a root child out of the band gets no search below it
            assert result.stats["root"]["visits"][2] == 1, result.stats["root"]
    assert picks == {None: 2, 0.01: 1, 0.0: 0}, picks
    assert best_of_k(root, chunks, toy.dynamics, toy.evaluate).index == 0
    with pytest.raises(ValueError, match="root_tolerance"):
        SearchConfig(root_tolerance=-0.1)
