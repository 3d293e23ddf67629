"""Many small sites at the same cost per patient (issue 25 item 3): OV split over 5, 20, 50 and 100 IID sites, the
federated method (modality-aware FedAvg, default run config) in-process and on Flower's simulation engine (Ray),
every configuration in a fresh Python process. Per round: wall and CPU seconds (the coordinator process and, on
Ray, every process Ray started), CPU seconds per training patient and per site; peak RSS of the coordinator
process and of each Ray worker process (sampled every 0.2 s with psutil, and ``ru_maxrss``).

A few rounds of 1 local epoch (``--rounds``, ``--local-epochs``): the cost of a round, not a trained model.
Round 1 also builds every site (data, graphs); the steady per-round figures are the median of rounds 2 and later.

    MAGNET_FL_THREADS=1 FLWR_TELEMETRY_ENABLED=0 python benchmarks/many_sites.py \\
        --data /work/shared/data/tcga-ov-magnet --sites 5,20,50,100 --engines inprocess,flower \\
        --rounds 3 --local-epochs 1 --out benchmarks/results/many_sites.json

``--patients-per-site N --preset ''`` uses the generated cohort with N patients per site instead of splitting one
cohort, so the consortium grows with the sites: the cost per patient at a fixed site size (a consortium of many
hospitals with a few dozen patients each), next to the fixed cohort split ever finer.

``--label before --code DIR`` runs the children on another checkout's code (PYTHONPATH=DIR), e.g. the code before
the memory fix, and stores the runs under that label next to the others in the same file. ``--screening`` adds the
cost of the update screen's direction check alone (pairwise cosines of model-sized steps) old vs new.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("engine", "sites", "rounds", "local_epochs")


class TreeSampler:
    """Peak RSS per process of this process's descendants (Ray's daemons and workers) and their CPU seconds, sampled
    every ``interval`` s in a thread (a process's last sample stands for its final CPU time)."""

    def __init__(self, interval: float = 0.2):
        self.me = psutil.Process()
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        total = self.me.memory_info().rss
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    rss, t = p.memory_info().rss, p.cpu_times()
                    self.names[p.pid] = " ".join(p.cmdline()[:3])[:120]  # Ray renames an actor's process
            except psutil.Error:
                continue
            total += rss
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            self.cpu[p.pid] = t.user + t.system
        self.peak_tree = max(self.peak_tree, total)

    def children_cpu(self) -> float:
        return sum(self.cpu.values())

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def workers(self) -> dict[int, int]:
        """Peak RSS of Ray's worker processes (the ClientApp actors), by pid."""
        def worker(name: str) -> bool:
            return ("ray::" in name or "default_worker" in name) and "Agent" not in name

        return {pid: rss for pid, rss in self.peak.items() if worker(self.names.get(pid, ""))}


def one(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process."""
    from magnet_core.consortium.simulated import load_consortium
    from simulations.engine import run_flower, run_inprocess
    from simulations.simulate import method_config

    work = Path(tempfile.mkdtemp(prefix=f"many-{args.engine}-{args.one}-"))
    data = f"generated:{args.patients_per_site * args.one}" if args.patients_per_site else args.data
    scenario = work / "scenario.toml"
    scenario.write_text(f'name = "iid-{args.one}"\nnum_sites = {args.one}\npartition = "iid"\n')
    _, sites = load_consortium(data, str(scenario), args.seed, "")
    train_patients = int(sum((s.split != "test").sum() for s in sites))
    cfg = method_config("federated", data, str(scenario), args.seed, {}, num_server_rounds=args.rounds,
                        local_epochs=args.local_epochs, min_sites=args.one, overwrite=True,
                        **({"preset": args.preset} if args.preset else {}),
                        report=False, out_dir=str(work / "run"))
    sampler = TreeSampler()
    marks = [(time.perf_counter(), time.process_time(), 0.0)]

    def on_round(_rec: dict) -> None:
        sampler.sample()
        marks.append((time.perf_counter(), time.process_time(), sampler.children_cpu()))

    t0 = time.perf_counter()
    if args.engine == "inprocess":
        _, history = run_inprocess(cfg, args.one, on_round=on_round)
    else:
        _, history = run_flower(cfg, args.one, on_round=on_round)
    wall = time.perf_counter() - t0
    sampler.sample()
    sampler.stop()
    workers = sampler.workers()
    if args.engine == "flower":
        import ray

        ray.shutdown()
    rounds = []
    for k in range(1, len(marks)):
        w = marks[k][0] - marks[k - 1][0]
        own = marks[k][1] - marks[k - 1][1]
        kids = marks[k][2] - marks[k - 1][2]
        rounds.append({"round": k, "wall_s": w, "coordinator_cpu_s": own, "workers_cpu_s": kids,
                       "cpu_s": own + kids})
    steady = rounds[1:] or rounds
    cpu = statistics.median(r["cpu_s"] for r in steady)
    return {
        "engine": args.engine, "data": data, "preset": args.preset or "default", "sites": args.one,
        "rounds": args.rounds, "local_epochs": args.local_epochs,
        "seed": args.seed, "train_patients": train_patients,
        "test_patients": int(sum((s.split == "test").sum() for s in sites)),
        "patients_per_site": [int(s.labels.shape[0]) for s in sites],
        "per_round": rounds,
        "steady_wall_s_per_round": statistics.median(r["wall_s"] for r in steady),
        "steady_cpu_s_per_round": cpu,
        "cpu_s_per_train_patient_per_round": cpu / train_patients,
        "cpu_s_per_site_per_round": cpu / args.one,
        "run_wall_s": wall,
        "coordinator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers": len(workers),
        "worker_peak_rss_mb": max(workers.values()) / 2**20 if workers else None,
        "workers_peak_rss_mb_each": sorted(round(v / 2**20, 1) for v in workers.values()),
        "process_tree_peak_rss_mb": sampler.peak_tree / 2**20,
        "children_cpu_s_rusage": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
        "final_global_mcc": (history[-1].get("global") or {}).get("mcc"),
    }


def screening_cost(sizes: list[int], old_max: int) -> list[dict]:
    """CPU seconds of the update screen on n random model-sized steps: the direction check of every step (before)
    vs only of large steps (now; none is large here, as in an honest round)."""
    import numpy as np

    from magnet_core.federation.screening import ScreenMemory, opposed, screen_updates
    from magnet_core.model.config import get_preset
    from magnet_core.model.network import MAGNET

    preset = get_preset("ov")
    model = MAGNET({"mRNA": 1000, "miRNA": 448}, 2, preset.model)
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    dim = sum(v.size for v in params.values())
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        base = rng.normal(size=dim).astype(np.float32) * 1e-3
        deltas = {i: base + rng.normal(size=dim).astype(np.float32) * 1e-3 for i in range(1, n + 1)}
        t = time.process_time()
        screen_updates(params, deltas, ScreenMemory())
        new = time.process_time() - t
        row = {"sites": n, "model_entries": int(dim), "cpu_s_now": new, "cosines_before": n * (n - 1)}
        if n <= old_max:
            t = time.process_time()
            opposed(deltas, list(deltas), None)  # what every round computed before, on top of the rest
            row["cpu_s_direction_check_before"] = time.process_time() - t
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sites", default="5,20,50,100")
    p.add_argument("--engines", default="inprocess,flower")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--preset", default="ov", help="model preset ('' for the default; the generated cohort's)")
    p.add_argument("--patients-per-site", type=int, default=0,
                   help="instead of splitting --data: the generated cohort with this many patients per site, so the "
                        "consortium grows with the number of sites (cost per patient at a fixed site size)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/many_sites.json")
    p.add_argument("--label", default="after", help="label of these runs in the result file (e.g. before, after)")
    p.add_argument("--code", default=None, help="run the children on this checkout's code (PYTHONPATH)")
    p.add_argument("--screening", action="store_true", help="also time the update screen alone, before vs now")
    p.add_argument("--screening-old-max", type=int, default=50)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine", default="inprocess", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args)))
        return 0
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = [r for r in existing.get("runs", []) if r.get("label") != args.label
            or (str(r["sites"]) not in args.sites.split(",") or r["engine"] not in args.engines.split(","))]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "MAGNET_FL_THREADS": os.environ.get("MAGNET_FL_THREADS", "1"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    if args.code:
        env["PYTHONPATH"] = args.code
    for engine in args.engines.split(","):
        for n in (int(s) for s in args.sites.split(",")):
            load0 = os.getloadavg()
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--data", args.data, "--one", str(n), "--engine", engine,
                       "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--seed", str(args.seed),
                       "--preset", args.preset, "--patients-per-site", str(args.patients_per_site)]
                # output to files, not pipes: Ray's daemons inherit the child's descriptors
                with open(f"{tmp}/out", "w") as so, open(f"{tmp}/err", "w") as se:
                    code = subprocess.run(cmd, stdout=so, stderr=se, env=env, check=False).returncode
                if code:
                    sys.exit(f"{engine} {n} sites failed:\n{Path(tmp, 'err').read_text()[-3000:]}")
                row = json.loads(Path(tmp, "out").read_text().strip().splitlines()[-1])
            row.update({"label": args.label, "code": args.code or "this checkout", "load_before": load0,
                        "load_after": os.getloadavg()})
            runs.append(row)
            print(f"[{args.label}] {engine:>9} {n:>3} sites: {row['steady_wall_s_per_round']:.1f} s wall and "
                  f"{row['steady_cpu_s_per_round']:.1f} CPU s per round ({row['cpu_s_per_train_patient_per_round']:.4f}"
                  f" per training patient), coordinator peak RSS {row['coordinator_peak_rss_mb']:.0f} MB, worker "
                  f"peak RSS {row['worker_peak_rss_mb'] or 0:.0f} MB, load {load0[0]:.1f}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write(args, existing, runs)
    if args.screening:
        existing["screening"] = screening_cost([int(s) for s in args.sites.split(",")], args.screening_old_max)
        print(json.dumps(existing["screening"], indent=1))
    write(args, existing, runs)
    return 0


def write(args: argparse.Namespace, existing: dict, runs: list[dict]) -> None:
    out = {**existing, "benchmark": "many_sites",
           "command": "MAGNET_FL_THREADS=1 FLWR_TELEMETRY_ENABLED=0 python benchmarks/many_sites.py "
                      "--data /work/shared/data/tcga-ov-magnet --sites 5,20,50,100 --engines inprocess,flower "
                      "--rounds 3 --local-epochs 1 --out benchmarks/results/many_sites.json "
                      "[--label before --code DIR]",
           "budget": "a few rounds of 1 local epoch: the cost of a round, not a trained model; round 1 also builds "
                     "the sites; steady = median of rounds 2 and later",
           "cpu": f"{os.cpu_count()} CPUs, shared (load average before/after each run recorded)",
           "runs": sorted(runs, key=lambda r: (r["label"], r["engine"], r["sites"]))}
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
