"""``magnet-fl study``: a resumable grid of consortium scenarios x methods x seeds, with CSV, figures and report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.cohort.data import SPLITS, DataError, available_seeds, detect_layout
from magnet_core.cohort.manifest import DEFAULT_SEED
from magnet_core.consortium import methods as vocabulary
from magnet_core.consortium.methods import BASELINE_METHOD, REFERENCE_METHODS
from magnet_core.consortium.scenarios import Scenario
from magnet_core.consortium.simulated import load_consortium

from . import statistics as st
from .cli import existing_dir
from .nested import RULE as TUNE_RULE
from .nested import compact, expand, validation_pass
from .parallel import parse_workers, resolve_workers, run_tasks
from .pooled_evaluation import CONSORTIUM, EVALUATIONS
from .reporting import console, write_json
from .simulate import (
    FEDERATED_METHODS,
    METHODS,
    VALIDATION_MCC,
    RunSpec,
    method_settings,
    parse_overrides,
    run_methods,
)
from .tune import PERSONALIZE_KEY, check_grid

BUILTIN_DIR = Path(__file__).parent / "studies"
# A study's default seeds: ten, from the one default seed (simulate and centralized keep DEFAULT_SEEDS, five).
STUDY_SEEDS: tuple[int, ...] = tuple(DEFAULT_SEED + 10 * i for i in range(10))
# Two evaluations per run (simulations/pooled_evaluation.py): own sites' test patients (no prefix) and the
# consortium's test patients (CONSORTIUM prefix: every model of a method scores every site's test patients).
OWN_COLUMNS = ("mcc", "acc", "f1", "auroc", "auprc", "paired_mcc", "unpaired_mcc")
CONSORTIUM_COLUMNS = tuple(CONSORTIUM + k for k in ("mcc", "acc", "paired_mcc", "unpaired_mcc"))
METRIC_COLUMNS = (*OWN_COLUMNS, *CONSORTIUM_COLUMNS)
# The validation score the "highest-validation-mcc" rule reads (a run record's metrics key; never a test metric).
VALIDATION_METRIC = VALIDATION_MCC
# Per (cell, seed): the consortium's training patients (train + val, what every method fits on) and test patients,
# counted from the sites the run built; the Nadeau-Bengio correction uses n_test / n_train.
SIZE_COLUMNS = ("n_train", "n_test")
SUMMARY_METRICS = ("mcc", "acc", "f1", "paired_mcc", "unpaired_mcc", *CONSORTIUM_COLUMNS)
# A study's `evaluation`: which of the two its comparisons, target and figure use (the report shows both).
EVALUATION_PREFIX = {"own": "", "consortium": CONSORTIUM}
# Contrast order: each trained method vs local-only, then vs centralized, then vs the baseline strategy.
REFERENCES = ("local_only", "centralized")
assert set(REFERENCES) == set(REFERENCE_METHODS)
BASELINE = BASELINE_METHOD
COMPARISON_COLUMNS = ["kind", "label", "cell", "cell_b", "method", "method_b", "metric", "n", "mean_diff", "std_diff",
                      "ci_low", "ci_high", "p_value", "p_holm", "p_bh", "nb_ci_low", "nb_ci_high", "nb_p_value",
                      "test_train_ratio", "units", "verdict"]
CELL_WORDS = ("higher", "lower")  # cell contrasts: the same method scores higher / lower in cell a than in b
FINDINGS = "## Findings (generated from the per-seed results)"
STATISTICS_NOTE = ("Per cell: mean, sample standard deviation (ddof = 1) and a 95% t interval for the mean over "
                   "seeds (n = number of finished seeds). Methods are compared paired by seed (a seed fixes the "
                   "train/test split and the sites, the same for every method of a cell): the mean of the per-seed "
                   "MCC differences with its 95% t interval and a two-sided paired t-test (scipy.stats.ttest_rel). "
                   "A method \"helps\" or \"hurts\" only where that interval excludes 0; otherwise the report says "
                   "no difference was detected. Next to each raw p-value: Holm and Benjamini-Hochberg adjusted "
                   "p-values over all of the report's comparisons with a p-value (one family per report). Seeds "
                   "re-split the same patients, so their training sets overlap and the plain t interval is too "
                   "narrow; next to it, the resampling-corrected interval of Nadeau and Bengio (2003): variance of "
                   "the mean (1/J + n_test/n_train) s^2 instead of s^2/J, J paired seeds, n_test/n_train the mean "
                   "over those seeds of the consortium's test over training (train + val) patients recorded by "
                   "each run; blank where the runs did not record their sizes. Verdicts follow the plain interval.")


class Cell(BaseModel):
    """One point of the grid: a scenario (and optionally its own dataset, preset or modality subset)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    x: float | str = Field(description="value on the study's x axis")
    group: str = Field("", description="series label within the study (e.g. even vs concentrated)")
    dataset: str | None = None
    preset: str | None = None
    modalities: list[str] = Field(default_factory=list)
    test_graph: Literal["among-test", "attach-to-train", "isolated"] | None = Field(
        None, description="test-graph rule of this cell (default: the study's)")
    settings: dict[str, Any] | None = Field(None, description="run-config settings of this cell's "
                                     "federated methods and evaluation (kebab-case keys, as `simulate --set`), "
                                     "e.g. secure-evaluation = true; over the study's")
    scenario: dict[str, Any]


class Contrast(BaseModel):
    """Two cells compared per method, paired by seed (e.g. concentrated minus even missingness)."""

    model_config = ConfigDict(extra="forbid")

    a: str = Field(description="cell id (minuend)")
    b: str = Field(description="cell id (subtrahend)")
    label: str = ""
    methods: list[str] = Field(default_factory=list, description="methods to compare (default: all of the study's)")


class BestMethodRule(BaseModel):
    """The rule, declared in the study before it runs, that names each cell's best trained method (the one the
    target sentence judges). ``highest-validation-mcc``: the trained method with the highest mean validation MCC
    (``VALIDATION_METRIC`` of the run records; the sites' validation patients, never test patients) over the
    cell's seeds; none when no method recorded it. ``declared``: ``method``, the pre-declared primary comparison."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["highest-validation-mcc", "declared"] = "highest-validation-mcc"
    method: str | None = Field(None, description="the declared method (rule 'declared' only)")

    @model_validator(mode="after")
    def _check(self) -> "BestMethodRule":
        if (self.rule == "declared") != (self.method is not None):
            raise ValueError("best_method: rule 'declared' needs `method`, and only it takes one")
        return self

    def describe(self) -> str:
        if self.rule == "declared":
            return f"the method declared before the runs, {method_label(self.method)}"
        return "highest mean validation MCC over the seeds, declared before the runs; test metrics are not read"


class Study(BaseModel):
    """A study: shared settings, its cells and optional cell-vs-cell contrasts."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    question: str = ""
    dataset: str
    preset: str = "ov"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(10, ge=1)
    seeds: list[int] = Field(default_factory=lambda: list(STUDY_SEEDS), min_length=1)
    methods: list[str] = Field(default_factory=lambda: list(METHODS), min_length=1,
                               description="names from magnet_core.consortium.methods.METHODS")
    x_label: str = "x"
    test_graph: Literal["among-test", "attach-to-train", "isolated"] = Field(
        "among-test", description="test-graph rule: among-test (the paper's), attach-to-train (deployment) or "
        "isolated (each test patient scored alone: no neighbour brings its site's label mix in)")
    target_gap: float | None = Field(None, ge=0, description="per cell, report whether the best trained method is at "
                                     "or above local-only and within this MCC of centralized")
    evaluation: Literal["own", "consortium"] = Field(
        "own", description="the test evaluation the comparisons, the target and the figure use, declared before "
        "the runs: own (each site's own test patients, with the model it would use) or consortium (every model of "
        "a method scores every site's test patients; local-only is then judged on the whole test population, not "
        "on its own site's label mix). The table and the findings show both, labelled")
    best_method: "BestMethodRule" = Field(default_factory=lambda: BestMethodRule(),
                                          description="how a cell's best trained method is chosen, fixed before "
                                          "the runs (never from test results)")
    settings: dict[str, Any] | None = Field(None, description="run-config settings of every cell "
                                     "(kebab-case keys, as `simulate --set`); a cell's own settings win")
    tune: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="per method, a grid of one or two settings (kebab-case keys, as "
        "`magnet-fl tune --grid`), e.g. fedprox = { proximal-mu = [0.01, 0.1, 1.0] }: each (cell, seed) chooses "
        "the value on its own validation patients (simulations/nested.py) and reports the run with it")
    cells: list[Cell] = Field(min_length=1)
    contrasts: list[Contrast] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "Study":
        ids = [c.id for c in self.cells]
        for what, values in (("cell ids", ids), ("seeds", self.seeds), ("methods", self.methods)):
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{what} must be unique; repeated: {repeated}")
        for k, con in enumerate(self.contrasts):
            for side in (con.a, con.b):
                if side not in ids:
                    raise ValueError(f"contrasts[{k}] names cell {side!r}; the cells are {ids}")
            extra = sorted(set(con.methods) - set(self.methods))
            if extra:
                raise ValueError(f"contrasts[{k}] names methods {extra} that the study does not run")
        declared = self.best_method.method
        if declared is not None and (declared not in self.methods or declared in REFERENCES):
            raise ValueError(f"best_method.method {declared!r} is not a trained method the study runs "
                             f"({[m for m in self.methods if m not in REFERENCES]})")
        for cell in self.cells:
            try:
                self.overrides_of(cell)
            except ValueError as exc:
                raise ValueError(f"cell {cell.id!r} settings: {exc}") from None
        self.tune = {method: self._checked_grid(method, grid) for method, grid in self.tune.items()}
        return self

    def _checked_grid(self, method: str, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """One ``[tune]`` entry, checked as ``magnet-fl tune --grid`` is (simulations.tune.check_grid); a setting
        also fixed by the study's or a cell's ``settings`` is refused (it would be set in two places)."""
        where = f"[tune] {method}"
        if method not in self.methods:
            raise ValueError(f"{where}: not a method the study runs ({self.methods})")
        checked = check_grid(method, grid, where)
        for cell in self.cells:
            fixed = {**(self.settings or {}), **(cell.settings or {})}
            clash = sorted(k for k in checked if k in fixed or k.replace("-", "_") in fixed)
            if clash:
                raise ValueError(f"{where} {clash[0]}: also fixed by the settings of cell {cell.id!r}; give it in "
                                 f"one place")
        return checked

    @property
    def metric(self) -> str:
        """The MCC column of the study's declared evaluation."""
        return EVALUATION_PREFIX[self.evaluation] + "mcc"

    def overrides_of(self, cell: Cell) -> dict[str, Any]:
        """The cell's run-config settings (the study's, then the cell's) as checked RunSpec overrides."""
        return parse_overrides(list({**(self.settings or {}), **(cell.settings or {})}.items()), self.methods)

    def test_graph_of(self, cell: Cell) -> str:
        return cell.test_graph or self.test_graph

    def scenario_of(self, cell: Cell) -> Scenario:
        return Scenario.model_validate({"name": f"{self.name}/{cell.id}", **cell.scenario})


def data_sets_note(study: Study) -> str:
    """Which dataset and preset each cell used (a cell may name its own), for the report's setup line."""
    by_data: dict[tuple[str, str], list[str]] = {}
    for c in study.cells:
        by_data.setdefault((c.dataset or study.dataset, c.preset or study.preset), []).append(c.id)
    if len(by_data) == 1:
        (dataset, preset), _ = by_data.popitem()
        return f"`{dataset}`, preset `{preset}`"
    return "; ".join(f"`{dataset}`, preset `{preset}` (cells {', '.join(ids)})"
                     for (dataset, preset), ids in by_data.items())


def rules_note(study: Study) -> str:
    """How the cells' test graphs were built, for the report's setup line."""
    rules = {study.test_graph_of(c) for c in study.cells}
    words = {"among-test": "`among-test` (each site's test patients among themselves, the paper's rule)",
             "attach-to-train": "`attach-to-train` (each test patient attached to the site's training patients, "
                                "as `predict` does)",
             "isolated": "`isolated` (each test patient scored alone, without neighbours)"}
    if len(rules) == 1:
        return words[rules.pop()]
    return "given per cell (" + "; ".join(f"{c.id}: `{study.test_graph_of(c)}`" for c in study.cells) + ")"


def settings_note(study: Study) -> str:
    """The cells' run-config settings, for the report's setup line ("" when no cell sets any)."""
    by_settings: dict[str, list[str]] = {}
    for c in study.cells:
        merged = {**(study.settings or {}), **(c.settings or {})}
        if merged:
            text = ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in sorted(merged.items()))
            by_settings.setdefault(text, []).append(c.id)
    if not by_settings:
        return ""
    parts = "; ".join(f"{text} (cells {', '.join(ids)})" for text, ids in by_settings.items())
    secure = " Under `secure-evaluation = true` every method's evaluation counts (confusion matrices, score " \
             "histograms; local-only: each site's own model on its own test patients) are summed by secure " \
             "aggregation before the minimum count k is applied, to the sums: a site with fewer than k test " \
             "patients still contributes, and no per-site metric is released." if any(
                 {**(study.settings or {}), **(c.settings or {})}.get("secure-evaluation") for c in study.cells) else ""
    return f" Run-config settings: {parts}.{secure}"


def tune_note(study: Study) -> str:
    """The study's grids and how each run's setting was chosen, for the report's setup line ("" without grids)."""
    if not study.tune:
        return ""
    grids = "; ".join(f"{method_label(m)}: " + ", ".join(f"`{k}` in {json.dumps(v)}" for k, v in grid.items())
                      for m, grid in study.tune.items())
    return (f" Settings chosen per split on validation patients only ({grids}): {TUNE_RULE}. Each run's chosen "
            f"setting and every grid setting's validation MCC: the tidy CSV's `tuned` column. A tuned method's "
            f"validation MCC is the highest of its grid's, which favours it under a best-method rule that reads "
            f"validation MCC; its test MCC is scored after the choice.")


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


def method_label(method: str) -> str:
    return vocabulary.label(method)


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
    scenario = study.scenario_of(cell).model_dump(mode="json", exclude_none=True)  # TOML keys are strings
    # Atomic (temporary file, then one rename): workers running other seeds of this cell read it meanwhile.
    tmp = scenario_file.with_name(f".{scenario_file.name}.tmp-{os.getpid()}")
    tmp.write_text(tomli_w.dumps(scenario))
    os.replace(tmp, scenario_file)
    dataset = cell.dataset or study.dataset
    spec = RunSpec(data_path=str(resolve_dataset(data, dataset)), scenario=str(scenario_file), seed=seed,
                   preset=cell.preset or study.preset, rounds=study.rounds, local_epochs=study.local_epochs,
                   modalities=",".join(cell.modalities), engine=engine, out_dir=cell_dir,
                   test_graph=study.test_graph_of(cell), overrides=study.overrides_of(cell),
                   validation_metric=study.metric)  # validation scored as the study's test: the same evaluation
    # the rule "highest-validation-mcc" reads each run's validation MCC (validation-only view: a second training per
    # untuned method; a tuned method's is its chosen setting's): only a study with a target uses the rule, so only
    # it pays for the untuned methods' second training
    record = study.target_gap is not None and study.best_method.rule == "highest-validation-mcc"
    t0 = time.perf_counter()
    sizes: dict[str, int] = {}
    tuned: dict[str, dict] = {}
    errors: dict[str, str] = {}
    try:
        sizes = split_sizes(spec)
        # first the validation-only view (settings chosen, validation MCCs): no test label is read before the
        # reported runs below
        checked = validation_pass(spec, todo, {m: g for m, g in study.tune.items() if m in todo}, record)
        tuned, errors = checked.tuned, checked.errors
        spec = checked.reported_spec(spec)
        results, _, seconds = run_methods(spec, [m for m in todo if m not in errors], advance=advance)
        for method, score in checked.val_mcc.items():
            results.get(method, {})[VALIDATION_MCC] = score
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
                   "modalities": cell.modalities, "test_graph": study.test_graph_of(cell), "split_sizes": sizes,
                   "run_settings": None if error or method in errors else run_settings(spec, method),
                   "tuned": tuned.get(method), "error": error or errors.get(method),
                   # the thread count changes the order of floating-point sums: part of what reproduces a run
                   "torch_threads": torch_threads()}
        write_json(cell_result_path(out, cell, method, seed), payload)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_settings(spec: RunSpec, method: str) -> dict[str, Any] | None:
    """The settings a trained method's reported run used (after nested tuning); None for the references."""
    if method == "personalized":
        return {PERSONALIZE_KEY: spec.personalize_part, **method_settings("federated", spec.overrides)}
    if method not in FEDERATED_METHODS:
        return None
    return method_settings(method, {**spec.overrides, **spec.method_overrides.get(method, {})})


def split_sizes(spec: RunSpec) -> dict[str, int]:
    """Patients per split (train, val, test) summed over the consortium's sites, as the run builds them (the same
    data, scenario, seed and modalities; a split depends on nothing else)."""
    _, sites = load_consortium(spec.data_path, spec.scenario, spec.seed, spec.modalities)
    return {name: int(sum((s.split == name).sum() for s in sites)) for name in SPLITS}


def sizes_columns(split: dict[str, int] | None) -> dict[str, int | None]:
    """``n_train`` (train + val: every method fits on both) and ``n_test`` of a run record's ``split_sizes``."""
    if not split or "test" not in split:
        return {k: None for k in SIZE_COLUMNS}
    return {"n_train": int(split.get("train", 0)) + int(split.get("val", 0)), "n_test": int(split["test"])}


@dataclasses.dataclass(frozen=True)
class CellSeedRun:
    """One (cell, seed) of a study, as sent to a worker process (or run here)."""

    study: Study
    cell: Cell
    seed: int
    data: Path
    out: Path
    engine: str

    def __str__(self) -> str:
        return f"cell {self.cell.id} seed {self.seed}"


def run_cell_seed_task(run: CellSeedRun, advance) -> None:
    """:func:`run_cell_seed` as a task of :func:`simulations.parallel.run_tasks` (its results are its files)."""
    run_cell_seed(run.study, run.cell, run.seed, run.data, run.out, run.engine, advance)


def shipped_seeds(data: Path, dataset: str) -> list[int] | None:
    """The seeds a dataset ships splits for (a MAGNET split layout: its numeric sub-folders, each preprocessed on
    its own training patients); None when any seed can be split (a cohort layout or the generated cohort)."""
    path = resolve_dataset(data, dataset)
    return available_seeds(path) if detect_layout(path) == "split" else None


def run_grid(study: Study, data: Path, out: Path, engine: str = "inprocess", workers: int | str = 1,
             advance=lambda n: None, describe=lambda text: None) -> int:
    """Run every (cell, seed) of the study that has methods without a result file, seed-major (an interrupted
    serial study has whole seeds for every cell), on up to ``workers`` processes (same result files as one by one;
    see :mod:`simulations.parallel`). ``advance(n)``: rounds done (finished ones counted at once). Returns the
    number of processes used."""
    todo = []
    shipped = {cell.id: shipped_seeds(data, cell.dataset or study.dataset) for cell in study.cells}
    for cell in study.cells:
        missing = [s for s in study.seeds if shipped[cell.id] is not None and s not in shipped[cell.id]]
        if missing:
            console.print(f"cell {cell.id}: its data ship splits for seeds {shipped[cell.id]} only; seeds {missing} "
                          f"are not run (a split made here would reuse the shipped preprocessing, chosen with the "
                          f"labels of some of its test patients)")
    for seed in study.seeds:
        for cell in study.cells:
            if shipped[cell.id] is not None and seed not in shipped[cell.id]:
                advance(len(study.methods) * study.rounds)  # nothing to run: the progress bar still ends
                continue
            done = [m for m in study.methods if cell_result_path(out, cell, m, seed).exists()]
            advance(len(done) * study.rounds)
            if len(done) < len(study.methods):
                todo.append(CellSeedRun(study, cell, seed, data, out, engine))
    n_workers = resolve_workers(workers, max(1, len(todo)))
    if n_workers > 1 and engine != "inprocess":
        raise ValueError(f"--workers {workers} needs --engine inprocess: the {engine!r} engine starts its own "
                         f"simulation runtime per run, which parallel workers would contend for")
    if n_workers == 1:
        def announce(i: int, _: None) -> None:
            if i + 1 < len(todo):
                describe(f"{study.name} {todo[i + 1].cell.id} seed {todo[i + 1].seed}")
        if todo:
            describe(f"{study.name} {todo[0].cell.id} seed {todo[0].seed}")
        run_tasks(run_cell_seed_task, todo, 1, advance=advance, on_result=announce)
    else:
        describe(f"{study.name}: {len(todo)} cell-seeds on {n_workers} workers")
        run_tasks(run_cell_seed_task, todo, n_workers, advance=advance)
    return n_workers


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
                row.update({k: r["metrics"].get(k) for k in (*METRIC_COLUMNS, VALIDATION_METRIC)})
                row.update(sizes_columns(r.get("split_sizes")))
                row.update({"seconds": r["seconds"], "seconds_per_round": r["seconds_per_round"],
                            "n_modalities": len(r["modalities"]) or None, "tuned": compact(r.get("tuned")),
                            "threads": r.get("torch_threads"), "error": r["error"] or ""})
                rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ statistics


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, method): mean, sample std, 95% t interval and n of each metric, plus failures and cost."""
    keys = ["cell", "group", "x", "method"]
    summary = st.summarize_groups(df, keys, SUMMARY_METRICS)
    extra = df.groupby(keys, sort=False).agg(seeds=("seed", "count"),
                                             failures=("error", lambda v: int((v.fillna("") != "").sum())),
                                             seconds_per_round=("seconds_per_round", "mean")).reset_index()
    return summary.merge(extra, on=keys, how="left")


def method_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(a, b) comparisons within a cell: every trained method vs each reference, and vs the baseline strategy."""
    trained = [m for m in methods if m not in REFERENCES]
    pairs: list[tuple[str, str]] = []
    for m in trained:
        pairs += [(m, ref) for ref in REFERENCES if ref in methods]
        if m != BASELINE and BASELINE in methods:
            pairs.append((m, BASELINE))
    if not trained and set(REFERENCES) <= set(methods):
        pairs.append(REFERENCES)
    return pairs


def comparisons_frame(study: Study, df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Paired differences by seed of ``metric`` (default: the MCC of the study's declared evaluation): between
    methods within each cell, and between the two cells of each contrast for each method."""
    metric = metric or study.metric
    rows: list[dict] = []
    if metric not in df.columns:
        df = df.assign(**{metric: np.nan})  # runs that did not record this evaluation: no comparison

    def add(kind: str, label: str, cell: str, cell_b: str, method: str, method_b: str, a: pd.DataFrame,
            b: pd.DataFrame) -> None:
        c = st.paired_comparison(st.values_by_unit(a, metric), st.values_by_unit(b, metric),
                                 ratios=test_train_ratios(pd.concat([a, b])))
        rows.append({"kind": kind, "label": label, "cell": cell, "cell_b": cell_b, "method": method,
                     "method_b": method_b, "metric": metric, **c.to_dict()})

    if df.empty:
        return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    for cell in study.cells:
        sub = df[df["cell"] == cell.id]
        for a, b in method_pairs(study.methods):
            add("methods", "", cell.id, cell.id, a, b, sub[sub["method"] == a], sub[sub["method"] == b])
    for con in study.contrasts:
        for m in con.methods or study.methods:
            add("cells", con.label or f"{con.a} vs {con.b}", con.a, con.b, m, m,
                df[(df["cell"] == con.a) & (df["method"] == m)], df[(df["cell"] == con.b) & (df["method"] == m)])
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    frame["p_holm"] = st.holm(frame["p_value"].astype(float))  # one family: every comparison of this report
    frame["p_bh"] = st.benjamini_hochberg(frame["p_value"].astype(float))
    return frame


def test_train_ratios(rows: pd.DataFrame) -> dict:
    """``{seed: n_test / n_train}`` from the rows' recorded sizes (the mean over the rows of a seed: two cells of a
    contrast have their own splits); {} when the rows carry no sizes (runs made before they were recorded)."""
    if not set(SIZE_COLUMNS) <= set(rows.columns) or rows.empty:
        return {}
    n_train = pd.to_numeric(rows["n_train"], errors="coerce")
    n_test = pd.to_numeric(rows["n_test"], errors="coerce")
    ratio = (n_test / n_train.where(n_train > 0)).rename("ratio")
    per_seed = pd.concat([rows["seed"], ratio], axis=1).dropna().groupby("seed")["ratio"].mean()
    return {k: float(v) for k, v in per_seed.items()}


def _adjusted(row: pd.Series, comparisons: pd.DataFrame) -> st.Adjusted:
    return st.Adjusted(row["p_holm"], row["p_bh"], int(comparisons["p_value"].map(st.is_finite).sum()))


def _comparison(row: pd.Series) -> st.PairedComparison:
    return st.PairedComparison(int(row["n"]), row["mean_diff"], row["std_diff"], row["ci_low"], row["ci_high"],
                               row["p_value"], tuple(row["units"]), row["nb_ci_low"], row["nb_ci_high"],
                               row["nb_p_value"], row["test_train_ratio"])


def _cell_stats(row: pd.Series, metric: str = "mcc") -> st.CellStats:
    return st.CellStats(int(row[f"{metric}_n"]), row[f"{metric}_mean"], row[f"{metric}_std"],
                        row[f"{metric}_ci_low"], row[f"{metric}_ci_high"])


# ------------------------------------------------------------------------------------------------ figures


def _half_width(frame: pd.DataFrame, metric: str = "mcc") -> pd.Series:
    """Error bar: half the 95% t interval (0 where there is none, e.g. a single seed)."""
    return (frame[f"{metric}_mean"] - frame[f"{metric}_ci_low"]).fillna(0.0)


def evaluation_label(prefix: str) -> str:
    """"own sites' test patients" / "consortium test patients" (simulations.pooled_evaluation.EVALUATIONS)."""
    return EVALUATIONS[prefix]


def plot_study(study: Study, summary: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {m: vocabulary.color(m, cycle[i % len(cycle)]) for i, m in enumerate(study.methods)}
    width = 0.8 / len(study.methods)
    metric = study.metric
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
                ax.errorbar(pd.to_numeric(m["x"]), m[f"{metric}_mean"], yerr=_half_width(m, metric), marker="o",
                            capsize=3,
                            color=colors[method], label=method_label(method))
            else:
                pos = np.arange(len(cells)) + (i - (len(study.methods) - 1) / 2) * width
                vals = [m[m["cell"] == c][f"{metric}_mean"].mean() for c in cells]
                errs = [_half_width(m[m["cell"] == c], metric).mean() for c in cells]
                ax.bar(pos, vals, width=width, yerr=errs, capsize=3, color=colors[method], label=method_label(method))
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
    axes[0][0].set_ylabel(f"test MCC, {evaluation_label(EVALUATION_PREFIX[study.evaluation])}\n(mean and 95% CI, "
                          f"{len(study.seeds)} seeds)", fontsize=9)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{study.name}: {study.description}", fontsize=10)
    fig.tight_layout()
    path = out / f"{study.name}_mcc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    trained = summary[~summary["method"].isin(REFERENCES)]
    if study.name == "extensibility" and not trained.empty:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for method in [m for m in study.methods if m not in REFERENCES]:
            m = trained[trained["method"] == method]
            ax.plot(m["x"].astype(str), m["seconds_per_round"], marker="o", color=colors[method],
                    label=method_label(method))
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


def multiplicity_note(comparisons: pd.DataFrame) -> str:
    """How many comparisons the report makes, how many read helps/hurts on their own 95% interval, and how many
    keep p < 0.05 after Holm and after Benjamini-Hochberg adjustment over the report."""
    n = len(comparisons)
    tested = int(comparisons["p_value"].map(st.is_finite).sum()) if n else 0
    detected = int(comparisons["verdict"].isin(["helps", "hurts"]).sum()) if n else 0
    holm = int((comparisons["p_holm"] < 0.05).sum()) if n else 0
    bh = int((comparisons["p_bh"] < 0.05).sum()) if n else 0
    return (f"This report makes {n} comparisons ({tested} with a p-value); each interval is a 95% interval on its own, "
            f"so about one in twenty comparisons without a real difference is expected to read \"helps\" or "
            f"\"hurts\" by chance. {detected} of the {n} read \"helps\"/\"hurts\" (or higher/lower) on their own "
            f"interval; adjusted over the {tested} p-values (the family: every comparison of this report with a "
            f"p-value), Holm (family-wise error) leaves {holm} below 0.05 and Benjamini-Hochberg (false discovery "
            f"rate) {bh}.{_corrected_note(comparisons)}")


def _corrected_note(comparisons: pd.DataFrame) -> str:
    """How many comparisons have a Nadeau-Bengio interval, and how many of the detected ones it keeps."""
    if comparisons.empty or "nb_ci_low" not in comparisons:
        return ""
    has = comparisons["nb_ci_low"].map(st.is_finite) & comparisons["nb_ci_high"].map(st.is_finite)
    if not has.any():
        return (" No resampling-corrected interval: these runs did not record their train/test sizes.")
    detected = comparisons["verdict"].isin(["helps", "hurts"])
    kept = detected & has & ((comparisons["nb_ci_low"] > 0) | (comparisons["nb_ci_high"] < 0))
    return (f" {int(has.sum())} comparisons have a resampling-corrected (Nadeau-Bengio) interval (mean test/train "
            f"ratio {comparisons.loc[has, 'test_train_ratio'].min():.3f} to "
            f"{comparisons.loc[has, 'test_train_ratio'].max():.3f}); of the {int((detected & has).sum())} of them "
            f"that read \"helps\"/\"hurts\", {int(kept.sum())} keep a corrected interval that excludes 0.")


def headline(study: Study, summary: pd.DataFrame, comparisons: pd.DataFrame,
             best: dict[str, str | None] | None = None) -> list[str]:
    """Markdown bullets generated from the numbers: per cell, each method's MCC (mean ± sample std, 95% CI, n) and
    every paired comparison ("helps"/"hurts" only where its interval excludes 0); then the cell contrasts."""
    lines = []
    for cell in study.cells:
        sub = summary[summary["cell"] == cell.id].set_index("method")
        if sub.empty:
            continue
        where = f"{study.x_label} = {cell.x}{', ' + cell.group if cell.group else ''}"
        text = f"- **{cell.id}** ({where}): " + evaluations_text(study, sub)
        failures = int(sub["failures"].sum())
        if failures:
            text += f"; **{failures} failed run(s)** (see cells/{cell.id}/error-seed*.txt)"
        lines.append(text)
        comp = comparisons[(comparisons["kind"] == "methods") & (comparisons["cell"] == cell.id)]
        for _, row in comp[comp["n"] > 0].iterrows():
            lines.append("  - " + st.comparison_sentence(method_label(row["method"]), method_label(row["method_b"]),
                                                         _comparison(row), adjusted=_adjusted(row, comparisons)))
        target = (target_sentence(study, sub, comp, comparisons, (best or {}).get(cell.id))
                  if study.target_gap is not None else None)
        if target:
            lines.append("  - " + target)
    contrasts = comparisons[(comparisons["kind"] == "cells") & (comparisons["n"] > 0)]
    for label, group in contrasts.groupby("label", sort=False):
        first = group.iloc[0]
        lines.append(f"- **{label}** (cell {first['cell']} vs cell {first['cell_b']}, same method, paired by seed):")
        for _, row in group.iterrows():
            lines.append("  - " + st.comparison_sentence(f"{method_label(row['method'])}, {row['cell']}",
                                                         row["cell_b"], _comparison(row), words=CELL_WORDS,
                                                         adjusted=_adjusted(row, comparisons)))
    return lines


def evaluations_text(study: Study, sub: pd.DataFrame) -> str:
    """One cell's MCC per method under both evaluations, labelled, the study's declared one first (the one its
    comparisons and target use); an evaluation no run of the cell recorded is said to be missing."""
    primary = EVALUATION_PREFIX[study.evaluation]
    texts = []
    for prefix in (primary, *[p for p in EVALUATIONS if p != primary]):
        metric = prefix + "mcc"
        label = f"MCC on {evaluation_label(prefix)}" + (" (compared below)" if prefix == primary else "")
        listed = [m for m in study.methods if m in sub.index]
        if not _recorded(sub, metric):
            texts.append(f"{label}: not recorded by these runs")
            continue
        texts.append(f"{label}: " + "; ".join(f"{method_label(m)} {st.fmt_stats(_cell_stats(sub.loc[m], metric))}"
                                               for m in listed))
    return ". ".join(texts)


def _recorded(sub: pd.DataFrame, metric: str) -> bool:
    """Whether any run of a cell's summary rows has a value of ``metric`` (False: the runs predate it)."""
    return f"{metric}_n" in sub and bool((pd.to_numeric(sub[f"{metric}_n"], errors="coerce").fillna(0) > 0).any())


def best_methods(study: Study, df: pd.DataFrame) -> dict[str, str | None]:
    """Per cell, the trained method the study's pre-declared rule (``study.best_method``) names; None where the rule
    cannot name one (no validation MCC recorded). Only the method, seed and validation columns of ``df`` are passed
    on to the rule: no test metric can take part in the choice."""
    keep = [c for c in ("cell", "method", "seed", VALIDATION_METRIC) if c in df.columns]
    validation = df[keep] if not df.empty else pd.DataFrame(columns=["cell", "method", "seed"])
    trained = [m for m in study.methods if m not in REFERENCES]
    return {cell.id: choose_best(study.best_method, trained,
                                 validation[validation["cell"] == cell.id] if "cell" in validation else validation)
            for cell in study.cells}


def held_out_validation(df: pd.DataFrame) -> pd.DataFrame:
    """``df``'s rows with each tuned run's validation MCC replaced by its grid's validation MCC at the setting chosen
    on the cell's *other* seeds (highest mean over them, ties: the grid's order; leave one seed out), so that a
    tuned method's score is no longer the best of its grid's on the very split it is read on. Seeds re-split the
    same patients, so the other seeds' validation patients overlap this seed's: the optimism is reduced, not removed.
    Untuned rows keep their validation MCC. NaN for a tuned row whose run failed or has no validation MCC, without a
    grid record, whose cell has no other seed with one, whose grid differs from another seed's, or whose other
    seeds score no setting. A sensitivity of the best-method rule, not the rule: the reported runs keep their
    per-split choice."""
    out = df.copy()
    if "tuned" not in out.columns or VALIDATION_METRIC not in out.columns:
        return out
    failed = out["error"].map(lambda e: isinstance(e, str) and bool(e.strip())) if "error" in out.columns \
        else pd.Series(False, index=out.index)
    grids: dict[Any, dict[str, float]] = {}
    for i, text in out["tuned"].items():
        if isinstance(text, str) and text.strip():
            settings, scores, _, _ = expand(text)
            grids[i] = {json.dumps(g, sort_keys=True): float(v) if v is not None else np.nan
                        for g, v in zip(settings, scores)}
    for _, rows in out.loc[list(grids)].groupby(["cell", "method"]) if grids else []:
        for i in rows.index:
            own = grids[i]
            others = [grids[j] for j in rows.index if rows.loc[j, "seed"] != rows.loc[i, "seed"] and grids[j]]
            score = np.nan
            usable = (own and others and not failed[i] and np.isfinite(pd.to_numeric(out.loc[i, VALIDATION_METRIC],
                                                                                       errors="coerce"))
                      and all(list(g) == list(own) for g in others))
            if usable:
                settings = list(own)
                mean = {s: np.mean(v) if (v := [g[s] for g in others if np.isfinite(g[s])]) else -np.inf
                        for s in settings}
                pick = max(settings, key=lambda s: (mean[s], -settings.index(s)))
                score = own[pick] if np.isfinite(mean[pick]) else np.nan
            out.loc[i, VALIDATION_METRIC] = score
    return out


def held_out_best(study: Study, df: pd.DataFrame) -> dict[str, str | None] | None:
    """The rule applied to :func:`held_out_validation`'s scores (None: the rule reads no validation MCC, or no run
    was tuned)."""
    tuned = df["tuned"].map(lambda t: isinstance(t, str) and bool(t.strip())) if "tuned" in df.columns else None
    if study.best_method.rule != "highest-validation-mcc" or tuned is None or not tuned.any():
        return None
    return best_methods(study, held_out_validation(df))


def held_out_ties(study: Study, df: pd.DataFrame, named: dict[str, str | None]) -> dict[str, list[str]]:
    """Per cell, the trained methods whose mean held-out validation MCC equals the named method's exactly (the
    rule's tie-break, the study's method order, then decided the name); cells without a tie are left out."""
    held = held_out_validation(df)
    out = {}
    for cell, name in named.items():
        sub = held[held["cell"] == cell]
        means = pd.to_numeric(sub[VALIDATION_METRIC], errors="coerce").groupby(sub["method"]).mean()
        if name is None or name not in means or not np.isfinite(means[name]):
            continue
        tied = [m for m in study.methods if m not in REFERENCES and m != name and m in means
                and means[m] == means[name]]
        if tied:
            out[cell] = tied
    return out


def held_out_note(best: dict[str, str | None], held_out: dict[str, str | None] | None,
                  ties: dict[str, list[str]] | None = None) -> str:
    """The report's sentence on the rule's sensitivity to tuned methods' max-over-grid validation MCC."""
    if held_out is None:
        return ""
    ties = ties or {}
    differ = [c for c in best if held_out.get(c) != best[c]]
    names = "; ".join(f"{c}: {method_label(held_out[c]) if held_out.get(c) else 'none'}"
                      + (f" (tied with {', '.join(map(method_label, ties[c]))}; named by the study's method order)"
                         if c in ties else "") for c in best)
    return (" Sensitivity of that rule (not the rule): a tuned method's validation MCC is the best of its grid's on "
            "the split it is read on; read instead at the setting its grid chose on the cell's other seeds (leave "
            "one seed out; seeds re-split the same patients, so this reduces that advantage without removing it), "
            f"the rule would name {names}; {len(differ)} of {len(best)} cells differ from the rule's choice"
            + (f" ({', '.join(differ)})." if differ else "."))


def choose_best(rule: BestMethodRule, trained: list[str], validation: pd.DataFrame) -> str | None:
    """The rule applied to one cell's rows (method, seed and at most the validation MCC)."""
    if rule.rule == "declared":
        return rule.method
    if VALIDATION_METRIC not in validation.columns:
        return None
    score = pd.to_numeric(validation[VALIDATION_METRIC], errors="coerce")
    means = score.groupby(validation["method"]).mean().dropna()
    means = means[[m for m in trained if m in means.index]]
    if means.empty:
        return None
    return max(trained, key=lambda m: (means.get(m, -np.inf), -trained.index(m)))  # ties: the study's order


def target_sentence(study: Study, sub: pd.DataFrame, comp: pd.DataFrame, comparisons: pd.DataFrame,
                    best: str | None) -> str | None:
    """Whether the cell's best trained method (``best``, named by the study's pre-declared rule, never by test
    results) is at or above local-only and within ``target_gap`` of centralized, judged on the mean paired
    differences, shown with their intervals and adjusted p-values (``comparisons``: the report's whole family)."""
    if not set(REFERENCES) <= set(study.methods):
        return None
    rule = study.best_method.describe()
    if best is None:
        return (f"target not judged: the study's rule for the best trained method ({rule}) names none, because no "
                f"run of this cell recorded a validation MCC; no method is picked from test results")
    if not _recorded(sub, study.metric):
        return (f"target not judged: MCC on {evaluation_label(EVALUATION_PREFIX[study.evaluation])}, the study's "
                f"declared evaluation, is not recorded by these runs")
    if best not in sub.index or not st.is_finite(sub.loc[best, f"{study.metric}_mean"]):
        return f"target not judged: {method_label(best)}, named by the rule ({rule}), has no finished run"
    diffs = {}
    for ref in REFERENCES:
        row = comp[(comp["method"] == best) & (comp["method_b"] == ref)]
        if row.empty or not st.is_finite(row["mean_diff"].iloc[0]):
            return None
        diffs[ref] = (_comparison(row.iloc[0]), _adjusted(row.iloc[0], comparisons))
    met = diffs["local_only"][0].mean_diff >= 0 and diffs["centralized"][0].mean_diff >= -study.target_gap
    return (f"target (at or above local-only and within {study.target_gap:.2f} of centralized, on the means, MCC "
            f"on {evaluation_label(EVALUATION_PREFIX[study.evaluation])}) "
            f"{'**met**' if met else '**not met**'} by the best trained method ({rule}), {method_label(best)}: "
            f"vs local-only {st.fmt_difference(*diffs['local_only'][:1], adjusted=diffs['local_only'][1])}; "
            f"vs centralized {st.fmt_difference(*diffs['centralized'][:1], adjusted=diffs['centralized'][1])}")


def seeds_note(study: Study, df: pd.DataFrame) -> str:
    """The cells whose finished runs (no error, a value of the declared metric) cover other seeds than the
    study's: a split layout that ships fewer, failed or unfinished runs. Per cell, the seeds it has when all its
    methods have the same ones, else per method; empty when every cell and method has every seed."""
    want = sorted(study.seeds)
    value = pd.to_numeric(df[study.metric], errors="coerce") if study.metric in df.columns else pd.Series(
        np.nan, index=df.index)
    error = df["error"].fillna("").astype(str) if "error" in df.columns else pd.Series("", index=df.index)
    ok = df[(error == "") & value.notna()]
    if ok.empty:
        return " No run has the compared metric yet."
    parts = []
    for cell in study.cells:
        rows = ok[ok["cell"] == cell.id]
        have = {m: sorted(int(s) for s in rows[rows["method"] == m]["seed"].unique()) for m in study.methods}
        if all(seeds == want for seeds in have.values()):
            continue
        if len({tuple(seeds) for seeds in have.values()}) == 1:
            parts.append(f"{cell.id}: {next(iter(have.values()))}")
        else:
            parts.append(f"{cell.id}: " + ", ".join(f"{method_label(m)} {seeds}" for m, seeds in have.items()
                                                    if seeds != want))
    return (" Cells whose runs have the compared metric for other seeds than these (a split layout that ships "
            "fewer, failed or unfinished runs, or every site withholding its evaluation): "
            + "; ".join(parts) + ".") if parts else ""


def threads_note(df: pd.DataFrame) -> str:
    """The torch thread counts the runs recorded: a run reproduces exactly (same code, seed and machine) only at
    its own thread count, which changes the order of floating-point sums."""
    recorded = pd.to_numeric(df["threads"], errors="coerce").dropna() if "threads" in df.columns else pd.Series()
    if recorded.empty:
        return (" Torch threads per run: not recorded (runs made before it was); a run reproduces exactly only at "
                "its own thread count.")
    counts = ", ".join(f"{int(k)}: {int(v)} runs" for k, v in recorded.value_counts().sort_index().items())
    missing = len(df) - len(recorded)
    return (f" Torch threads per run: {counts}" + (f", not recorded: {missing} runs" if missing else "")
            + "; a run reproduces exactly only at its own thread count.")


def write_report(study: Study, summary: pd.DataFrame, comparisons: pd.DataFrame, figures: list[Path], out: Path,
                 data_note: str, best: dict[str, str | None] | None = None, runs_note: str = "",
                 held_out: dict[str, str | None] | None = None, ties: dict[str, list[str]] | None = None) -> Path:
    table = summary.copy()
    table["method"] = table["method"].map(method_label)
    primary = EVALUATION_PREFIX[study.evaluation]
    cols = ["cell", "group", "x", "method"]
    for prefix in (primary, *[p for p in EVALUATIONS if p != primary]):
        short = "own sites" if prefix == "" else "consortium"
        # missing: the run failed (no evaluation at all), or (consortium) these runs predate that evaluation
        failed = (table["failures"] > 0) & ~(pd.to_numeric(table["mcc_n"], errors="coerce").fillna(0) > 0)
        table[f"MCC {short} mean ± sd"] = [
            f"{_f(a)} ± {_f(b)}" if st.is_finite(a) else ("failed" if prefix == "" or f else "not recorded")
            for a, b, f in zip(table[f"{prefix}mcc_mean"], table[f"{prefix}mcc_std"], failed)]
        table[f"MCC {short} 95% CI"] = [_interval(lo, hi) for lo, hi in zip(table[f"{prefix}mcc_ci_low"],
                                                                          table[f"{prefix}mcc_ci_high"])]
        table[f"n {short}"] = table[f"{prefix}mcc_n"]
        cols += [f"MCC {short} mean ± sd", f"MCC {short} 95% CI", f"n {short}"]
    table["paired MCC"] = table[f"{primary}paired_mcc_mean"].map(_f)
    table["unpaired MCC"] = table[f"{primary}unpaired_mcc_mean"].map(_f)
    table["acc"] = table[f"{primary}acc_mean"].map(_f)
    table["s/round"] = table["seconds_per_round"].map(lambda v: f"{v:.2f}" if st.is_finite(v) else "")
    cols += ["paired MCC", "unpaired MCC", "acc", "failures", "s/round"]
    md = [f"# Study `{study.name}`", "", study.description, ""]
    if study.question:
        md += [f"**Question.** {study.question}", ""]
    md += [f"**Setup.** Data ({data_note}): {data_sets_note(study)}. {study.rounds} rounds x "
           f"{study.local_epochs} local epochs (centralized and local-only train "
           f"{study.rounds * study.local_epochs} epochs), seeds "
           f"{study.seeds}.{runs_note} Every method is scored twice, with the test-graph rule "
           f"{rules_note(study)}: on "
           "**own sites' test patients** (each site scores its own test patients with the model it would use; "
           "local-only: its own, which rewards a model that has learned which site a patient comes from) and on "
           "**consortium test patients** (every model of the method scores every site's test patients; one "
           "global model: the same patients and model). The comparisons, the target and the figure use "
           f"**{evaluation_label(EVALUATION_PREFIX[study.evaluation])}** (`evaluation = \"{study.evaluation}\"`, "
           "declared before the runs); the table and the findings show both. "
           "Global metrics come from summed confusion matrices (exactly the pooled predictions). Paired / unpaired "
           "MCC (and acc) in the table: the declared evaluation's; test patients with all / not all of the cell's "
           "modalities after the simulated missingness; a blank "
           "value means every site withheld that split (a site with between 1 and k - 1 test patients in either "
           "group, k the consortium's minimum count, releases neither, so one cannot be derived from the total)."
           + settings_note(study) + tune_note(study),
           "",
           f"**Statistics.** {STATISTICS_NOTE} {multiplicity_note(comparisons)}"
           + (f" Best trained method per cell (for the target): {study.best_method.describe()}."
              if study.target_gap is not None else "") + held_out_note(best or {}, held_out, ties), "", FINDINGS, ""]
    md += headline(study, summary, comparisons, best) + [""]
    md += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    md += ["## Table", "", _markdown_table(table[cols]), ""]
    if (comparisons["n"] > 0).any():
        comp = comparisons[comparisons["n"] > 0].copy()
        comp["a"] = [f"{method_label(m)} @ {c}" for m, c in zip(comp["method"], comp["cell"])]
        comp["b"] = [f"{method_label(m)} @ {c}" for m, c in zip(comp["method_b"], comp["cell_b"])]
        comp["a − b"] = comp["mean_diff"].map(lambda v: _f(v, sign=True))
        comp["95% CI"] = [_interval(lo, hi, sign=True) for lo, hi in zip(comp["ci_low"], comp["ci_high"])]
        comp["p (paired t)"] = comp["p_value"].map(st.fmt_p_cell)
        comp["p Holm"] = comp["p_holm"].map(st.fmt_p_cell)
        comp["p BH"] = comp["p_bh"].map(st.fmt_p_cell)
        comp["corrected 95% CI"] = [_interval(lo, hi, sign=True) for lo, hi in zip(comp["nb_ci_low"],
                                                                                    comp["nb_ci_high"])]
        comp["p corrected"] = comp["nb_p_value"].map(st.fmt_p_cell)
        md += [f"## Paired comparisons (MCC on {evaluation_label(primary)})", "",
               f"Family: the {int(comp['p_value'].map(st.is_finite).sum())} comparisons with a p-value; Holm and "
               "Benjamini-Hochberg adjust within it. Corrected: the Nadeau-Bengio resampling-corrected interval "
               "and p-value (blank where the runs did not record their train/test sizes).", "",
               _markdown_table(comp[["a", "b", "n", "a − b", "95% CI", "p (paired t)", "p Holm", "p BH",
                                     "corrected 95% CI", "p corrected", "verdict"]]),
               ""]
    md += [f"Per-seed rows: `{study.name}_tidy.csv`; summary (mean, sample std, 95% CI and n per cell and method, and "
           f"every paired comparison): `{study.name}_summary.json`. Rerun with the same command to resume; finished "
           "cells are not run again.", ""]
    path = out / f"{study.name}_report.md"
    path.write_text("\n".join(md))
    return path


def _f(v: Any, sign: bool = False) -> str:
    return "" if not st.is_finite(v) else (f"{v:+.3f}" if sign else f"{v:.3f}")


def _interval(lo: Any, hi: Any, sign: bool = False) -> str:
    return f"{_f(lo, sign)} to {_f(hi, sign)}" if st.is_finite(lo) and st.is_finite(hi) else ""


def _markdown_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    sep = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def write_outputs(study: Study, df: pd.DataFrame, out: Path, data_note: str, wall_seconds: float = float("nan")
                  ) -> Path:
    """Tidy CSV (per-seed rows), summary JSON (mean, std, CI, n and the comparisons), figures and the report."""
    df.to_csv(out / f"{study.name}_tidy.csv", index=False)
    summary = summary_frame(df)
    comparisons = comparisons_frame(study, df)
    best = best_methods(study, df)
    held_out = held_out_best(study, df)
    ties = held_out_ties(study, df, held_out) if held_out is not None else {}
    write_json(out / f"{study.name}_summary.json",
               {"study": study.name, "seeds": study.seeds, "methods": study.methods, "statistics": STATISTICS_NOTE,
                "adjustment": {"methods": ["holm", "benjamini-hochberg"],
                               "family_size": int(comparisons["p_value"].map(st.is_finite).sum())},
                "best_method": {**study.best_method.model_dump(), "chosen": best,
                                **({"held_out_chosen": held_out, "held_out_ties": ties}
                                   if held_out is not None else {})},
                "evaluation": {"declared": study.evaluation, "metric": study.metric,
                               "label": evaluation_label(EVALUATION_PREFIX[study.evaluation])},
                "tune": {"grids": study.tune, "rule": TUNE_RULE} if study.tune else None,
                "rows": summary.to_dict(orient="records"), "comparisons": comparisons.to_dict(orient="records"),
                "wall_seconds": wall_seconds,  # of this invocation only: a resumed study re-trains nothing
                "runs_seconds_total": float(pd.to_numeric(df.get("seconds", pd.Series(dtype=float)),
                                                          errors="coerce").sum())})
    figures = plot_study(study, summary, out)
    return write_report(study, summary, comparisons, figures, out, data_note, best,
                        seeds_note(study, df) + threads_note(df), held_out, ties)


def reanalyse(study: Study, tidy_csv: Path, out: Path, data_note: str, drop_groups: bool = False) -> Path:
    """Rewrite summary, figures and report from an existing tidy CSV (no training). ``drop_groups`` blanks the
    paired/unpaired columns, e.g. for runs made before the paired flag was recomputed after missingness."""
    df = pd.read_csv(tidy_csv, keep_default_na=False, na_values=[""])
    for text in ("error", "group"):  # all blank in the CSV: read as float NaN
        df[text] = df[text].astype(object).where(df[text].notna(), "")
    for column in METRIC_COLUMNS:
        if column not in df.columns:  # a CSV written before that evaluation was recorded
            df[column] = np.nan
    if drop_groups:
        df[["paired_mcc", "unpaired_mcc"]] = np.nan
    study = study.model_copy(update={"seeds": sorted(int(s) for s in df["seed"].unique())})
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.toml").write_text(tomli_w.dumps(study.model_dump(mode="json", exclude_none=True)))
    return write_outputs(study, df, out, data_note)


# ------------------------------------------------------------------------------------------------ CLI


def select(study: Study, cells: str | None, methods: str | None) -> Study:
    """The study restricted to some of its cells and methods (``--cells``, ``--methods``); unknown names are
    refused naming what the study has."""
    update: dict[str, Any] = {}
    if cells:
        keep = [c.strip() for c in cells.split(",") if c.strip()]
        unknown = sorted(set(keep) - {c.id for c in study.cells})
        if unknown or not keep:
            raise ValueError(f"--cells: unknown {unknown or 'none given'}; study {study.name!r} has cells "
                             f"{[c.id for c in study.cells]}")
        update["cells"] = [c for c in study.cells if c.id in keep]
        update["contrasts"] = [k for k in study.contrasts if k.a in keep and k.b in keep]
    if methods:
        keep = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = sorted(set(keep) - set(study.methods))
        if unknown or not keep:
            raise ValueError(f"--methods: unknown {unknown or 'none given'}; study {study.name!r} runs "
                             f"{study.methods}")
        update["methods"] = [m for m in study.methods if m in keep]
        update["tune"] = {m: g for m, g in study.tune.items() if m in keep}
        update["contrasts"] = [k.model_copy(update={"methods": [m for m in k.methods if m in keep]})
                               for k in update.get("contrasts", study.contrasts)
                               if not k.methods or set(k.methods) & set(keep)]
    return study.model_copy(update=update)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_dir, required=True,
                   help="data root holding the study's dataset folders (or one dataset folder)")
    p.add_argument("--study", required=True, help=f"built-in study ({', '.join(builtin_studies())}) or a TOML file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default=None, help="override the study's seeds, e.g. 10,20,30")
    p.add_argument("--cells", default=None, help="run only these cells (comma-separated ids); contrasts between "
                   "cells left out are dropped")
    p.add_argument("--methods", default=None, help="run only these of the study's methods (comma-separated)")
    p.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                   help="inprocess (default for sweeps) or Flower's simulation engine")
    p.add_argument("--workers", type=parse_workers, default=1,
                   help="run cell-seeds on this many worker processes, one torch thread each on a machine with "
                        "that many cores (auto: one per CPU; needs --engine inprocess); same result files as one "
                        "by one (default 1)")


def run(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    if args.seeds:
        from .cli import parse_seeds

        study = study.model_copy(update={"seeds": parse_seeds(args.seeds)})
    study = select(study, args.cells, args.methods)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.toml").write_text(tomli_w.dumps(study.model_dump(mode="json", exclude_none=True)))
    for cell in study.cells:
        resolve_dataset(args.data, cell.dataset or study.dataset)
    total = len(study.cells) * len(study.seeds) * len(study.methods) * study.rounds
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task(study.name, total=total)
        run_grid(study, args.data, out, args.engine, args.workers, advance=lambda n: progress.advance(task, n),
                 describe=lambda text: progress.update(task, description=text))
    df = tidy_frame(study, out)
    report = write_outputs(study, df, out, f"real TCGA data from {args.data}",
                           wall_seconds=time.perf_counter() - t0)
    findings = report.read_text().split(FINDINGS, 1)[1].split("\n## ", 1)[0]
    for line in findings.splitlines():
        if line.strip() and not line.startswith("!["):
            console.print(line.replace("**", ""))
    console.print(f"wrote {out}/{study.name}_tidy.csv, _summary.json, _mcc.png, {report.name} "
                  f"({time.perf_counter() - t0:.0f} s)")
    return 0
