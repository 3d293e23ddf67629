"""Patient graph: masked cosine similarity on shared modalities, per-split quantile sparsification."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass
class PatientGraph:
    """Undirected weighted graph stored as both edge directions (``edge_index`` is 2 x E)."""

    edge_index: Tensor
    edge_weight: Tensor
    num_nodes: int
    rule: str = "dense"  # "dense" (MAGNET's quantile rule) or "topk" (sparse k-NN, large sites)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.size(1))

    def subgraph(self, nodes: np.ndarray | Tensor) -> "PatientGraph":
        """The graph induced on ``nodes`` with nodes relabelled 0..len(nodes)-1 in that order."""
        nodes = torch.as_tensor(np.asarray(nodes), dtype=torch.long)
        relabel = torch.full((self.num_nodes,), -1, dtype=torch.long)
        relabel[nodes] = torch.arange(len(nodes))
        src, dst = relabel[self.edge_index[0]], relabel[self.edge_index[1]]
        keep = (src >= 0) & (dst >= 0)
        return PatientGraph(torch.stack([src[keep], dst[keep]]), self.edge_weight[keep], len(nodes), self.rule)


def masked_cosine_similarity(xs: Sequence[Tensor], mask: Tensor, eps: float = 1e-8) -> Tensor:
    """|cos(x_i, x_j)| over the features of the modalities patients i and j share; 0 if they share none.

    ``xs[m]`` is (n, d_m) with rows of any value where ``mask[:, m]`` is False (they are ignored).
    With S = mask as float (n x M), G_m = X_m X_m^T and s_m the squared row norms:
        dot_ij   = sum_m S_im S_jm G_m[i, j]
        |x_i|^2  = sum_m S_im S_jm s_m[i]   (norm restricted to the shared modalities)
    all as matrix products; the diagonal is 0.
    """
    S = mask.to(torch.float32)
    # Rows of missing modalities are zeroed, so G_m[i, j] vanishes unless both hold m, and the sum over m of
    # the Gram matrices is one matmul of the concatenated features.
    X = torch.cat([torch.where(S[:, m : m + 1] > 0, x.to(torch.float32), 0.0) for m, x in enumerate(xs)], dim=1)
    sq = torch.stack([(X_m * X_m).sum(dim=1) for X_m in X.split([x.size(1) for x in xs], dim=1)], dim=1)
    dot = X @ X.T
    norm_i_sq = (S * sq) @ S.T  # [i, j] = sum_m S_im S_jm s_m[i]
    root = norm_i_sq.sqrt_()
    denom = root * root.T + eps
    sim = dot.div_(denom).abs_()
    sim.masked_fill_((S @ S.T) == 0, 0.0)  # no shared modality: no similarity
    sim.fill_diagonal_(0.0)
    return sim


def sparsify_quantile(sim: Tensor, sparsity: float) -> Tensor:
    """Keep entries at or above the ``sparsity`` quantile of all n^2 entries (MAGNET's rule), then give every
    patient without an edge its most similar patient (when that similarity is > 0). Returns a dense matrix."""
    n = sim.size(0)
    if n < 2:
        return torch.zeros_like(sim)
    flat = sim.flatten().sort().values
    threshold = flat[min(int(sparsity * flat.numel()), flat.numel() - 1)]
    adj = torch.where(sim >= threshold, sim, torch.zeros_like(sim))
    isolated = torch.nonzero((adj > 0).sum(dim=1) == 0).flatten().tolist()
    for i in isolated:  # a loop over isolated nodes only, never over pairs
        if (adj[i] > 0).any():
            continue  # got an edge from an earlier isolated neighbour
        j = int(torch.argmax(sim[i]))
        if sim[i, j] > 0:
            adj[i, j] = adj[j, i] = sim[i, j]
    return adj


def dense_to_graph(adj: Tensor) -> PatientGraph:
    """Edges where ``adj > 0`` (both directions), weighted by ``adj``."""
    edge_index = torch.nonzero(adj > 0).T.contiguous()
    return PatientGraph(edge_index, adj[edge_index[0], edge_index[1]].to(torch.float32), adj.size(0))


def build_patient_graph(
    xs: Sequence[Tensor | np.ndarray],
    mask: Tensor | np.ndarray,
    groups: np.ndarray | None = None,
    sparsity: float = 0.8,
) -> PatientGraph:
    """The MAGNET patient graph over all n patients; edges only inside each group (e.g. split or site).

    Similarities are computed and sparsified within each group separately, so no edge crosses a group boundary.
    """
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in xs]
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    n = mask.size(0)
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    groups = np.asarray(groups)
    edge_parts, weight_parts = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        it = torch.as_tensor(idx, dtype=torch.long)
        sim = masked_cosine_similarity([x[it] for x in xs], mask[it])
        local = dense_to_graph(sparsify_quantile(sim, sparsity))
        edge_parts.append(it[local.edge_index])
        weight_parts.append(local.edge_weight)
    edge_index = torch.cat(edge_parts, dim=1) if edge_parts else torch.zeros(2, 0, dtype=torch.long)
    edge_weight = torch.cat(weight_parts) if weight_parts else torch.zeros(0)
    return PatientGraph(edge_index, edge_weight, n)
