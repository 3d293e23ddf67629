"""Sparse top-k graph: equals a brute-force top-k on the dense similarity, keeps MAGNET's graph invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.graph import build_patient_graph, masked_cosine_similarity
from magnet_core.model.graph_topk import build_graph, build_graph_auto, build_topk_graph


def _cohort(n=120, seed=0):
    c = make_generated_cohort(n=n, dims={"a": 12, "b": 9, "c": 5}, missing={"a": 0.4, "b": 0.4, "c": 0.5}, seed=seed)
    return [torch.from_numpy(c.X[m]) for m in c.modalities], torch.from_numpy(c.mask)


def _brute_force(xs, mask, k):
    sim = masked_cosine_similarity(xs, mask)
    n = sim.size(0)
    adj = torch.zeros(n, n)
    val, idx = sim.topk(k, dim=1)
    for i in range(n):
        for v, j in zip(val[i].tolist(), idx[i].tolist()):
            if v > 0:
                adj[i, j] = adj[j, i] = v
    return adj


def _dense(graph):
    adj = torch.zeros(graph.num_nodes, graph.num_nodes)
    adj[graph.edge_index[0], graph.edge_index[1]] = graph.edge_weight
    return adj


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("k", [1, 5])
def test_topk_equals_brute_force(k, fast):
    xs, mask = _cohort()
    ours = _dense(build_topk_graph(xs, mask, k=k, block=16, fast=fast))
    torch.testing.assert_close(ours, _brute_force(xs, mask, k), atol=1e-5, rtol=1e-5)


def test_block_size_does_not_change_the_graph():
    xs, mask = _cohort(seed=1)
    a = _dense(build_topk_graph(xs, mask, k=4, block=7, fast=False))
    b = _dense(build_topk_graph(xs, mask, k=4, block=1000, fast=False))
    torch.testing.assert_close(a, b)


def test_full_k_gives_every_positive_similarity_and_invariants_hold():
    xs, mask = _cohort(n=40, seed=2)
    groups = np.arange(40) % 2
    g = build_topk_graph(xs, mask, k=39, groups=groups, fast=False)
    adj = _dense(g)
    assert torch.all(g.edge_index[0] != g.edge_index[1])
    torch.testing.assert_close(adj, adj.T)
    gr = torch.as_tensor(groups)
    assert torch.all(gr[g.edge_index[0]] == gr[g.edge_index[1]])
    assert torch.all((mask[g.edge_index[0]] & mask[g.edge_index[1]]).any(dim=1))
    for grp in (0, 1):
        idx = torch.as_tensor(np.flatnonzero(groups == grp))
        sim = masked_cosine_similarity([x[idx] for x in xs], mask[idx])
        torch.testing.assert_close(adj[idx][:, idx], sim, atol=1e-5, rtol=1e-5)


def test_topk_edges_above_the_dense_threshold_are_dense_edges():
    """Where both rules should agree they do: a top-k edge whose similarity reaches the dense rule's quantile
    threshold is an edge of the dense graph too, with the same weight."""
    xs, mask = _cohort(seed=3)
    sim = masked_cosine_similarity(xs, mask)
    threshold = sim.flatten().sort().values[int(0.8 * sim.numel())]
    dense = _dense(build_patient_graph(xs, mask, None, 0.8))
    top = build_topk_graph(xs, mask, k=5, fast=False)
    strong = top.edge_weight >= threshold
    assert strong.sum() > 0
    i, j = top.edge_index[:, strong]
    torch.testing.assert_close(dense[i, j], top.edge_weight[strong], atol=1e-6, rtol=1e-6)


def test_auto_chooses_dense_for_paper_sized_cohorts():
    xs, mask = _cohort(n=60, seed=4)
    auto = build_graph_auto(xs, mask, None, sparsity=0.8)
    dense = build_patient_graph(xs, mask, None, 0.8)
    assert torch.equal(auto.edge_index, dense.edge_index)
    assert build_graph_auto(xs, mask, None, k=3).num_edges <= 2 * 3 * 60


def test_build_graph_by_rule_and_the_auto_threshold():
    xs, mask = _cohort(n=60, seed=5)
    dense = build_graph(xs, mask, "dense", sparsity=0.8)
    top = build_graph(xs, mask, "topk", k=3)
    assert dense.rule == "dense" and top.rule == "topk"
    assert torch.equal(dense.edge_index, build_patient_graph(xs, mask, None, 0.8).edge_index)
    assert torch.equal(top.edge_index, build_topk_graph(xs, mask, k=3).edge_index)
    assert build_graph(xs, mask, "auto", dense_max=60).rule == "dense"
    assert build_graph(xs, mask, "auto", k=3, dense_max=59).rule == "topk"
    with pytest.raises(ValueError, match="k must be"):
        build_graph(xs, mask, "topk", k=0)
