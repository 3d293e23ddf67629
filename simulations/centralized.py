"""Centralized MAGNET runs (the paper's protocol): train on train+val, test on test, per seed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.config import Preset
from magnet_core.data import Cohort, load_for_seed
from magnet_core.metrics import metrics_with_groups, summarize
from magnet_core.synthetic import GENERATED_NOTICE, make_generated_cohort

from .reporting import console, print_summary, write_json


def cohort_loader(data: str | Path | None, log: Callable[..., None] = console.print) -> Callable[[int], Cohort]:
    """seed -> Cohort, for a data path or (None) the generated cohort."""
    if data is None:
        return lambda seed: make_generated_cohort(seed=seed)
    return lambda seed: load_for_seed(data, seed, log=log)


def evaluate_centralized(cohort: Cohort, preset: Preset, seed: int, epochs: int | None = None,
                         on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, float | None]:
    """Train one model on the cohort's train+val patients and return its test metrics (all/paired/unpaired)."""
    from magnet_core.train import fit_and_predict

    train_cfg = preset.train if epochs is None else preset.train.model_copy(update={"epochs": epochs})
    _, test, probs = fit_and_predict(cohort, preset.model, train_cfg, preset.graph, seed, on_epoch=on_epoch)
    return metrics_with_groups(test.y.numpy(), probs.numpy(), test.paired.numpy(), cohort.num_classes)


def run_centralized(data: str | Path | None, seeds: list[int], preset: Preset, out: Path,
                    epochs: int | None = None, shown_as: Path | None = None) -> dict:
    """Read every seed's cohort first (bad data stop the run before any training), then train each seed with a
    progress bar, print the table and write ``out/results.json`` (``shown_as``: the path to print instead of
    ``out``, when ``out`` is a staging folder). ``results.json`` records the epochs that ran."""
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    generated = data is None
    if generated:
        console.print(f"[bold yellow]Using a {GENERATED_NOTICE}; pass --data PATH for real data.[/]")
    load = cohort_loader(data)
    cohorts = {seed: load(seed) for seed in seeds}
    if epochs is not None:  # what runs is what is recorded
        preset = preset.model_copy(update={"train": preset.train.model_copy(update={"epochs": epochs})})
    n_epochs = preset.train.epochs
    per_seed, info = [], {}
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("centralized", total=len(seeds) * n_epochs)
        for seed in seeds:
            cohort = cohorts.pop(seed)
            info = {"cohort": cohort.name, "generated": cohort.generated, **cohort.availability()}
            progress.update(task, description=f"seed {seed}")
            metrics = evaluate_centralized(cohort, preset, seed, None,
                                           on_epoch=lambda e, s: progress.advance(task))
            per_seed.append(metrics)
            progress.console.print(f"seed {seed}: test MCC {metrics['mcc']:.3f}  acc {metrics['acc']:.3f}")
    wall = time.perf_counter() - t0
    summary = summarize(per_seed)
    title = f"MAGNET centralized on {'generated cohort' if generated else Path(data).name} ({len(seeds)} seeds, preset {preset.name})"
    if generated:
        title += f" — {GENERATED_NOTICE}"
    print_summary(title, {"centralized": summary})
    payload = {
        "mode": "centralized",
        "data": "generated" if generated else str(data),
        "generated_data": generated,
        "cohort": info,
        "preset": preset.model_dump(),
        "seeds": seeds,
        "epochs": n_epochs,
        "metrics": summary,
        "wall_seconds": wall,
    }
    path = write_json(out / "results.json", payload)
    if shown_as is not None:
        path = Path(shown_as) / path.relative_to(out)
    console.print(f"wrote {path} ({wall:.1f} s)" + (f" — {GENERATED_NOTICE}" if generated else ""))
    return payload
