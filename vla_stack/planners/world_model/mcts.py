"""Sampled MCTS over action chunks in a latent model. Knows nothing about torch: the model comes in as three
callables over numpy arrays, so the search is tested on hand-built toy models.

    dynamics(latents (B, D), chunks (B, H, A)) -> next latents (B, D)          one "latent chunk-rollout" per row
    evaluate(latents (B, D)) -> scores (B,)                                     leaf value (value/progress heads)
    propose(latents (B, D), n, rng) -> chunks (B, n, H, A), log_pi (B, n), log_beta (B, n)

The root's children are given (the VLA's K sampled chunks); deeper nodes draw theirs from `propose`. A root
child may come with its own continuation (`root_continuations`: the rest of the VLA's sampled chunk, which
is longer than the H steps executed): the node it leads to then tries that continuation first (candidate 0,
half the node's prior), its child the next one, and so on; the proposals fill the other places.

- Sampled MuZero prior correction: a node's K sampled actions get prior (beta_hat / beta) * pi, i.e. for
  distinct samples pi(a)/beta(a) renormalised (uniform when sampling from pi itself, as for the VLA's chunks).
- Progressive widening: a node with N visits may use its first ceil(pw_k * N**pw_alpha) candidates.
- PUCT selection on min-max normalised Q (MuZero), first-play urgency = the parent's value.
- Backups: `mean` (MuZero: Q = the mean discounted leaf value below an edge) or `max` (the model is
  deterministic, so an edge is worth the discounted best of its child's own value and its children's: a node's
  value already estimates what the data's policy would get from there, and the search can only add what it
  finds; the root's pick is then the highest Q, best_of_k's pick unless lookahead finds better).
- Batched: each round selects up to `batch_size` distinct leaves with virtual loss, expands them with one
  dynamics/evaluate/propose call each, then backs up.
- Anytime: stops before a round that would end past the deadline, judged by the longest of the last three
  rounds (rounds vary with the tree's shape); `clock` is injectable so deadline behaviour is testable.
- Deterministic given `seed` (one numpy Generator; ties broken by index).
- Python's cyclic garbage collector is paused during a search: the tree has no reference cycles (refcounting
  frees it), and a full collection in a process holding torch, MuJoCo and the models (~410k objects) takes
  ~300 ms here, twice a deadline.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SearchConfig:
    deadline_s: float | None = 0.15
    max_simulations: int = 100_000
    batch_size: int = 128  # a 128-row predictor call is ~1.3x the rollouts/s of a 64-row one here
    c_puct: float = 1.25
    discount: float = 0.9  # per chunk
    pw_k: float = 3.0
    pw_alpha: float = 0.5
    children: int = 16  # candidates drawn per non-root node (widened progressively)
    max_depth: int = 12  # chunks below the root: a cap, rarely reached (discount 0.9**12 = 0.28)
    backup: str = "mean"  # or "max"
    # root children scored more than this below the best one-step score (the root child's own value) may not be
    # picked or searched: lookahead then only decides among candidates the one-step critic cannot tell apart
    root_tolerance: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backup not in ("mean", "max"):
            raise ValueError(f"backup must be 'mean' or 'max', got {self.backup!r}")
        if self.root_tolerance is not None and self.root_tolerance < 0:
            raise ValueError(f"root_tolerance must be >= 0 (or None), got {self.root_tolerance}")


_PENDING = object()  # marks a child whose expansion is in the current round's batch


class _Node:
    """Per-child statistics are plain lists: nodes have <= ~16 children, where Python beats numpy's overhead."""

    __slots__ = ("latent", "value", "depth", "follow", "cands", "logw", "child", "n", "w", "q", "visits",
                 "value_sum", "weight", "cum_weight")

    def __init__(self, latent: np.ndarray, value: float, depth: int, follow: np.ndarray | None = None):
        self.latent, self.value, self.depth = latent, float(value), depth
        self.follow = follow  # (C, H, A) continuation chunks: candidate 0 is follow[0] (None: proposals only)
        self.cands: np.ndarray | None = None  # (n, H, A)
        self.logw: np.ndarray = np.zeros(0)  # log(pi/beta) per candidate
        self.child: list[_Node | None] = []
        self.n: list[float] = []
        self.w: list[float] = []
        self.q: list[float] = []  # max backups: discounted best value below each child
        self.visits = 0
        self.value_sum = 0.0
        # unnormalised prior weights and their running sums: the prior over the first m (widened) candidates
        # is weight[i] / cum_weight[m - 1], so widening costs nothing
        self.weight: list[float] = []
        self.cum_weight: list[float] = []

    def set_candidates(self, cands: np.ndarray, logw: np.ndarray, weight: list[float], cum_weight: list[float]) -> None:
        k = len(cands)
        self.cands, self.logw, self.weight, self.cum_weight = cands, logw, weight, cum_weight
        self.child = [None] * k
        self.n, self.w, self.q = [0.0] * k, [0.0] * k, [-math.inf] * k

    def best(self) -> float:
        """max backups: the node's own value or the best of its expanded children's."""
        return max(self.value, max(self.q, default=-math.inf))


def prior_weights(log_pi: np.ndarray | None, log_beta: np.ndarray | None, shape: tuple[int, int]):
    """log(pi/beta) (B, n), its unnormalised weights and their running sums as nested lists: one numpy pass
    for a whole batch of new nodes."""
    logw = np.zeros(shape) if log_pi is None else np.asarray(log_pi, float).reshape(shape)
    if log_pi is not None and log_beta is not None:
        logw = logw - np.asarray(log_beta, float).reshape(shape)
    weight = np.exp(logw - logw.max(axis=1, keepdims=True))
    return logw, weight.tolist(), np.cumsum(weight, axis=1).tolist()


def sampled_prior(log_weights: np.ndarray) -> np.ndarray:
    """Normalised (beta_hat/beta)*pi for distinct samples, from log(pi/beta)."""
    x = np.exp(log_weights - log_weights.max())
    return x / x.sum()


@dataclass
class SearchResult:
    index: int  # root child chosen
    chunk: np.ndarray  # its action chunk (H, A)
    stats: dict = field(default_factory=dict)


class _MinMax:
    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf

    def update(self, v: float) -> None:
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)

    def norm(self, q: np.ndarray) -> np.ndarray:
        return (q - self.lo) / (self.hi - self.lo) if self.hi > self.lo else np.zeros_like(q)


def search(root_latent: np.ndarray, root_chunks: np.ndarray, dynamics, evaluate, propose,
           config: SearchConfig | None = None, root_log_pi: np.ndarray | None = None,
           root_log_beta: np.ndarray | None = None, clock=time.perf_counter,
           root_continuations: np.ndarray | None = None) -> SearchResult:
    """root_continuations: (K, C, H, A) the chunks that follow each root chunk in its proposer's plan."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _search(root_latent, root_chunks, dynamics, evaluate, propose, config or SearchConfig(),
                       root_log_pi, root_log_beta, clock, root_continuations)
    finally:
        if collecting:
            gc.enable()


def _search(root_latent, root_chunks, dynamics, evaluate, propose, cfg: SearchConfig, root_log_pi, root_log_beta,
            clock, root_continuations) -> SearchResult:
    start = clock()
    rng = np.random.default_rng(cfg.seed)
    root_chunks = np.asarray(root_chunks, np.float32)
    if root_chunks.ndim != 3 or len(root_chunks) == 0:
        raise ValueError(f"root_chunks must be (K >= 1, H, A), got {root_chunks.shape}")
    if root_continuations is not None:
        root_continuations = np.asarray(root_continuations, np.float32)
        if root_continuations.shape[:1] + root_continuations.shape[2:] != root_chunks.shape:
            raise ValueError(f"root_continuations must be (K, C, H, A) for root chunks {root_chunks.shape}, "
                             f"got {root_continuations.shape}")
        if not np.all(np.isfinite(root_continuations)):
            raise ValueError("search input contains NaN or inf")
    root_latent = np.asarray(root_latent, np.float32)
    if not np.all(np.isfinite(root_latent)) or not np.all(np.isfinite(root_chunks)):
        raise ValueError("search input contains NaN or inf")
    root = _Node(root_latent, float(evaluate(root_latent[None])[0]), 0)
    logw, weight, cum = prior_weights(root_log_pi, root_log_beta, (1, len(root_chunks)))
    root.set_candidates(root_chunks, logw[0], weight[0], cum[0])
    minmax = _MinMax()
    minmax.update(root.value)
    stats = {"simulations": 0, "rollouts": 0, "model_rounds": 0, "nodes": 1, "max_depth": 0, "stopped_by": None}
    recent_rounds = [0.0]  # durations of the last rounds: the next one is predicted to take their maximum

    pw_k, pw_alpha, c_puct, use_max = cfg.pw_k, cfg.pw_alpha, cfg.c_puct, cfg.backup == "max"
    tolerance = cfg.root_tolerance
    cut = [-math.inf]  # root children valued below this are out (root_tolerance)

    def out_of_band(node: _Node, i: int) -> bool:
        c = node.child[i]
        return node is root and isinstance(c, _Node) and c.value < cut[0]

    def select_child(node: _Node) -> int | None:
        """PUCT over the widened children; a child being expanded in this round (_PENDING) is skipped."""
        visits = node.visits
        m = min(len(node.child), max(1, math.ceil(pw_k * visits ** pw_alpha)))
        weight, n, w, q, child = node.weight, node.n, node.w, node.q, node.child
        fpu = node.value if use_max or not visits else node.value_sum / visits
        lo, span = minmax.lo, minmax.hi - minmax.lo
        inv = 1.0 / span if span > 0 else 0.0
        explore = c_puct * math.sqrt(visits + 1) / node.cum_weight[m - 1]
        best, best_i = -math.inf, None
        for i in range(m):
            if child[i] is _PENDING or (tolerance is not None and out_of_band(node, i)):
                continue
            ni = n[i]
            value = (q[i] if q[i] > -math.inf else fpu) if use_max else (w[i] / ni if ni else fpu)
            score = (value - lo) * inv + explore * weight[i] / (1 + ni)
            if score > best:
                best, best_i = score, i
        return best_i

    while True:
        if stats["simulations"] >= cfg.max_simulations:
            stats["stopped_by"] = "simulations"
            break
        if cfg.deadline_s is not None and clock() - start + max(recent_rounds) >= cfg.deadline_s:
            stats["stopped_by"] = "deadline"
            break
        round_start = clock()
        # ---- select up to batch_size distinct leaves (virtual loss: visits count before the backup)
        leaves: list[tuple[list[tuple[_Node, int]], _Node | None]] = []
        budget = min(cfg.batch_size, cfg.max_simulations - stats["simulations"])
        for _ in range(budget):
            node, path, i = root, [], None
            while True:
                i = select_child(node)
                if i is None:
                    break
                path.append((node, i))
                nxt = node.child[i]
                if nxt is None or nxt.depth >= cfg.max_depth or nxt.cands is None:
                    break
                node = nxt
            if i is None:  # everything below is being expanded this round
                break
            parent, i = path[-1]
            leaf = parent.child[i]
            if leaf is None:
                parent.child[i] = _PENDING
            vl = minmax.lo if math.isfinite(minmax.lo) else 0.0
            for p, j in path:  # virtual loss
                p.visits += 1
                p.n[j] += 1
                p.w[j] += vl
            leaves.append((path, leaf))
        if not leaves:
            stats["stopped_by"] = "exhausted"
            break
        # ---- expand the new leaves in one batch
        new = [(path, k) for k, (path, leaf) in enumerate(leaves) if leaf is None]
        if new:
            lat = np.stack([p[-1][0].latent for p, _ in new])
            acts = np.stack([p[-1][0].cands[p[-1][1]] for p, _ in new])
            nxt = np.asarray(dynamics(lat, acts), np.float32)
            vals = np.asarray(evaluate(nxt), float)
            if not (np.all(np.isfinite(nxt)) and np.all(np.isfinite(vals))):
                raise ValueError("the model returned NaN or inf")
            stats["rollouts"] += len(new)
            depths = [p[-1][0].depth + 1 for p, _ in new]
            follows = [_follow(*p[-1], root, root_continuations) for p, _ in new]
            grow = [j for j, d in enumerate(depths) if d < cfg.max_depth]
            growing = set(grow)
            if grow:
                cands, lp, lb = propose(nxt[grow], cfg.children, rng)
                cands = np.array(cands, np.float32)
                lp = np.zeros(cands.shape[:2]) if lp is None else np.array(lp, float).reshape(cands.shape[:2])
                lb = np.zeros(cands.shape[:2]) if lb is None else np.array(lb, float).reshape(cands.shape[:2])
                for g, j in enumerate(grow):  # the proposer's own plan first, with half the node's prior
                    if follows[j] is not None:
                        cands[g, 0] = follows[j][0]
                        others = lp[g, 1:] - lb[g, 1:]
                        lp[g, 0] = lb[g, 0] + (others.max() + np.log(np.exp(others - others.max()).sum())
                                               if len(others) else 0.0)
                logw, weight, cum = prior_weights(lp, lb, cands.shape[:2])
            g = 0
            for j, (path, k) in enumerate(new):
                parent, i = path[-1]
                node = _Node(nxt[j], vals[j], depths[j], follows[j])
                if j in growing:
                    node.set_candidates(cands[g], logw[g], weight[g], cum[g])
                    g += 1
                parent.child[i] = node
                if parent is root and tolerance is not None:
                    cut[0] = max(cut[0], node.value - tolerance)
                leaves[k] = (path, node)
                stats["nodes"] += 1
                stats["max_depth"] = max(stats["max_depth"], node.depth)
        # ---- back up: G = value(leaf), discounted once per chunk on the way up
        lo = minmax.lo if math.isfinite(minmax.lo) else 0.0
        for path, leaf in leaves:
            g_ret = leaf.value
            leaf.visits += 1
            leaf.value_sum += g_ret
            best = leaf.best()
            for p, j in reversed(path):
                g_ret = cfg.discount * g_ret
                p.w[j] += g_ret - lo  # replace the virtual loss
                p.value_sum += g_ret
                if use_max:
                    p.q[j] = cfg.discount * best
                    minmax.update(p.q[j])
                    best = p.best()
                else:
                    minmax.update(g_ret)
            stats["simulations"] += 1
        stats["model_rounds"] += 1
        recent_rounds = [*recent_rounds[-2:], clock() - round_start]

    # ---- decision: most visited root child (ties: higher Q, then lower index); max backups: highest Q
    n, w = np.array(root.n), np.array(root.w)
    q = np.array(root.q) if use_max else np.where(n > 0, w / np.maximum(n, 1), -np.inf)
    eligible = [i for i in range(len(n)) if n[i] > 0 and not out_of_band(root, i)]
    if not eligible:  # deadline before any expansion: the highest prior
        best = int(np.argmax(root.logw))
    elif use_max:
        best = max(eligible, key=lambda i: (q[i], n[i], -i))
    else:
        best = max(eligible, key=lambda i: (n[i], q[i], -i))
    stats["elapsed_s"] = clock() - start
    stats["root"] = {"visits": n.astype(int).tolist(),
                     "q": [None if not np.isfinite(v) else round(float(v), 5) for v in q],
                     "value": [round(c.value, 5) if isinstance(c, _Node) else None for c in root.child],
                     "prior": [round(float(p), 5) for p in sampled_prior(root.logw)],
                     "root_value": round(root.value, 5)}
    return SearchResult(best, root_chunks[best], stats)


def _follow(parent: _Node, i: int, root: _Node, root_continuations: np.ndarray | None) -> np.ndarray | None:
    """The continuation chunks a new child (parent's candidate i) starts with, or None."""
    if parent is root:
        rest = None if root_continuations is None else root_continuations[i]
    else:
        rest = parent.follow[1:] if parent.follow is not None and i == 0 else None
    return rest if rest is not None and len(rest) else None


def best_of_k(root_latent: np.ndarray, root_chunks: np.ndarray, dynamics, evaluate) -> SearchResult:
    """The no-search baseline: roll every candidate one chunk ahead, keep the best-scored one."""
    root_chunks = np.asarray(root_chunks, np.float32)
    lat = np.repeat(np.asarray(root_latent, np.float32)[None], len(root_chunks), 0)
    vals = np.asarray(evaluate(np.asarray(dynamics(lat, root_chunks), np.float32)), float)
    best = int(np.argmax(vals))
    return SearchResult(best, root_chunks[best], {"rollouts": len(root_chunks), "values": vals.round(5).tolist()})
