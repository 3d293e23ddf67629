"""Milliseconds per training epoch of one OV seed at 1 thread, by operator (torch.profiler), before vs after.

Each measured code tree runs in its own fresh process (``--src``; default: this repository), in alternating turns
(A B A B ...) so that both see the same machine load. Per tree it prints the median wall and CPU ms per epoch over
the timed epochs of all turns, the median ms of one test-set prediction, the top-10 operators by self CPU time per
epoch, the matmul FLOPs per epoch counted by the profiler, and the time those FLOPs would take at the rate one
thread reaches on an (n x 256) @ (256 x 256) matmul here (the "arithmetic estimate"). Writes
``benchmarks/results/epoch_profile.json``.

    git archive <old-commit> | tar -x -C /tmp/before      # the code before the change
    python benchmarks/epoch_profile.py --src before=/tmp/before --src after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "epoch_profile.json"


def _default_data() -> Path:
    return Path(os.environ.get("MAGNET_FL_DATA", str(ROOT.parent / "shared" / "data"))) / "tcga-ov-magnet"


def measure(data: Path, seed: int, warmup: int, epochs: int, profiled: int, preds: int) -> dict:
    """One turn in this process: timed epochs, timed predictions, one profiled stretch of epochs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from magnet_core.model.train import build_model, in_dims_of, predict_proba, split_sets, train_epochs

    p = get_preset("ov")
    cohort = load_for_seed(data, seed, log=lambda *a, **k: None)
    train, test = split_sets(cohort, p.graph.sparsity, p.graph.rule, p.graph.k)
    model = build_model(in_dims_of(cohort), cohort.num_classes, p.model, seed)
    torch.manual_seed(seed)
    train_epochs(model, train, p.train, warmup)
    wall, cpu = [], []
    stamp = [time.perf_counter(), time.process_time()]

    def tick(epoch: int, stats: dict) -> None:
        w, c = time.perf_counter(), time.process_time()
        wall.append(1e3 * (w - stamp[0]))
        cpu.append(1e3 * (c - stamp[1]))
        stamp[:] = [time.perf_counter(), time.process_time()]

    stamp[:] = [time.perf_counter(), time.process_time()]
    train_epochs(model, train, p.train, epochs, on_epoch=tick)
    pred_ms = []
    for _ in range(preds):
        t = time.perf_counter()
        predict_proba(model, test)
        pred_ms.append(1e3 * (time.perf_counter() - t))
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        train_epochs(model, train, p.train, profiled)
    ops = []
    for ev in prof.key_averages():
        ops.append({"op": ev.key, "self_cpu_ms_per_epoch": ev.self_cpu_time_total / 1e3 / profiled,
                    "calls_per_epoch": ev.count / profiled, "flops_per_epoch": (ev.flops or 0) / profiled})
    ops.sort(key=lambda o: -o["self_cpu_ms_per_epoch"])
    profiled_ms = sum(o["self_cpu_ms_per_epoch"] for o in ops)
    flops = sum(o["flops_per_epoch"] for o in ops)
    a = torch.randn(train.n, 256)
    b = torch.randn(256, 256)
    for _ in range(3):
        a @ b
    t, reps = time.perf_counter(), 50
    for _ in range(reps):
        a @ b
    rate = reps * 2 * train.n * 256 * 256 / (time.perf_counter() - t)
    return {"wall_ms": wall, "cpu_ms": cpu, "predict_ms": pred_ms, "ops": ops[:25], "profiled_ms": profiled_ms,
            "matmul_flops_per_epoch": flops, "matmul_flops_per_s": rate, "patients": train.n,
            "edges": train.graph.num_edges, "threads": torch.get_num_threads()}


def _turn(src: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "MAGNET_FL_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data", str(args.data), "--seed",
           str(args.seed), "--warmup", str(args.warmup), "--epochs", str(args.epochs), "--profiled",
           str(args.profiled), "--preds", str(args.preds)]
    load_before = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(src))
    if done.returncode != 0:
        sys.exit(f"error: measuring {src} failed:\n{done.stderr}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["load1"] = [load_before, os.getloadavg()[0]]
    return out


def summarise(turns: list[dict]) -> dict:
    wall = [x for t in turns for x in t["wall_ms"]]
    cpu = [x for t in turns for x in t["cpu_ms"]]
    pred = [x for t in turns for x in t["predict_ms"]]
    by_op: dict[str, list[float]] = {}
    calls: dict[str, float] = {}
    for t in turns:
        for o in t["ops"]:
            by_op.setdefault(o["op"], []).append(o["self_cpu_ms_per_epoch"])
            calls[o["op"]] = o["calls_per_epoch"]
    top = sorted(({"op": k, "self_cpu_ms_per_epoch": statistics.median(v), "calls_per_epoch": calls[k]}
                  for k, v in by_op.items()), key=lambda o: -o["self_cpu_ms_per_epoch"])[:10]
    flops = statistics.median(t["matmul_flops_per_epoch"] for t in turns)
    rate = statistics.median(t["matmul_flops_per_s"] for t in turns)
    wall_med = statistics.median(wall)
    return {"epoch_wall_ms_median": wall_med, "epoch_cpu_ms_median": statistics.median(cpu),
            "epoch_wall_ms_min": min(wall), "predict_ms_median": statistics.median(pred),
            "epochs_timed": len(wall), "top10_ops": top, "matmul_flops_per_epoch": flops,
            "matmul_flops_per_s": rate, "arithmetic_ms": 1e3 * flops / rate,
            "ratio_to_arithmetic": wall_med / (1e3 * flops / rate),
            "load1_per_turn": [t["load1"] for t in turns], "patients": turns[0]["patients"],
            "edges": turns[0]["edges"], "threads": turns[0]["threads"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", default=None,
                    help="label=path of a code tree to measure (repeatable; default after=<this repository>)")
    ap.add_argument("--data", type=Path, default=_default_data())
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--turns", type=int, default=3, help="fresh processes per code tree, alternating")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20, help="timed epochs per turn")
    ap.add_argument("--profiled", type=int, default=5, help="epochs under torch.profiler per turn")
    ap.add_argument("--preds", type=int, default=5, help="timed test-set predictions per turn")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from magnet_core.model.threads import apply_thread_policy

        apply_thread_policy()
        print(json.dumps(measure(args.data, args.seed, args.warmup, args.epochs, args.profiled, args.preds)))
        return 0
    if not args.data.is_dir():
        sys.exit(f"error: {args.data}: no such directory (pass --data or set MAGNET_FL_DATA)")
    srcs = dict(s.split("=", 1) for s in (args.src or [f"after={ROOT}"]))
    turns: dict[str, list[dict]] = {label: [] for label in srcs}
    for _ in range(args.turns):
        for label, path in srcs.items():
            turns[label].append(_turn(Path(path).resolve(), args))
    result = {"benchmark": "epoch_profile", "command": " ".join(sys.argv), "cpus": os.cpu_count(),
              "seed": args.seed, "trees": {label: {"src": str(Path(p).resolve()), **summarise(turns[label])}
                                            for label, p in srcs.items()}}
    for label, r in result["trees"].items():
        print(f"\n== {label} ({r['src']}): {r['patients']} patients, {r['edges']} edges, {r['threads']} thread(s)")
        print(f"epoch: median {r['epoch_wall_ms_median']:.1f} ms wall, {r['epoch_cpu_ms_median']:.1f} ms CPU "
              f"(min {r['epoch_wall_ms_min']:.1f} ms, {r['epochs_timed']} epochs); test prediction "
              f"{r['predict_ms_median']:.1f} ms; load average per turn "
              + ", ".join(f"{a:.1f}-{b:.1f}" for a, b in r["load1_per_turn"]))
        print(f"arithmetic: {r['matmul_flops_per_epoch'] / 1e9:.2f} GFLOP of matmuls per epoch at "
              f"{r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s = {r['arithmetic_ms']:.1f} ms; epoch / that = "
              f"{r['ratio_to_arithmetic']:.2f}x")
        print(f"{'operator':<44}{'self CPU ms/epoch':>18}{'calls/epoch':>13}")
        for o in r["top10_ops"]:
            print(f"{o['op'][:43]:<44}{o['self_cpu_ms_per_epoch']:>18.2f}{o['calls_per_epoch']:>13.0f}")
    labels = list(result["trees"])
    if len(labels) == 2:
        a, b = (result["trees"][x]["epoch_wall_ms_median"] for x in labels)
        result["speedup"] = a / b
        print(f"\n{labels[0]} / {labels[1]} median epoch wall time: {a / b:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
