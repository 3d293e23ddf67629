"""The EdgeSAGE convolution as the code before issue 24 ran it: PyG's generic ``MessagePassing.propagate`` with
mean aggregation and the message ``ReLU(addmm(x_j, w_ji, W_e^T))``, on the weights of a
:class:`magnet_core.model.edge_sage_conv.EdgeSAGEConv`. Tests compare the fused layer (and whole training runs)
against it."""

from __future__ import annotations

import torch
from torch_geometric.nn.conv import MessagePassing

from magnet_core.model.edge_sage_conv import EdgeSAGEConv


class PyGEdgeSAGE(MessagePassing):
    """``conv``'s function through PyG's generic message passing (the pre-issue-24 code path)."""

    def __init__(self, conv: EdgeSAGEConv):
        super().__init__(aggr="mean")
        self.conv = conv

    def forward(self, x, edge_index, edge_weight, edge_chunk=None):
        c = self.conv
        w_x, w_e = c.lin_msg.weight.split([c.in_channels, c.edge_dim], dim=1)
        proj = c.lin_src(x).relu() @ w_x.T + c.lin_msg.bias
        out = self.propagate(edge_index, x=proj, edge_weight=edge_weight.view(-1, c.edge_dim), w_e=w_e)
        return c.lin_l(out) + c.lin_r(x)

    def message(self, x_j, edge_weight, w_e):
        return torch.addmm(x_j, edge_weight, w_e.T).relu_()


def use_pyg_reference_convs(model) -> None:
    """Make every EdgeSAGEConv of ``model`` compute through :class:`PyGEdgeSAGE` (same parameters)."""
    for conv in model.convs:
        ref = PyGEdgeSAGE(conv)
        object.__setattr__(conv, "forward", ref.forward)
