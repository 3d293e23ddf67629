"""MAGNET loss: the edge-list KL equals the reference's dense N x N formulation; CE + 0.1 KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import magnet_core.model.loss as loss_module
from magnet_core.model.graph import build_patient_graph
from magnet_core.model.loss import magnet_loss, similarity_kl_loss


def dense_reference_kl(similarities: torch.Tensor, embeddings: torch.Tensor, edge_mask: torch.Tensor,
                       alpha: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """The reference's ``similarity_kl_loss``: Student-t kernel on all N x N pairs, self pairs removed, both
    matrices masked to the edges, normalised, clamped at eps, KL(P || Q) summed over all N^2 entries."""
    n = embeddings.size(0)
    sum_sq = torch.sum(embeddings**2, dim=1)
    dist_sq = sum_sq.unsqueeze(1) + sum_sq.unsqueeze(0) - 2 * embeddings @ embeddings.T
    q = torch.pow(1 + dist_sq / alpha, -(alpha + 1) / 2) * (1 - torch.eye(n, dtype=embeddings.dtype))
    q = q.masked_fill(edge_mask == 0, 0.0)
    p = similarities.masked_fill(edge_mask == 0, 0.0)
    q = torch.clamp(q / (q.sum() + eps), min=eps)
    p = torch.clamp(p / (p.sum() + eps), min=eps)
    return torch.sum(p * torch.log(p / q))


def _dense(edge_index, edge_weight, n, dtype=torch.float64):
    adj = torch.zeros(n, n, dtype=dtype)
    adj[edge_index[0], edge_index[1]] = edge_weight.to(dtype)
    return adj


def _graph(n: int, seed: int, sparsity: float = 0.7):
    rng = np.random.default_rng(seed)
    xs = [rng.random((n, 6)).astype(np.float32), rng.random((n, 4)).astype(np.float32)]
    mask = rng.random((n, 2)) > 0.3
    mask[~mask.any(axis=1), 0] = True
    mask[:3] = False  # three patients in no edge at all (like test patients during training in the reference)
    return build_patient_graph(xs, mask, None, sparsity)


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 0.05), (2, 3.0), (3, 10.0)])
def test_kl_equals_dense_reference_formulation(seed, scale):
    n = 35
    graph = _graph(n, seed)
    emb = torch.randn(n, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
    weight = graph.edge_weight.double()
    ours = similarity_kl_loss(graph.edge_index, weight, emb)
    dense = _dense(graph.edge_index, weight, n)
    ref = dense_reference_kl(dense, emb, (dense > 0).double())
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert float(ours) > 0  # distributions differ: KL is positive


def test_kl_equals_dense_reference_in_float32_and_on_the_large_graph_path(monkeypatch):
    n = 40
    graph = _graph(n, 7)
    emb = torch.randn(n, 16, generator=torch.Generator().manual_seed(1))
    dense = _dense(graph.edge_index, graph.edge_weight, n, torch.float32)
    ref = dense_reference_kl(dense, emb, (dense > 0).float())
    gram = similarity_kl_loss(graph.edge_index, graph.edge_weight, emb)
    monkeypatch.setattr(loss_module, "DENSE_GRAM_MAX_NODES", 0)  # force the per-edge difference path
    gathered = similarity_kl_loss(graph.edge_index, graph.edge_weight, emb)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-6)


def test_kl_with_general_alpha_matches_dense_reference():
    n = 20
    graph = _graph(n, 3, sparsity=0.5)
    emb = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dense = _dense(graph.edge_index, graph.edge_weight, n)
    for alpha in (0.5, 2.0):
        torch.testing.assert_close(similarity_kl_loss(graph.edge_index, graph.edge_weight.double(), emb, alpha=alpha),
                                   dense_reference_kl(dense, emb, (dense > 0).double(), alpha=alpha),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("factor", [1.0, 0.01, 37.0])
def test_kl_is_zero_when_p_and_q_are_the_same_distribution(factor):
    n = 30
    graph = _graph(n, 5)
    emb = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    src, dst = graph.edge_index
    q = 1.0 / (1.0 + ((emb[src] - emb[dst]) ** 2).sum(dim=1))
    kl = similarity_kl_loss(graph.edge_index, factor * q, emb)  # p proportional to q
    assert abs(float(kl)) < 1e-9  # not exactly 0: the eps in the normalisers (as in the reference)
    perturbed = factor * q * torch.linspace(0.5, 1.5, q.numel(), dtype=torch.float64)
    assert float(similarity_kl_loss(graph.edge_index, perturbed, emb)) > 1e-6


def test_kl_gradient_flows_and_passes_gradcheck():
    n = 15
    graph = _graph(n, 6, sparsity=0.6)
    emb = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weight = graph.edge_weight.double()
    assert torch.autograd.gradcheck(lambda e: similarity_kl_loss(graph.edge_index, weight, e), (emb,))
    similarity_kl_loss(graph.edge_index, weight, emb).backward()
    in_edges = torch.zeros(n, dtype=torch.bool)
    in_edges[graph.edge_index.flatten()] = True
    assert emb.grad.abs().sum(dim=1)[in_edges].min() > 0  # every patient on an edge receives a gradient
    assert torch.all(emb.grad[~in_edges] == 0)  # patients on no edge are untouched
    assert torch.isfinite(emb.grad).all()


def test_kl_without_edges_is_zero_and_differentiable():
    emb = torch.randn(5, 3, requires_grad=True)
    kl = similarity_kl_loss(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), emb)
    assert float(kl.detach()) == 0.0
    kl.backward()
    assert torch.all(emb.grad == 0)


@pytest.mark.parametrize("kl_weight", [None, 0.5])
def test_magnet_loss_is_cross_entropy_plus_weighted_kl(kl_weight):
    n = 25
    graph = _graph(n, 8)
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(n, 3, generator=gen, requires_grad=True)
    fused = torch.randn(n, 6, generator=gen, requires_grad=True)
    y = torch.randint(0, 3, (n,), generator=gen)
    kwargs = {} if kl_weight is None else {"kl_weight": kl_weight}
    total, parts = magnet_loss(logits, y, graph.edge_index, graph.edge_weight, fused, **kwargs)
    w = 0.1 if kl_weight is None else kl_weight
    ce = F.cross_entropy(logits, y)
    kl = similarity_kl_loss(graph.edge_index, graph.edge_weight, fused)
    torch.testing.assert_close(total, ce + w * kl)
    ce_v, kl_v = float(ce.detach()), float(kl.detach())
    assert parts["ce"] == pytest.approx(ce_v) and parts["kl"] == pytest.approx(kl_v)
    assert parts["loss"] == pytest.approx(ce_v + w * kl_v) and parts["kl"] > 0
    g_total = torch.autograd.grad(total, [logits, fused])
    g_parts = torch.autograd.grad(ce + w * kl, [logits, fused])
    for a, b in zip(g_total, g_parts):
        torch.testing.assert_close(a, b)
