"""Width of the pooled AUROC/AUPRC bounds (high - low) in finished runs' history.json: typical (median) and worst."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

GROUPS = ("", "paired_", "unpaired_")


def histories(paths: list[Path]) -> list[Path]:
    """Every history.json under the given folders (or the given files themselves), sorted."""
    found: set[Path] = set()
    for p in paths:
        if p.is_file() and p.name == "history.json":
            found.add(p)
        elif p.is_dir():
            found.update(p.rglob("history.json"))
        else:
            raise SystemExit(f"{p}: neither a history.json nor a folder")
    return sorted(found)


def widths(history: list[dict], metric: str, group: str, last_only: bool) -> list[float]:
    """``{group}{metric}_high - {group}{metric}_low`` of the global metrics, per round (or the last round only)."""
    records = history[-1:] if last_only else history
    out = []
    for rec in records:
        g = rec.get("global") or {}
        lo, hi = g.get(f"{group}{metric}_low"), g.get(f"{group}{metric}_high")
        if lo is not None and hi is not None:
            out.append(float(hi) - float(lo))
    return out


def summarize(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median": None, "worst": None, "mean": None}
    a = np.asarray(values)
    return {"n": int(a.size), "median": float(np.median(a)), "worst": float(a.max()), "mean": float(a.mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="run folders (searched for history.json) or history files")
    p.add_argument("--all-rounds", action="store_true", help="every round's bound (default: the final round)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    files = histories(args.paths)
    if not files:
        raise SystemExit("no history.json found")
    loaded = {f: json.loads(f.read_text()) for f in files}
    summary: dict = {"files": [str(f) for f in files], "rounds": "all" if args.all_rounds else "final", "widths": {}}
    print(f"{len(files)} run(s); {'all rounds' if args.all_rounds else 'final round'} of each")
    print(f"{'metric':<18}{'n':>5}{'median':>10}{'worst':>10}{'mean':>10}")
    for metric in ("auroc", "auprc"):
        for group in GROUPS:
            vals = [w for h in loaded.values() for w in widths(h, metric, group, not args.all_rounds)]
            s = summarize(vals)
            summary["widths"][group + metric] = s
            if s["n"]:
                print(f"{group + metric:<18}{s['n']:>5}{s['median']:>10.4f}{s['worst']:>10.4f}{s['mean']:>10.4f}")
            else:
                print(f"{group + metric:<18}{0:>5}{'n/a':>10}{'n/a':>10}{'n/a':>10}")
    per_run = {str(f): (loaded[f][-1].get("global") or {}) for f in files}
    summary["final_auroc"] = {k: [g.get("auroc_low"), g.get("auroc"), g.get("auroc_high")] for k, g in per_run.items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
