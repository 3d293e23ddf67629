"""A site's runtime: its patients and graphs (built once), local training and count-based evaluation."""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import numpy as np
import torch

from magnet_core.cohort.data import Cohort
from magnet_core.model.config import ModelConfig, TrainConfig
from magnet_core.model.graph import PatientGraph
from magnet_core.model.loss import label_offsets
from magnet_core.model.metrics import DEFAULT_BINS, EvalCounts, confusion_counts, score_histogram
from magnet_core.model.network import MAGNET
from magnet_core.model.optim import GradientStep
from magnet_core.model.prototypes import class_means, global_prototypes, site_release
from magnet_core.model.train import (
    PatientSet,
    PrototypePull,
    fused_embeddings,
    in_dims_of,
    make_optimizer,
    predict_proba,
    split_sets,
    train_epochs,
)

TestGraph = Literal["among-test", "attach-to-train", "isolated"]
TEST_GRAPHS = ("among-test", "attach-to-train", "isolated")


@dataclasses.dataclass
class SiteRuntime:
    """Everything a site keeps between rounds. Graphs never join patients of two sites or of train and test."""

    name: str
    cohort: Cohort
    train: PatientSet
    test: PatientSet
    model: MAGNET
    sparsity: float = 0.8
    k: int = 10  # top-k graphs (above graph_topk.DENSE_MAX_PATIENTS patients), also for attach-to-train
    _reference: object | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def build(cls, name: str, cohort: Cohort, model_cfg: ModelConfig, sparsity: float, graph: str = "auto",
              k: int = 10, shared_model: bool = False) -> "SiteRuntime":
        """``shared_model``: work in the process's :func:`scratch_model` instead of a model of its own (simulated
        sites of one process, which handle one message at a time and load the weights they are sent first)."""
        train, test = split_sets(cohort, sparsity, graph, k)
        model = (scratch_model(cohort, model_cfg) if shared_model
                 else MAGNET(in_dims_of(cohort), cohort.num_classes, model_cfg))
        return cls(name, cohort, train, test, model, sparsity, k)

    @property
    def modality_counts(self) -> dict[str, int]:
        return self.train.modality_counts(self.cohort.modalities)

    def set_params(self, params: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Load weights given as numpy arrays or tensors (copied; the caller's objects are not shared)."""
        state = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in params.items()}
        self.model.load_state_dict(state, strict=True)

    def get_params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def get_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def fit(self, params: Mapping[str, np.ndarray | torch.Tensor], cfg: TrainConfig, local_epochs: int,
            server_round: int, seed: int, proximal_mu: float = 0.0, label_adjustment: str = "none",
            label_tau: float = 0.0, prototype_weight: float = 0.0, min_count: int | None = None,
            local_update: str = "epochs") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train ``local_epochs`` from the global ``params``. The learning rate follows the global StepLR
        schedule ((round - 1) * local_epochs epochs done so far); the RNG is seeded by (seed, round, site).
        ``proximal_mu`` > 0: FedProx, the local loss gains (mu / 2) * ||w - params||^2. ``label_adjustment`` /
        ``label_tau``: logit offsets from this site's own training-label counts (:meth:`label_counts`; nothing
        about them leaves the site) inside the local cross-entropy (:func:`~magnet_core.model.loss.label_offsets`).
        ``prototype_weight`` > 0: FedProto's pull towards the received class prototypes; a model with prototype
        buffers then gets this site's class means, for the classes with at least ``min_count`` (k) training
        patients only (:mod:`magnet_core.model.prototypes`).

        ``local_update`` "gradient" (fedsgd): instead of local epochs, one step of plain gradient descent of size 1
        on the whole training graph, so the update (new - params) is minus this site's full-batch gradient at
        ``params`` (coupled weight decay included, as centralized training's Adam adds it); the coordinator runs
        the optimiser (server.config ``server-optimizer`` preset-adam). The gradient is taken over the whole
        training graph in one pass (no neighbour sampling), so a site too large for that fails the round."""
        if local_update not in ("epochs", "gradient"):
            raise ValueError(f"unknown local update {local_update!r}; choose epochs or gradient")
        self.set_params(params)
        done = (server_round - 1) * local_epochs
        lr = cfg.lr * cfg.lr_gamma ** (done // cfg.lr_step)
        opt, _ = make_optimizer(self.model, cfg.model_copy(update={"lr": lr}))
        torch.manual_seed(seed * 100_003 + server_round * 1_009 + _stable_hash(self.name))
        if self.train.n == 0:
            return self.get_state(), {"loss": float("nan")}
        if local_update == "gradient":
            if prototype_weight > 0 or local_epochs != 1:
                raise ValueError("a gradient update is one full-batch step: local_epochs = 1, no class prototypes")
            step = GradientStep(self.model.parameters(), cfg.weight_decay)
            stats = train_epochs(self.model, self.train, cfg, 1, optimizer=step, scheduler=None, batching="full",
                                 proximal_mu=proximal_mu,
                                 offsets=label_offsets(self.label_counts(), label_adjustment, label_tau))
            return self.get_state(), stats
        offsets = label_offsets(self.label_counts(), label_adjustment, label_tau)
        carries = hasattr(self.model, "prototype_sum")
        if prototype_weight > 0 and not carries:
            raise ValueError("prototype_weight > 0 needs a model with class-prototype buffers (get_preset(..., "
                             "prototypes=True))")
        pull = None
        if carries and prototype_weight > 0:
            protos, defined = global_prototypes(self.model.prototype_sum, self.model.prototype_mass)
            pull = PrototypePull(protos, defined, float(prototype_weight))
        stats = train_epochs(self.model, self.train, cfg, local_epochs, optimizer=opt, scheduler=None,
                             proximal_mu=proximal_mu, offsets=offsets, pull=pull)
        if pull is not None:
            if min_count is None:
                raise ValueError("class prototypes are released only under a minimum count k: give min_count")
            means, held = class_means(fused_embeddings(self.model, self.train), self.train.y,
                                      self.cohort.num_classes, min_count)
            new_sum, new_mass = site_release(self.model.prototype_sum, self.model.prototype_mass, means, held)
            self.model.prototype_sum.copy_(new_sum)
            self.model.prototype_mass.copy_(new_mass)
            stats = {**stats, "prototype_classes": float(held.sum())}
        return self.get_state(), stats

    def label_counts(self) -> torch.Tensor:
        """Training patients per class at this site (C,), from its own labels."""
        return torch.bincount(self.train.y.long(), minlength=self.cohort.num_classes)

    def evaluate_counts(self, params: Mapping[str, np.ndarray | torch.Tensor], bins: int = DEFAULT_BINS,
                        test_graph: TestGraph = "among-test") -> EvalCounts:
        """Confusion matrices (all / paired / unpaired test patients) and binary score histograms (log-odds bins).

        ``test_graph``: "among-test" (the paper's rule: one graph among the site's test patients) or
        "isolated" (no edge: each test patient scored alone, so no neighbour brings the site's label mix into a
        prediction; the graph layers see only the patient itself) or
        "attach-to-train" (the deployment rule: each test patient attached to the site's training patients by the
        same masked cosine and quantile rule, never changing their edges; see magnet_core.model.inductive)."""
        self.set_params(params)
        c = self.cohort.num_classes
        if self.test.n == 0:
            zero = np.zeros((c, c), dtype=np.int64)
            hist = {g: np.zeros((2, bins), np.int64) for g in ("all", "paired", "unpaired")} if c == 2 else {}
            return EvalCounts(self.name, {g: zero.copy() for g in ("all", "paired", "unpaired")}, hist)
        probs = self.test_probabilities(test_graph)
        y, paired = self.test.y.numpy(), self.test.paired.numpy()
        pred = probs.argmax(axis=1)
        groups = {"all": np.ones_like(paired), "paired": paired, "unpaired": ~paired}
        confusion = {g: confusion_counts(y[s], pred[s], c) for g, s in groups.items()}
        histogram = ({g: score_histogram(y[s], probs[s, 1], bins, scale="logit") for g, s in groups.items()}
                     if c == 2 else {})
        return EvalCounts(self.name, confusion, histogram)

    def test_probabilities(self, test_graph: TestGraph = "among-test") -> np.ndarray:
        """Class probabilities of the site's test patients under the current weights."""
        if test_graph == "among-test":
            return predict_proba(self.model, self.test).numpy()
        if test_graph == "isolated":
            return predict_proba(self.model, isolated(self.test)).numpy()
        if test_graph != "attach-to-train":
            raise ValueError(f"test graph {test_graph!r}: choose one of {', '.join(TEST_GRAPHS)}")
        from magnet_core.model.inductive import Reference, default_attach_rule, predict_new

        if self._reference is None:
            self._reference = Reference.from_patient_set(self.train, self.sparsity)
        rule = default_attach_rule(self.train.n, self.k)  # the rule `magnet-fl predict --attach auto` uses
        return predict_new(self.model, self._reference, self.test.xs, self.test.mask, rule).probs


def isolated(patients: PatientSet) -> PatientSet:
    """``patients`` without a single edge: each is scored alone (test graph "isolated")."""
    g = patients.graph
    empty = PatientGraph(g.edge_index.new_zeros((2, 0)), g.edge_weight.new_zeros(0), patients.n, g.rule)
    return dataclasses.replace(patients, graph=empty)


# One working model per (inputs, classes, model settings) in this process (see :func:`scratch_model`).
_SCRATCH: dict[tuple, MAGNET] = {}


def scratch_model(cohort: Cohort, model_cfg: ModelConfig) -> MAGNET:
    """The process's one working model for sites of ``cohort``'s shape: simulated sites in one process (in-process
    engine, a Ray actor) hold no model of their own between messages, because every use (``fit``,
    ``evaluate_counts``) first loads the weights it was sent (all of them: ``load_state_dict(strict=True)``), and
    the sites of a process run one message at a time. So a consortium of n sites holds one model per process,
    not n (4.7 MB each for the OV preset). The weights it is built with are never used."""
    key = (tuple(in_dims_of(cohort).items()), int(cohort.num_classes), model_cfg.model_dump_json())
    if key not in _SCRATCH:
        _SCRATCH.clear()  # one shape at a time: a process running another consortium drops the old model
        _SCRATCH[key] = MAGNET(in_dims_of(cohort), cohort.num_classes, model_cfg)
    return _SCRATCH[key]


def _stable_hash(text: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 100_000
