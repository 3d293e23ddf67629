"""magnet_core model, graph and loss: masking, graph invariants, exactness against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magnet_core.cohort.data import load_magnet_split
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.config import ModelConfig
from magnet_core.model.graph import build_patient_graph, masked_cosine_similarity, sparsify_quantile
from magnet_core.model.loss import magnet_loss, similarity_kl_loss
from magnet_core.model.network import MAGNET, EdgeSAGEConv, PatientModalityAttention


def _random_modalities(n=40, dims=(7, 5, 3), p_missing=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(n, d, generator=g) for d in dims]
    mask = torch.rand(n, len(dims), generator=g) > p_missing
    mask[~mask.any(dim=1), 0] = True
    for m, x in enumerate(xs):
        x[~mask[:, m]] = 0.0
    return xs, mask


# ----------------------------------------------------------------------------------------------- attention


def test_missing_modality_gets_exactly_zero_attention_and_rest_sums_to_one():
    torch.manual_seed(0)
    att = PatientModalityAttention(hidden=16, heads=4)
    x = torch.randn(6, 3, 16)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    fused, w = att(x, mask)
    assert w.shape == (6, 4, 3)
    assert torch.all(w[~mask.unsqueeze(1).expand_as(w)] == 0.0)
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(6, 4))
    assert torch.isfinite(fused).all()


def test_single_modality_patient_has_finite_output_and_ignores_masked_data():
    torch.manual_seed(0)
    model = MAGNET({"a": 5, "b": 4}, 2, ModelConfig(hidden=8, heads=2, dropout=0.0)).eval()
    xs = [torch.rand(4, 5), torch.rand(4, 4)]
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    ei = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    ew = torch.rand(4)
    logits, fused = model(xs, mask, ei, ew)
    assert torch.isfinite(logits).all() and torch.isfinite(fused).all()
    # changing the (masked-out) modality-b data of patient 1 must not change anything
    xs2 = [xs[0].clone(), xs[1].clone()]
    xs2[1][1] = 1e6
    logits2, fused2 = model(xs2, mask, ei, ew)
    torch.testing.assert_close(fused2, fused)
    torch.testing.assert_close(logits2, logits)
    # and no gradient flows into encoder b from patient 1's row
    xs3 = [xs[0], xs[1].clone().requires_grad_(True)]
    model(xs3, mask, ei, ew)[0].sum().backward()
    assert torch.all(xs3[1].grad[1] == 0) and xs3[1].grad[0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- conv layer


def test_edge_sage_conv_equals_naive_per_edge_computation():
    torch.manual_seed(1)
    conv = EdgeSAGEConv(6, 5)
    x = torch.randn(7, 6)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0], [1, 0, 3, 2, 5, 4, 0, 6]])
    w = torch.rand(ei.size(1))
    out = conv(x, ei, w)
    src = conv.lin_src(x).relu()
    expected = torch.zeros(7, 5)
    for i in range(7):
        msgs = [conv.lin_msg(torch.cat([src[j], w[e].view(1)])).relu()
                for e, (j, t) in enumerate(ei.T.tolist()) if t == i]
        agg = torch.stack(msgs).mean(0) if msgs else torch.zeros(6)
        expected[i] = conv.lin_l(agg) + conv.lin_r(x[i])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- graph


def _naive_similarity(xs, mask):
    """The reference's O(n^2) loop: cosine on the concatenated features of shared modalities."""
    n = mask.size(0)
    full = torch.cat(xs, dim=1)
    fmask = torch.cat([mask[:, m : m + 1].float().expand(-1, x.size(1)) for m, x in enumerate(xs)], dim=1)
    sim = torch.zeros(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            shared = fmask[i] * fmask[j]
            if shared.sum() > 0:
                a, b = full[i] * shared, full[j] * shared
                sim[i, j] = sim[j, i] = abs(torch.dot(a, b) / (a.norm() * b.norm() + 1e-8))
    return sim


def _naive_quantile(sim, rate):
    n = sim.size(0)
    thr = sim.flatten().sort().values[int(rate * n * n)]
    adj = sim.clone()
    adj[adj < thr] = 0
    for i in range(n):
        if (adj[i] == 0).all():
            j = int(torch.argmax(sim[i]))
            adj[i, j] = adj[j, i] = sim[i, j]
    return adj


def test_masked_cosine_equals_pairwise_loop_and_quantile_rule_equals_reference():
    xs, mask = _random_modalities()
    sim = masked_cosine_similarity(xs, mask)
    torch.testing.assert_close(sim, _naive_similarity(xs, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparsify_quantile(sim, 0.8), _naive_quantile(sim, 0.8))


def _check_invariants(graph, mask, groups):
    ei, w = graph.edge_index, graph.edge_weight
    n = graph.num_nodes
    dense = torch.zeros(n, n)
    dense[ei[0], ei[1]] = w
    torch.testing.assert_close(dense, dense.T)  # symmetric
    assert not torch.any(ei[0] == ei[1])  # no self loops
    assert torch.all(w > 0)
    g = torch.as_tensor(groups)
    assert torch.all(g[ei[0]] == g[ei[1]])  # never across groups (train/test, sites)
    shared = (mask[ei[0]] & mask[ei[1]]).any(dim=1)
    assert torch.all(shared)  # only between patients sharing a modality
    degree = torch.bincount(ei[0], minlength=n)
    m = mask.float()
    for grp in torch.unique(g):
        idx = torch.nonzero(g == grp).flatten()
        can = ((m[idx] @ m[idx].T) > 0).sum(dim=1) > 1  # shares a modality with someone else in its group
        assert torch.all(degree[idx][can] >= 1)


def test_graph_invariants_on_real_ov_split(ov_path):
    cohort = load_magnet_split(ov_path, 10, log=lambda *a: None)
    xs = [torch.from_numpy(cohort.X[m]) for m in cohort.modalities]
    mask = torch.from_numpy(cohort.mask)
    groups = np.where(cohort.split == "test", 1, 0)
    graph = build_patient_graph(xs, mask, groups, 0.8)
    _check_invariants(graph, mask, groups)
    assert graph.num_edges > cohort.n


def test_graph_invariants_on_generated_cohort_with_three_groups():
    cohort = make_generated_cohort(n=150, missing={"mRNA": 0.5, "miRNA": 0.5, "DNA": 0.5}, seed=3)
    xs = [torch.from_numpy(cohort.X[m]) for m in cohort.modalities]
    mask = torch.from_numpy(cohort.mask)
    groups = np.arange(cohort.n) % 3
    _check_invariants(build_patient_graph(xs, mask, groups, 0.6), mask, groups)


def test_patients_sharing_no_modality_are_never_joined():
    xs = [torch.rand(4, 3), torch.rand(4, 3)]
    mask = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    sim = masked_cosine_similarity(xs, mask)
    assert sim[0, 2] == 0 and sim[1, 3] == 0 and sim[0, 1] > 0
    graph = build_patient_graph(xs, mask, None, 0.0)
    pairs = set(map(tuple, graph.edge_index.T.tolist()))
    assert pairs <= {(0, 1), (1, 0), (2, 3), (3, 2)}


# ----------------------------------------------------------------------------------------------- loss


def _dense_reference_kl(sim_dense, emb, edge_mask, eps=1e-12):
    n = emb.size(0)
    d2 = torch.cdist(emb, emb) ** 2
    q = (1 + d2).pow(-1.0) * (1 - torch.eye(n))
    q = q.masked_fill(edge_mask == 0, 0.0)
    p = sim_dense.masked_fill(edge_mask == 0, 0.0)
    q = torch.clamp(q / (q.sum() + eps), min=eps)
    p = torch.clamp(p / (p.sum() + eps), min=eps)
    return torch.sum(p * torch.log(p / q))


def test_kl_equals_dense_reference_and_gradients_flow():
    xs, mask = _random_modalities(n=30, seed=4)
    graph = build_patient_graph(xs, mask, None, 0.7)
    emb = torch.randn(30, 8, requires_grad=True)
    dense = torch.zeros(30, 30)
    dense[graph.edge_index[0], graph.edge_index[1]] = graph.edge_weight
    ours = similarity_kl_loss(graph.edge_index, graph.edge_weight, emb)
    ref = _dense_reference_kl(dense, emb, (dense > 0).float())
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_kl_is_zero_when_embedding_similarity_matches_and_loss_combines():
    ei = torch.tensor([[0, 1], [1, 0]])
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([0.3, 0.3])  # one undirected edge: both distributions are uniform over the two entries
    assert float(similarity_kl_loss(ei, w, emb)) == pytest.approx(0.0, abs=1e-9)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2]])
    y = torch.tensor([0, 1])
    total, parts = magnet_loss(logits, y, ei, torch.tensor([0.9, 0.1]), emb, kl_weight=0.1)
    assert float(total) == pytest.approx(parts["ce"] + 0.1 * parts["kl"], rel=1e-6)
    assert parts["kl"] > 0


def test_nan_in_rows_of_missing_modalities_is_ignored():
    torch.manual_seed(0)
    xs, mask = _random_modalities(n=20, seed=5)
    missing = torch.nonzero(~mask[:, 1]).flatten()
    assert len(missing) > 0
    dirty = [x.clone() for x in xs]
    dirty[1][missing] = float("nan")
    torch.testing.assert_close(masked_cosine_similarity(dirty, mask), masked_cosine_similarity(xs, mask))
    model = MAGNET({f"m{i}": x.size(1) for i, x in enumerate(xs)}, 2, ModelConfig(hidden=8, heads=2)).eval()
    g = build_patient_graph(xs, mask, None, 0.5)
    clean_logits, _ = model(xs, mask, g.edge_index, g.edge_weight)
    dirty_logits, _ = model(dirty, mask, g.edge_index, g.edge_weight)
    torch.testing.assert_close(dirty_logits, clean_logits)
