"""Training and prediction on a set of patients with its own patient graph (dense, or sparse for large sites)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from magnet_core.cohort.data import Cohort
from magnet_core.model.allocator import keep_freed_memory
from magnet_core.model.config import GraphConfig, ModelConfig, TrainConfig
from magnet_core.model.graph import PatientGraph
from magnet_core.model.graph_topk import DEFAULT_K, NeighbourSampler, build_graph
from magnet_core.model.loss import magnet_loss
from magnet_core.model.network import MAGNET, build_model
from magnet_core.model.optim import adam, skip_dynamo_import
from magnet_core.model.prototypes import prototype_loss

Batching = Literal["full", "neighbour", "auto"]
FUSE_CHUNK = 8192  # patients encoded per (checkpointed) chunk when a sparse graph is larger than this
MEMORY_BUDGET_BYTES = 6 * 2**30  # "auto" batching: full-graph epochs while their estimate stays below this
DEFAULT_BATCH_SIZE = 8192  # seed patients per mini-batch (neighbour sampling)
# Edges per block of a graph convolution on a large sparse graph (16,384 x hidden 256 = 16 MB per block tensor;
# blocks of this size measured faster than 2^18-edge blocks at 20,000 patients: 6.9 vs 8.7 CPU s per epoch).
CONV_EDGE_CHUNK = 2**14


@dataclasses.dataclass
class PatientSet:
    """Tensors of one group of patients (e.g. a site's training patients) and the graph among them."""

    xs: list[Tensor]
    mask: Tensor
    y: Tensor
    paired: Tensor
    graph: PatientGraph

    @property
    def n(self) -> int:
        return int(self.y.numel())

    @classmethod
    def from_cohort(cls, cohort: Cohort, sparsity: float, graph: str = "auto", k: int = DEFAULT_K) -> "PatientSet":
        """Tensors of ``cohort`` and its patient graph (built among these patients only) by ``graph`` rule:
        "dense" (MAGNET's quantile rule), "topk" (k nearest neighbours) or "auto" (dense up to
        ``graph_topk.DENSE_MAX_PATIENTS`` patients, top-k above)."""
        xs = [torch.from_numpy(np.ascontiguousarray(cohort.X[m])) for m in cohort.modalities]
        mask = torch.from_numpy(cohort.mask.copy())
        g = build_graph(xs, mask, graph, sparsity, k)
        return cls(xs, mask, torch.from_numpy(cohort.labels.copy()), torch.from_numpy(cohort.paired.copy()), g)

    def modality_counts(self, modalities: list[str]) -> dict[str, int]:
        """How many of these patients hold each modality (aggregation weights)."""
        return {m: int(self.mask[:, j].sum()) for j, m in enumerate(modalities)}

    def subset(self, nodes: Tensor, graph: PatientGraph) -> "PatientSet":
        """Patients ``nodes`` (in that order) with the given graph among them (local indices)."""
        return PatientSet([x[nodes] for x in self.xs], self.mask[nodes], self.y[nodes], self.paired[nodes], graph)


def split_sets(cohort: Cohort, sparsity: float, graph: str = "auto", k: int = DEFAULT_K
               ) -> tuple[PatientSet, PatientSet]:
    """Train (train+val, as the paper) and test sets, each with its own graph: no edge crosses the boundary."""
    train = cohort.subset(cohort.split_indices("train", "val"))
    test = cohort.subset(cohort.split_indices("test"))
    return PatientSet.from_cohort(train, sparsity, graph, k), PatientSet.from_cohort(test, sparsity, graph, k)


def make_optimizer(model: MAGNET, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam + StepLR as in the reference."""
    skip_dynamo_import()  # this project never compiles: no ~1.2 s import of torch._dynamo in every process
    opt = adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # torch.optim.Adam's numbers
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


# ------------------------------------------------------------------------------------------- forward passes


def _fuse_chunk(model: MAGNET, mask: Tensor, *xs: Tensor) -> Tensor:
    return model.fuse(list(xs), mask)[0]


def forward(model: MAGNET, data: PatientSet, chunk: int | None = None, edge_chunk: int = CONV_EDGE_CHUNK
            ) -> tuple[Tensor, Tensor]:
    """Logits and fused embeddings of all patients. Dense graphs (and sets of at most ``chunk`` patients) use
    ``model(...)`` unchanged; a large sparse graph encodes patients in checkpointed chunks and runs each
    convolution over blocks of ``edge_chunk`` edges whose messages are recomputed in the backward pass
    (:class:`~magnet_core.model.edge_sage_conv.EdgeSAGEConv`), so activation memory is O(n x hidden + one chunk),
    not O(edges x hidden x layers). The gradient is the same; only the dropout draws differ (per chunk)."""
    g = data.graph
    chunk = chunk or FUSE_CHUNK
    if g.rule == "dense" or data.n <= chunk:
        return model(data.xs, data.mask, g.edge_index, g.edge_weight)
    grad = torch.is_grad_enabled()
    parts = []
    for s in range(0, data.n, chunk):
        xs = [x[s : s + chunk] for x in data.xs]
        mask = data.mask[s : s + chunk]
        parts.append(checkpoint(_fuse_chunk, model, mask, *xs, use_reentrant=False) if grad
                     else _fuse_chunk(model, mask, *xs))
    fused = torch.cat(parts)
    return model.decode(fused, g.edge_index, g.edge_weight, edge_chunk), fused


def estimate_epoch_bytes(data: PatientSet, hidden: int, num_layers: int) -> int:
    """Rough peak memory of one full-graph training epoch (activations + inputs), for choosing batching.
    Dense path: ~(3 + 2 layers) (edges x hidden) tensors plus ~40 (patients x hidden); sparse path
    (:func:`forward`): ~(4 + 6 layers) (patients x hidden), one encoder chunk and a few edge blocks, plus the
    edge lists (~48 bytes per edge)."""
    n, e = data.n, data.graph.num_edges
    inputs = sum(x.numel() for x in data.xs) * 4
    if data.graph.rule == "dense" or n <= FUSE_CHUNK:
        return inputs + 4 * hidden * ((3 + 2 * num_layers) * e + 40 * n)
    return inputs + 48 * e + 4 * hidden * ((4 + 6 * num_layers) * n + 40 * FUSE_CHUNK + 4 * CONV_EDGE_CHUNK)


def resolve_batching(data: PatientSet, model_cfg: ModelConfig, batching: str = "auto",
                     batch_size: int = DEFAULT_BATCH_SIZE, memory_budget: int = MEMORY_BUDGET_BYTES) -> str:
    """"full" or "neighbour": "auto" picks neighbour sampling only when a full-graph epoch's estimate exceeds
    ``memory_budget`` and the set is larger than one batch."""
    if batching not in ("full", "neighbour", "auto"):
        raise ValueError(f"unknown batching {batching!r}; choose full, neighbour or auto")
    if batching != "auto":
        return batching
    too_big = estimate_epoch_bytes(data, model_cfg.hidden, model_cfg.gnn_layers) > memory_budget
    return "neighbour" if too_big and data.n > batch_size else "full"


# ------------------------------------------------------------------------------------------- training


def train_epochs(
    model: MAGNET,
    data: PatientSet,
    cfg: TrainConfig,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    batching: Batching = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    fanouts: Sequence[int] | None = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    proximal_mu: float = 0.0,
    offsets: Tensor | None = None,
    pull: "PrototypePull | None" = None,
) -> dict[str, float]:
    """Train for ``epochs`` epochs; returns the last epoch's losses (mean over its mini-batches).

    ``proximal_mu`` > 0 adds FedProx's proximal term (mu / 2) * ||w - w_start||^2 to the loss, w_start the weights
    at the call (the global model a site starts a round from); its gradient mu * (w - w_start) is added only to
    parameters the task loss reached (a gradient exists), so the term never makes the optimiser step a parameter
    it would otherwise leave alone. The last epoch's term is reported as "proximal"; "loss" stays the task loss.

``offsets`` (C,): per-class logit offsets inside the cross-entropy (label-skew methods, see
:func:`magnet_core.model.loss.label_offsets`); None = plain cross-entropy.

    ``pull``: FedProto's prototype term on the fused embeddings (:class:`PrototypePull`), reported as "prototype".

    ``batching``: "full" = one step per epoch on the whole graph; "neighbour" = mini-batches of ``batch_size``
    seed patients with sampled neighbourhoods (``fanouts`` per layer, default 10 each; cross-entropy on the
    seeds, KL over the sampled edges), one step per batch; "auto" = full while :func:`estimate_epoch_bytes` is
    within ``memory_budget``, neighbour otherwise. Randomness comes from torch's global RNG (seed it)."""
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, cfg)
    batching = resolve_batching(data, model.cfg, batching, batch_size, memory_budget)
    sampler = NeighbourSampler(data.graph, fanouts or [10] * model.cfg.gnn_layers) if batching == "neighbour" \
        else None
    if not (proximal_mu >= 0 and np.isfinite(proximal_mu)):
        raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu}")
    prox = Proximal.at(model, proximal_mu) if proximal_mu > 0 else None
    keep_freed_memory()  # epochs reuse the previous epoch's memory instead of page-faulting fresh pages
    model.train()
    stats: dict[str, float] = {}
    for epoch in range(epochs):
        if sampler is None:
            stats = _step(model, data, cfg, optimizer, prox=prox, offsets=offsets, pull=pull)
        else:
            stats = _neighbour_epoch(model, data, cfg, optimizer, sampler, batch_size, prox, offsets, pull)
        if scheduler is not None:
            scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return stats


@dataclasses.dataclass
class Proximal:
    """FedProx's proximal term (mu / 2) * ||w - w0||^2 around the weights w0 a round started from."""

    mu: float
    anchor: dict[str, Tensor]

    @classmethod
    def at(cls, model: MAGNET, mu: float) -> "Proximal":
        return cls(float(mu), {k: p.detach().clone() for k, p in model.named_parameters()})

    @torch.no_grad()
    def add_gradient(self, model: MAGNET) -> float:
        """Add mu * (w - w0) to the gradient of every parameter the loss reached; the term's value over them."""
        total = 0.0
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            diff = p - self.anchor[name]
            p.grad.add_(diff, alpha=self.mu)
            total += float(diff.double().pow(2).sum())
        return 0.5 * self.mu * total


@dataclasses.dataclass(frozen=True)
class PrototypePull:
    """FedProto's local term ``weight`` x :func:`~magnet_core.model.prototypes.prototype_loss` towards the
    consortium's class ``prototypes`` (C, d) for the classes ``defined`` (C,) bool."""

    prototypes: Tensor
    defined: Tensor
    weight: float

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and np.isfinite(self.weight)):
            raise ValueError(f"prototype weight must be a finite number >= 0, got {self.weight}")


def _step(model: MAGNET, data: PatientSet, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
          num_seeds: int | None = None, prox: Proximal | None = None, offsets: Tensor | None = None,
          pull: PrototypePull | None = None) -> dict[str, float]:
    """One optimiser step on ``data`` (cross-entropy on its first ``num_seeds`` patients, default all); with
    ``prox``, FedProx's proximal gradient is added before the step; with ``pull``, the prototype term on the same
    patients' fused embeddings."""
    optimizer.zero_grad(set_to_none=True)
    g = data.graph
    logits, fused = forward(model, data)
    seeds = slice(0, num_seeds if num_seeds is not None else data.n)
    loss, stats = magnet_loss(logits[seeds], data.y[seeds], g.edge_index, g.edge_weight, fused, cfg.kl_weight,
                               offsets)
    if pull is not None and pull.weight > 0:
        term = prototype_loss(fused[seeds], data.y[seeds], pull.prototypes, pull.defined)
        loss = loss + pull.weight * term
        stats = {**stats, "prototype": float(term.detach())}  # "loss" stays the task loss, as for "proximal"
    loss.backward()
    if prox is not None:
        stats = {**stats, "proximal": prox.add_gradient(model)}
    optimizer.step()
    return stats


def _neighbour_epoch(model: MAGNET, data: PatientSet, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                     sampler: NeighbourSampler, batch_size: int, prox: Proximal | None = None,
                     offsets: Tensor | None = None, pull: PrototypePull | None = None) -> dict[str, float]:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))  # from the (seeded) global RNG
    order = torch.randperm(data.n, generator=gen)
    totals: dict[str, float] = {}
    batches = 0
    for s in range(0, data.n, batch_size):
        seeds = order[s : s + batch_size]
        nodes, sub = sampler.sample(seeds, gen)
        stats = _step(model, data.subset(nodes, sub), cfg, optimizer, num_seeds=len(seeds), prox=prox,
                      offsets=offsets, pull=pull)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        batches += 1
    return {key: value / batches for key, value in totals.items()}


@torch.no_grad()
def fused_embeddings(model: MAGNET, data: PatientSet, chunk: int = FUSE_CHUNK) -> Tensor:
    """The fused embeddings (n, hidden) of ``data``'s patients in eval mode (no dropout), in chunks of patients
    (the fusion is per patient: no graph is needed)."""
    model.eval()
    return torch.cat([model.fuse([x[s : s + chunk] for x in data.xs], data.mask[s : s + chunk])[0]
                      for s in range(0, data.n, chunk)]) if data.n else torch.zeros(0, model.cfg.hidden)


@torch.no_grad()
def predict_proba(model: MAGNET, data: PatientSet) -> Tensor:
    """Class probabilities (n, C) in eval mode."""
    model.eval()
    logits, _ = forward(model, data)
    return torch.softmax(logits, dim=-1)


def in_dims_of(cohort: Cohort) -> dict[str, int]:
    return {m: int(cohort.X[m].shape[1]) for m in cohort.modalities}


def fit_and_predict(
    cohort: Cohort,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    graph_cfg: GraphConfig,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    graph: str | None = None,
    k: int | None = None,
) -> tuple[MAGNET, PatientSet, Tensor]:
    """Train on train+val, predict on test (the paper's protocol). Returns model, test set and test probabilities.
    ``graph``/``k`` override the graph rule (default: ``graph_cfg``'s, else "auto" with k = 10)."""
    rule = graph or getattr(graph_cfg, "rule", "auto")
    k = k or getattr(graph_cfg, "k", DEFAULT_K)
    train, test = split_sets(cohort, graph_cfg.sparsity, rule, k)
    model = build_model(in_dims_of(cohort), cohort.num_classes, model_cfg, seed)
    torch.manual_seed(seed)
    train_epochs(model, train, train_cfg, train_cfg.epochs, on_epoch=on_epoch)
    return model, test, predict_proba(model, test)
