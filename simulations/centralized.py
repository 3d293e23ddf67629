"""Centralized MAGNET runs (the paper's protocol): train on train+val, test on test, per seed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.cohort.data import Cohort, DataError, detect_layout, load_for_seed
from magnet_core.cohort.generated import GENERATED_NOTICE, make_generated_cohort
from magnet_core.model.config import Preset
from magnet_core.model.metrics import metrics_with_groups, summarize

from .parallel import resolve_workers, run_tasks
from .reporting import console, print_summary, test_patient_text, write_json


def cohort_loader(data: str | Path | None, log: Callable[..., None] = console.print) -> Callable[[int], Cohort]:
    """seed -> Cohort, for a data path or (None) the generated cohort."""
    if data is None:
        return lambda seed: make_generated_cohort(seed=seed)
    return lambda seed: load_for_seed(data, seed, log=log)


def train_centralized(cohort: Cohort, preset: Preset, seed: int, epochs: int | None = None,
                      on_epoch: Callable[[int, dict], None] | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """Train one model on the cohort's train+val patients: (its weights, its test metrics (all/paired/unpaired))."""
    from magnet_core.model.train import fit_and_predict

    train_cfg = preset.train if epochs is None else preset.train.model_copy(update={"epochs": epochs})
    model, test, probs = fit_and_predict(cohort, preset.model, train_cfg, preset.graph, seed, on_epoch=on_epoch)
    params = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return params, metrics_with_groups(test.y.numpy(), probs.numpy(), test.paired.numpy(), cohort.num_classes)


def evaluate_centralized(cohort: Cohort, preset: Preset, seed: int, epochs: int | None = None,
                         on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, float | None]:
    """Train one model on the cohort's train+val patients and return its test metrics (all/paired/unpaired)."""
    return train_centralized(cohort, preset, seed, epochs, on_epoch)[1]


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One seed's training, as sent to a worker process (or run here)."""

    cohort: Cohort
    preset: Preset
    seed: int

    def __str__(self) -> str:
        return f"seed {self.seed}"


@dataclasses.dataclass(frozen=True)
class SeedResult:
    params: dict[str, np.ndarray]
    metrics: dict[str, float | None]
    seconds: float  # training and testing of this seed, in the process that ran it


def train_seed(run: SeedRun, advance: Callable[[int], None]) -> SeedResult:
    """Train and test one seed; ``advance(1)`` after every epoch (a task of :func:`simulations.parallel.run_tasks`)."""
    t0 = time.perf_counter()
    params, metrics = train_centralized(run.cohort, run.preset, run.seed, None, on_epoch=lambda e, s: advance(1))
    return SeedResult(params, metrics, time.perf_counter() - t0)


@dataclasses.dataclass
class PackageSpec:
    """Where and with which key a centralized run writes its model package (one per seed)."""

    path: Path
    signing_key: Path
    signing_cert: Path

    def path_for(self, seed: int, seeds: list[int]) -> Path:
        """``path`` itself for one seed; ``<stem>-seed<N><suffix>`` for each of several."""
        if len(seeds) == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}-seed{seed}{self.path.suffix or '.magnet'}")


def check_packageable(data: str | Path | None) -> None:
    """A package must describe how its inputs were scaled. Data used as loaded (MAGNET split layout, generated
    cohort) qualify; a cohort-layout folder is min-max scaled at load time with this run's training statistics,
    which the package manifest cannot carry, so it is refused before any training."""
    if data is not None and detect_layout(data) == "cohort":
        raise DataError(f"{data}: --package needs data whose features are used as given (a MAGNET split layout or a "
                        f"generated cohort); this cohort-layout folder is min-max scaled at load time with this "
                        f"run's training statistics, which a package cannot record. Train federated on prepared "
                        f"sites (magnet-fl prepare) to get a package with its preprocessing")


def write_centralized_package(spec: PackageSpec, path: Path, params: dict[str, np.ndarray], cohort: Cohort,
                              preset: Preset, seed: int, data: str | Path | None,
                              metrics: dict[str, float | None]) -> Path:
    """The signed package of one centralized model: its manifest (the cohort's modalities and features in model
    order), preset, run settings (data, seed, epochs) and its test metrics; `magnet-fl predict` reads it as it
    reads a federated one."""
    from magnet_core.artefacts.model_package import manifest_from_cohort, write_package

    run_config = {"mode": "centralized", "data": "generated" if data is None else str(data), "seed": seed,
                  "preset": preset.name, "epochs": preset.train.epochs}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    return write_package(path, params, manifest=manifest_from_cohort(cohort), preset=preset.name,
                         model_cfg=preset.model, graph_cfg=preset.graph, run_config=run_config,
                         signing_key=spec.signing_key, signing_cert=spec.signing_cert, metrics=numeric,
                         method="centralized")


def run_centralized(data: str | Path | None, seeds: list[int], preset: Preset, out: Path,
                    epochs: int | None = None, shown_as: Path | None = None,
                    package: PackageSpec | None = None, workers: int | str = 1) -> dict:
    """Read every seed's cohort first (bad data stop the run before any training), then train each seed with a
    progress bar, print the table and write ``out/results.json`` (``shown_as``: the path to print instead of
    ``out``, when ``out`` is a staging folder). ``results.json`` records the epochs that ran. ``package``: also
    write each seed's model as a signed package (see :class:`PackageSpec`). ``workers``: seeds train on up to this
    many worker processes (``"auto"``: one per CPU; see :mod:`simulations.parallel`), with the same results as
    one by one; per-seed lines, packages and results are written in seed order."""
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if package is not None:  # key, certificate and data checked before any training
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from magnet_core.artefacts.model_package import PackageError, load_certificate, load_signing_key

        check_packageable(data)
        key, cert = load_signing_key(package.signing_key), load_certificate(package.signing_cert)
        pub = cert.public_key()
        if not isinstance(pub, type(key.public_key())) or key.public_key().public_bytes(
                Encoding.Raw, PublicFormat.Raw) != pub.public_bytes(Encoding.Raw, PublicFormat.Raw):
            raise PackageError(f"{package.signing_cert}: this certificate is not the signing key's certificate")
    generated = data is None
    if generated:
        console.print(f"[bold yellow]Using a {GENERATED_NOTICE}; pass --data PATH for real data.[/]")
    n_workers = resolve_workers(workers, len(seeds))
    load = cohort_loader(data)
    cohorts = {seed: load(seed) for seed in seeds}
    if epochs is not None:  # what runs is what is recorded
        preset = preset.model_copy(update={"train": preset.train.model_copy(update={"epochs": epochs})})
    n_epochs = preset.train.epochs
    info: dict = {}  # the cohort of the last seed, as before
    runs = [SeedRun(cohorts.pop(seed), preset, seed) for seed in seeds]
    per_seed: list[dict] = []
    test_patients: dict[str, list[int]] = {"all": [], "paired": [], "unpaired": []}  # per seed
    seconds: list[float] = []
    packages: list[str] = []
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("centralized", total=len(seeds) * n_epochs)

        def finished(i: int, result: SeedResult) -> None:  # called in seed order
            run = runs[i]
            info.update({"cohort": run.cohort.name, "generated": run.cohort.generated,
                         **run.cohort.availability()})
            per_seed.append(result.metrics)
            paired = run.cohort.paired[run.cohort.split_indices("test")]
            for group, n in (("all", paired.size), ("paired", int(paired.sum())), ("unpaired", int((~paired).sum()))):
                test_patients[group].append(int(n))
            seconds.append(result.seconds)
            if package is not None:
                path = write_centralized_package(package, package.path_for(run.seed, seeds), result.params,
                                                 run.cohort, preset, run.seed, data, result.metrics)
                packages.append(str(path))
                progress.console.print(f"seed {run.seed}: signed model package {path}")
            progress.console.print(f"seed {run.seed}: test MCC {result.metrics['mcc']:.3f}  "
                                   f"acc {result.metrics['acc']:.3f}")
            if i + 1 < len(runs) and n_workers == 1:
                progress.update(task, description=f"seed {runs[i + 1].seed}")

        progress.update(task, description=f"seed {seeds[0]}" if n_workers == 1 else f"{len(seeds)} seeds on "
                        f"{n_workers} workers")
        run_tasks(train_seed, runs, n_workers, advance=lambda n: progress.advance(task, n), on_result=finished)
    wall = time.perf_counter() - t0
    summary = summarize(per_seed)
    where = "generated cohort" if generated else Path(data).name
    title = f"MAGNET centralized on {where} ({len(seeds)} seeds, preset {preset.name})"
    if generated:
        title += f" — {GENERATED_NOTICE}"
    print_summary(title, {"centralized": summary},
                  pooled={g: test_patient_text(v) for g, v in test_patients.items()})
    payload = {
        "mode": "centralized",
        "data": "generated" if generated else str(data),
        "generated_data": generated,
        "cohort": info,
        "preset": preset.model_dump(),
        "seeds": seeds,
        "epochs": n_epochs,
        "metrics": summary,
        "test_patients": test_patients,  # group -> per seed, the test patients its metrics are computed over
        "wall_seconds": wall,
        "workers": n_workers,
        "seconds_per_seed": seconds,  # each seed's training and testing, in the process that ran it
    }
    if package is not None:
        payload["packages"] = packages
    path = write_json(out / "results.json", payload)
    if shown_as is not None:
        path = Path(shown_as) / path.relative_to(out)
    console.print(f"wrote {path} ({wall:.1f} s)" + (f" — {GENERATED_NOTICE}" if generated else ""))
    return payload
