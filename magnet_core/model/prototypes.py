r"""Class prototypes of the fused patient embedding, shared across sites under the minimum count k (``fedproto``).

The method is FedAvg (modality-aware) whose local loss adds FedProto's prototype term: Tan et al., "FedProto:
Federated prototype learning across heterogeneous clients", AAAI 2022 (eq. 5 and Algorithm 1), as FedProc does
with a shared model (Mu et al., "FedProc: Prototypical contrastive federated learning on non-IID data", Future
Generation Computer Systems 2023). With :math:`h_i` the fused embedding of training patient i (the input of the
graph decoder, the representation MAGNET's KL term shapes) and :math:`\bar C^{(c)}` the consortium's prototype of
class c, a site minimises

.. math::  \mathcal L = \mathrm{CE} + w_{KL}\,\mathrm{KL} + \lambda\,\frac{1}{|I|}\sum_{i\in I}
           \frac{1}{d}\lVert h_i - \bar C^{(y_i)}\rVert^2,

I the training patients whose class has a prototype, d the embedding width (FedProto's MSE). Under label skew the
term ties each site's embedding of a class to the consortium's, so a site with few patients of a class does not
drift its own way, and the shared decoder sees one geometry per class.

**What leaves a site, and when.** The prototypes travel inside the model, as two buffers (``prototype_sum`` (C, d),
``prototype_mass`` (C,)), so they need no new message and the site's record of what it sent covers them. They are
statistics, not weights: the coordinator screens and clips the weights without them and checks them on their own
(``magnet_core.federation.aggregate.prototype_problems`` / ``prototype_outliers``); a run with them aggregates in
the clear (``server/config.py`` refuses them with secure aggregation or DP, which would clip them with the weights),
and a site answers such a round only if its policy sets ``release_class_prototypes``, at its own k and split seed
(``client/policy.py``). After local training a site replaces, for each class c with **at least k training patients**
(k: the larger of the consortium's and its own minimum count), the received pair by its own class mean and mass 1:
``(mean_c, 1)``; for every other class it returns exactly what it received. The coordinator's weighted average (by
training patients, as for every shared array) then holds, for each class, :math:`S_c = \sum_s w_s S_{s,c}` and
:math:`m_c = \sum_s w_s m_{s,c}`, and the prototype is :math:`\bar C^{(c)} = S_c / m_c`: in the first round the
weighted mean of the contributing sites' class means, later a running mix with the previous prototype for the sites
that hold fewer than k of the class. A released class mean describes at least k patients; a site with fewer than k
patients of a class releases nothing about them beyond the weights themselves. (Like any update, a class mean is a
function the coordinator's weights choose: the k rule bounds whom it averages, not what a crafted encoder extracts;
only DP noise would bound that, and prototype runs have none yet.)

A class whose mass is below :data:`MIN_MASS` has no prototype (no site held k of it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from magnet_core.model.network import MAGNET

MIN_MASS = 0.05  # below this share of the consortium's weight a received prototype is not used (a guard: honest
# masses are 0 or at least the smallest contributing site's weight share)


def class_means(fused: Tensor, y: Tensor, num_classes: int, min_count: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of ``fused`` (n, d) over the patients of that class, and which classes have at least
    ``min_count`` patients (C,) bool; the mean of a class below ``min_count`` is 0 and must not be released."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    y = y.long()
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, fused.size(1), dtype=torch.float64).index_add_(0, y, fused.double())
    held = counts >= min_count
    means = torch.where(held.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), torch.zeros_like(sums))
    return means.to(fused.dtype), held


def site_release(received_sum: Tensor, received_mass: Tensor, means: Tensor, held: Tensor) -> tuple[Tensor, Tensor]:
    """What a site sends back: ``(mean_c, 1)`` for each class it holds at least k patients of, the received pair
    unchanged for every other class (module docstring)."""
    out_sum = torch.where(held.unsqueeze(1), means.to(received_sum.dtype), received_sum)
    out_mass = torch.where(held, torch.ones_like(received_mass), received_mass)
    return out_sum, out_mass


def global_prototypes(prototype_sum: Tensor, prototype_mass: Tensor) -> tuple[Tensor, Tensor]:
    """The consortium's prototypes :math:`S_c / m_c` (C, d) and which classes have one (mass >= :data:`MIN_MASS`).
    Received arrays are the coordinator's: a non-finite value is refused (ValueError), a mass outside [0, 1]
    (DP noise, or a dishonest coordinator) is clipped to it, so one class's prototype is at most 1 / MIN_MASS times
    the received sum."""
    if not (bool(torch.isfinite(prototype_sum).all()) and bool(torch.isfinite(prototype_mass).all())):
        raise ValueError("the received class prototypes hold non-finite values")
    if prototype_sum.dim() != 2 or prototype_mass.shape != prototype_sum.shape[:1]:
        raise ValueError(f"class prototypes: sum {tuple(prototype_sum.shape)} and mass "
                         f"{tuple(prototype_mass.shape)} do not fit (C, d) and (C,)")
    mass = prototype_mass.clamp(0.0, 1.0)
    defined = mass >= MIN_MASS
    protos = prototype_sum / mass.clamp_min(MIN_MASS).unsqueeze(1)
    return torch.where(defined.unsqueeze(1), protos, torch.zeros_like(protos)), defined


def prototype_loss(fused: Tensor, y: Tensor, prototypes: Tensor, defined: Tensor) -> Tensor:
    r"""FedProto's term: the mean over patients whose class has a prototype of :math:`\lVert h_i - \bar
    C^{(y_i)}\rVert^2 / d`; 0 (with a gradient path) when none has."""
    y = y.long()
    use = defined[y]
    if not bool(use.any()):
        return fused.sum() * 0.0
    diff = fused[use] - prototypes[y[use]].to(fused.dtype)
    return diff.pow(2).mean()


def prediction_params(params: dict) -> dict:
    """``params`` without the class-prototype buffers: what a model without them (every scoring model) loads; the
    buffers never change a prediction."""
    return {k: v for k, v in params.items() if not MAGNET.is_statistic(k)}
