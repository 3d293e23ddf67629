"""Many random draws per split, MAGNET reference code vs ``magnet-fl centralized``, with a pre-declared analysis.

The question: on the 5 tcga-ov-magnet splits our test MCC was higher than the reference's for every seed. Both
codes reach the same test predictions from the same initial weights with dropout off
(``benchmarks/results/reference_comparison.json``), so the remaining candidates are the random draws (initial
weights, dropout masks) and anything that acts only with dropout on. This script measures, per split, K draws of
each code with the random seed decoupled from the split (rng = split + k, k = 1..K, the same rngs for both codes),
and answers with the analysis written into the result file BEFORE the first draw is run (``plan`` below).

Sides (each draw in a fresh worker process at one torch thread, one process at a time):

- ours: ``fit_and_predict`` of ``magnet-fl centralized`` (preset ov, 200 epochs) on split S with seed rng;
- reference: its own dataset, model and trainer modules (``--reference PATH``, a checkout of SinaTabakhi/MAGNET;
  nothing of it is copied here) under a plain loop equal to its Lightning fit/test (one batch per epoch:
  training_step, backward, Adam step, StepLR step per epoch; then eval mode and test_step), with its own
  ``seed_everything(rng)`` before the dataset and model are built, as ``main_inference.py`` does with the split seed.
  The plain loop needs no Lightning: a stand-in ``LightningModule`` (an ``nn.Module`` whose ``log`` stores the
  value) is used when ``lightning`` is not importable. ``--check`` re-runs rng = split (the coupled seed) on one
  split and compares it with the Lightning run stored in ``reference_side_by_side.json``.

The OV splits are laid out for the reference by ``reference_side_by_side.prepare_reference_data`` (patients with
neither released modality dropped, as our loader does). The reference's dataset (its O(n^2) Python graph build)
is built once per split and cached in the work folder; it draws no random numbers (checked by ``--check``).

    python benchmarks/reference_draws.py --reference /path/to/MAGNET --stop-at 17:50 --max-k 20
    python benchmarks/reference_draws.py --analyse-only     # recompute the analysis from the stored draws
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reference_comparison.json"
SIDE_BY_SIDE = ROOT / "benchmarks" / "results" / "reference_side_by_side.json"
KEY = "draws_within_split"
SPLITS = [10, 20, 30, 40, 50]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MAGNET_FL_THREADS": "1",
              "FLWR_TELEMETRY_ENABLED": "0"}
PERMUTATIONS = 100_000

PLAN = {
    "declared_before_any_draw_of_this_key": True,
    "draws": "per split S in 10,20,30,40,50 and k = 1..K: rng = S + k for both codes (the same rngs); one draw = "
             "one full training (200 epochs) and test of one code on split S with random seed rng",
    "K": "rounds k = 1, 2, ... are run in order (each round: all 5 splits, reference then ours) until --stop-at; "
         "the analysis uses every complete round (all 5 splits x both codes), so K is fixed by the clock, not by "
         "results. Draws with rng = S + k stored earlier under 'decoupled_rng' are reused when this runner "
         "reproduces one of them exactly (checked on one draw per code before reuse)",
    "primary": "per split d_S = mean over k of ours - mean over k of reference (test MCC, all test patients); "
               "estimate = mean over the 5 splits of d_S; 95% paired t interval over the 5 d_S (t, 4 df)",
    "secondary": [
        "stratified permutation test of the code label within split: statistic = mean over splits of d_S; the "
        "2K draws of each split are reshuffled between the codes within that split (100000 random permutations, "
        "seed 0), two-sided p = share of |statistic| >= observed (with the observed counted once)",
        "per split: Welch t interval of d_S from the K + K draws",
        "the same primary analysis with the coupled draw (rng = S, 'same_seed') added as k = 0",
    ],
    "reading": "if the paired t interval and the permutation test exclude 0 the codes differ systematically on "
               "these splits; otherwise the measured gap is reported with its interval and no difference is claimed",
}


# ------------------------------------------------------------------------------------------------ reference side


def _stub_lightning() -> None:
    """A stand-in for the parts of ``lightning`` the reference's trainer and utils import (plain loop only)."""
    import torch.nn as nn

    try:
        import lightning  # noqa: F401
        return
    except ImportError:
        pass

    class LightningModule(nn.Module):
        def save_hyperparameters(self, *args, **kwargs) -> None:
            pass

        def log(self, name, value, **kwargs) -> None:
            self.__dict__.setdefault("logged", {})[name] = float(value)

    lightning = types.ModuleType("lightning")
    lightning.LightningModule = LightningModule
    pytorch = types.ModuleType("lightning.pytorch")
    loggers = types.ModuleType("lightning.pytorch.loggers")
    loggers.CometLogger = loggers.CSVLogger = object
    lightning.pytorch, pytorch.loggers = pytorch, loggers
    sys.modules.update({"lightning": lightning, "lightning.pytorch": pytorch, "lightning.pytorch.loggers": loggers})
    for name in ("umap", "matplotlib", "matplotlib.pyplot"):  # plots only; not used by the plain loop
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)


def _reference_dataset(reference: Path, data_root: Path, split: int, cache: Path):
    from dataloader.dataloader import MultiomicsDataset

    path = cache / f"dataset-{split}.pkl"
    if path.exists():
        with path.open("rb") as fh:
            return pickle.load(fh)
    ds = MultiomicsDataset(split_folder=str(data_root / "split_data"), dataset_name="OV", modalities=["mRNA", "miRNA"],
                           seed=split, num_classes=2, class_names=["Short-term survivors", "Long-term survivors"],
                           sparsity_rate=0.8, tune_hyperparameters=False)
    with path.open("wb") as fh:
        pickle.dump(ds, fh)
    return ds


def reference_draw(reference: Path, data_root: Path, split: int, rng: int, cache: Path, epochs: int = 200) -> dict:
    """One draw of the reference: its config values for OV (configs/MAGNET_OV.yaml), its modules, a plain loop."""
    import torch

    sys.path.insert(0, str(reference))
    _stub_lightning()
    from model.base_models import GNNDecoder, MLPEncoder, MultiHeadAttentionLayer
    from trainer.trainer import MAGNETTrainer
    from utils import seed_everything

    seed_everything(rng)
    state_before = torch.get_rng_state()
    ds = _reference_dataset(reference, data_root, split, cache)
    dataset_drew = not torch.equal(state_before, torch.get_rng_state())
    dims = [ds.get_data(omics_idx=i).shape[1] for i in range(2)]
    encoders = [MLPEncoder(in_dims=d, hid_dims=256, dropout_rate=0.2) for d in dims]
    attention = MultiHeadAttentionLayer(hid_dims=256, num_heads=8)
    decoder = GNNDecoder(hid_dims=256, out_dims=2, num_layers=2, dropout_rate=0.2, negative_slope=0.2)
    model = MAGNETTrainer(dataset=ds, unimodal_encoders=encoders, attention_layer=attention, gnn_decoder=decoder,
                          loss_fn=torch.nn.CrossEntropyLoss(), lr=0.000212, wd=0.001)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    batch = ds[0]
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        model.test_step(batch, 0)
    logged = model.__dict__.get("logged", {})
    return {"mcc": logged["test_mcc"], "n_test": int(ds.test_mask.sum()), "dataset_drew_random_numbers": dataset_drew}


# ------------------------------------------------------------------------------------------------ our side


def ours_draw(data: Path, split: int, rng: int, epochs: int = 200) -> dict:
    import torch

    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from simulations.centralized import evaluate_centralized

    torch.set_num_threads(1)
    cohort = load_for_seed(data, split, log=lambda *a, **k: None)
    metrics = evaluate_centralized(cohort, get_preset("ov"), rng, epochs=epochs)
    return {"mcc": metrics["mcc"]}


# ------------------------------------------------------------------------------------------------ worker / driver


def worker(args) -> None:
    out = []
    for split, rng in args.jobs:
        t0 = time.process_time()
        if args.side == "ours":
            res = ours_draw(args.data, split, rng)
        else:
            res = reference_draw(args.reference, args.work / "reference-data", split, rng, args.work)
        out.append({"split": split, "rng": rng, **res, "cpu_seconds": round(time.process_time() - t0, 1)})
        print(json.dumps(out[-1]), flush=True)


def _run_worker(side: str, jobs: list[tuple[int, int]], args) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--jobs",
           ";".join(f"{s},{r}" for s, r in jobs), "--data", str(args.data), "--work", str(args.work)]
    if args.reference is not None:
        cmd += ["--reference", str(args.reference)]
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {side} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _load() -> dict:
    return json.loads(RESULTS.read_text())


def _save(record: dict) -> None:
    d = _load()
    d[KEY] = record
    RESULTS.write_text(json.dumps(d, indent=1) + "\n")


def _pool(record: dict, stored: dict) -> tuple[dict, dict]:
    """Draws per (code, split), rng = split + k (k >= 1), as the amended plan says; and the reproduction check."""
    mine = {(d["side"], d["split"], d["rng"]): d["mcc"] for d in record["draws"] if d.get("source") == "this runner"}
    old = {(side, r["split"], r["rng"]): r["mcc"] for side in ("reference", "ours")
           for r in stored.get("decoupled_rng", {}).get(side, [])}
    rerun = {key: {"stored": old[key], "rerun": mine[key]} for key in mine if key in old}
    reproduced = bool(rerun) and all(abs(v["stored"] - v["rerun"]) < 1e-6 for v in rerun.values())
    draws = dict(mine)
    if reproduced:
        draws.update({key: v for key, v in old.items() if key not in mine})
    pools = {side: {s: [v for (sd, sp, r), v in sorted(draws.items()) if sd == side and sp == s and r > s]
                    for s in SPLITS} for side in ("reference", "ours")}
    check = {"reruns_of_stored_draws": [{"side": k[0], "split": k[1], "rng": k[2], **v} for k, v in rerun.items()],
             "all_reproduced": reproduced, "stored_draws_reused": reproduced}
    return pools, check


def analyse(record: dict, stored: dict) -> dict:
    """The analysis of the amended plan (key ``draws_within_split_plan_amendment``)."""
    from scipy import stats

    pools, check = _pool(record, stored)
    if any(not pools[side][s] for side in pools for s in SPLITS):
        return {"reproduction": check, "draws_per_split": {side: {str(s): len(pools[side][s]) for s in SPLITS}
                                                           for side in pools},
                "note": "some split has no draw of one code: no analysis"}

    def summary(pl: dict) -> dict:
        ours = np.array([np.mean(pl["ours"][s]) for s in SPLITS])
        ref = np.array([np.mean(pl["reference"][s]) for s in SPLITS])
        d = ours - ref
        est, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
        t = float(stats.t.ppf(0.975, len(d) - 1))
        return {"draws_per_split": {side: [len(pl[side][s]) for s in SPLITS] for side in pl},
                "per_split_ours_mean": ours.round(4).tolist(), "per_split_reference_mean": ref.round(4).tolist(),
                "per_split_difference": d.round(4).tolist(), "estimate": est,
                "paired_t_ci95": [est - t * se, est + t * se], "splits_ours_higher": int((d > 0).sum())}

    primary = summary(pools)
    rs = np.random.default_rng(0)
    observed, count = primary["estimate"], 0
    groups = [(np.array(pools["ours"][s] + pools["reference"][s]), len(pools["ours"][s])) for s in SPLITS]
    for _ in range(PERMUTATIONS):
        stat = 0.0
        for values, n_ours in groups:
            perm = rs.permutation(values)
            stat += perm[:n_ours].mean() - perm[n_ours:].mean()
        count += abs(stat / len(groups)) >= abs(observed) - 1e-12
    welch = []
    for s in SPLITS:
        a, b = np.array(pools["ours"][s]), np.array(pools["reference"][s])
        entry = {"split": s, "difference": float(a.mean() - b.mean()), "n_ours": len(a), "n_reference": len(b)}
        if len(a) > 1 and len(b) > 1:
            r = stats.ttest_ind(a, b, equal_var=False)
            ci = r.confidence_interval(0.95)
            entry.update(welch_ci95=[float(ci.low), float(ci.high)], p=float(r.pvalue))
        welch.append(entry)
    with_same = None
    same = stored.get("same_seed")
    if same:
        pl = {side: {s: pools[side][s] + [v] for s, v in zip(same["splits"], same[f"{side}_mcc"])} for side in pools}
        with_same = summary(pl)
    return {"reproduction": check, "primary": primary,
            "permutation_within_split": {"statistic": observed, "permutations": PERMUTATIONS, "seed": 0,
                                         "p_two_sided": (count + 1) / (PERMUTATIONS + 1)},
            "per_split_welch": welch, "with_same_seed_draw": with_same}


def driver(args) -> None:
    stored = _load()
    record = stored.get(KEY)
    if record is None:
        record = {"plan": PLAN, "plan_written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "what": "test MCC (all test patients) per draw; reference = its modules under a plain loop equal "
                          "to its Lightning fit/test; ours = magnet-fl centralized --preset ov; 200 epochs; 1 thread "
                          "each; one process at a time", "draws": []}
        _save(record)
        print("plan written to", RESULTS)
    have = {(d["side"], d["split"], d["rng"]) for d in record["draws"]}
    stop = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(args.stop_at), dt.timezone.utc)
    reused = {side: {(r["split"], r["rng"]): r["mcc"] for r in stored.get("decoupled_rng", {}).get(side, [])}
              for side in ("reference", "ours")}
    for k in range(1, args.max_k + 1):
        for side in ("reference", "ours"):
            jobs = [(s, s + k) for s in SPLITS if (side, s, s + k) not in have]
            if not jobs:
                continue
            if args.reuse_checked:
                take = [(s, r) for s, r in jobs if (s, r) in reused[side]]
                for s, r in take:
                    record["draws"].append({"side": side, "split": s, "rng": r, "mcc": reused[side][(s, r)],
                                            "source": "decoupled_rng (stored earlier; reproduction checked)"})
                    have.add((side, s, r))
                jobs = [j for j in jobs if j not in take]
            for s, r in jobs:
                if dt.datetime.now(dt.timezone.utc) >= stop:
                    print("stop time reached")
                    record["stopped_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                    record["analysis"] = analyse(record, stored)
                    _save(record)
                    return
                load = [round(x, 2) for x in os.getloadavg()]
                t0 = time.perf_counter()
                (res,) = _run_worker(side, [(s, r)], args)
                res.update(side=side, source="this runner", wall_seconds=round(time.perf_counter() - t0, 1),
                           load_average_before=load)
                record["draws"].append(res)
                have.add((side, s, r))
                _save(record)
                print(f"k={k} {side:9s} split {s} rng {r}: MCC {res['mcc']:.4f} ({res['wall_seconds']} s wall, "
                      f"load {load[0]})", flush=True)
        record["analysis"] = analyse(record, stored)
        _save(record)
    record["analysis"] = analyse(record, stored)
    _save(record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, default=None, help="a checkout of SinaTabakhi/MAGNET")
    default_data = Path(os.environ.get("MAGNET_FL_DATA", str(ROOT.parent / "shared" / "data"))) / "tcga-ov-magnet"
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--stop-at", default="17:50", help="UTC time (HH:MM) after which no new draw is started")
    ap.add_argument("--max-k", type=int, default=20)
    ap.add_argument("--reuse-checked", action="store_true",
                    help="reuse the stored 'decoupled_rng' draws (only after --check reproduced one per code)")
    ap.add_argument("--check", action="store_true",
                    help="reproduce one stored draw per code (and the reference's Lightning MCC) and exit")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="work folder (reference layout + dataset cache)")
    ap.add_argument("--worker", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.jobs = [tuple(int(x) for x in j.split(",")) for j in args.jobs.split(";") if j]
    if args.worker:
        args.side = args.worker
        return worker(args)
    if args.analyse_only:
        stored = _load()
        record = stored[KEY]
        record["analysis"] = analyse(record, stored)
        _save(record)
        print(json.dumps(record["analysis"], indent=1))
        return
    if args.reference is None:
        sys.exit("error: --reference PATH (a checkout of SinaTabakhi/MAGNET) is required to run draws")
    work = args.work or Path(tempfile.mkdtemp(prefix="reference-draws-"))
    args.work = work
    if not (work / "reference-data").exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from reference_side_by_side import prepare_reference_data

        prepare_reference_data(args.data, SPLITS, work / "reference-data")
    print("work folder", work)
    if args.check:
        side_by_side = json.loads(SIDE_BY_SIDE.read_text())["reference"]["mcc_per_seed"]
        stored = _load()
        (ref,) = _run_worker("reference", [(10, 10)], args)
        print("reference rng=split=10 plain loop:", ref, "Lightning run:", side_by_side["10"])
        (ref2,) = _run_worker("reference", [(10, 11)], args)
        want = {(r["split"], r["rng"]): r["mcc"] for r in stored["decoupled_rng"]["reference"]}
        print("reference split 10 rng 11:", ref2["mcc"], "stored:", want.get((10, 11)))
        (our,) = _run_worker("ours", [(10, 11)], args)
        want = {(r["split"], r["rng"]): r["mcc"] for r in stored["decoupled_rng"]["ours"]}
        print("ours split 10 rng 11:", our["mcc"], "stored:", want.get((10, 11)))
        return
    driver(args)


if __name__ == "__main__":
    main()
