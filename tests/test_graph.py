"""Patient graph: masked cosine and the quantile rule against naive copies of the reference; graph invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magnet_core.cohort.data import load_magnet_split
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.graph import (
    PatientGraph,
    build_patient_graph,
    dense_to_graph,
    masked_cosine_similarity,
    sparsify_quantile,
)
from magnet_core.model.train import split_sets


def _silent(*_args) -> None:
    return None


# ----------------------------------------------------------------------------------------- naive references


def naive_masked_cosine(xs: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Pairwise loop in float64, as the reference: cosine over the features of the shared modalities, |.|."""
    n = mask.shape[0]
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            shared = [m for m in range(len(xs)) if mask[i, m] and mask[j, m]]
            if i == j or not shared:
                continue
            a = np.concatenate([xs[m][i] for m in shared]).astype(np.float64)
            b = np.concatenate([xs[m][j] for m in shared]).astype(np.float64)
            sim[i, j] = abs(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))
    return sim


def reference_apply_sparsity(adj: torch.Tensor, member: torch.Tensor, rate: float) -> torch.Tensor:
    """MAGNET's ``_apply_sparsity``: threshold the block of ``member`` patients at the ``rate`` quantile of its
    n^2 entries, then give each all-zero row (in order) its most similar patient of the block. In place."""
    indices = member.nonzero(as_tuple=False).squeeze()
    sub_adj = adj[indices][:, indices]
    sorted_sims = sub_adj.flatten().sort(descending=False)
    threshold_val = sorted_sims.values[int(rate * len(sorted_sims.values))]
    sub_adj[sub_adj < threshold_val] = 0.0
    for i in range(sub_adj.size(0)):
        if (sub_adj[i] == 0).all():
            row = adj[indices[i]]
            row[indices[i]] = 0.0
            top_idx = torch.argmax(row[indices])
            sub_adj[i, top_idx] = row[indices[top_idx]]
            sub_adj[top_idx, i] = row[indices[top_idx]]
    adj[indices.unsqueeze(1), indices.unsqueeze(0)] = sub_adj  # the reference's double loop, written at once
    return adj


def reference_graph(sim: torch.Tensor, is_test: np.ndarray, rate: float) -> torch.Tensor:
    """MAGNET's whole pipeline on a full similarity matrix: drop train-test pairs, sparsify train, then test."""
    adj = sim.clone()
    t = torch.as_tensor(is_test)
    adj[t.unsqueeze(1) != t.unsqueeze(0)] = 0.0
    adj = reference_apply_sparsity(adj, ~t, rate)
    return reference_apply_sparsity(adj, t, rate)


def _dense(graph: PatientGraph) -> torch.Tensor:
    dense = torch.zeros(graph.num_nodes, graph.num_nodes)
    dense[graph.edge_index[0], graph.edge_index[1]] = graph.edge_weight
    return dense


def _random_inputs(n: int, dims: tuple[int, ...], p_missing: float, seed: int):
    """Random features (negative values too) and masks; rows of missing modalities hold garbage, not zeros."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, d)).astype(np.float32) for d in dims]
    mask = rng.random((n, len(dims))) > p_missing
    mask[~mask.any(axis=1), rng.integers(0, len(dims))] = True
    return xs, mask


# ----------------------------------------------------------------------------------------- similarity


@pytest.mark.parametrize("seed, dims, p_missing", [(0, (5, 3, 4), 0.4), (1, (8, 2), 0.6), (2, (6,), 0.0),
                                                   (3, (3, 3, 3, 3), 0.7)])
def test_masked_cosine_equals_naive_pairwise_loop(seed, dims, p_missing):
    xs, mask = _random_inputs(25, dims, p_missing, seed)
    ours = masked_cosine_similarity([torch.from_numpy(x) for x in xs], torch.from_numpy(mask))
    ref = naive_masked_cosine(xs, mask)
    assert ours.dtype == torch.float32 and ours.shape == (25, 25)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)
    shares = (mask.astype(float) @ mask.T.astype(float)) > 0
    assert np.all(ours.numpy()[~shares] == 0.0)
    assert np.all(np.diag(ours.numpy()) == 0.0)


def test_masked_rows_do_not_affect_similarity():
    xs, mask = _random_inputs(20, (4, 6), 0.5, 5)
    base = masked_cosine_similarity([torch.from_numpy(x) for x in xs], torch.from_numpy(mask))
    changed = [x.copy() for x in xs]
    for m, x in enumerate(changed):
        x[~mask[:, m]] = 1e6 * np.random.default_rng(m).random(x[~mask[:, m]].shape)
    again = masked_cosine_similarity([torch.from_numpy(x) for x in changed], torch.from_numpy(mask))
    assert torch.equal(base, again)


def test_zero_vector_on_the_shared_modality_gives_zero_similarity():
    xs = [np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]], dtype=np.float32)]
    mask = np.ones((3, 1), dtype=bool)
    sim = masked_cosine_similarity([torch.from_numpy(xs[0])], torch.from_numpy(mask))
    assert sim[0, 1] == 0 and sim[1, 0] == 0 and sim[1, 2] > 0


# ----------------------------------------------------------------------------------------- quantile rule


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.6, 0.8, 0.95, 0.995])
@pytest.mark.parametrize("ties", [False, True])
def test_sparsify_quantile_equals_reference_rule(rate, ties):
    xs, mask = _random_inputs(40, (6, 4, 5), 0.5, 11)
    sim = masked_cosine_similarity([torch.from_numpy(x) for x in xs], torch.from_numpy(mask))
    if ties:  # few distinct values: the threshold sits on ties
        sim = (sim * 4).round() / 4
    ours = sparsify_quantile(sim, rate)
    ref = reference_apply_sparsity(sim.clone(), torch.ones(40, dtype=torch.bool), rate)
    assert torch.equal(ours, ref)


def test_full_graph_pipeline_equals_reference_on_generated_cohort():
    cohort = make_generated_cohort(n=90, dims={"a": 12, "b": 7, "c": 9}, missing={"a": 0.5, "b": 0.3, "c": 0.6},
                                   seed=4)
    xs = [cohort.X[m] for m in cohort.modalities]
    is_test = cohort.split == "test"
    sim = torch.from_numpy(naive_masked_cosine(xs, cohort.mask)).float()
    ref = reference_graph(sim, is_test, 0.7)
    ours = _dense(build_patient_graph(xs, cohort.mask, np.where(is_test, "test", "train"), 0.7))
    assert torch.equal(ours > 0, ref > 0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- invariants


def check_invariants(graph: PatientGraph, mask: np.ndarray, groups: np.ndarray) -> None:
    ei, w = graph.edge_index, graph.edge_weight
    n = graph.num_nodes
    assert ei.dtype == torch.long and ei.shape == (2, w.numel()) and n == len(groups)
    pairs = list(zip(ei[0].tolist(), ei[1].tolist()))
    assert len(set(pairs)) == len(pairs)  # no duplicate edges
    dense = _dense(graph)
    assert torch.equal(dense, dense.T)  # symmetric, same weight both ways
    assert not bool((ei[0] == ei[1]).any())  # no self loops
    assert bool((w > 0).all()) and bool((w <= 1 + 1e-6).all())
    g = np.asarray(groups)
    src, dst = ei[0].numpy(), ei[1].numpy()
    assert np.all(g[src] == g[dst])  # never across groups
    assert np.all((mask[src] & mask[dst]).any(axis=1))  # only between patients sharing a modality
    degree = np.bincount(src, minlength=n)
    for grp in np.unique(g):
        idx = np.flatnonzero(g == grp)
        m = mask[idx].astype(float)
        shares = m @ m.T > 0
        np.fill_diagonal(shares, False)
        can = shares.any(axis=1)
        assert np.all(degree[idx][can] >= 1), (grp, idx[can & (degree[idx] == 0)])


@pytest.fixture(scope="module")
def ov10(ov_path):
    return load_magnet_split(ov_path, 10, log=_silent)


def test_graph_invariants_on_real_ov_split(ov10):
    xs = [ov10.X[m] for m in ov10.modalities]
    graph = build_patient_graph(xs, ov10.mask, ov10.split, 0.8)
    check_invariants(graph, ov10.mask, ov10.split)
    src, dst = graph.edge_index
    is_test = torch.from_numpy(ov10.split == "test")
    assert not bool((is_test[src] ^ is_test[dst]).any())  # no train-test edge
    # OV has mRNA-only and miRNA-only patients: they share nothing and must never be joined
    only = {m: np.flatnonzero(ov10.mask[:, j] & ~ov10.mask[:, 1 - j]) for j, m in enumerate(ov10.modalities)}
    assert len(only["mRNA"]) == 3 and len(only["miRNA"]) == 121
    dense = _dense(graph)
    assert torch.all(dense[np.ix_(only["mRNA"], only["miRNA"])] == 0)
    # a few edge weights against |cos| computed by hand from the cohort's matrices
    rng = np.random.default_rng(0)
    for e in rng.choice(graph.num_edges, size=12, replace=False):
        i, j = int(src[e]), int(dst[e])
        shared = [m for k, m in enumerate(ov10.modalities) if ov10.mask[i, k] and ov10.mask[j, k]]
        a = np.concatenate([ov10.X[m][i] for m in shared]).astype(np.float64)
        b = np.concatenate([ov10.X[m][j] for m in shared]).astype(np.float64)
        expected = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)
        assert float(graph.edge_weight[e]) == pytest.approx(expected, rel=1e-5)


def test_training_graphs_equal_reference_pipeline_on_real_ov(ov10):
    """The graphs training actually uses (train+val, and test) equal MAGNET's dense pipeline on the full cohort."""
    xs = [torch.from_numpy(ov10.X[m]) for m in ov10.modalities]
    is_test = ov10.split == "test"
    ref = reference_graph(masked_cosine_similarity(xs, torch.from_numpy(ov10.mask)), is_test, 0.8)
    train, test = split_sets(ov10, 0.8)
    for part, rows in ((train, np.flatnonzero(~is_test)), (test, np.flatnonzero(is_test))):
        block = ref[np.ix_(rows, rows)]
        ours = _dense(part.graph)
        assert torch.equal(ours > 0, block > 0)
        torch.testing.assert_close(ours, block, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9, 0.99])
def test_graph_invariants_on_generated_cohort(sparsity):
    cohort = make_generated_cohort(n=240, missing={"mRNA": 0.5, "miRNA": 0.4, "DNA": 0.6}, seed=7)
    xs = [cohort.X[m] for m in cohort.modalities]
    check_invariants(build_patient_graph(xs, cohort.mask, cohort.split, sparsity), cohort.mask, cohort.split)
    sites = np.arange(cohort.n) % 4
    check_invariants(build_patient_graph(xs, cohort.mask, sites, sparsity), cohort.mask, sites)


def test_sparsity_zero_keeps_exactly_the_pairs_sharing_a_modality():
    xs, mask = _random_inputs(30, (4, 4), 0.5, 9)
    mask[:5] = [True, False]
    mask[5:10] = [False, True]
    graph = build_patient_graph(xs, mask, None, 0.0)
    shares = (mask.astype(float) @ mask.T.astype(float)) > 0
    np.fill_diagonal(shares, False)
    assert torch.equal(_dense(graph) > 0, torch.from_numpy(shares))
    assert torch.all(_dense(graph)[:5, 5:10] == 0)


def test_dense_to_graph_and_subgraph_round_trip():
    xs, mask = _random_inputs(20, (5, 3), 0.3, 12)
    graph = build_patient_graph(xs, mask, None, 0.5)
    dense = _dense(graph)
    assert torch.equal(_dense(dense_to_graph(dense)), dense)
    nodes = np.array([7, 2, 11, 3, 19])
    sub = graph.subgraph(nodes)
    assert sub.num_nodes == 5
    torch.testing.assert_close(_dense(sub), dense[np.ix_(nodes, nodes)], rtol=0, atol=0)
