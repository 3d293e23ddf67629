"""MAGNET layers: modality encoders, masked patient-modality attention, edge-aware SAGE decoder."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magnet_core.model.config import ModelConfig
from magnet_core.model.edge_sage_conv import EdgeSAGEConv, glorot_, glorot_linear

__all__ = ["MAGNET", "EdgeSAGEConv", "ModalityEncoder", "PatientModalityAttention", "build_model"]


class ModalityEncoder(nn.Module):
    """Two-layer MLP ``Linear -> LeakyReLU -> Dropout -> Linear`` mapping one modality to the shared width."""

    def __init__(self, in_dims: int, hidden: int, dropout: float = 0.0, negative_slope: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            glorot_linear(in_dims, hidden), nn.LeakyReLU(negative_slope), nn.Dropout(dropout),
            glorot_linear(hidden, hidden),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PatientModalityAttention(nn.Module):
    r"""Patient-modality multi-head attention with a hard availability mask.

    For patient i, head h and modality m with projected embedding :math:`z_{imh}`:

    .. math::
        \alpha_{ihm} = \frac{M_{im}\exp(a_h^\top z_{imh})}{\sum_{m'} M_{im'}\exp(a_h^\top z_{im'h})},\qquad
        f_i = W_o\,\big\Vert_h \sum_m \alpha_{ihm} z_{imh}

    so a missing modality (:math:`M_{im}=0`) gets weight exactly 0 and the available ones sum to 1 per head.
    """

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads, self.head_dims = heads, hidden // heads
        self.lin_proj = glorot_linear(hidden, hidden, bias=False)
        self.att = nn.Parameter(torch.empty(heads, 1, self.head_dims))
        self.out_proj = glorot_linear(hidden, hidden, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lin_proj.reset_parameters()
        self.out_proj.reset_parameters()
        glorot_(self.att)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x``: (n, M, hidden), ``mask``: (n, M) bool/0-1. Returns fused (n, hidden) and weights (n, heads, M)."""
        n, num_mod, hidden = x.shape
        z = self.lin_proj(x).view(n, num_mod, self.heads, self.head_dims).permute(0, 2, 1, 3)  # n,H,M,d
        scores = (z @ self.att.transpose(-1, -2)).squeeze(-1)  # n,H,M
        avail = mask.bool().unsqueeze(1)  # n,1,M
        scores = scores.masked_fill(~avail, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        # Patients with no modality at all would give NaN; zero them (such patients are dropped at load time).
        weights = torch.where(avail, weights, torch.zeros_like(weights))
        fused = (weights.unsqueeze(-1) * z).sum(dim=2).reshape(n, hidden)
        return self.out_proj(fused), weights


class MAGNET(nn.Module):
    """Encoders (one per modality, keyed by name) -> masked attention -> EdgeSAGE layers -> MLP head."""

    def __init__(self, in_dims: dict[str, int], num_classes: int, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.modalities = list(in_dims)
        self.cfg = cfg
        h = cfg.hidden
        self.encoders = nn.ModuleDict(
            {m: ModalityEncoder(d, h, cfg.dropout, cfg.negative_slope) for m, d in in_dims.items()}
        )
        self.attention = PatientModalityAttention(h, cfg.heads)
        self.convs = nn.ModuleList([EdgeSAGEConv(h, h) for _ in range(cfg.gnn_layers)])
        self.head_hidden = glorot_linear(h, h)
        self.head_out = glorot_linear(h, num_classes)
        if cfg.prototypes:  # the consortium's class prototypes (magnet_core.model.prototypes); never in a prediction
            self.register_buffer("prototype_sum", torch.zeros(num_classes, h))
            self.register_buffer("prototype_mass", torch.zeros(num_classes))

    def fuse(self, xs: Sequence[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encode each available modality and fuse per patient: (n, hidden), attention (n, heads, M)."""
        # Every row is encoded (a dense matmul is cheaper than gather/scatter); rows of missing modalities get
        # attention weight exactly 0, so they contribute neither to the output nor to any gradient.
        avail = mask.bool()
        emb = torch.stack([self.encoders[name](torch.where(avail[:, m : m + 1], x, 0.0))
                           for m, (name, x) in enumerate(zip(self.modalities, xs))], dim=1)
        return self.attention(emb, mask)

    def decode(self, fused: Tensor, edge_index: Tensor, edge_weight: Tensor, edge_chunk: int | None = None
               ) -> Tensor:
        """Logits (n, C) from fused embeddings: the EdgeSAGE layers and the head (``edge_chunk``: see
        :class:`EdgeSAGEConv`)."""
        x, p = fused, self.cfg.dropout
        for conv in self.convs:
            x = F.dropout(conv(x, edge_index, edge_weight, edge_chunk).relu(), p=p, training=self.training)
        x = F.dropout(self.head_hidden(x).relu(), p=p, training=self.training)
        return self.head_out(x)

    def forward(self, xs: Sequence[Tensor], mask: Tensor, edge_index: Tensor, edge_weight: Tensor,
                edge_chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """Logits (n, C) and fused embeddings (n, hidden)."""
        fused, _ = self.fuse(xs, mask)
        return self.decode(fused, edge_index, edge_weight, edge_chunk), fused

    # --- helpers for federated aggregation -------------------------------------------------------------
    PROTOTYPE_ARRAYS = ("prototype_sum", "prototype_mass")

    @staticmethod
    def is_statistic(param_name: str) -> bool:
        """True for the class-prototype buffers: averaged like any shared array, never stepped by a server
        optimizer (they are statistics, not weights) and never used by a prediction."""
        return param_name in MAGNET.PROTOTYPE_ARRAYS

    @staticmethod
    def encoder_modality(param_name: str) -> str | None:
        """``"encoders.<m>.…"`` -> m; None for shared parameters (attention, GNN, head)."""
        if param_name.startswith("encoders."):
            return param_name.split(".", 2)[1]
        return None


def build_model(in_dims: dict[str, int], num_classes: int, cfg: ModelConfig, seed: int) -> MAGNET:
    """A freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return MAGNET(in_dims, num_classes, cfg)
