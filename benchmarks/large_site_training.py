"""Cost of one local training epoch at 1,000 / 10,000 / 100,000 patients (generated, 3 modalities): seconds and
peak memory, each size in a fresh process; writes benchmarks/results/large_site_training.json."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DIMS = "mRNA=200,miRNA=184,protein=142"  # the mixOmics BRCA cohort's feature counts
MISSING = (0.2, 0.1, 0.3)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_size(args: argparse.Namespace) -> dict:
    """Measure one size in this process (the parent runs each size in its own process: peak RSS is per size)."""
    from magnet_core.model.threads import apply_thread_policy

    policy = apply_thread_policy()
    import psutil
    import torch

    from magnet_core.cohort.generated import make_generated_cohort
    from magnet_core.model.config import get_preset
    from magnet_core.model.network import build_model
    from magnet_core.model.train import PatientSet, estimate_epoch_bytes, make_optimizer, resolve_batching, train_epochs

    dims = {k: int(v) for k, v in (p.split("=") for p in args.dims.split(","))}
    preset = get_preset(args.preset)
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cohort = make_generated_cohort(n=args.one, dims=dims, missing=dict(zip(dims, MISSING)), seed=0)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    data = PatientSet.from_cohort(cohort, preset.graph.sparsity, args.graph, args.k)
    graph_wall, graph_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    rss_before_training = proc.memory_info().rss
    model = build_model(dims, cohort.num_classes, preset.model, 0)
    opt, sched = make_optimizer(model, preset.train)
    torch.manual_seed(0)
    epochs: list[dict] = []

    def on_epoch(epoch: int, stats: dict) -> None:
        epochs.append({"wall_s": time.perf_counter() - marks[0], "cpu_s": _cpu_seconds() - marks[1],
                       "load1": os.getloadavg()[0], **stats})
        marks[:] = [time.perf_counter(), _cpu_seconds()]

    marks = [time.perf_counter(), _cpu_seconds()]
    train_epochs(model, data, preset.train, args.epochs, opt, sched, on_epoch=on_epoch, batching=args.batching)
    stop.set()
    sampler.join()
    estimate = estimate_epoch_bytes(data, preset.model.hidden, preset.model.gnn_layers)
    return {
        "patients": args.one, "features": dims, "missing": dict(zip(dims, MISSING)), "preset": args.preset,
        "hidden": preset.model.hidden, "graph_rule": data.graph.rule, "k": args.k,
        "edges": data.graph.num_edges, "dense_pairs_would_be": args.one * args.one,
        "batching": resolve_batching(data, preset.model, args.batching),
        "estimated_epoch_gib": estimate / 2**30,
        "graph_build_wall_s": graph_wall, "graph_build_cpu_s": graph_cpu, "epochs": epochs,
        "peak_rss_gib": peak[0] / 2**30, "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_training_gib": rss_before_training / 2**30,
        "threads": policy.threads, "generated": True,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per size (the first includes warm-up)")
    ap.add_argument("--graph", default="auto", choices=("auto", "topk", "dense"))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batching", default="auto", choices=("auto", "full", "neighbour"))
    ap.add_argument("--preset", default="ov", help="model preset (ov: hidden 256, 8 heads)")
    ap.add_argument("--dims", default=DIMS)
    ap.add_argument("--out", default=str(RESULTS / "large_site_training.json"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args)))
        return 0
    from magnet_core.cohort.generated import GENERATED_NOTICE

    rows = []
    print(f"{GENERATED_NOTICE}; features {args.dims}; preset {args.preset}; graph rule {args.graph}; "
          f"batching {args.batching}; load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--epochs", str(args.epochs), "--graph", args.graph,
               "--k", str(args.k), "--batching", args.batching, "--preset", args.preset, "--dims", args.dims]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{n} patients: FAILED\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        steady = row["epochs"][1:] or row["epochs"]
        wall = min(e["wall_s"] for e in steady)
        cpu = min(e["cpu_s"] for e in steady)
        print(f"{n:>7} patients: {row['graph_rule']} graph, {row['edges']:,} edges "
              f"(graph {row['graph_build_wall_s']:.1f} s); "
              f"{row['batching']} batching; epoch {wall:.1f} s wall / {cpu:.1f} s CPU "
              f"(best of {len(steady)}; load {steady[0]['load1']:.1f}); peak RSS {row['peak_rss_gib']:.2f} GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "large_site_training", "command": " ".join(sys.argv), "rows": rows,
               "note": "generated cohort; one process per size; wall times depend on the machine's load (load1)"}
    Path(args.out).write_text(json.dumps(payload, indent=1))
    last = rows[-1]
    best = min(e["wall_s"] for e in (last["epochs"][1:] or last["epochs"]))
    ok = best < 60 and last["peak_rss_gib"] < 8
    print(f"bar at {last['patients']:,} patients (< 60 s per epoch, < 8 GB): {'met' if ok else 'NOT met'}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
