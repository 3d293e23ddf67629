"""MAGNET layers: masked attention, the EdgeSAGE shortcut against a per-edge loop, masked data has no influence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magnet_core.model.config import PRESETS, ModelConfig, get_preset
from magnet_core.model.graph import build_patient_graph
from magnet_core.model.loss import magnet_loss
from magnet_core.model.network import MAGNET, EdgeSAGEConv, ModalityEncoder, PatientModalityAttention, build_model
from magnet_core.model.train import make_optimizer

ALL_PATTERNS = torch.tensor([p for p in itertools.product([0, 1], repeat=3) if any(p)], dtype=torch.bool)


def _inputs(n: int, dims: dict[str, int], mask: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(n, d, generator=g) for d in dims.values()]
    for m, x in enumerate(xs):
        x[~mask[:, m]] = 0.0
    return xs


# ----------------------------------------------------------------------------------------- attention


def naive_attention(att: PatientModalityAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per patient and head: softmax over the available modalities only, weighted sum, heads concatenated."""
    n, num_mod, hidden = x.shape
    out = torch.zeros(n, hidden, dtype=x.dtype)
    for i in range(n):
        z = att.lin_proj(x[i]).view(num_mod, att.heads, att.head_dims)  # M, H, d
        avail = [m for m in range(num_mod) if mask[i, m]]
        heads = []
        for h in range(att.heads):
            scores = torch.stack([z[m, h] @ att.att[h, 0] for m in avail])
            w = torch.softmax(scores, dim=0)
            heads.append(sum(w[k] * z[m, h] for k, m in enumerate(avail)))
        out[i] = att.out_proj(torch.cat(heads))
    return out


def test_missing_modality_has_weight_exactly_zero_and_the_rest_sum_to_one():
    torch.manual_seed(0)
    att = PatientModalityAttention(hidden=24, heads=4)
    mask = ALL_PATTERNS.repeat(3, 1)  # every non-empty pattern of 3 modalities
    x = torch.randn(mask.size(0), 3, 24) * 5
    fused, w = att(x, mask)
    assert fused.shape == (mask.size(0), 24) and w.shape == (mask.size(0), 4, 3)
    missing = ~mask.unsqueeze(1).expand_as(w)
    assert torch.all(w[missing] == 0.0)
    assert torch.all(w[~missing] > 0.0)
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(mask.size(0), 4), rtol=0, atol=1e-6)
    single = mask.sum(dim=1) == 1
    assert torch.all(w[single].sum(dim=-1) == 1.0)  # one modality: weight exactly 1 in every head
    assert torch.isfinite(fused).all()


def test_attention_equals_per_patient_softmax_over_available_modalities():
    torch.manual_seed(1)
    att = PatientModalityAttention(hidden=12, heads=3).double()
    mask = ALL_PATTERNS
    x = torch.randn(mask.size(0), 3, 12, dtype=torch.float64)
    fused, _ = att(x, mask)
    torch.testing.assert_close(fused, naive_attention(att, x, mask), rtol=1e-12, atol=1e-12)


def test_hidden_must_be_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        PatientModalityAttention(hidden=10, heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden=10, heads=3)


# ----------------------------------------------------------------------------------------- full model


DIMS = {"mRNA": 9, "miRNA": 5, "DNA": 7}


def _model(seed=0, dropout=0.0) -> MAGNET:
    return build_model(DIMS, 3, ModelConfig(hidden=16, heads=4, dropout=dropout), seed)


def test_patients_with_a_single_modality_give_finite_outputs_loss_and_gradients():
    mask = torch.zeros(12, 3, dtype=torch.bool)
    mask[torch.arange(12), torch.arange(12) % 3] = True  # everyone has exactly one modality
    xs = _inputs(12, DIMS, mask)
    graph = build_patient_graph(xs, mask, None, 0.5)
    model = _model(dropout=0.2).train()
    logits, fused = model(xs, mask, graph.edge_index, graph.edge_weight)
    assert logits.shape == (12, 3) and fused.shape == (12, 16)
    assert torch.isfinite(logits).all() and torch.isfinite(fused).all()
    loss, _ = magnet_loss(logits, torch.arange(12) % 3, graph.edge_index, graph.edge_weight, fused)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    _, w = model.fuse(xs, mask)
    assert torch.all(w.sum(dim=1) == w.size(1) * mask.float())  # weight 1 on the held modality, 0 elsewhere


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e6])
def test_data_of_a_masked_out_modality_changes_nothing(scale):
    """Rewrite every masked-out row (the graph is rebuilt from the rewritten data too): outputs, losses and all
    parameter gradients stay bit-identical."""
    g = torch.Generator().manual_seed(3)
    mask = ALL_PATTERNS[torch.randint(0, len(ALL_PATTERNS), (30,), generator=g)]
    xs = _inputs(30, DIMS, mask, seed=3)
    y = torch.randint(0, 3, (30,), generator=g)
    altered = [x.clone() for x in xs]
    for m, x in enumerate(altered):
        x[~mask[:, m]] = scale * (torch.rand(int((~mask[:, m]).sum()), x.size(1), generator=g) - 0.3)

    results = []
    for data in (xs, altered):
        model = _model(seed=5).eval()
        graph = build_patient_graph(data, mask, None, 0.6)
        leaves = [d.clone().requires_grad_(True) for d in data]
        logits, fused = model(leaves, mask, graph.edge_index, graph.edge_weight)
        loss, _ = magnet_loss(logits, y, graph.edge_index, graph.edge_weight, fused)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((graph, logits, fused, loss, grads, [leaf.grad for leaf in leaves]))

    (g0, l0, f0, loss0, grads0, in0), (g1, l1, f1, loss1, grads1, in1) = results
    assert torch.equal(g0.edge_index, g1.edge_index) and torch.equal(g0.edge_weight, g1.edge_weight)
    assert torch.equal(l0, l1) and torch.equal(f0, f1) and torch.equal(loss0, loss1)
    for k in grads0:
        assert torch.equal(grads0[k], grads1[k]), k
    for m, (a, b) in enumerate(zip(in0, in1)):
        assert torch.all(a[~mask[:, m]] == 0) and torch.all(b[~mask[:, m]] == 0)  # no gradient into masked rows
        assert torch.equal(a, b)


def test_forward_is_the_composition_of_its_layers():
    mask = ALL_PATTERNS.repeat(2, 1)
    xs = _inputs(mask.size(0), DIMS, mask, seed=1)
    graph = build_patient_graph(xs, mask, None, 0.5)
    model = _model(seed=2, dropout=0.3).eval()
    logits, fused = model(xs, mask, graph.edge_index, graph.edge_weight)
    emb = torch.stack([model.encoders[m](x) for m, x in zip(DIMS, xs)], dim=1)
    expected_fused, _ = model.attention(emb, mask)
    h = expected_fused
    for conv in model.convs:
        h = conv(h, graph.edge_index, graph.edge_weight).relu()
    expected = model.head_out(model.head_hidden(h).relu())
    assert len(model.convs) == 2 and isinstance(model.encoders["mRNA"], ModalityEncoder)
    torch.testing.assert_close(fused, expected_fused, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    model.train()  # dropout active: a different output
    torch.manual_seed(0)
    assert not torch.equal(model(xs, mask, graph.edge_index, graph.edge_weight)[0], logits)


def test_build_model_is_deterministic_per_seed():
    a, b, c = _model(seed=7), _model(seed=7), _model(seed=8)
    for (k, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), k
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert MAGNET.encoder_modality("encoders.miRNA.net.0.weight") == "miRNA"
    assert MAGNET.encoder_modality("convs.0.lin_l.weight") is None


# ----------------------------------------------------------------------------------------- EdgeSAGEConv


class NaiveEdgeSAGE(torch.nn.Module):
    """The reference's layer, message by message: relu(lin_msg([relu(lin(x_j)) || w_ji])), mean, lin_l + lin_r."""

    def __init__(self, conv: EdgeSAGEConv):
        super().__init__()
        self.conv = conv

    def forward(self, x, edge_index, edge_weight):
        c = self.conv
        src = c.lin_src(x).relu()
        out = []
        for i in range(x.size(0)):
            msgs = [F.relu(c.lin_msg(torch.cat([src[j], edge_weight[e].view(1)])))
                    for e, (j, t) in enumerate(edge_index.T.tolist()) if t == i]
            agg = torch.stack(msgs).mean(dim=0) if msgs else torch.zeros(x.size(1), dtype=x.dtype)
            out.append(c.lin_l(agg) + c.lin_r(x[i]))
        return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_sage_conv_equals_naive_per_edge_messages_and_gradients(seed):
    torch.manual_seed(seed)
    conv = EdgeSAGEConv(6, 4).double()
    assert conv.aggr == "mean"  # PyG's MessagePassing with mean aggregation: tests/test_edge_sage_conv.py
    n = 9
    # directed edges with uneven in-degrees, a repeated edge, and node 8 without incoming edges
    src = torch.randint(0, n, (30,))
    dst = torch.randint(0, n - 1, (30,))
    edge_index = torch.cat([torch.stack([src, dst]), torch.tensor([[0, 0], [1, 1]])], dim=1)
    weight = torch.rand(edge_index.size(1), dtype=torch.float64) * 2 - 0.5  # negative weights too
    x = torch.randn(n, 6, dtype=torch.float64)

    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    wa, wb = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = conv(xa, edge_index, wa)
    ref = NaiveEdgeSAGE(conv)(xb, edge_index, wb)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)

    probe = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * probe).sum(), [xa, wa, *conv.parameters()])
    grads_ref = torch.autograd.grad((ref * probe).sum(), [xb, wb, *conv.parameters()])
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_edge_sage_conv_respects_edge_direction():
    torch.manual_seed(0)
    conv = EdgeSAGEConv(3, 2)
    x = torch.randn(3, 3)
    out = conv(x, torch.tensor([[0], [1]]), torch.tensor([0.7]))  # only 0 -> 1
    root_only = conv.lin_l(torch.zeros(3)) + conv.lin_r(x)
    torch.testing.assert_close(out[[0, 2]], root_only[[0, 2]])
    assert not torch.allclose(out[1], root_only[1])


# ----------------------------------------------------------------------------------------- presets


def test_presets_are_the_reference_hyperparameters():
    expected = {"ov": (256, 8, 0.2, 2.12e-4, 0.8), "brca": (128, 2, 0.1, 3.2e-4, 0.6),
                "blca": (256, 8, 0.2, 1.7e-4, 0.6)}
    assert set(PRESETS) == set(expected)
    for name, (hidden, heads, dropout, lr, sparsity) in expected.items():
        p = get_preset(name.upper())
        assert (p.model.hidden, p.model.heads, p.model.dropout, p.train.lr, p.graph.sparsity) == (
            hidden, heads, dropout, lr, sparsity)
        assert (p.model.gnn_layers, p.train.epochs, p.train.lr_step, p.train.lr_gamma, p.train.kl_weight,
                p.train.weight_decay) == (2, 200, 20, 0.8, 0.1, 1e-3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("luad")
    opt, sched = make_optimizer(_model(), get_preset("ov").train)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 2.12e-4
    assert opt.defaults["weight_decay"] == 1e-3
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and (sched.step_size, sched.gamma) == (20, 0.8)
    np.testing.assert_allclose(
        [_lr_after(opt, sched, k) for k in (19, 1, 19, 1)], [2.12e-4, 2.12e-4 * 0.8, 2.12e-4 * 0.8, 2.12e-4 * 0.64])


def _lr_after(opt, sched, steps):
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]
