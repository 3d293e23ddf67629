"""Inductive placement of new patients: attach them to a site's reference patients without touching their edges."""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from magnet_core.model.graph import PatientGraph, masked_cosine_similarity
from magnet_core.model.network import MAGNET


class AttachRule(BaseModel):
    """How a new patient is linked to the reference patients (and, optionally, to the other new patients).

    ``quantile``: every reference patient whose similarity reaches the reference graph's own threshold (the
    ``sparsity`` quantile of the reference similarities, MAGNET's rule; see :attr:`Reference.threshold`), else the
    single most similar one.
    ``topk``: the ``k`` most similar reference patients. Only patients sharing a modality are ever linked.
    Edges run from reference to new patients only, so the reference patients' representations never change and,
    without ``link_new``, a patient's prediction does not depend on the other patients of its batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["quantile", "topk"] = "quantile"
    k: int = Field(10, ge=1, description="topk rule: reference neighbours per new patient")
    link_new: bool = Field(False, description="also link new patients among themselves (same rule, both ways); "
                                              "predictions then depend on the batch")


def default_attach_rule(n_reference: int, k: int = 10) -> AttachRule:
    """The rule that matches how training builds the reference graph ("auto"): MAGNET's quantile rule up to
    ``graph_topk.DENSE_MAX_PATIENTS`` reference patients, the ``k`` nearest above. `magnet-fl predict --attach
    auto` uses it; evaluation under "attach-to-train" must use the same to measure what predict does."""
    from magnet_core.model.graph_topk import DENSE_MAX_PATIENTS

    return AttachRule(rule="quantile" if n_reference <= DENSE_MAX_PATIENTS else "topk", k=k)


def masked_cosine_cross(xs_a: Sequence[Tensor], mask_a: Tensor, xs_b: Sequence[Tensor], mask_b: Tensor,
                        eps: float = 1e-8) -> Tensor:
    """(n_a, n_b) |cos| between patients of two sets over the modalities each pair shares; 0 if they share none.

    The same quantity as :func:`magnet_core.model.graph.masked_cosine_similarity` (which compares a set with itself):
    both norms are restricted to the pair's shared modalities."""
    sa, sb = mask_a.to(torch.float32), mask_b.to(torch.float32)

    def stacked(xs: Sequence[Tensor], s: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([torch.where(s[:, m : m + 1] > 0, t.to(torch.float32), 0.0) for m, t in enumerate(xs)], 1)
        sq = torch.stack([(p * p).sum(dim=1) for p in x.split([t.size(1) for t in xs], dim=1)], dim=1)
        return x, sq

    xa, sqa = stacked(xs_a, sa)
    xb, sqb = stacked(xs_b, sb)
    dot = xa @ xb.T
    norm_a = ((sa * sqa) @ sb.T).sqrt_()  # |x_a| over the modalities a shares with b
    norm_b = (sa @ (sb * sqb).T).sqrt_()  # |x_b| over the same modalities
    sim = dot.div_(norm_a * norm_b + eps).abs_()
    sim.masked_fill_((sa @ sb.T) == 0, 0.0)
    return sim


def quantile_threshold(sim: Tensor, sparsity: float) -> float:
    """The similarity at the ``sparsity`` quantile of all n^2 entries, exactly as :func:`sparsify_quantile` keeps."""
    flat = sim.flatten().sort().values
    if flat.numel() == 0:
        return float("inf")
    return float(flat[min(int(sparsity * flat.numel()), flat.numel() - 1)])


@dataclasses.dataclass
class Reference:
    """A site's reference patients (its training patients) with their own graph (kept as it is)."""

    xs: list[Tensor]
    mask: Tensor
    graph: PatientGraph
    sparsity: float  # the reference graph's sparsity (its quantile rule)
    ids: np.ndarray | None = None
    _threshold: float | None = dataclasses.field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.mask.size(0))

    @property
    def threshold(self) -> float:
        """The quantile rule's similarity threshold: the ``sparsity`` quantile of the reference similarities
        (n^2 entries, computed once, only when the quantile rule asks for it)."""
        if self._threshold is None:
            self._threshold = quantile_threshold(masked_cosine_similarity(self.xs, self.mask), self.sparsity)
        return self._threshold

    @classmethod
    def build(cls, xs: Sequence[Tensor | np.ndarray], mask: Tensor | np.ndarray, sparsity: float,
              ids: Sequence[str] | np.ndarray | None = None) -> "Reference":
        """Reference graph as training builds it (``build_graph_auto``: MAGNET's dense quantile rule up to
        ``DENSE_MAX_PATIENTS`` patients, identical to ``build_patient_graph``; the sparse top-k graph above)."""
        from magnet_core.model.graph_topk import build_graph_auto

        xs = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in xs]
        mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        graph = build_graph_auto(xs, mask, None, sparsity)
        return cls(xs, mask, graph, sparsity, None if ids is None else np.asarray(ids))

    @classmethod
    def from_patient_set(cls, patients, sparsity: float, ids: Sequence[str] | np.ndarray | None = None
                         ) -> "Reference":
        """Reuse a :class:`magnet_core.model.train.PatientSet` (e.g. a site's training set) and its existing graph."""
        return cls(list(patients.xs), patients.mask, patients.graph, sparsity,
                   None if ids is None else np.asarray(ids))


@dataclasses.dataclass
class Attachment:
    """Reference patients (nodes 0..R-1) followed by new patients (R..R+N-1) in one graph."""

    xs: list[Tensor]
    mask: Tensor
    graph: PatientGraph
    num_reference: int
    reference_neighbours: np.ndarray  # (N,) reference patients each new patient receives messages from
    no_shared_modality: np.ndarray  # (N,) True: shares no modality with any reference patient (no reference edge)


def _select(sim: Tensor, rule: AttachRule, threshold: float) -> Tensor:
    """Boolean (N, R) choice of reference neighbours for each new patient (a row at a time: no batch effect)."""
    positive = sim > 0
    if rule.rule == "topk":
        k = min(rule.k, sim.size(1))
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        chosen = torch.zeros_like(positive)
        chosen.scatter_(1, order, True)
        return chosen & positive
    chosen = (sim >= threshold) & positive
    lonely = ~chosen.any(dim=1) & positive.any(dim=1)  # MAGNET's rule for isolated patients: the best match
    if lonely.any():
        best = torch.sort(sim[lonely], dim=1, descending=True, stable=True).indices[:, 0]
        chosen[torch.nonzero(lonely).flatten(), best] = True
    return chosen


def _new_new(xs: list[Tensor], mask: Tensor, rule: AttachRule, threshold: float) -> tuple[Tensor, Tensor]:
    """Boolean symmetric (N, N) links among new patients by the same rule, and their similarities."""
    sim = masked_cosine_similarity(xs, mask)
    if rule.rule == "topk":
        k = min(rule.k, max(sim.size(0) - 1, 0))
        if k == 0:
            return torch.zeros_like(sim, dtype=torch.bool), sim
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        chosen = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, order, True)
        chosen = chosen | chosen.T
    else:
        chosen = sim >= threshold
    chosen &= sim > 0
    chosen.fill_diagonal_(False)
    return chosen, sim


def attach_new_patients(reference: Reference, xs_new: Sequence[Tensor | np.ndarray], mask_new: Tensor | np.ndarray,
                        rule: AttachRule, new_ids: Sequence[str] | np.ndarray | None = None) -> Attachment:
    """Place new patients in the reference graph. The reference edges are kept as they are; each new patient gets
    directed edges from its chosen reference patients (and, with ``link_new``, undirected edges among the new
    patients). A new patient whose id is also a reference id is never linked to that reference copy of itself."""
    xs_new = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in xs_new]
    mask_new = torch.as_tensor(np.asarray(mask_new), dtype=torch.bool)
    if len(xs_new) != len(reference.xs) or mask_new.size(1) != reference.mask.size(1):
        raise ValueError(f"new patients have {len(xs_new)} modalities, the reference {len(reference.xs)}")
    r, n = reference.n, int(mask_new.size(0))
    sim = masked_cosine_cross(xs_new, mask_new, reference.xs, reference.mask)
    if new_ids is not None and reference.ids is not None:
        same = torch.from_numpy(np.asarray(new_ids, dtype=str)[:, None] == reference.ids.astype(str)[None, :])
        sim.masked_fill_(same, 0.0)
    shares = (mask_new.to(torch.float32) @ reference.mask.to(torch.float32).T) > 0
    threshold = reference.threshold if rule.rule == "quantile" else float("inf")
    chosen = _select(sim, rule, threshold)
    new_idx, ref_idx = torch.nonzero(chosen, as_tuple=True)
    parts = [reference.graph.edge_index, torch.stack([ref_idx, new_idx + r])]
    weights = [reference.graph.edge_weight, sim[new_idx, ref_idx].to(torch.float32)]
    if rule.link_new and n > 1:
        links, sim_nn = _new_new(xs_new, mask_new, rule, threshold)
        a, b = torch.nonzero(links, as_tuple=True)
        parts.append(torch.stack([a + r, b + r]))
        weights.append(sim_nn[a, b].to(torch.float32))
    graph = PatientGraph(torch.cat(parts, dim=1), torch.cat(weights), r + n)
    xs = [torch.cat([x_ref, x_new]) for x_ref, x_new in zip(reference.xs, xs_new)]
    return Attachment(xs, torch.cat([reference.mask, mask_new]), graph, r,
                      chosen.sum(dim=1).numpy().astype(np.int64), (~shares.any(dim=1)).numpy())


@dataclasses.dataclass
class InductivePrediction:
    """Class probabilities of new patients and how each was placed."""

    probs: np.ndarray  # (N, C)
    reference_neighbours: np.ndarray  # (N,)
    no_shared_modality: np.ndarray  # (N,) bool


@torch.no_grad()
def predict_new(model: MAGNET, reference: Reference, xs_new: Sequence[Tensor | np.ndarray],
                mask_new: Tensor | np.ndarray, rule: AttachRule, new_ids: Sequence[str] | np.ndarray | None = None,
                batch_size: int = 512, on_batch: Callable[[int], None] | None = None) -> InductivePrediction:
    """Probabilities (eval mode) for new patients attached to ``reference``.

    Without ``link_new`` the patients are scored ``batch_size`` at a time (the answer does not depend on the
    batch); with it, all at once (they link among themselves). ``on_batch(done)`` reports progress."""
    xs_new = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in xs_new]
    mask_new = torch.as_tensor(np.asarray(mask_new), dtype=torch.bool)
    n = int(mask_new.size(0))
    ids = None if new_ids is None else np.asarray(new_ids, dtype=str)
    model.eval()
    step = n if rule.link_new else max(1, batch_size)
    probs, neighbours, lonely = [], [], []
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        att = attach_new_patients(reference, [x[sl] for x in xs_new], mask_new[sl], rule,
                                  None if ids is None else ids[sl])
        logits, _ = model(att.xs, att.mask, att.graph.edge_index, att.graph.edge_weight)
        probs.append(torch.softmax(logits[att.num_reference:], dim=-1).numpy())
        neighbours.append(att.reference_neighbours)
        lonely.append(att.no_shared_modality)
        if on_batch is not None:
            on_batch(sl.stop)
    if not probs:
        return InductivePrediction(np.zeros((0, int(model.head_out.out_channels)), np.float32),
                                   np.zeros(0, np.int64), np.zeros(0, bool))
    return InductivePrediction(np.concatenate(probs), np.concatenate(neighbours), np.concatenate(lonely))
