"""Rerun rows of a stored study in fresh processes on this machine and compare them with the stored values.

A stored study row (``docs/studies/<study>/<study>_tidy.csv``: one cell, method and seed) is rerun with the study
runner itself (``magnet-fl study --cells C --methods M --seeds S`` in a new process at ``--threads``), so tuning,
the validation pass and the reported run are the study's own. Each rerun value is compared exactly (every bit) with
the stored one. ``--set KEY=VALUE`` reruns with a run-config setting added to the study's ``settings`` (e.g.
``clip-factor=0``, the default before bounded influence) to test whether a code change explains a difference. The
machine (CPU model, torch's CPU capability, versions) is recorded: on CPU the same code and seed give the same
numbers in every process of a machine at a given number of torch threads (``--threads``): the thread count changes
the order of floating-point sums, and after hundreds of epochs that can change a prediction.

    python benchmarks/reproduce_rows.py --data ../shared/data --study label-skew \
        --rows rjive-label-skew-3:centralized:10,rjive-label-skew-3:federated:90 \
        --result benchmarks/results/reproduce_label_skew.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.reporting import write_json  # noqa: E402
from simulations.simulate import key_value  # noqa: E402
from simulations.study import load_study  # noqa: E402

METRICS = ("mcc", "consortium_mcc")


def machine() -> dict:
    import torch

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu_model": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def parse_rows(text: str) -> list[tuple[str, str, int]]:
    rows = []
    for item in text.split(","):
        try:
            cell, method, seed = item.strip().split(":")
            rows.append((cell, method, int(seed)))
        except ValueError:
            raise SystemExit(f"--rows {item!r}: expected CELL:METHOD:SEED") from None
    return rows


def rerun(data: Path, study_file: Path, cell: str, method: str, seed: int, out: Path, threads: int) -> dict:
    env = {**os.environ, "MAGNET_FL_THREADS": str(threads), "FLWR_TELEMETRY_ENABLED": "0"}
    args = [sys.executable, "-m", "simulations.cli", "study", "--data", str(data), "--study", str(study_file),
            "--out", str(out), "--cells", cell, "--methods", method, "--seeds", str(seed)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rerun of {cell}:{method}:{seed} failed:\n{proc.stderr[-2000:]}")
    record = json.loads((out / "cells" / cell / f"{method}-seed{seed}.json").read_text())
    return {k: record["metrics"].get(k) for k in METRICS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--study", required=True, help="a stored study under docs/studies/")
    p.add_argument("--rows", required=True, help="CELL:METHOD:SEED,... (rows of the stored tidy CSV)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="a run-config setting added to the study's settings for the rerun (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the rerun (MAGNET_FL_THREADS; default 1): "
                   "the thread count changes the order of floating-point sums, so it is part of what reproduces")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    folder = ROOT / "docs" / "studies" / args.study
    stored = pd.read_csv(folder / f"{args.study}_tidy.csv")
    study = load_study(folder / "study.toml")
    settings = dict(args.overrides)  # read as `simulate --set` reads them (a TOML value, or else text)
    if settings:
        study = study.model_copy(update={"settings": {**(study.settings or {}), **settings}})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "study.toml"
        study_file.write_text(tomli_w.dumps(study.model_dump(mode="json", exclude_none=True)))
        for i, (cell, method, seed) in enumerate(parse_rows(args.rows)):
            row = stored[(stored["cell"] == cell) & (stored["method"] == method) & (stored["seed"] == seed)]
            if len(row) != 1:
                raise SystemExit(f"{folder}: no single stored row for {cell}:{method}:{seed}")
            print(f"[{i + 1}] {cell} {method} seed {seed} ...", flush=True)
            got = rerun(args.data, study_file, cell, method, seed, Path(tmp) / f"run{i}", args.threads)
            want = {k: (None if pd.isna(row.iloc[0].get(k)) else float(row.iloc[0][k])) for k in METRICS
                    if k in row.columns}
            same = all(got.get(k) == v for k, v in want.items() if v is not None)  # None: not recorded then
            print(f"    stored {want}  rerun {got}  {'same' if same else 'DIFFERENT'}", flush=True)
            results.append({"cell": cell, "method": method, "seed": seed, "stored": want, "rerun": got,
                            "same": same})
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    tidy = folder / f"{args.study}_tidy.csv"
    tidy_blob = subprocess.run(["git", "-C", str(ROOT), "hash-object", str(tidy)], capture_output=True,
                               text=True).stdout.strip()
    write_json(args.result, {"study": args.study, "settings_added": settings, "commit": commit.strip(),
                             "uncommitted_changes": dirty, "compared_with": {"tidy_csv": str(tidy.relative_to(ROOT)),
                                                                             "git_blob": tidy_blob},
                             "machine": machine(), "threads": args.threads, "rows": results,
                             "command": "python benchmarks/reproduce_rows.py " + " ".join(sys.argv[1:])})
    print(f"wrote {args.result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
