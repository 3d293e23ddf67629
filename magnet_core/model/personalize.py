"""Personalization: a site fine-tunes part of the global model on its own patients, stopped early on validation."""

from __future__ import annotations

import copy
import zlib
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from magnet_core.model.config import TrainConfig
from magnet_core.model.loss import magnet_loss
from magnet_core.model.metrics import confusion_counts, metrics_from_confusion
from magnet_core.model.network import MAGNET
from magnet_core.model.site import SiteRuntime
from magnet_core.model.train import forward

Part = Literal["head", "head+graph"]
PARTS: tuple[str, ...] = ("head", "head+graph")
HEAD_PREFIXES = ("head_hidden.", "head_out.")  # MAGNET's MLP head after the graph layers (the classifier)
DEFAULT_MAX_EPOCHS = 50
DEFAULT_PATIENCE = 10
MIN_VAL = 5  # fewer validation patients than this at a site: carve a validation set from its training patients
VAL_FRACTION = 0.2  # share of the training patients carved for validation when the site has too few


def part_prefixes(model: MAGNET, part: str) -> tuple[str, ...]:
    """Parameter-name prefixes fine-tuned for ``part``: "head" = ``head_hidden.`` + ``head_out.``;
    "head+graph" = those and the last graph layer ``convs.<L-1>.``. Everything else (encoders, attention, the
    other graph layers) stays frozen."""
    if part == "head":
        return HEAD_PREFIXES
    if part == "head+graph":
        return (*HEAD_PREFIXES, f"convs.{len(model.convs) - 1}.")
    raise ValueError(f"unknown part {part!r}; choose one of {list(PARTS)}")


class PersonalizationRecord(BaseModel):
    """What one site's fine-tuning did (validation = cross-entropy of held-out training patients)."""

    model_config = ConfigDict(extra="forbid")

    site: str
    part: str
    trainable: list[str] = Field(description="parameter names fine-tuned")
    n_train: int = Field(ge=0, description="patients whose labels the fine-tuning used")
    n_val: int = Field(ge=0, description="patients whose labels chose the epoch")
    validation: str = Field(description="'site split val' or how the validation patients were carved")
    epochs_run: int = Field(ge=0)
    best_epoch: int = Field(ge=0, description="0 = no epoch beat the global weights; they are kept")
    val_loss_before: float | None
    val_loss_after: float | None
    val_mcc_before: float | None
    val_mcc_after: float | None


def split_for_personalization(runtime: SiteRuntime, seed: int, min_val: int = MIN_VAL,
                              val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray, str]:
    """(fine-tune, validation) positions within ``runtime.train`` (its train+val patients, in that set's order) and
    where the validation patients come from: the site's own "val" split when it holds at least ``min_val``
    patients; otherwise ``val_fraction`` of all its training patients, stratified by class, seeded by ``seed``."""
    from sklearn.model_selection import train_test_split

    cohort = runtime.cohort
    rows = cohort.split_indices("train", "val")  # runtime.train holds exactly these patients, in this order
    is_val = cohort.split[rows] == "val"
    if int(is_val.sum()) >= min_val:
        return np.flatnonzero(~is_val), np.flatnonzero(is_val), "site split val"
    n = len(rows)
    pos = np.arange(n)
    if n < 2:
        return pos, np.zeros(0, dtype=np.int64), f"none: the site has {n} training patient(s)"
    y = runtime.train.y.numpy()
    size = max(1, int(round(val_fraction * n)))
    stratify = y if np.bincount(y).min(initial=n) >= 2 and size >= len(np.unique(y)) else None
    try:
        tr, va = train_test_split(pos, test_size=size, stratify=stratify, random_state=seed)
    except ValueError:  # a class too small to appear on both sides
        tr, va = train_test_split(pos, test_size=size, random_state=seed)
        stratify = None
    how = "stratified" if stratify is not None else "random (a class has fewer than 2 patients)"
    return (np.sort(tr), np.sort(va),
            f"carved {len(va)} of {n} training patients, {how}, seed {seed} (site split val has "
            f"{int(is_val.sum())} < {min_val})")


@torch.no_grad()
def _val_scores(model: MAGNET, runtime: SiteRuntime, val: torch.Tensor) -> tuple[float | None, float | None]:
    """Cross-entropy and MCC of the validation patients (eval mode, the site's training graph)."""
    if val.numel() == 0:
        return None, None
    model.eval()
    logits, _ = forward(model, runtime.train)
    y = runtime.train.y.index_select(0, val)
    out = logits.index_select(0, val)
    loss = float(F.cross_entropy(out, y))
    cm = confusion_counts(y.numpy(), out.argmax(dim=1).numpy(), runtime.cohort.num_classes)
    return loss, float(metrics_from_confusion(cm)["mcc"])


def personalize(runtime: SiteRuntime, global_params: Mapping[str, np.ndarray | torch.Tensor], part: str,
                cfg: TrainConfig, *, seed: int, max_epochs: int = DEFAULT_MAX_EPOCHS,
                patience: int = DEFAULT_PATIENCE, lr: float | None = None, min_val: int = MIN_VAL,
                val_fraction: float = VAL_FRACTION) -> tuple[dict[str, np.ndarray], PersonalizationRecord]:
    """Fine-tune ``part`` of the global model at one site; return its personalized params and a record.

    Works on a copy of ``runtime.model`` (the runtime is not changed). Loss = training's loss (cross-entropy on the
    fine-tune patients + ``cfg.kl_weight`` x the similarity KL over the site's training graph), full-batch on the
    site's training graph (train + val patients; validation patients' labels are never in the loss), Adam with
    ``lr`` (default ``cfg.lr``) and ``cfg.weight_decay`` over the trainable parameters only. After each epoch the
    validation cross-entropy is measured; the weights of the best epoch are returned (epoch 0 = the global weights,
    kept when no epoch is better) and training stops after ``patience`` epochs without improvement or
    ``max_epochs``. Seeded by ``seed`` and the site's name: the same inputs give bit-identical weights on CPU."""
    if max_epochs < 0 or patience < 1:
        raise ValueError(f"max_epochs must be >= 0 and patience >= 1 (got {max_epochs}, {patience})")
    model = copy.deepcopy(runtime.model)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)).clone() for k, v in global_params.items()},
                          strict=True)
    prefixes = part_prefixes(model, part)
    trainable = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    fit_pos, val_pos, source = split_for_personalization(runtime, seed, min_val, val_fraction)
    fit_idx, val_idx = torch.from_numpy(fit_pos.astype(np.int64)), torch.from_numpy(val_pos.astype(np.int64))
    torch.manual_seed(seed * 100_003 + zlib.crc32(runtime.name.encode()) % 100_000)

    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_before, mcc_before = _val_scores(model, runtime, val_idx)
    best_loss, best_mcc, best_epoch, epochs_run = loss_before, mcc_before, 0, 0
    if fit_idx.numel() and val_idx.numel() and max_epochs:
        opt = torch.optim.Adam([p for n, p in model.named_parameters() if n in trainable],
                               lr=cfg.lr if lr is None else lr, weight_decay=cfg.weight_decay)
        g, y_fit = runtime.train.graph, runtime.train.y.index_select(0, fit_idx)
        since_best = 0
        for epoch in range(1, max_epochs + 1):
            model.train()
            opt.zero_grad(set_to_none=True)
            logits, fused = forward(model, runtime.train)
            loss, _ = magnet_loss(logits.index_select(0, fit_idx), y_fit, g.edge_index, g.edge_weight, fused,
                                  cfg.kl_weight)
            loss.backward()
            opt.step()
            epochs_run = epoch
            val_loss, val_mcc = _val_scores(model, runtime, val_idx)
            if val_loss < best_loss:  # type: ignore[operator]
                best_loss, best_mcc, best_epoch, since_best = val_loss, val_mcc, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
                if since_best >= patience:
                    break
    params = {k: v.cpu().numpy().copy() for k, v in best_state.items()}
    record = PersonalizationRecord(
        site=runtime.name, part=part, trainable=trainable, n_train=int(fit_idx.numel()), n_val=int(val_idx.numel()),
        validation=source, epochs_run=epochs_run, best_epoch=best_epoch, val_loss_before=loss_before,
        val_loss_after=best_loss, val_mcc_before=mcc_before, val_mcc_after=best_mcc)
    return params, record


def personalize_sites(runtimes: Sequence[SiteRuntime], global_params: Mapping[str, np.ndarray | torch.Tensor],
                      part: str, cfg: TrainConfig, *, seed: int, **kwargs) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                                  list[PersonalizationRecord]]:
    """:func:`personalize` at every site from the same global params: ({site name: params}, records)."""
    own: dict[str, dict[str, np.ndarray]] = {}
    records = []
    for runtime in runtimes:
        own[runtime.name], record = personalize(runtime, global_params, part, cfg, seed=seed, **kwargs)
        records.append(record)
    return own, records
