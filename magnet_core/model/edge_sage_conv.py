"""MAGNET's decoder convolution: an edge-aware GraphSAGE layer, with its mean of edge messages as one autograd step.

Plain torch (no torch_geometric import: PyG's import alone took longer than torch's on this project's machines). The
layer is PyG's message passing with mean aggregation, written out; ``tests/test_edge_sage_conv.py`` checks it against
PyG's ``MessagePassing.propagate``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def glorot_(value: Tensor) -> Tensor:
    """Glorot-uniform in place over the last two dimensions (``torch_geometric.nn.inits.glorot``: same draws)."""
    bound = math.sqrt(6.0 / (value.size(-2) + value.size(-1)))
    with torch.no_grad():
        return value.uniform_(-bound, bound)


class GlorotLinear(nn.Module):
    """``y = x W^T + b`` with glorot-uniform W and zero b: PyG's ``Linear(weight_initializer="glorot",
    bias_initializer="zeros")`` (the reference's layers), same parameter names and the same random draws."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot_(self.weight)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}"


def glorot_linear(i: int, o: int, bias: bool = True) -> GlorotLinear:
    return GlorotLinear(i, o, bias)


def edge_messages(proj_src: Tensor, edge_weight: Tensor, w_e: Tensor) -> Tensor:
    r""":math:`m_{ji} = \mathrm{ReLU}(p_j + w_{ji} W_e^\top)` per edge, in place on ``proj_src`` (E, C), the
    gathered :math:`p_j`; ``edge_weight`` (E, edge_dim), ``w_e`` (C, edge_dim)."""
    return proj_src.addmm_(edge_weight, w_e.T).relu_()


def in_degree(dst: Tensor, num_nodes: int, dtype: torch.dtype) -> Tensor:
    """In-edges per target, at least 1 (a target without in-edges gets a zero mean), as (n, 1)."""
    return torch.bincount(dst, minlength=num_nodes).clamp_min_(1).to(dtype).view(-1, 1)


# Bytes of (edges x C) messages per cache block of :class:`MeanEdgeMessages` (1,024 edges x 256 floats = 1 MB): a
# block is gathered, updated, clipped and scattered while it is in cache, instead of streaming (E x C) tensors through
# memory once per operation.
BLOCK_BYTES = 2**20


def _block(chunk: int, channels: int) -> int:
    return max(1, min(chunk, BLOCK_BYTES // (4 * max(1, channels))))


class MeanEdgeMessages(torch.autograd.Function):
    r"""``mean_{j -> i} ReLU(proj[j] + w_ji W_e^T)`` for every target i, forward and backward in one step.

    Forward: gather, rank-1 update, ReLU, ``index_add_`` into the targets, divide by the in-degree. Backward: gather
    the targets' gradient per edge, zero it where the message was clipped, ``index_add_`` it into the sources and one
    (1 x E) @ (E x C) product for :math:`W_e`. This is the arithmetic PyG's ``propagate`` runs for
    :meth:`EdgeSAGEConv.message` with mean aggregation, in the same order per target (so the same result), without
    its per-call bookkeeping and intermediate (E x C) tensors.

    ``chunk``: edges per chunk. With fewer edges than that, the (E x C) messages are kept for the backward pass;
    otherwise each chunk's messages are recomputed there, so memory is O(n x C + chunk x C), never O(E x C).
    Within a chunk the edges go in cache blocks of :data:`BLOCK_BYTES` (each block gathered, updated, clipped and
    scattered while it is in cache); every element sees the same operations in the same order as over the whole
    chunk at once. The rank-1 update is one GEMM per block, and the kernel MKL picks may depend on the block's size:
    on some CPUs (AMX-era Xeons) a block of a few edges rounds differently by an ulp, so chunked and whole agree to
    the last bit or within a few ulps (``tests/test_edge_sage_conv.py``); a given chunk size always gives the same
    numbers.
    """

    @staticmethod
    def forward(ctx, proj: Tensor, w_e: Tensor, edge_weight: Tensor, src: Tensor, dst: Tensor,  # type: ignore[override]
                count: Tensor, chunk: int) -> Tensor:
        num_edges = src.numel()
        out = proj.new_zeros(count.size(0), proj.size(1))
        kept = proj.new_empty((num_edges, proj.size(1))) if num_edges <= chunk else None
        step = _block(chunk, proj.size(1))
        blocks = zip(src.split(step), dst.split(step), edge_weight.split(step),
                     kept.split(step) if kept is not None else [None] * -(-num_edges // step))
        for s, d, w, k in blocks:
            gathered = proj.index_select(0, s) if k is None else torch.index_select(proj, 0, s, out=k)
            out.index_add_(0, d, edge_messages(gathered, w, w_e))
        ctx.save_for_backward(proj, w_e, edge_weight, src, dst, count, kept)
        ctx.chunk = chunk
        return out / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        proj, w_e, edge_weight, src, dst, count, kept = ctx.saved_tensors
        need_proj, need_w, need_weight = ctx.needs_input_grad[:3]
        grad = grad_out / count
        g_proj = torch.zeros_like(proj) if need_proj else None
        g_w = None
        g_weight = torch.empty_like(edge_weight) if need_weight else None
        num_edges, chunk = src.numel(), ctx.chunk
        step = _block(chunk, proj.size(1))
        for e0 in range(0, num_edges, chunk):
            e1 = min(e0 + chunk, num_edges)
            # The chunk's per-edge gradient, block by block: the targets' gradient, zeroed where ReLU clipped the
            # message (kept, or recomputed with the forward pass's arithmetic), scattered into the sources in edge
            # order (the order of one index_add_ over the chunk).
            g_msg = grad.new_empty(e1 - e0, grad.size(1))
            parts = (src[e0:e1].split(step), dst[e0:e1].split(step), edge_weight[e0:e1].split(step),
                     g_msg.split(step))
            for i, (s, d, w, g_blk) in enumerate(zip(*parts)):
                torch.index_select(grad, 0, d, out=g_blk)
                msg = kept[i * step : i * step + s.numel()] if kept is not None else edge_messages(
                    proj.index_select(0, s), w, w_e)
                torch.ops.aten.threshold_backward.grad_input(g_blk, msg, 0, grad_input=g_blk)  # ReLU's gradient
                if need_proj:
                    g_proj.index_add_(0, s, g_blk)
            if need_w:  # one product over the chunk's edges, as without blocks
                part = edge_weight[e0:e1].T @ g_msg  # (edge_dim, C): the gradient of W_e^T
                g_w = part if g_w is None else g_w + part
            if need_weight:
                g_weight[e0:e1] = g_msg @ w_e
        if need_w and g_w is None:
            g_w = w_e.new_zeros(w_e.T.shape)
        return g_proj, (g_w.T if need_w else None), g_weight, None, None, None, None


class EdgeSAGEConv(nn.Module):
    r"""Edge-aware GraphSAGE layer (MAGNET's decoder convolution).

    .. math::
        \tilde{x}_j = \mathrm{ReLU}(W_s x_j + b_s),\qquad
        m_{ji} = \mathrm{ReLU}\big(W_m [\tilde{x}_j \,\Vert\, w_{ji}] + b_m\big),\qquad
        x_i' = W_l \,\mathrm{mean}_{j \in \mathcal{N}(i)} m_{ji} + b_l + W_r x_i

    where :math:`w_{ji}` is the weight of edge :math:`j \to i` (patient similarity) and a node without in-edges
    gets mean 0. :math:`W_m [\tilde{x}_j \Vert w_{ji}] = W_x \tilde{x}_j + W_e w_{ji}`, so the (C x C) part is
    applied once per node (:math:`p_j = W_x \tilde{x}_j + b_m`) and each edge adds only :math:`w_{ji} W_e`
    (:func:`edge_messages`); the mean over edges runs as one autograd step (:class:`MeanEdgeMessages`).

    Shapes:
        - **inputs:** node features :math:`(|\mathcal{V}|, C_{in})`, edge indices :math:`(2, |\mathcal{E}|)`
          (row 0 source, row 1 target), edge weights :math:`(|\mathcal{E}|)` or
          :math:`(|\mathcal{E}|, \text{edge\_dim})`
        - **output:** node features :math:`(|\mathcal{V}|, C_{out})`

    ``edge_chunk`` (forward): process the edges in blocks of this many and recompute each block's messages in the
    backward pass (memory O(|V| x C) for graphs of any size); None keeps all messages (fastest for small graphs).
    """

    def __init__(self, in_channels: int, out_channels: int, edge_dim: int = 1, aggr: str = "mean"):
        if aggr != "mean":
            raise ValueError(f"EdgeSAGEConv aggregates by mean, got aggr={aggr!r}")
        super().__init__()
        self.aggr = aggr
        self.in_channels, self.out_channels, self.edge_dim = in_channels, out_channels, edge_dim
        self.lin_src = glorot_linear(in_channels, in_channels)
        self.lin_msg = glorot_linear(in_channels + edge_dim, in_channels)
        self.lin_l = glorot_linear(in_channels, out_channels)
        self.lin_r = glorot_linear(in_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_src, self.lin_msg, self.lin_l, self.lin_r):
            lin.reset_parameters()

    def node_projection(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`p = W_x \\mathrm{ReLU}(W_s x + b_s) + b_m` (n, C) and :math:`W_e` (C, edge_dim)."""
        w_x, w_e = self.lin_msg.weight.split([self.in_channels, self.edge_dim], dim=1)
        return self.lin_src(x).relu() @ w_x.T + self.lin_msg.bias, w_e

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor, edge_chunk: int | None = None) -> Tensor:
        proj, w_e = self.node_projection(x)
        src, dst = edge_index[0].contiguous(), edge_index[1].contiguous()
        count = in_degree(dst, x.size(0), proj.dtype)
        weight = edge_weight.view(-1, self.edge_dim).to(proj.dtype)
        chunk = max(1, src.numel()) if edge_chunk is None else int(edge_chunk)
        agg = MeanEdgeMessages.apply(proj, w_e, weight, src, dst, count, chunk)
        return self.lin_l(agg) + self.lin_r(x)
