"""``magnet-fl defaults``: the built-in value of each tunable, derived from what studies chose on validation patients.

A study with a ``[tune]`` table chooses, for every (cell, seed), each tuned method's setting on that split's own
validation patients (:mod:`simulations.nested`) and records the choice in the tidy CSV's ``tuned`` column. This
command pools those choices over the given studies and names, per method, the setting chosen in the most
cell-seeds (ties: the grid's declared order, smallest value first in the built-in studies), and how many of
each setting's choices were ties on validation MCC (decided by that order, not by the score), with, as a
sensitivity, the setting that would win if each tied vote were split equally over the tied settings. No test
metric is read: only the ``tuned`` column (choices and validation MCCs) of finished runs.

The procedure was fixed before the studies it will read had finished (issue 23 item 2): the defaults in
``simulations/simulate.py`` are to be the choices of the ``label-skew`` and ``gap`` studies pooled this way; until
both have run, the comment there says the defaults are not yet derived. A default derived this way is for new
data: a study on the same cohorts keeps choosing per split.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from .nested import expand
from .reporting import console, write_json
from .tune import current_defaults

PROCEDURE = ("per tuned method, the setting that the nested validation pass (simulations/nested.py) chose in the most "
             "cell-seeds, pooled over the studies read; ties: the grid's declared order (smallest value first in "
             "the built-in studies); choices made on different validation scores or grids are not pooled; only "
             "the tidy CSVs' `tuned` column of runs without an error is read, no test metric; `tied` counts the "
             "choices decided by the grid's order (a tied validation score) and `split_ties` is a sensitivity "
             "with each tied vote split equally over the tied settings")


def study_choices(folder: Path) -> tuple[str, pd.DataFrame]:
    """A study output folder's name and its rows with a tuning record: cell, seed, method, grid, choice."""
    csvs = sorted(folder.glob("*_tidy.csv"))
    if len(csvs) != 1:
        raise ValueError(f"{folder}: expected one <study>_tidy.csv, found {[p.name for p in csvs] or 'none'}")
    df = pd.read_csv(csvs[0], keep_default_na=False, na_values=[""], dtype={"tuned": str, "error": str})
    for column in ("cell", "seed", "method", "tuned"):
        if column not in df.columns:
            raise ValueError(f"{csvs[0]}: no column {column!r} (a study written before settings were tuned per "
                             f"split has nothing to derive from)")
    rows = []
    for i, r in df.iterrows():
        if not isinstance(r["tuned"], str) or not r["tuned"] or (isinstance(r.get("error"), str) and r["error"]):
            continue
        try:
            grid, scores, choice, metric = expand(r["tuned"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{csvs[0]} row {i + 2} (method {r['method']!r}, seed {r['seed']}): unreadable `tuned` "
                             f"cell ({exc})") from None
        if choice is None:
            continue  # no setting had a validation score: nothing was chosen
        if choice not in grid:
            raise ValueError(f"{csvs[0]} row {i + 2} (method {r['method']!r}, seed {r['seed']}): choice {choice} "
                             f"is not in its grid {grid}")
        top = scores[grid.index(choice)]
        finite = [s for s in scores if s is not None]
        if top is None or top < max(finite):
            raise ValueError(f"{csvs[0]} row {i + 2} (method {r['method']!r}, seed {r['seed']}): choice {choice} "
                             f"does not have the grid's highest validation score ({scores}): not a choice the "
                             f"nested pass makes")
        # the settings sharing the top score: more than one = a tie, which the grid's order decided
        tied_with = [j for j, s in enumerate(scores) if s == top]
        rows.append({"cell": r["cell"], "seed": int(r["seed"]), "method": r["method"], "grid": grid,
                     "choice": choice, "metric": metric, "tied": len(tied_with) > 1, "top": tied_with})
    return csvs[0].name.removesuffix("_tidy.csv"), pd.DataFrame(rows, columns=["cell", "seed", "method", "grid",
                                                                                "choice", "metric", "tied", "top"])


def derive(choices: dict[str, pd.DataFrame]) -> dict[str, dict[str, Any]]:
    """Per method: its grid, how many cell-seeds chose each setting (per study and in all), and the derived setting.
    A method tuned on different grids in different studies is refused: the counts would not be comparable."""
    out: dict[str, dict[str, Any]] = {}
    methods = dict.fromkeys(m for df in choices.values() for m in df["method"])
    for method in methods:
        grid: list[dict[str, Any]] | None = None
        metrics: dict[str, set[str]] = {}
        per_study: dict[str, Counter] = {}
        tied = Counter()
        split: list[float] = []  # the sensitivity: each tied choice's vote split equally over the tied settings
        for study, df in choices.items():
            rows = df[df["method"] == method]
            metrics.update({study: set(rows["metric"])} if len(rows) else {})
            for g in rows["grid"]:
                if grid is None:
                    grid = g
                elif g != grid:
                    raise ValueError(f"method {method!r} was tuned on grid {g} in study {study!r} and on {grid} "
                                     f"elsewhere: choices from different grids are not pooled")
            per_study[study] = Counter(json.dumps(c, sort_keys=True) for c in rows["choice"])
            tied.update(json.dumps(c, sort_keys=True) for c, t in zip(rows["choice"], rows["tied"]) if t)
            for top in rows["top"]:
                split = split or [0.0] * len(grid)
                for j in top:
                    split[j] += 1 / len(top)
        assert grid is not None
        used = set().union(*metrics.values())
        if len(used) > 1:
            by_study = {s: sorted(m) for s, m in metrics.items()}
            raise ValueError(f"method {method!r} was chosen on different validation scores ({by_study}): choices "
                             f"made on different scores are not pooled")
        total = sum(per_study.values(), Counter())
        counts = [total[json.dumps(s, sort_keys=True)] for s in grid]
        best = max(range(len(grid)), key=lambda i: (counts[i], -i))  # ties: the grid's order
        best_split = max(range(len(grid)), key=lambda i: (round(split[i], 9), -i))
        out[method] = {"grid": grid, "counts": counts, "cell_seeds": sum(counts), "validation_metric": used.pop(),
                       # of each setting's choices, those decided by the grid's order (a tied validation score)
                       "tied": [tied[json.dumps(s, sort_keys=True)] for s in grid],
                       "per_study": {s: [c[json.dumps(g, sort_keys=True)] for g in grid] for s, c in per_study.items()},
                       "derived": grid[best],
                       # sensitivity (not the declared rule): tied votes split equally over the tied settings
                       "split_ties": {"counts": [round(v, 3) for v in split], "derived": grid[best_split],
                                      "same": best_split == best}}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", dest="studies", type=Path, action="append", required=True,
                   help="a study output folder (its <study>_tidy.csv); repeatable, the choices are pooled")
    p.add_argument("--out", type=Path, required=True, help="the derivation (JSON)")


def run(args: argparse.Namespace) -> int:
    read = [study_choices(folder) for folder in args.studies]
    names = [name for name, _ in read]
    if len(set(names)) < len(names):
        raise ValueError(f"--study: the same study given twice ({names}): its choices would be counted twice")
    choices = dict(read)
    derived = derive(choices)
    for method, d in derived.items():
        keys = list(d["derived"])
        d["built_in"] = current_defaults(method, {k: [] for k in keys})
        d["changed"] = d["built_in"] != d["derived"]
        counts = ", ".join(f"{json.dumps(s)}: {n} ({k} tied)" for s, n, k in zip(d["grid"], d["counts"], d["tied"]))
        if not d["split_ties"]["same"]:
            counts += f"; with tied votes split: {json.dumps(d['split_ties']['derived'])}"
        console.print(f"{method}: {counts} -> {json.dumps(d['derived'])} (built in: {json.dumps(d['built_in'])})")
    write_json(args.out, {"procedure": PROCEDURE,
                          "studies": {name: {"folder": str(folder), "cell_seeds": len(df.groupby(["cell", "seed"]))}
                                      for (name, df), folder in zip(read, args.studies)},
                          "methods": derived})
    console.print(f"wrote {args.out}")
    return 0
