"""Prediction quality of a trained world model on held-out episodes.

Open-loop latent error vs horizon h = 1..chunks*H steps: from z_t (encoded), roll the predictor chunk by chunk on
the recorded actions (never re-encoding) and compare with the encoded z_{t+h}. The copy-last baseline predicts
z_{t+h} = z_t. Errors are mean squared distances divided by the mean latent variance (so 1.0 = as far as two
random latents are apart along each dim, on average). Also the collapse check: covariance spectrum of the
held-out embeddings (sigreg.effective_rank), and value-head accuracy at telling success from failure.
`branch_choice`: on held-out branched rollouts, how often the planner's one-step score picks a chunk that did
succeed, against the first candidate, a random one and the best. Goal-offset models read the replayed offsets
here (the heads and dynamics are judged; the keypoint reader is judged on its own, train.fit_keypoint_reader)."""

from __future__ import annotations

import numpy as np
import torch

from vla_stack.planners.world_model.sigreg import effective_rank


@torch.inference_mode()
def encode_episode(model, ep) -> torch.Tensor:
    images = episode_images(ep)
    return torch.cat([model.encode(images[i:i + 256], torch.from_numpy(ep.state[i:i + 256]))
                      for i in range(0, len(images), 256)])


def episode_images(ep) -> torch.Tensor:
    return torch.from_numpy(ep.images).permute(0, 1, 4, 2, 3).float() / 255.0


def raw_commands(model, ep) -> np.ndarray:
    """The command sent before each frame (the joint state before the first), raw: what heads_command heads read."""
    return np.concatenate([ep.state[:1, :model.config.action_dim], ep.action[:-1]]).astype(np.float32)


def episode_commands(model, ep) -> torch.Tensor | None:
    """raw_commands normalised, or None for a model whose heads do not read them."""
    if not model.config.heads_command:
        return None
    return model.norm_action(torch.from_numpy(raw_commands(model, ep)))


@torch.inference_mode()
def prediction_quality(model, episodes, chunks: int = 2, stride: int = 2) -> dict:
    H = model.config.chunk
    horizon = chunks * H
    sq_model = np.zeros(horizon)
    sq_copy = np.zeros(horizon)
    counts = np.zeros(horizon)
    all_z, values, labels = [], [], []
    for ep in episodes:
        z = encode_episode(model, ep)
        all_z.append(z)
        g = model.embed_goal([ep.instruction]).expand(len(z), -1)
        # goal_offset models: the labels (the reader is judged apart)
        offset = torch.from_numpy(ep.offset) if model.config.goal_offset else None
        values.append(model.value(z, g, episode_commands(model, ep), offset).numpy())
        labels.append(np.full(len(z), ep.success))
        T = len(z)
        starts = np.arange(0, T - 1, stride)
        if len(starts) == 0:
            continue
        a = torch.from_numpy(ep.action)
        cur = z[starts]
        for c in range(chunks):
            idx = np.minimum(starts[:, None] + c * H + np.arange(H)[None], T - 1)
            preds = model.predict(cur, model.norm_action(a[torch.from_numpy(idx)]))  # (S, H, D)
            for j in range(H):
                h = c * H + j + 1
                valid = starts + h <= T - 1
                if not valid.any():
                    continue
                target = z[starts[valid] + h]
                sq_model[h - 1] += (preds[valid, j] - target).square().mean(-1).sum().item()
                sq_copy[h - 1] += (z[starts[valid]] - target).square().mean(-1).sum().item()
                counts[h - 1] += valid.sum()
            cur = preds[:, -1]
    zcat = torch.cat(all_z)
    var = zcat.var(0).mean().item()
    ok = counts > 0
    err_model = np.where(ok, sq_model / np.maximum(counts, 1) / var, np.nan)
    err_copy = np.where(ok, sq_copy / np.maximum(counts, 1) / var, np.nan)
    v, y = np.concatenate(values), np.concatenate(labels)
    out = {
        "episodes": len(episodes),
        "frames": int(len(zcat)),
        "horizons": list(range(1, horizon + 1)),
        "samples_per_horizon": counts.astype(int).tolist(),
        "latent_error_model": [round(float(e), 4) for e in err_model],
        "latent_error_copy_last": [round(float(e), 4) for e in err_copy],
        "model_beats_copy_last_at_every_horizon_to_chunk": bool(np.all((err_model < err_copy)[:H][ok[:H]])),
        "model_beats_copy_last_at_every_horizon": bool(np.all((err_model < err_copy)[ok])),
        "latent_variance_per_dim": round(var, 5),
        "collapse_check": effective_rank(zcat),
        "value_mean_success_episodes": round(float(v[y].mean()), 4) if y.any() else None,
        "value_mean_failed_episodes": round(float(v[~y].mean()), 4) if (~y).any() else None,
    }
    return out


@torch.inference_mode()
def branch_choice(model, episodes, progress_weight: float = 0.25) -> dict | None:
    """Per branch point (K candidates tried from one state, collect_branched): the success of the candidate
    best_of_k would pick (value + progress_weight * progress of its predicted latent) vs candidate 0 (the
    VLA's own first sample), the mean over candidates (a random pick) and any (a perfect critic)."""
    from vla_stack.planners.world_model.model import LatentSearchModel

    picked, first, mean, best, mixed = [], [], [], [], 0
    for ep in episodes:
        groups: dict[int, list[dict]] = {}
        for b in ep.branches:
            groups.setdefault(b["t"], []).append(b)
        if not groups:
            continue
        lsm = LatentSearchModel(model, model.embed_goal([ep.instruction]), progress_weight)
        z = encode_episode(model, ep)
        commands = raw_commands(model, ep) if model.config.heads_command else None
        for t, group in sorted(groups.items()):
            chunks = model.norm_action(torch.from_numpy(np.stack([b["chunk"] for b in group]))).numpy()
            command = None if commands is None else commands[t]
            root = lsm.root(z[t].numpy(), command, ep.state[t], ep.offset[t] if model.config.goal_offset else None)
            latents = np.repeat(root[None], len(group), 0)
            scores = lsm.evaluate(lsm.dynamics(latents, chunks))
            ok = np.array([b["success"] for b in group])
            picked.append(ok[int(np.argmax(scores))])
            first.append(ok[0])
            mean.append(ok.mean())
            best.append(ok.any())
            mixed += 0 < ok.sum() < len(ok)
    if not picked:
        return None
    return {"points": len(picked), "mixed_points": int(mixed),
            **{f"success_{k}": round(float(np.mean(v)), 4)
               for k, v in (("picked", picked), ("first", first), ("random", mean), ("best", best))}}
