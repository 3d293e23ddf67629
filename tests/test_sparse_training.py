"""Training on the sparse top-k graph: KL over its edges only, never an n x n matrix, neighbour sampling, seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import magnet_core.model.train as train_module
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.config import ModelConfig, TrainConfig
from magnet_core.model.graph_topk import NeighbourSampler, build_graph, build_topk_graph
from magnet_core.model.loss import edge_squared_distances, similarity_kl_loss
from magnet_core.model.network import build_model
from magnet_core.model.train import PatientSet, forward, resolve_batching, split_sets, train_epochs

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"a": 12, "b": 9, "c": 5}
SMALL = ModelConfig(hidden=16, heads=4, dropout=0.2)


def _set(n: int = 400, seed: int = 0, rule: str = "topk", k: int = 5) -> PatientSet:
    c = make_generated_cohort(n=n, dims=DIMS, missing={"a": 0.3, "b": 0.2, "c": 0.4}, seed=seed)
    return PatientSet.from_cohort(c, 0.8, rule, k)


def dense_kl_on_edges(edge_index, edge_weight, emb, eps=1e-12):
    """The reference's dense N x N KL (Student-t, alpha 1) with both matrices masked to the given edges."""
    n = emb.size(0)
    sq = (emb * emb).sum(1)
    q = (1 + (sq[:, None] + sq[None, :] - 2 * emb @ emb.T)).pow(-1.0)
    on = torch.zeros(n, n, dtype=torch.bool)
    on[edge_index[0], edge_index[1]] = True
    p = torch.zeros(n, n, dtype=emb.dtype)
    p[edge_index[0], edge_index[1]] = edge_weight.to(emb.dtype)
    q = torch.clamp(q.masked_fill(~on, 0) / (q.masked_fill(~on, 0).sum() + eps), min=eps)
    p = torch.clamp(p / (p.sum() + eps), min=eps)
    return (p * torch.log(p / q)).sum()


def test_kl_over_topk_edges_equals_dense_kl_restricted_to_them():
    data = _set(n=150)
    g = data.graph
    assert g.rule == "topk" and g.num_edges < 0.2 * 150 * 150  # sparse: the per-edge path, not the Gram shortcut
    emb = torch.randn(150, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = similarity_kl_loss(g.edge_index, g.edge_weight.double(), emb)
    ref = dense_kl_on_edges(g.edge_index, g.edge_weight, emb)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, emb)
    (g_ref,) = torch.autograd.grad(ref, emb)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_chunked_edge_distances_pass_gradcheck_for_any_chunk():
    data = _set(n=40)
    emb = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ei = data.graph.edge_index
    whole = edge_squared_distances(emb, ei, chunk=10**9)
    torch.testing.assert_close(edge_squared_distances(emb, ei, chunk=7), whole)
    torch.testing.assert_close(whole, ((emb[ei[0]] - emb[ei[1]]) ** 2).sum(1))
    assert torch.autograd.gradcheck(lambda e: edge_squared_distances(e, ei, chunk=7), (emb,))


def test_sparse_forward_equals_model_forward_and_gradient():
    data = _set(n=500)
    model = build_model(DIMS, 2, SMALL, 0).eval()  # eval: no dropout, so both paths are the same function
    g = data.graph
    ref_logits, ref_fused = model(data.xs, data.mask, g.edge_index, g.edge_weight)
    logits, fused = forward(model, data, chunk=128, edge_chunk=300)  # 4 encoder chunks, ~10 edge blocks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, ref_fused, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    refs = torch.autograd.grad(ref_logits.square().sum(), list(model.parameters()))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_rule_keeps_dense_for_paper_sized_sets_and_topk_edges_are_linear_in_n():
    c = make_generated_cohort(n=200, dims=DIMS, seed=3)
    train, test = split_sets(c, 0.8)  # the lead's SiteRuntime call: unchanged for paper-sized cohorts
    assert train.graph.rule == test.graph.rule == "dense"
    big = _set(n=2500, rule="auto", k=4)
    assert big.graph.rule == "topk" and big.graph.num_edges <= 2 * 4 * 2500
    with pytest.raises(ValueError, match="unknown graph rule"):
        build_graph(big.xs, big.mask, "knn")


def test_neighbour_sampler_samples_existing_edges_at_most_fanout_per_target():
    data = _set(n=300, k=6)
    g = data.graph
    sampler = NeighbourSampler(g, [3, 2])
    seeds = torch.tensor([5, 17, 250, 9])
    nodes, sub = sampler.sample(seeds, torch.Generator().manual_seed(0))
    assert torch.equal(nodes[:4], seeds) and len(torch.unique(nodes)) == len(nodes)
    existing = set(zip(g.edge_index[0].tolist(), g.edge_index[1].tolist()))
    src, dst = nodes[sub.edge_index[0]], nodes[sub.edge_index[1]]
    assert set(zip(src.tolist(), dst.tolist())) <= existing
    deg = torch.bincount(g.edge_index[1], minlength=g.num_nodes)
    per_target = torch.bincount(sub.edge_index[1], minlength=len(nodes))
    assert torch.equal(per_target[:4], torch.clamp(deg[seeds], max=3))  # hop 1: min(degree, fanout) each seed
    assert int(per_target.max()) <= 3
    again = sampler.sample(seeds, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], nodes) and torch.equal(again[1].edge_index, sub.edge_index)


@pytest.mark.parametrize("batching", ["full", "neighbour"])
def test_sparse_training_is_deterministic_with_a_seed(batching, monkeypatch):
    monkeypatch.setattr(train_module, "FUSE_CHUNK", 150)  # exercise the chunked path on a small set
    data = _set(n=400)

    def run() -> list[torch.Tensor]:
        model = build_model(DIMS, 2, SMALL, 0)
        torch.manual_seed(7)
        stats = train_epochs(model, data, TrainConfig(lr=1e-2), 3, batching=batching, batch_size=128)
        assert np.isfinite(stats["loss"]) and stats["kl"] > 0
        return [p.detach().clone() for p in model.parameters()]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    start = build_model(DIMS, 2, SMALL, 0)
    assert any(not torch.equal(a, b) for a, b in zip(first, start.parameters()))  # it did train


def test_auto_batching_switches_to_neighbour_sampling_over_the_memory_budget():
    data = _set(n=400)
    assert resolve_batching(data, SMALL, "auto", batch_size=100) == "full"
    assert resolve_batching(data, SMALL, "auto", batch_size=100, memory_budget=1) == "neighbour"
    with pytest.raises(ValueError, match="unknown batching"):
        resolve_batching(data, SMALL, "minibatch")


SPARSE_ONLY = """
import json, resource, torch
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.train import PatientSet, train_epochs, predict_proba
from magnet_core.model.network import build_model
from magnet_core.model.config import ModelConfig, TrainConfig
n = 12000
c = make_generated_cohort(n=n, dims={"a": 6, "b": 4, "c": 5}, seed=0)
def vm():
    return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
limit = vm() + 320 * 2**20  # 320 MiB more address space; one n x n float32 matrix needs 549 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    torch.zeros(n, n)
    dense_possible = True
except (RuntimeError, MemoryError):
    dense_possible = False
data = PatientSet.from_cohort(c, 0.8)  # rule "auto": top-k at this size
model = build_model({"a": 6, "b": 4, "c": 5}, 2, ModelConfig(hidden=16, heads=4), 0)
torch.manual_seed(0)
stats = train_epochs(model, data, TrainConfig(), 1, batching="full")
probs = predict_proba(model, data)
print(json.dumps({"dense_possible": dense_possible, "rule": data.graph.rule, "edges": data.graph.num_edges,
                  "loss": stats["loss"], "rows": probs.shape[0]}))
"""


def test_sparse_training_never_materialises_an_n_by_n_matrix():
    """12,000 patients under an address-space limit in which a single n x n float matrix cannot exist (549 MiB
    against 320 MiB of room, the ratio of 30,000 patients in 2 GiB; sparse training and prediction run within
    160 MiB of it; the dense rule at this size fails on its first n x n product)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SPARSE_ONLY], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["dense_possible"] is False  # the limit bites ...
    assert out["rule"] == "topk" and out["edges"] <= 2 * 10 * 12000  # ... and sparse training ran within it
    assert np.isfinite(out["loss"]) and out["rows"] == 12000


def test_topk_graph_only_joins_patients_sharing_a_modality():
    data = _set(n=300, k=8)
    src, dst = data.graph.edge_index
    assert bool((data.mask[src] & data.mask[dst]).any(dim=1).all())
    assert not bool((src == dst).any())
    assert build_topk_graph(data.xs, data.mask, 3).rule == "topk"
