"""EdgeSAGEConv's fused path (MeanEdgeMessages) against PyG's generic propagate and against itself in blocks; its
initialisation against PyG's Linear (same draws, so the same model per seed); no PyG import at run time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyg_reference import PyGEdgeSAGE
from torch_geometric.nn import Linear
from torch_geometric.nn.inits import glorot

from magnet_core.model.edge_sage_conv import EdgeSAGEConv, GlorotLinear, edge_messages, glorot_

ROOT = Path(__file__).resolve().parents[1]


def _graph(n: int = 30, e: int = 200, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (e,), generator=g)
    dst = torch.randint(0, n - 2, (e,), generator=g)  # the last two nodes have no in-edges
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    w = torch.rand(e, generator=g, dtype=dtype)
    return x, torch.stack([src, dst]), w


def _grads(conv, x, ei, w, **kw):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = conv(x, ei, w, **kw) if kw.get("edge_chunk") is not None else conv(x, ei, w)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, w, *conv.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_path_equals_pyg_propagate_bit_for_bit(seed):
    torch.manual_seed(seed)
    conv = EdgeSAGEConv(8, 5)
    x, ei, w = _graph(seed=seed)
    fused, g_fused = _grads(conv, x, ei, w)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    generic = PyGEdgeSAGE(conv)(xg, ei, wg)
    probe = torch.linspace(-1, 1, generic.numel()).view_as(generic)
    g_generic = torch.autograd.grad((generic * probe).sum(), [xg, wg, *conv.parameters()])
    assert torch.equal(fused, generic.detach())
    names = ["x", "edge_weight", *(n for n, _ in conv.named_parameters())]
    for name, a, b in zip(names, g_fused, g_generic):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # the two nodes without in-edges: mean 0, so only the root term and lin_l's bias
    root = conv.lin_l(torch.zeros(8)) + conv.lin_r(x[-2:])
    torch.testing.assert_close(fused[-2:], root.detach())


def test_edge_blocks_with_recomputation_equal_the_whole_edge_list():
    torch.manual_seed(3)
    conv = EdgeSAGEConv(8, 5).double()
    x, ei, w = _graph(e=301, dtype=torch.float64)
    whole, g_whole = _grads(conv, x, ei, w)
    for chunk in (1, 7, 300, 301, 10_000):
        out, grads = _grads(conv, x, ei, w, edge_chunk=chunk)
        if chunk >= ei.size(1):  # one chunk: the same blocks and kernels as the whole edge list
            assert torch.equal(out, whole)
        # same additions per target in the same order; the rank-1 update is one GEMM per block, whose kernel may
        # depend on the block's size (MKL rounds a one-edge block differently by an ulp on AMX-era Xeons)
        torch.testing.assert_close(out, whole, rtol=1e-14, atol=1e-15)
        for a, b in zip(grads, g_whole):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_graph_without_edges_gives_the_root_term_and_gradients():
    conv = EdgeSAGEConv(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    out = conv(x, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0))
    torch.testing.assert_close(out, conv.lin_l(torch.zeros(4)) + conv.lin_r(x))
    out.sum().backward()
    assert x.grad is not None and conv.lin_msg.weight.grad is not None
    assert torch.count_nonzero(conv.lin_msg.weight.grad) == 0


def test_only_mean_aggregation_is_accepted():
    with pytest.raises(ValueError, match="mean"):
        EdgeSAGEConv(4, 3, aggr="max")


def test_messages_are_the_pyg_message_and_initialisation_is_pyg_linear_draw_for_draw():
    g = torch.Generator().manual_seed(0)
    proj_j, w, w_e = torch.randn(50, 6, generator=g), torch.rand(50, 1, generator=g), torch.randn(6, 1, generator=g)
    assert torch.equal(edge_messages(proj_j.clone(), w, w_e), torch.addmm(proj_j, w, w_e.T).relu())
    for bias in (True, False):
        torch.manual_seed(5)
        ours = GlorotLinear(7, 3, bias=bias)
        torch.manual_seed(5)
        pyg = Linear(7, 3, bias=bias, weight_initializer="glorot", bias_initializer="zeros")
        assert ours.state_dict().keys() == pyg.state_dict().keys()
        for key, value in pyg.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value)
    a, b = torch.empty(8, 1, 32), torch.empty(8, 1, 32)
    torch.manual_seed(1)
    glorot_(a)
    torch.manual_seed(1)
    glorot(b)
    assert torch.equal(a, b)


def test_training_code_does_not_import_torch_geometric():
    code = ("import json, sys\nimport magnet_core.model.train, magnet_core.model.site, magnet_core.model.inductive\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('torch_geometric'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
