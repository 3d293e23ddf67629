"""``magnet-fl study``: a resumable grid of consortium scenarios x methods x seeds, with CSV, figures and report."""

from __future__ import annotations

import argparse
import json
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.data import DataError, detect_layout

from .cli import existing_dir
from .reporting import console, write_json
from magnet_core.scenarios import Scenario
from .simulate import METHODS, RunSpec, run_methods

BUILTIN_DIR = Path(__file__).parent / "studies"
METRIC_COLUMNS = ("mcc", "acc", "f1", "auroc", "auprc", "paired_mcc", "unpaired_mcc")


class Cell(BaseModel):
    """One point of the grid: a scenario (and optionally its own dataset, preset or modality subset)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    x: float | str = Field(description="value on the study's x axis")
    group: str = Field("", description="series label within the study (e.g. even vs concentrated)")
    dataset: str | None = None
    preset: str | None = None
    modalities: list[str] = Field(default_factory=list)
    scenario: dict[str, Any]


class Study(BaseModel):
    """A study: shared settings plus its cells."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    question: str = ""
    dataset: str
    preset: str = "ov"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(10, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30], min_length=1)
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    x_label: str = "x"
    cells: list[Cell] = Field(min_length=1)

    def scenario_of(self, cell: Cell) -> Scenario:
        return Scenario.model_validate({"name": f"{self.name}/{cell.id}", **cell.scenario})


def builtin_studies() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}


def load_study(name_or_file: str | Path) -> Study:
    path = Path(name_or_file)
    if not (path.suffix == ".toml" and path.exists()):
        studies = builtin_studies()
        if str(name_or_file) not in studies:
            raise DataError(f"unknown study {str(name_or_file)!r}: not a TOML file and not one of {sorted(studies)}")
        path = studies[str(name_or_file)]
    try:
        study = Study.model_validate(tomllib.loads(path.read_text()))
        for cell in study.cells:
            study.scenario_of(cell)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc})") from None
    except ValidationError as exc:
        raise DataError(f"{path}: invalid study:\n{exc}") from None
    bad = sorted(set(study.methods) - set(METHODS))
    if bad:
        raise DataError(f"{path}: unknown methods {bad}; choose from {list(METHODS)}")
    return study


def resolve_dataset(data: Path, name: str) -> Path:
    """``data`` may be the data root (holding ``name``) or the dataset folder itself."""
    if (data / name).is_dir():
        return data / name
    detect_layout(data)  # raises a clear error when data is not a cohort either
    return data


# ------------------------------------------------------------------------------------------------ running


def cell_result_path(out: Path, cell: Cell, method: str, seed: int) -> Path:
    return out / "cells" / cell.id / f"{method}-seed{seed}.json"


def run_cell_seed(study: Study, cell: Cell, seed: int, data: Path, out: Path, engine: str, advance) -> None:
    """Run the methods of one (cell, seed) whose result files do not exist yet; failures are recorded."""
    todo = [m for m in study.methods if not cell_result_path(out, cell, m, seed).exists()]
    if not todo:
        return
    cell_dir = out / "cells" / cell.id
    cell_dir.mkdir(parents=True, exist_ok=True)
    scenario_file = cell_dir / "scenario.toml"
    scenario = study.scenario_of(cell).model_dump(exclude_none=True)
    scenario["sites"] = {str(k): v for k, v in scenario["sites"].items()}  # TOML keys are strings
    scenario_file.write_text(tomli_w.dumps(scenario))
    dataset = cell.dataset or study.dataset
    spec = RunSpec(data_path=str(resolve_dataset(data, dataset)), scenario=str(scenario_file), seed=seed,
                   preset=cell.preset or study.preset, rounds=study.rounds, local_epochs=study.local_epochs,
                   modalities=",".join(cell.modalities), engine=engine, out_dir=cell_dir)
    t0 = time.perf_counter()
    try:
        results, _, seconds = run_methods(spec, todo, advance=advance)
        error = None
    except Exception as exc:  # a failing cell is a finding, not a crash: record it and go on
        results, seconds, error = {}, {}, f"{type(exc).__name__}: {exc}"
        (cell_dir / f"error-seed{seed}.txt").write_text(traceback.format_exc())
        console.print(f"[red]cell {cell.id} seed {seed} failed: {error}[/]")
    for method in todo:
        payload = {"study": study.name, "cell": cell.id, "group": cell.group, "x": cell.x, "dataset": dataset,
                   "method": method, "seed": seed, "metrics": results.get(method, {}),
                   "seconds": seconds.get(method, time.perf_counter() - t0),
                   "seconds_per_round": seconds.get(method, float("nan")) / study.rounds,
                   "modalities": cell.modalities, "error": error}
        write_json(cell_result_path(out, cell, method, seed), payload)


def tidy_frame(study: Study, out: Path) -> pd.DataFrame:
    """One row per (cell, method, seed), read back from the result files only."""
    rows = []
    for cell in study.cells:
        for method in study.methods:
            for seed in study.seeds:
                path = cell_result_path(out, cell, method, seed)
                if not path.exists():
                    continue
                r = json.loads(path.read_text())
                row = {k: r[k] for k in ("study", "cell", "group", "x", "dataset", "method", "seed")}
                row.update({k: r["metrics"].get(k) for k in METRIC_COLUMNS})
                row.update({"seconds": r["seconds"], "seconds_per_round": r["seconds_per_round"],
                            "n_modalities": len(r["modalities"]) or None, "error": r["error"] or ""})
                rows.append(row)
    return pd.DataFrame(rows)


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    grouped = df.groupby(["cell", "group", "x", "method"], sort=False)
    agg = grouped.agg(mcc_mean=("mcc", "mean"), mcc_std=("mcc", lambda v: float(np.std(v))),
                      acc_mean=("acc", "mean"), f1_mean=("f1", "mean"), seeds=("seed", "count"),
                      failures=("error", lambda v: int((v != "").sum())),
                      seconds_per_round=("seconds_per_round", "mean"))
    return agg.reset_index()


# ------------------------------------------------------------------------------------------------ figures


def plot_study(study: Study, summary: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"centralized": "tab:green", "local_only": "tab:red", "fedavg_plain": "tab:orange",
              "federated": "tab:blue"}
    labels = {"federated": "modality-aware FedAvg", "fedavg_plain": "plain FedAvg", "centralized": "centralized",
              "local_only": "local-only"}
    paths = []
    numeric = pd.to_numeric(summary["x"], errors="coerce").notna().all()
    groups = [g for g in summary["group"].unique()]
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.2 * len(groups), 8.5), 4.3), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        sub = summary[summary["group"] == group]
        cells = list(dict.fromkeys(sub["cell"]))
        for i, method in enumerate(study.methods):
            m = sub[sub["method"] == method]
            if m.empty:
                continue
            if numeric:
                xs = pd.to_numeric(m["x"])
                ax.errorbar(xs, m["mcc_mean"], yerr=m["mcc_std"], marker="o", capsize=3, color=colors[method],
                            label=labels[method])
            else:
                pos = np.arange(len(cells)) + (i - (len(study.methods) - 1) / 2) * 0.2
                vals = [m[m["cell"] == c]["mcc_mean"].mean() for c in cells]
                errs = [m[m["cell"] == c]["mcc_std"].mean() for c in cells]
                ax.bar(pos, vals, width=0.2, yerr=errs, capsize=3, color=colors[method], label=labels[method])
        xs_all = pd.to_numeric(sub["x"], errors="coerce")
        if numeric and (xs_all > 0).all() and xs_all.max() / xs_all.min() >= 100:
            ax.set_xscale("log")  # e.g. Dirichlet alpha from 0.1 to 100
        if not numeric:
            ax.set_xticks(np.arange(len(cells)))
            ax.set_xticklabels([str(sub[sub["cell"] == c]["x"].iloc[0]) for c in cells], rotation=15, fontsize=8)
        ax.set_xlabel(study.x_label)
        ax.set_title(group or study.name, fontsize=10)
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test MCC (mean ± std over {len(study.seeds)} seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{study.name}: {study.description}", fontsize=10)
    fig.tight_layout()
    path = out / f"{study.name}_mcc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    fed = summary[summary["method"].isin(["federated", "fedavg_plain"])]
    if study.name == "extensibility" and not fed.empty:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for method in ("federated", "fedavg_plain"):
            m = fed[fed["method"] == method]
            ax.plot(m["x"].astype(str), m["seconds_per_round"], marker="o", color=colors[method],
                    label=labels[method])
        ax.set_xlabel(study.x_label)
        ax.set_ylabel("seconds per round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{study.name}_cost.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ report


def headline(study: Study, summary: pd.DataFrame) -> list[str]:
    """Findings computed from the summary: per cell, the ranking and the key differences, in plain words."""
    lines = []
    for cell in study.cells:
        sub = summary[summary["cell"] == cell.id].set_index("method")
        if sub.empty:
            continue

        def stat(m: str) -> str:
            if m not in sub.index or pd.isna(sub.loc[m, "mcc_mean"]):
                return "n/a"
            return f"{sub.loc[m, 'mcc_mean']:.3f} ± {sub.loc[m, 'mcc_std']:.3f}"

        parts = [f"{m.replace('_', '-')} {stat(m)}" for m in study.methods]
        text = f"**{cell.id}** ({study.x_label} = {cell.x}{', ' + cell.group if cell.group else ''}): " + ", ".join(parts)
        if {"federated", "fedavg_plain"} <= set(sub.index):
            d = sub.loc["federated", "mcc_mean"] - sub.loc["fedavg_plain", "mcc_mean"]
            if not pd.isna(d):
                text += f"; modality-aware minus plain FedAvg: {d:+.3f}"
        if {"federated", "local_only"} <= set(sub.index):
            d = sub.loc["federated", "mcc_mean"] - sub.loc["local_only", "mcc_mean"]
            if not pd.isna(d):
                text += f"; federated minus local-only: {d:+.3f}"
        failures = int(sub["failures"].sum())
        if failures:
            text += f"; **{failures} failed run(s)** (see cells/{cell.id}/error-seed*.txt)"
        lines.append(text)
    return lines


def write_report(study: Study, df: pd.DataFrame, summary: pd.DataFrame, figures: list[Path], out: Path,
                 data_note: str) -> Path:
    table = summary.copy()
    table["MCC"] = [f"{a:.3f} ± {b:.3f}" if not pd.isna(a) else "failed" for a, b in
                    zip(table["mcc_mean"], table["mcc_std"])]
    table["acc"] = table["acc_mean"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    table["s/round"] = table["seconds_per_round"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    cols = ["cell", "group", "x", "method", "MCC", "acc", "seeds", "failures", "s/round"]
    md = [f"# Study `{study.name}`", "", study.description, ""]
    if study.question:
        md += [f"**Question.** {study.question}", ""]
    md += [f"**Setup.** Data: {data_note}. Preset `{study.preset}`, {study.rounds} rounds x {study.local_epochs} local "
           f"epochs (centralized and local-only train {study.rounds * study.local_epochs} epochs), seeds "
           f"{study.seeds}. Every method is scored on each site's own test patients with the site's own test graph; "
           "global metrics come from summed confusion matrices (exactly the pooled predictions).", "",
           "## Findings (mean ± std over seeds)", ""]
    md += [f"- {line}" for line in headline(study, summary)] + [""]
    md += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    md += ["## Table", "", _markdown_table(table[cols]), "",
           f"Per-seed rows: `{study.name}_tidy.csv`; summary: `{study.name}_summary.json`. Rerun with the same "
           "command to resume; finished cells are not run again.", ""]
    path = out / f"{study.name}_report.md"
    path.write_text("\n".join(md))
    return path


def _markdown_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    sep = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_dir, required=True,
                   help="data root holding the study's dataset folders (or one dataset folder)")
    p.add_argument("--study", required=True, help=f"built-in study ({', '.join(builtin_studies())}) or a TOML file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default=None, help="override the study's seeds, e.g. 10,20,30")
    p.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                   help="inprocess (default for sweeps) or Flower's simulation engine")


def run(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    if args.seeds:
        from .cli import parse_seeds

        study = study.model_copy(update={"seeds": parse_seeds(args.seeds)})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.toml").write_text(tomli_w.dumps(study.model_dump(exclude_none=True)))
    for cell in study.cells:
        resolve_dataset(args.data, cell.dataset or study.dataset)
    total = len(study.cells) * len(study.seeds) * len(study.methods) * study.rounds
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task(study.name, total=total)
        for cell in study.cells:
            for seed in study.seeds:
                done = [m for m in study.methods if cell_result_path(out, cell, m, seed).exists()]
                progress.update(task, description=f"{study.name} {cell.id} seed {seed}")
                progress.advance(task, len(done) * study.rounds)
                run_cell_seed(study, cell, seed, args.data, out, args.engine,
                              advance=lambda n: progress.advance(task, n))
    df = tidy_frame(study, out)
    df.to_csv(out / f"{study.name}_tidy.csv", index=False)
    summary = summary_frame(df)
    write_json(out / f"{study.name}_summary.json",
               {"study": study.name, "seeds": study.seeds, "rows": summary.to_dict(orient="records"),
                "wall_seconds": time.perf_counter() - t0})
    figures = plot_study(study, summary, out)
    report = write_report(study, df, summary, figures, out, f"`{study.dataset}` (real TCGA data from {args.data})")
    for line in headline(study, summary):
        console.print("- " + line.replace("**", ""))
    console.print(f"wrote {out}/{study.name}_tidy.csv, _summary.json, {', '.join(p.name for p in figures)}, "
                  f"{report.name} ({time.perf_counter() - t0:.0f} s)")
    return 0
