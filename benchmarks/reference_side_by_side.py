"""The 5-seed OV run side by side with the MAGNET reference code, 1 torch thread each, in one invocation.

Our side: ``magnet-fl centralized --data ... --preset ov --seeds ...`` at ``MAGNET_FL_THREADS=1``, once one seed
after another and once with ``--workers 2`` (seeds on two worker processes, one thread each). The reference side
(only with ``--reference PATH``, a checkout of the public repository SinaTabakhi/MAGNET): its own entry point,
``main_inference.py --cfg <config>``, run from that checkout in a subprocess with ``OMP_NUM_THREADS=1`` (torch's
default thread count). Nothing of the reference is copied into this project: the config passed is the checkout's own
``configs/MAGNET_OV.yaml`` with these keys changed, written to a temporary folder:

- ``DATASET.ROOT``: a temporary copy of our OV splits in the reference's layout (``split_data/OV/<seed>/*.csv``,
  decompressed; labelled samples with neither released modality dropped, as the data README says and as our
  loader does, so both sides train and test on the same patients);
- ``DATASET.OMICS = ["mRNA", "miRNA"]``: DNA methylation is not released with the splits;
- ``DATASET.SEEDS``, ``RESULT.OUTPUT_DIR`` (temporary), ``SOLVER.MAX_EPOCHS`` only with ``--epochs``.

Its test MCC per seed is read from the CSV it writes (``<output>/OV/MAGNET_OV_cls.csv``, rows ``mcc,<seed>,<v>``).
The reference needs packages this project does not (lightning, yacs, umap-learn, ...): give a separate
interpreter with ``--reference-python``; the script names what is missing there and how to install it. It never
installs anything.

Times are process wall times (start-up, data loading, graph building, training, testing, and what else each
program does: the reference also fits UMAP plots and cluster metrics per seed), plus each side's own in-program
timing where it records one. On a shared, loaded machine the numbers are indicative only: the load average is
printed and recorded. Writes ``benchmarks/results/reference_side_by_side.json``.

    python benchmarks/reference_side_by_side.py --reference /path/to/MAGNET --reference-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reference_side_by_side.json"
SEEDS = [10, 20, 30, 40, 50]
MODALITIES = ("mRNA", "miRNA")  # the released OV modalities
LABEL_FILES = [f"label_{part}_{kind}" for part in ("train", "val", "test") for kind in ("paired", "unpaired")]
REFERENCE_MODULES = ("torch", "torch_geometric", "lightning", "yacs", "umap", "sklearn", "matplotlib", "pandas",
                     "numpy")
REFERENCE_PIP = ("lightning", "yacs", "umap-learn", "torch-geometric", "scikit-learn", "'matplotlib<3.9'", "pandas")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
              "OMP_WAIT_POLICY": "PASSIVE"}


def _default_data() -> Path:
    return Path(os.environ.get("MAGNET_FL_DATA", str(ROOT.parent / "shared" / "data"))) / "tcga-ov-magnet"


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "n/a"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


# ------------------------------------------------------------------------------------------------ our side


def run_ours(data: Path, seeds: list[int], workers: int, epochs: int | None, work: Path) -> dict:
    """``magnet-fl centralized`` in a fresh process at one torch thread (per worker)."""
    out = work / f"ours-workers{workers}"
    cmd = [sys.executable, "-m", "simulations.cli", "centralized", "--data", str(data), "--preset", "ov",
           "--seeds", ",".join(map(str, seeds)), "--out", str(out), "--workers", str(workers)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    env = {**os.environ, **ONE_THREAD, "MAGNET_FL_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("OMP_NUM_THREADS")  # our thread policy reads MAGNET_FL_THREADS; OMP_NUM_THREADS would cap --workers auto
    log = work / f"ours-workers{workers}.log"
    load_before = _load()
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: our side failed (exit {proc.returncode}); log:\n{log.read_text()[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {"command": " ".join(cmd[1:]), "env": {"MAGNET_FL_THREADS": "1"}, "workers": res["workers"],
            "process_wall_seconds": wall, "in_program_seconds": res["wall_seconds"],
            "in_program_covers": "training and testing of all seeds (after loading the data)",
            "seconds_per_seed": res["seconds_per_seed"], "epochs": res["epochs"],
            "mcc_per_seed": dict(zip(map(str, seeds), res["metrics"]["mcc"]["per_seed"])),
            "load_average_before": load_before, "load_average_after": _load()}


# ------------------------------------------------------------------------------------------------ reference side


def missing_reference_modules(python: str) -> list[str]:
    """What the reference imports and cannot find in ``python`` (and an API it calls that newer releases lack)."""
    missing = []
    for module in REFERENCE_MODULES:
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        if probe.returncode != 0:
            missing.append(module)
    if "matplotlib" not in missing:
        probe = subprocess.run([python, "-c", "import matplotlib.cm; matplotlib.cm.get_cmap"], capture_output=True)
        if probe.returncode != 0:  # its UMAP plot calls matplotlib.cm.get_cmap, removed in matplotlib 3.9
            missing.append("matplotlib.cm.get_cmap (matplotlib < 3.9)")
    return missing


def _read_gz_csv(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.reader(fh))


def prepare_reference_data(data: Path, seeds: list[int], root: Path) -> dict:
    """Our OV splits in the reference's layout (``<root>/split_data/OV/<seed>/``), decompressed, without the
    labelled samples that have neither released modality. Returns what was dropped, per seed."""
    dropped = {}
    for seed in seeds:
        src, dst = data / str(seed), root / "split_data" / "OV" / str(seed)
        dst.mkdir(parents=True, exist_ok=True)
        have: set[str] = set()
        for modality in MODALITIES:
            rows = _read_gz_csv(src / f"{modality}.csv.gz")
            have |= {r[0] for r in rows[1:]}
            with (dst / f"{modality}.csv").open("w", newline="") as fh:
                csv.writer(fh).writerows(rows)
        n_dropped = 0
        for name in LABEL_FILES:
            rows = _read_gz_csv(src / f"{name}.csv.gz")
            kept = [rows[0]] + [r for r in rows[1:] if r[0] in have]
            n_dropped += len(rows) - len(kept)
            with (dst / f"{name}.csv").open("w", newline="") as fh:
                csv.writer(fh).writerows(kept)
        dropped[str(seed)] = n_dropped
    return dropped


def reference_config(reference: Path, data_root: Path, output: Path, seeds: list[int], epochs: int | None,
                     path: Path) -> dict:
    """The checkout's own OV config with the data, modality, seed and output keys changed (see the module doc)."""
    import yaml

    cfg = yaml.safe_load((reference / "configs" / "MAGNET_OV.yaml").read_text()) or {}
    changed = {("DATASET", "ROOT"): str(data_root), ("DATASET", "SPLITS"): "split_data",
               ("DATASET", "OMICS"): list(MODALITIES), ("DATASET", "SEEDS"): seeds,
               ("RESULT", "OUTPUT_DIR"): str(output)}
    if epochs is not None:
        changed[("SOLVER", "MAX_EPOCHS")] = epochs
    for (section, key), value in changed.items():
        cfg.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {f"{s}.{k}": v for (s, k), v in changed.items()}


def run_reference(reference: Path, python: str, data: Path, seeds: list[int], epochs: int | None, work: Path) -> dict:
    entry = reference / "main_inference.py"
    if not entry.is_file() or not (reference / "configs" / "MAGNET_OV.yaml").is_file():
        return {"ran": False, "reason": f"{reference}: no main_inference.py and configs/MAGNET_OV.yaml (not a "
                                        f"checkout of SinaTabakhi/MAGNET)"}
    missing = missing_reference_modules(python)
    if missing:
        return {"ran": False, "reason": f"{python} cannot import {', '.join(missing)}; install the reference's "
                                        f"packages into a separate venv (not this project's): python -m venv "
                                        f"/tmp/refvenv && /tmp/refvenv/bin/pip install {' '.join(REFERENCE_PIP)} "
                                        f"(torch as already installed), then --reference-python "
                                        f"/tmp/refvenv/bin/python"}
    data_root, output = work / "reference-data", work / "reference-output"
    dropped = prepare_reference_data(data, seeds, data_root)
    config = work / "reference_OV.yaml"
    changed = reference_config(reference, data_root, output, seeds, epochs, config)
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAGNET_FL_THREADS")}, **ONE_THREAD}
    cmd = [python, str(entry), "--cfg", str(config)]
    log = work / "reference.log"
    load_before = _load()
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=reference, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ran": False, "reason": f"the reference exited with {proc.returncode}; last lines of its output:\n"
                                        + "\n".join(log.read_text().splitlines()[-25:])}
    mcc: dict[str, float] = {}
    with (output / "OV" / "MAGNET_OV_cls.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["metric"] == "mcc":
                mcc[str(int(row["seed"]))] = float(row["value"])
    own_times: dict[str, float] = {}
    time_file = output / "OV" / "MAGNET_OV_time.csv"
    if time_file.exists():
        with time_file.open() as fh:
            own_times = {str(int(r["seed"])): float(r["value"]) for r in csv.DictReader(fh)}
    return {"ran": True, "command": f"{Path(python).name} main_inference.py --cfg <the checkout's "
                                    f"configs/MAGNET_OV.yaml with {sorted(changed)} changed>",
            "config_changes": changed, "env": ONE_THREAD, "labelled_samples_dropped_per_seed": dropped,
            "process_wall_seconds": wall, "in_program_seconds": sum(own_times.values()) if own_times else None,
            "in_program_covers": "its own per-seed timer: data loading, graph building and training (not testing, "
                                 "UMAP plots, cluster metrics)",
            "seconds_per_seed": [own_times.get(str(s)) for s in seeds], "mcc_per_seed": mcc,
            "load_average_before": load_before, "load_average_after": _load(),
            "versions": _versions(python)}


def _versions(python: str) -> dict:
    code = ("import json, torch, lightning, torch_geometric; print(json.dumps({'torch': torch.__version__, "
            "'lightning': lightning.__version__, 'torch_geometric': torch_geometric.__version__}))")
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(probe.stdout) if probe.returncode == 0 else {}


def _reference_commit(reference: Path) -> str | None:
    probe = subprocess.run(["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=_default_data(), help="the tcga-ov-magnet folder "
                    "(default: $MAGNET_FL_DATA/tcga-ov-magnet)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="a checkout of the MAGNET reference code (github.com/SinaTabakhi/MAGNET); omitted: our side "
                         "only")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="the interpreter of a separate venv with the reference's packages (default: this one)")
    ap.add_argument("--seeds", type=_seeds, default=SEEDS, help="default 10,20,30,40,50")
    ap.add_argument("--epochs", type=int, default=None, help="both sides (default: 200, each side's own)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: {args.data}: no such directory (pass --data or set MAGNET_FL_DATA)")
    if args.reference is not None and not args.reference.is_dir():
        sys.exit(f"error: --reference {args.reference}: no such directory")

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    record: dict = {"magnet_fl_commit": commit.stdout.strip() or None, "magnet_fl_uncommitted_changes":
                    bool(dirty.stdout.strip()), "seeds": args.seeds, "data": str(args.data), "cpus": os.cpu_count(),
                    "machine": platform.platform(), "load_average_start": _load(), "threads_per_process": 1}
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        work = Path(tmp)
        print(f"load average at start {record['load_average_start']} on {os.cpu_count()} CPUs")
        ours = run_ours(args.data, args.seeds, 1, args.epochs, work)
        print(f"ours (1 thread, one seed after another): {ours['process_wall_seconds']:.1f} s")
        if args.reference is not None:
            ref = run_reference(args.reference.resolve(), args.reference_python, args.data, args.seeds, args.epochs,
                                work)
            ref["path"] = str(args.reference)
            ref["commit"] = _reference_commit(args.reference)
            if ref["ran"]:
                print(f"reference (1 thread): {ref['process_wall_seconds']:.1f} s")
            else:
                print(f"reference not run: {ref['reason']}")
        else:
            ref = {"ran": False, "reason": "no --reference given"}
        ours2 = run_ours(args.data, args.seeds, 2, args.epochs, work)
        print(f"ours (--workers 2, 1 thread each): {ours2['process_wall_seconds']:.1f} s")
    record.update({"ours": ours, "ours_workers2": ours2, "reference": ref, "load_average_end": _load()})

    print()
    print(f"{'':38s}{'wall s':>9s}{'in-program s':>14s}   test MCC mean ± sd")
    rows = [("magnet-fl, 1 thread", ours), ("magnet-fl --workers 2, 1 thread each", ours2)]
    if ref["ran"]:
        rows.insert(0, ("reference, 1 thread", ref))
    for name, side in rows:
        own = side["in_program_seconds"]
        print(f"{name:38s}{side['process_wall_seconds']:9.1f}{own if own is not None else float('nan'):14.1f}   "
              f"{_mean_sd(list(side['mcc_per_seed'].values()))}")
    print("per-seed test MCC:")
    for seed in map(str, args.seeds):
        line = f"  seed {seed}: magnet-fl {ours['mcc_per_seed'][seed]:.3f} (--workers 2: " \
               f"{ours2['mcc_per_seed'][seed]:.3f})"
        if ref["ran"]:
            line += f"  reference {ref['mcc_per_seed'].get(seed, float('nan')):.3f}"
        print(line)
    ratios = {"workers2_speedup_over_serial": ours["process_wall_seconds"] / ours2["process_wall_seconds"]}
    if ref["ran"]:
        ratios.update({
            "reference_over_ours_wall": ref["process_wall_seconds"] / ours["process_wall_seconds"],
            "reference_over_ours_workers2_wall": ref["process_wall_seconds"] / ours2["process_wall_seconds"]})
        if ref["in_program_seconds"]:
            ratios["reference_own_timer_over_ours_sum_of_seeds"] = (ref["in_program_seconds"]
                                                                    / sum(ours["seconds_per_seed"]))
        print(f"ratio reference / magnet-fl (process wall, 1 thread each): {ratios['reference_over_ours_wall']:.2f}x; "
              f"vs --workers 2: {ratios['reference_over_ours_workers2_wall']:.2f}x")
        if "reference_own_timer_over_ours_sum_of_seeds" in ratios:
            print(f"ratio of in-program timers (reference: load + graph + train per seed; ours: train + test per "
                  f"seed): {ratios['reference_own_timer_over_ours_sum_of_seeds']:.2f}x")
    print(f"--workers 2 over one by one (process wall): {ratios['workers2_speedup_over_serial']:.2f}x")
    print(f"load average at end {record['load_average_end']} on {os.cpu_count()} CPUs"
          + (" (the machine was loaded: times are indicative)" if max(record["load_average_start"][0],
                                                                     record["load_average_end"][0]) > 0.5 else ""))
    record["ratios"] = ratios
    record["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
