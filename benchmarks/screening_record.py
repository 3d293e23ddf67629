"""What the coordinator's update screen did to the federated runs of a study: how much it shortened each site's
update (the bounded-influence clip) and how many site-rounds it rejected, per cell and method.

Every federated run writes its per-round screening record to ``runs/<method>-seed<seed>/history.json`` inside the
study's cell folder (``server/ledger.py``): ``screening.clip.scale`` (the factor each accepted update was shortened by,
1 = untouched) and ``rejected`` (site -> reason). In a simulated study every site is honest, so any shortening or
rejection is the screen acting on honest updates. This script reads those records only (no patient, no model) and
writes, per (cell, method): the runs read, the site-rounds, the mean and the smallest clip factor over accepted
site-rounds, the share of site-rounds shortened by more than 10 %, and the rejected site-rounds with the first words
of their reasons.

    python benchmarks/screening_record.py --study-out runs/label-skew-fedsgd --cells rjive-label-skew-3 \\
        --result benchmarks/results/screening_label_skew_fedsgd.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reason_kind(text: str) -> str:
    """A rejection reason without its numbers and node: what rule it was."""
    text = re.sub(r"^node \d+: ", "", text)
    return re.sub(r"[-+]?\d[\d.e+-]*x?", "#", text)[:80]


def record_of(files: list[Path]) -> dict:
    """The screen's record over the given runs' ``history.json`` files (one method)."""
    scales, rejected, reasons, site_rounds = [], 0, Counter(), 0
    for f in files:
        for record in json.loads(f.read_text()):
            scale = (record.get("screening") or {}).get("clip", {}).get("scale") or {}
            scales.extend(float(v) for v in scale.values())
            rejected += len(record.get("rejected") or {})
            reasons.update(reason_kind(r) for r in (record.get("rejected") or {}).values())
            site_rounds += len(record.get("accepted") or []) + len(record.get("rejected") or {})
    s = np.asarray(scales, float)
    return {"runs": len(files), "site_rounds": site_rounds, "accepted_site_rounds": int(s.size),
            "mean_clip_factor": float(s.mean()) if s.size else None,
            "min_clip_factor": float(s.min()) if s.size else None,
            "share_shortened_over_10pct": float((s < 0.9).mean()) if s.size else None,
            "rejected_site_rounds": rejected, "rejection_reasons": dict(reasons.most_common())}


VIEWS = {"test": "runs", "validation": "validation/runs"}  # a cell's reported runs; its validation-only view's runs


def cell_record(cell_dir: Path, view: str = "test") -> dict[str, dict]:
    runs: dict[str, list[Path]] = {}
    for history in sorted((cell_dir / VIEWS[view]).glob("*-seed*/history.json")):
        method = history.parent.name.rsplit("-seed", 1)[0]
        runs.setdefault(method, []).append(history)
    return {method: record_of(files) for method, files in sorted(runs.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study-out", type=Path, required=True, help="a study's --out folder (cells/<cell>/runs/...)")
    p.add_argument("--cells", default=None, help="comma-separated cell ids (default: every cell folder)")
    p.add_argument("--view", choices=sorted(VIEWS), default="test",
                   help="test: the reported runs (training patients of each split); validation: the runs of the "
                        "validation-only view that scored each method's validation MCC")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",")] if args.cells else \
        sorted(d.name for d in (args.study_out / "cells").iterdir() if d.is_dir())
    result = {"study_out": str(args.study_out), "command": "python benchmarks/screening_record.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "view": args.view, "cells": {}}
    for cell in cells:
        folder = args.study_out / "cells" / cell
        if not (folder / VIEWS[args.view]).is_dir():
            raise SystemExit(f"{folder / VIEWS[args.view]}: no federated runs of cell {cell!r} in this study folder")
        result["cells"][cell] = cell_record(folder, args.view)
        for method, r in result["cells"][cell].items():
            print(f"{cell} {method}: {r['runs']} runs, mean clip factor {r['mean_clip_factor']:.3f} (min "
                  f"{r['min_clip_factor']:.3f}), {r['share_shortened_over_10pct']:.1%} shortened > 10 %, "
                  f"{r['rejected_site_rounds']} of {r['site_rounds']} site-rounds rejected")
    from simulations.reporting import write_json

    write_json(args.result, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
