"""MAGNET loss: cross-entropy plus a KL term that keeps input-space patient similarity on graph edges."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from magnet_core.model.config import MAX_LABEL_TAU

DENSE_GRAM_MAX_NODES = 4096  # the n x n Gram shortcut only for graphs this small ...
DENSE_GRAM_MIN_DENSITY = 1 / 16  # ... and this dense (edges / n^2); sparse (top-k) graphs always go per edge
EDGE_CHUNK = 16384  # edges per chunk of the per-edge path: memory O(chunk x d), never O(E x d)


class _EdgeSquaredDistance(torch.autograd.Function):
    """``|e_src - e_dst|^2`` per edge, computed and differentiated in chunks of edges (no E x d tensor is kept)."""

    @staticmethod
    def forward(ctx, emb: Tensor, src: Tensor, dst: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        out = emb.new_empty(src.numel())
        for s in range(0, src.numel(), chunk):
            d = emb[src[s : s + chunk]] - emb[dst[s : s + chunk]]
            out[s : s + chunk] = (d * d).sum(dim=1)
        ctx.save_for_backward(emb, src, dst)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        emb, src, dst = ctx.saved_tensors
        grad = torch.zeros_like(emb)
        for s in range(0, src.numel(), ctx.chunk):
            i, j = src[s : s + ctx.chunk], dst[s : s + ctx.chunk]
            w = (emb[i] - emb[j]).mul_(2.0 * grad_out[s : s + ctx.chunk].unsqueeze(1))
            grad.index_add_(0, i, w)
            grad.index_add_(0, j, w.neg_())
        return grad, None, None, None


def edge_squared_distances(embeddings: Tensor, edge_index: Tensor, chunk: int = EDGE_CHUNK) -> Tensor:
    """Squared Euclidean distance between the embeddings of each edge's endpoints, O(E) memory."""
    return _EdgeSquaredDistance.apply(embeddings, edge_index[0], edge_index[1], chunk)


def similarity_kl_loss(edge_index: Tensor, edge_weight: Tensor, embeddings: Tensor, alpha: float = 1.0,
                       eps: float = 1e-12) -> Tensor:
    r"""KL(P || Q) over the graph's edges.

    P is the input-space similarity ``edge_weight`` normalised over the edges; Q is a Student-t kernel
    :math:`q_{ij} = (1 + \lVert e_i - e_j\rVert^2/\alpha)^{-(\alpha+1)/2}` on the embeddings, normalised over the
    same edges. Equal to the reference's dense N x N computation masked to the edge set, in O(E): a small dense
    graph uses one n x n Gram matmul; any other graph (every top-k graph) works edge by edge, in chunks.
    """
    if edge_index.numel() == 0:
        return embeddings.sum() * 0.0
    src, dst = edge_index
    n, num_edges = embeddings.size(0), edge_index.size(1)
    if n <= DENSE_GRAM_MAX_NODES and num_edges >= DENSE_GRAM_MIN_DENSITY * n * n:
        sq = (embeddings * embeddings).sum(dim=1)
        gram = embeddings @ embeddings.T  # one n x n matmul beats gathering E x d rows on dense graphs
        # index_select, not advanced indexing: its backward (index_add) sums in a fixed order with several threads
        pairs = gram.reshape(-1).index_select(0, src * n + dst)
        dist_sq = (sq.index_select(0, src) + sq.index_select(0, dst) - 2.0 * pairs).clamp_min(0.0)
    else:
        dist_sq = edge_squared_distances(embeddings, edge_index)
    q = (1.0 + dist_sq / alpha).pow(-(alpha + 1.0) / 2.0)
    q = torch.clamp(q / (q.sum() + eps), min=eps)
    p = torch.clamp(edge_weight / (edge_weight.sum() + eps), min=eps)
    return torch.sum(p * torch.log(p / q))


LABEL_ADJUSTMENTS = ("none", "logit-adjust", "fedlc")


def label_offsets(counts: Tensor, kind: str, tau: float) -> Tensor | None:
    r"""Per-class offsets added to the logits inside the training loss only (prediction uses the raw logits), from
    a site's own training-label counts ``counts`` (C,). None for "none" or ``tau`` = 0 (plain cross-entropy).

    - "logit-adjust": :math:`\tau \log \pi_c`, :math:`\pi_c = n_c / \sum_j n_j` -- the logit-adjusted loss of
      Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (eq. 10); :math:`\tau = 1` is the
      Balanced Softmax of Ren et al., "Balanced Meta-Softmax for long-tailed visual recognition", NeurIPS 2020.
      Minimising it makes the raw logits estimate the class-balanced posterior, so a site whose patients are
      mostly of one class does not teach the shared model that class's prior.
    - "fedlc": :math:`-\tau\, n_c^{-1/4}` -- the logits calibration of FedLC, Zhang et al., "Federated learning
      with label distribution skew via logits calibration", ICML 2022 (eq. 8; as the authors' public code, the
      softmax's denominator runs over all classes).

    A class with no training patient at the site gets :math:`-\infty` in both (its softmax share is 0): the site
    neither raises nor lowers that class's logit, instead of pushing it down on every patient it has."""
    if kind not in LABEL_ADJUSTMENTS:
        raise ValueError(f"unknown label adjustment {kind!r}; choose one of {list(LABEL_ADJUSTMENTS)}")
    if not (0.0 <= tau <= MAX_LABEL_TAU):
        raise ValueError(f"label-adjustment tau must be in [0, {MAX_LABEL_TAU}], got {tau}")
    if kind == "none" or tau == 0.0:
        return None
    counts = counts.to(torch.float64)
    if counts.dim() != 1 or bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(f"label counts must be a 1-d vector of counts >= 0 with a positive one, got {counts}")
    absent = counts == 0
    safe = counts.clamp_min(1.0)
    out = tau * torch.log(safe / counts.sum()) if kind == "logit-adjust" else -tau * safe.pow(-0.25)
    return out.masked_fill(absent, float("-inf")).to(torch.float32)


def magnet_loss(logits: Tensor, y: Tensor, edge_index: Tensor, edge_weight: Tensor, fused: Tensor,
                kl_weight: float = 0.1, offsets: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on ``logits``/``y`` plus ``kl_weight`` times the similarity KL on ``fused``. ``offsets`` (C,)
    (:func:`label_offsets`) are added to the logits inside the cross-entropy only."""
    ce = F.cross_entropy(logits if offsets is None else logits + offsets.to(logits.dtype), y)
    kl = similarity_kl_loss(edge_index, edge_weight, fused)
    total = ce + kl_weight * kl
    return total, {"ce": float(ce.detach()), "kl": float(kl.detach()), "loss": float(total.detach())}
