"""Image-text adherence, CLIP-style (Radford et al. 2021), built offline: two linear projections of frozen
image features (`metrics.adherence.image_features`) and frozen text features to a shared space,
L2-normalised, a learned temperature, the symmetric InfoNCE loss. Text features are a plain (N, D) tensor:
this module does not depend on a text encoder. `aligntok.dit_eval` fits it on a dataset's real training
pairs and scores the retrieval of each generated image's own prompt among the validation prompts
(docs/metrics.md, "Adherence").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aligntok.metrics.adherence import load_head, save_head

MAX_LOG_SCALE = math.log(100.0)  # CLIP clips the logit scale (1 / temperature) at 100


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, caption_ids: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) of a batch of B (image, text) pairs, unit-norm (B, E) each,
    with duplicate captions handled: the target of image i is uniform over the texts whose caption equals
    its own (and symmetrically for texts), so a second image of the same caption is a positive, never a
    negative. Without duplicates it is exactly CLIP's loss: the mean of the two cross-entropies with targets
    arange(B). With k copies of a caption in the batch its rows' cross-entropy is floored at log(k) (the
    target's entropy) and its gradient vanishes when the copies share the probability equally.
    """
    logits = scale * image_emb @ text_emb.T  # (B, B): images x texts
    ids = torch.as_tensor(caption_ids, device=logits.device).flatten()
    same = (ids[:, None] == ids[None, :]).float()  # symmetric, so one matrix serves both directions
    target = same / same.sum(1, keepdim=True)
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target * logits.log_softmax(0)).sum(0).mean()
    return (i2t + t2i) / 2


def retrieval_ranks(similarity: Tensor, true_index: Tensor) -> Tensor:
    """Rank (1 = best) of each row's true column among all columns of `similarity` (N, M). Ties count
    against the true column (rank = number of columns scoring at least as high), so a constant score ranks
    last, not first."""
    idx = torch.as_tensor(true_index, device=similarity.device).long().flatten()
    if similarity.ndim != 2 or len(idx) != similarity.shape[0]:
        raise ValueError(
            f"need similarity (N, M) and N true indices, got {tuple(similarity.shape)}, {len(idx)}"
        )
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= similarity.shape[1]):
        raise ValueError(f"true_index must lie in 0..{similarity.shape[1] - 1} (the candidate columns)")
    true = similarity.gather(1, idx[:, None])  # (N, 1)
    return (similarity >= true).sum(1)


def retrieval_scores(similarity: Tensor, true_index: Tensor) -> dict[str, float]:
    """top1, top5 (fractions of rows whose true column ranks first / in the first five), mean_rank, and
    num_candidates with the chance levels of those (top1 1/M, top5 5/M, mean rank (M + 1) / 2)."""
    ranks = retrieval_ranks(similarity, true_index).float()
    m = similarity.shape[1]
    return {
        "top1": float((ranks <= 1).float().mean()),
        "top5": float((ranks <= 5).float().mean()),
        "mean_rank": float(ranks.mean()),
        "num_candidates": m,
        "chance_top1": 1 / m,
        "chance_top5": min(5, m) / m,
        "chance_mean_rank": (m + 1) / 2,
    }


class ContrastiveAdherence(nn.Module):
    """CLIP-style agreement of frozen image features (N, Di) and frozen text features (N, Dt).

    Each side is standardised with its training mean / std (buffers), projected linearly to `dim` and
    L2-normalised; `log_scale` is the learned log inverse temperature (clipped at log 100, as in CLIP).
    """

    KIND = "contrastive-adherence"

    def __init__(self, image_dim: int, text_dim: int, *, dim: int = 128, temperature: float = 0.07) -> None:
        super().__init__()
        if min(image_dim, text_dim, dim) < 1 or not temperature > 0:
            raise ValueError(
                f"need positive dims and temperature, got {image_dim}, {text_dim}, {dim}, {temperature}"
            )
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        for name, d in (("image", image_dim), ("text", text_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_std", torch.ones(d))
        self.record: dict[str, Any] = {}

    def _side(self, feats: Tensor, side: str) -> Tensor:
        mean, std = getattr(self, f"{side}_mean"), getattr(self, f"{side}_std")
        feats = torch.as_tensor(feats).to(mean.device, torch.float32)
        if feats.ndim != 2 or feats.shape[1] != len(mean):
            raise ValueError(f"{side} features must have shape (N, {len(mean)}), got {tuple(feats.shape)}")
        proj = self.image_proj if side == "image" else self.text_proj
        return F.normalize(proj((feats - mean) / std), dim=1)

    def embed_images(self, feats: Tensor) -> Tensor:
        """Unit embeddings (N, dim) of image features (N, Di)."""
        return self._side(feats, "image")

    def embed_texts(self, feats: Tensor) -> Tensor:
        """Unit embeddings (M, dim) of text features (M, Dt)."""
        return self._side(feats, "text")

    @torch.no_grad()
    def similarity(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarities (N, M) of every image with every text."""
        return self.embed_images(image_feats) @ self.embed_texts(text_feats).T

    @torch.no_grad()
    def scores(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity (N,) of each image with its own text (row i with row i)."""
        return (self.embed_images(image_feats) * self.embed_texts(text_feats)).sum(1)

    def retrieval(self, image_feats: Tensor, text_feats_of_candidates: Tensor, true_index: Tensor) -> dict:
        """For each image, the rank of its own prompt (`true_index` into the candidates, e.g. the unique
        validation prompts) among all candidates: `retrieval_scores`."""
        return retrieval_scores(self.similarity(image_feats, text_feats_of_candidates), true_index)

    def save(self, directory: str | Path) -> Path:
        record = {**self.record, "kind": self.KIND, "dims": self._dims()}
        return save_head(directory, dict(self.state_dict()), record)

    def _dims(self) -> dict[str, int]:
        return {
            "image": self.image_proj.in_features,
            "text": self.text_proj.in_features,
            "dim": self.image_proj.out_features,
        }

    @classmethod
    def load(cls, directory: str | Path) -> ContrastiveAdherence:
        state, record = load_head(directory, cls.KIND)
        dims = record["dims"]
        model = cls(dims["image"], dims["text"], dim=dims["dim"])
        model.load_state_dict(state)
        model.record = record
        return model.eval()


def _check_pairs(
    image_feats: Tensor, text_feats: Tensor, caption_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    xi, xt = torch.as_tensor(image_feats).float(), torch.as_tensor(text_feats).float()
    ids = torch.as_tensor(caption_ids).long().flatten()
    if xi.ndim != 2 or xt.ndim != 2 or not len(xi) == len(xt) == len(ids):
        raise ValueError(
            f"need image features (N, Di), text features (N, Dt) and N caption ids for N pairs, got "
            f"{tuple(xi.shape)}, {tuple(xt.shape)} and {len(ids)}"
        )
    if len(ids) < 2:
        raise ValueError("a contrastive model needs at least 2 (image, text) pairs")
    return xi, xt.to(xi.device), ids.to(xi.device)


def _train(
    model: ContrastiveAdherence,
    xi: Tensor,
    xt: Tensor,
    ids: Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
) -> Tensor:
    """`fit_contrastive`'s loop; returns the loss of every step (steps,)."""
    decay = [model.image_proj.weight, model.text_proj.weight]
    rest = [model.image_proj.bias, model.text_proj.bias, model.log_scale]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.empty(0, dtype=torch.long), 0, []
    model.train()
    for _ in range(steps):
        if pos + batch_size > len(order):  # a new epoch: every pair once, in a fresh order
            order, pos = torch.randperm(len(ids), generator=gen).to(xi.device), 0
        idx, pos = order[pos : pos + batch_size], pos + batch_size
        with torch.enable_grad():
            emb_i, emb_t = model.embed_images(xi[idx]), model.embed_texts(xt[idx])
            loss = contrastive_loss(emb_i, emb_t, ids[idx], model.log_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.log_scale.clamp_(max=MAX_LOG_SCALE)
        losses.append(loss.detach())
    return torch.stack(losses)


def fit_contrastive(
    image_feats: Tensor,
    text_feats: Tensor,
    caption_ids: Tensor,
    *,
    seed: int = 0,
    steps: int,
    lr: float,
    batch_size: int,
    dim: int = 128,
    weight_decay: float = 0.1,
    data: dict[str, Any] | None = None,
) -> ContrastiveAdherence:
    """Train `ContrastiveAdherence` on N (image, text) pairs: `image_feats` (N, Di), `text_feats` (N, Dt),
    `caption_ids` (N,) equal for pairs with the same caption (`contrastive_loss` makes them positives).

    AdamW (`lr`, `weight_decay` on the projection weights only), cosine decay to 0 over `steps`, batches of
    `batch_size` pairs drawn without replacement per epoch. Init and batches come from `seed` alone (the
    global RNG is left as it was). Runs on the device of `image_feats`. `data` describes the training pairs
    for the record (dataset, split, text encoder, ...).
    """
    xi, xt, ids = _check_pairs(image_feats, text_feats, caption_ids)
    if steps < 1 or batch_size < 2 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 2 and lr > 0, got {steps}, {batch_size}, {lr}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveAdherence(xi.shape[1], xt.shape[1], dim=dim).to(xi.device)
    for side, x in (("image", xi), ("text", xt)):
        getattr(model, f"{side}_mean").copy_(x.mean(0))
        getattr(model, f"{side}_std").copy_(x.std(0, unbiased=False) + 1e-6)
    bs = min(batch_size, len(ids))
    losses = _train(
        model, xi, xt, ids, steps=steps, lr=lr, weight_decay=weight_decay, batch_size=bs, seed=seed
    )
    model.record = {
        "data": dict(data or {}),
        "num_pairs": len(ids),
        "num_captions": int(ids.unique().numel()),
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "batch_size": bs,
        "weight_decay": weight_decay,
        "final_loss": float(losses[-20:].mean()),  # the mean of the last 20 steps
        "temperature": float(1 / model.log_scale.detach().exp()),
    }
    return model.eval()


__all__ = [
    "ContrastiveAdherence",
    "contrastive_loss",
    "fit_contrastive",
    "retrieval_ranks",
    "retrieval_scores",
]
