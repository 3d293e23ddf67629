"""Shared output helpers: results tables, JSON files and the generated-data banner."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from magnet_core.artefacts.report import EVALUATIONS, pooled_over

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)

TABLE_METRICS = ("mcc", "acc", "f1", "auroc", "auprc")
# simulate's metrics: the sites release no AUPRC (average precision needs the order of scores inside a histogram bin)
COMPARISON_METRICS = ("mcc", "acc", "f1", "auroc")


def fmt(stat: Mapping[str, Any] | None) -> str:
    """``mean ± sample std`` (ddof 1) of a :func:`magnet_core.model.metrics.summarize` entry; the mean alone when
    there is no std (a single finite value)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("std") is None:
        return f"{stat['mean']:.3f} (n = 1)"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def test_patient_text(per_seed: list[int] | None, sites: int = 1) -> str:
    """"1 site, 58 patients" (or "56-60 patients" when the seeds differ); "" when not recorded."""
    if not per_seed:
        return ""
    lo, hi = min(per_seed), max(per_seed)
    return f"{sites} site{'' if sites == 1 else 's'}, {lo if lo == hi else f'{lo}-{hi}'} patients"


def print_summary(title: str, rows: Mapping[str, Mapping[str, Mapping[str, Any]]], groups=("", "paired_", "unpaired_"),
                  pooled: Mapping[str, str] | None = None) -> None:
    """One row per method (or one row when ``rows`` has a single entry), one column per metric; ``pooled``: per
    group ("all", "paired", "unpaired"), over how many sites and test patients its metrics are computed."""
    caption = "Mean ± sample std (ddof 1) over seeds."
    if pooled:
        caption += " Pooled over: the test sites and test patients of the group, per seed."
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("method")
    table.add_column("patients")
    if pooled:
        table.add_column("pooled over")
    for m in TABLE_METRICS:
        table.add_column(m)
    for method, metrics in rows.items():
        for g in groups:
            if not any(f"{g}{m}" in metrics for m in TABLE_METRICS):
                continue
            group = g.rstrip("_") or "all"
            cells = [fmt(metrics.get(f"{g}{m}")) for m in TABLE_METRICS]
            table.add_row(method, group, *([pooled.get(group, "")] if pooled else []), *cells)
    console.print(table)


def print_comparison(title: str, results: Mapping[str, Mapping[str, Mapping[str, Any]]], caption: str = "") -> None:
    """simulate's table: per method, its evaluation on its own sites' test patients and on the consortium's test
    patients (all test patients of each), with over how many sites and patients each row is pooled."""
    table = Table(title=title, caption=caption, caption_justify="left")
    for col in ("method", "evaluation", "pooled over"):
        table.add_column(col)
    for m in COMPARISON_METRICS:
        table.add_column(m)
    for method, metrics in results.items():
        for prefix, evaluation in EVALUATIONS.items():
            if f"{prefix}mcc" not in metrics:
                continue
            table.add_row(method, evaluation, pooled_over(metrics, prefix),
                          *[fmt(metrics.get(f"{prefix}{m}")) for m in COMPARISON_METRICS])
    console.print(table)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write atomically: a temporary file beside ``path``, then one rename (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(dict(payload)), indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
