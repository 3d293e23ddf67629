"""``magnet-fl tune``: choose a method's settings on the sites' VALIDATION patients only, never on test patients.

For every setting of a grid (one or two tunables, e.g. ``--grid server-lr=0.01,0.03,0.1``) and every tuning seed,
the method runs on the validation-only view of the data (:func:`magnet_core.consortium.simulated.validation_view`):
each seed's test patients are dropped before anything else, the remaining patients get the view's own train /
validation split, the sites train on the training part and the coordinator pools the sites' released evaluations of
their validation patients (under the minimum count k, as every federated evaluation). The chosen setting is the one
with the highest mean validation MCC over the tuning seeds; ties go to the setting given first in the grid. The
result (every setting's per-seed validation MCC, the choice, the command and the seeds) is written as JSON.

Tuning seeds should not be the seeds results are reported on (default 1, 2, 3; studies and simulate report on
10, 20, ...). A MAGNET split layout (tcga-ov-magnet) ships splits for its own seeds only (10 ... 50): tune there on
some of them and report on the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from rich.table import Table

from magnet_core.cohort.data import available_seeds, detect_layout
from magnet_core.consortium.scenarios import load_scenario
from magnet_core.consortium.simulated import VALIDATION_PREFIX, load_consortium, parse_generated
from magnet_core.model.config import PRESETS
from magnet_core.model.personalize import PARTS

from .cli import existing_dir, parse_seeds, positive_int
from .reporting import console, write_json
from .simulate import (
    DEMO_DATA,
    DEMO_SCENARIO,
    FEDERATED_METHODS,
    PERSONALIZE_PART,
    RunSpec,
    key_value,
    method_config,
    parse_overrides,
    run_methods,
)

TUNING_SEEDS = (1, 2, 3)
PERSONALIZE_KEY = "personalize-part"
# tunables beyond a method's own defaults (magnet_core/simulate FEDERATED_METHODS[...].defaults)
_ADAPTIVE = ("server_lr", "server_beta1", "server_beta2", "server_tau")
RULE = ("highest mean validation MCC over the tuning seeds (the sites' validation patients of the validation-only "
        "view, pooled as the coordinator sees them); ties: the setting given first in the grid")

# --evaluation -> the validation score (simulations.simulate.VALIDATION_METRICS)
EVALUATION_METRIC = {"own": "mcc", "consortium": "consortium_mcc"}


def tunables(method: str) -> list[str]:
    """The settings (kebab-case) ``tune`` may vary for ``method``: its tuned defaults (and, for an adaptive server
    optimizer, the optimizer's other constants); "personalized" adds the part each site fine-tunes."""
    if method == "personalized":
        return [PERSONALIZE_KEY, *tunables("federated")]
    if method not in FEDERATED_METHODS:
        raise ValueError(f"method {method!r} has no setting to tune; choose one of "
                         f"{sorted([*FEDERATED_METHODS, 'personalized'])}")
    m = FEDERATED_METHODS[method]
    names = list(m.defaults)
    if m.fixed.get("server_optimizer", "none") in ("adam", "yogi"):  # preset-adam takes the preset's settings
        names += [n for n in _ADAPTIVE if n not in names]
    return [n.replace("_", "-") for n in names]


def parse_grid(texts: Sequence[str], method: str) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2,...`` options (one or two) as {key: values}, in the order given. Every value is checked
    as the run configuration would check it; a bad key or value raises one ValueError naming it."""
    if not texts:
        raise ValueError("--grid: give at least one, e.g. --grid server-lr=0.01,0.03,0.1")
    if len(texts) > 2:
        raise ValueError(f"--grid: at most two settings at once, got {len(texts)}")
    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or not key:
            raise ValueError(f"--grid {text!r}: expected KEY=V1,V2,...")
        check_key(method, key, grid)
        items = [v.strip() for v in raw.split(",")]
        if not any(items) or "" in items:
            raise ValueError(f"--grid {key}: empty value in {raw!r}; expected comma-separated values")
        grid[key] = check_values(method, key, [key_value(f"{key}={v}")[1] for v in items], items)
    return grid


def check_grid(method: str, grid: Mapping[str, Any], where: str) -> dict[str, list[Any]]:
    """A grid given as a table (a study's ``[tune]`` entry for ``method``: {key: [values]}), checked as
    :func:`parse_grid` checks ``--grid`` options; errors start with ``where`` (e.g. the study file and method)."""
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"{where}: expected a table of one or two settings, e.g. {{ server-lr = [0.01, 0.1] }}")
    if len(grid) > 2:
        raise ValueError(f"{where}: at most two settings at once, got {len(grid)}")
    out: dict[str, list[Any]] = {}
    try:
        for raw_key, values in grid.items():
            key = str(raw_key).strip().replace("_", "-")
            check_key(method, key, out)
            if not isinstance(values, list) or not values:
                raise ValueError(f"--grid {key}: expected a non-empty list of values, got {values!r}")
            out[key] = check_values(method, key, list(values), [json.dumps(v) for v in values])
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix('--grid ')}") from None
    return out


def check_key(method: str, key: str, grid: Mapping[str, Any]) -> None:
    """Refuse a key ``method`` cannot tune, or one already in ``grid``."""
    allowed = tunables(method)
    if key not in allowed:
        raise ValueError(f"--grid {key}: not a setting of method {method!r}; tunable: {', '.join(allowed)}")
    if key in grid:
        raise ValueError(f"--grid {key}: given twice")


def check_values(method: str, key: str, values: list[Any], items: Sequence[str]) -> list[Any]:
    """Every value checked (``items``: how each was written, for the message); no value given twice."""
    for item, value in zip(items, values):
        check_value(method, key, value, item)
    repeated = sorted({items[i] for i, v in enumerate(values) if values.index(v) != i})
    if repeated:
        raise ValueError(f"--grid {key}: value {', '.join(repeated)} given more than once")
    return values


def check_value(method: str, key: str, value: Any, text: str) -> None:
    """Refuse a value the run would refuse, naming the setting and the value (one line)."""
    if key == PERSONALIZE_KEY:
        if value not in PARTS:
            raise ValueError(f"--grid {key}={text}: not a part; choose from {', '.join(PARTS)}")
        return
    field = key.replace("-", "_")
    try:
        parse_overrides([(key, value)], [method])
        cfg = method_config("federated" if method == "personalized" else method, "", "demo-3", 0, {field: value})
    except ValueError as exc:
        raise ValueError(f"--grid {key}={text}: {str(exc).splitlines()[0]}") from None
    if getattr(cfg, field) != value:
        raise ValueError(f"--grid {key}={text}: method {method!r} would run with {key} = {getattr(cfg, field)!r}")


def settings_of(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid, first key outermost (the grid's order, which breaks ties)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def choose(scores: Sequence[Sequence[float | None]]) -> int:
    """Index of the setting with the highest mean validation MCC (None / NaN scores left out of its mean); ties:
    the lowest index (the grid's order). A setting with no score at all cannot be chosen; ValueError if none has."""
    means = [mean_of(s) for s in scores]
    finite = [i for i, m in enumerate(means) if m is not None]
    if not finite:
        raise ValueError("no setting has a validation MCC (every run's validation evaluation was withheld or "
                         "undefined): nothing to choose from")
    return max(finite, key=lambda i: (means[i], -i))


def mean_of(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else None


def sd_of(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else None


def validation_mcc(spec: RunSpec, method: str, setting: dict[str, Any]) -> float | None:
    """One run of ``method`` with ``setting`` on the validation-only view of ``spec``'s data; its pooled
    validation MCC (None when undefined or withheld)."""
    overrides = {k.replace("-", "_"): v for k, v in setting.items() if k != PERSONALIZE_KEY}
    run = dataclasses.replace(spec, data_path=VALIDATION_PREFIX + spec.data_path,
                              overrides={**spec.overrides, **overrides},
                              personalize_part=setting.get(PERSONALIZE_KEY, spec.personalize_part))
    results, _, _ = run_methods(run, [method])
    score = results[method].get(run.validation_metric)
    return None if score is None or math.isnan(score) else float(score)


def current_defaults(method: str, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """The built-in value of each grid key for ``method`` (what a run without --set uses)."""
    cfg = method_config("federated" if method == "personalized" else method, "", "demo-3", 0)
    return {k: PERSONALIZE_PART if k == PERSONALIZE_KEY else getattr(cfg, k.replace("-", "_")) for k in grid}


def check_seeds(data_path: str, seeds: Sequence[int]) -> None:
    """A MAGNET split layout has splits for its own seeds only: refuse others before any work, saying which."""
    if parse_generated(data_path) is not None or detect_layout(data_path) != "split":
        return
    have = available_seeds(data_path)
    missing = [s for s in seeds if s not in have]
    if missing:
        raise ValueError(f"--seeds {','.join(map(str, missing))}: {data_path} ships splits for seeds {have} only; "
                         f"tune on some of them (e.g. {','.join(map(str, have[:3]))}) and report on the others")


def tune(spec: RunSpec, method: str, grid: dict[str, list[Any]], seeds: Sequence[int], progress=lambda s: None
         ) -> dict[str, Any]:
    """Run the grid on the validation-only view for every seed; the result payload (without the command)."""
    settings = settings_of(grid)
    t0, cpu0 = time.perf_counter(), time.process_time()
    rows = []
    for setting in settings:
        per_seed = {}
        for seed in seeds:
            per_seed[seed] = validation_mcc(dataclasses.replace(spec, seed=seed), method, setting)
            progress(f"{_describe(setting)} seed {seed}: validation MCC {_f(per_seed[seed])}")
        values = list(per_seed.values())
        rows.append({"setting": setting, "val_mcc": {str(s): v for s, v in per_seed.items()},
                     "mean": mean_of(values), "sd": sd_of(values), "n": sum(v is not None for v in values)})
    best = choose([list(r["val_mcc"].values()) for r in rows])
    defaults = current_defaults(method, grid)
    return {
        "mode": "tune", "method": method, "data": spec.data_path, "scenario": spec.scenario,
        "view": ("validation-only: each seed's test patients dropped before the view's own stratified split of "
                 "the rest; sites train on its training part and are scored on its validation part"),
        "seeds": list(seeds), "grid": grid, "rule": RULE, "validation_metric": spec.validation_metric,
        "budget": {"rounds": spec.rounds, "local_epochs": spec.local_epochs, "preset": spec.preset,
                   "test_graph": spec.test_graph, "engine": spec.engine},
        "fixed_overrides": {k.replace("_", "-"): v for k, v in spec.overrides.items()},
        "settings": rows, "choice": settings[best], "choice_index": best,
        "current_defaults": defaults, "choice_differs_from_defaults": settings[best] != defaults,
        "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
    }


def _describe(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_table(result: dict[str, Any]) -> None:
    seeds = [str(s) for s in result["seeds"]]
    table = Table(title=f"tune {result['method']} on {result['data']} / {result['scenario']} (validation patients "
                        f"only)", caption=f"Chosen by {result['rule']}. Mean ± sample std (ddof 1).",
                  caption_justify="left")
    for col in ("setting", *(f"seed {s}" for s in seeds), "mean ± sd", ""):
        table.add_column(col)
    for i, row in enumerate(result["settings"]):
        sd = "" if row["sd"] is None else f" ± {row['sd']:.3f}"
        table.add_row(_describe(row["setting"]), *(_f(row["val_mcc"][s]) for s in seeds), _f(row["mean"]) + sd,
                      "chosen" if i == result["choice_index"] else "")
    console.print(table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="a federated method of simulate, or personalized")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a setting and its values (once or twice: two give every combination), e.g. "
                        "--grid server-lr=0.01,0.03,0.1")
    p.add_argument("--data", type=existing_dir, default=None,
                   help=f"cohort folder; omitted: the generated demo cohort ({DEMO_DATA})")
    p.add_argument("--scenario", default=None,
                   help=f"built-in scenario or TOML file (default {DEMO_SCENARIO} on the generated cohort, iid-3 with "
                        "--data)")
    p.add_argument("--seeds", type=parse_seeds, default=list(TUNING_SEEDS),
                   help="tuning seeds, not the seeds results are reported on (default 1,2,3)")
    p.add_argument("--rounds", type=positive_int, default=RunSpec.rounds)
    p.add_argument("--local-epochs", type=positive_int, default=RunSpec.local_epochs)
    p.add_argument("--preset", default=RunSpec.preset, choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="a run-config field held fixed for every setting (as simulate --set)")
    p.add_argument("--evaluation", choices=sorted(EVALUATION_METRIC), default="own",
                   help="which validation score chooses: own (each site's own validation patients) or consortium "
                        "(every model of the method scores every site's validation patients; for personalized, a "
                        "site's model is not rewarded for knowing its own site's label mix) (default own)")
    p.add_argument("--out", type=Path, required=True, help="the result JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    method = args.method
    grid = parse_grid(args.grid, method)
    base = "federated" if method == "personalized" else method
    fixed = parse_overrides(list(args.overrides), [base])
    clash = sorted(set(fixed) & {k.replace("-", "_") for k in grid})
    if clash:
        raise ValueError(f"--set {clash[0].replace('_', '-')}: also in --grid; give it in one place")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: exists (pass --overwrite to replace it)")
    data_path = str(args.data) if args.data else DEMO_DATA
    scenario = args.scenario or (DEMO_SCENARIO if args.data is None else "iid-3")
    load_scenario(scenario)
    check_seeds(data_path, args.seeds)
    for seed in args.seeds:  # every seed's data read (and checked) before any training
        load_consortium(VALIDATION_PREFIX + data_path, scenario, seed, "")
    with tempfile.TemporaryDirectory(prefix="magnet-fl-tune-") as work:
        spec = RunSpec(data_path=data_path, scenario=scenario, seed=args.seeds[0], preset=args.preset,
                       rounds=args.rounds, local_epochs=args.local_epochs, out_dir=Path(work), overrides=fixed,
                       validation_metric=EVALUATION_METRIC[args.evaluation])
        result = tune(spec, method, grid, args.seeds, progress=console.print)
    result = {"command": "magnet-fl " + " ".join(shlex.quote(a) for a in sys.argv[1:]), **result}
    write_json(args.out, result)
    print_table(result)
    console.print(f"chosen: {_describe(result['choice'])} (built-in: {_describe(result['current_defaults'])}); "
                  f"wrote {args.out}")
    return 0
