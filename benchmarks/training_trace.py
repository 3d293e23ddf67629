"""Per-epoch losses and per-seed test metrics of centralized OV training: the record that pins "same numbers".

Run once on the code before a speed change (``--out tests/data/training_trace_before.json``) and again after;
``--compare`` prints the largest per-epoch loss difference and whether every seed's MCC / predictions agree.

    python benchmarks/training_trace.py --data /work/shared/data/tcga-ov-magnet --seeds 10,20,30,40,50 \
        --out tests/data/training_trace_before.json
    python benchmarks/training_trace.py --data ... --compare tests/data/training_trace_before.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trace(data: Path, seed: int, epochs: int, preset: str = "ov") -> dict:
    """Train one seed the way ``magnet-fl centralized`` does; its per-epoch losses, test metrics and predictions."""
    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from magnet_core.model.metrics import metrics_with_groups
    from magnet_core.model.train import fit_and_predict

    p = get_preset(preset)
    cohort = load_for_seed(data, seed, log=lambda *a, **k: None)
    losses: list[dict[str, float]] = []
    t0 = time.perf_counter()
    train_cfg = p.train.model_copy(update={"epochs": epochs})
    _, test, probs = fit_and_predict(cohort, p.model, train_cfg, p.graph, seed,
                                     on_epoch=lambda e, s: losses.append(dict(s)))
    seconds = time.perf_counter() - t0
    metrics = metrics_with_groups(test.y.numpy(), probs.numpy(), test.paired.numpy(), cohort.num_classes)
    return {"seed": seed, "epochs": epochs, "seconds": seconds, "losses": losses, "mcc": metrics["mcc"],
            "acc": metrics["acc"], "pred": probs.argmax(1).tolist(), "probs": probs.tolist()}


def compare(new: list[dict], old: list[dict]) -> dict:
    """Largest absolute per-epoch loss difference and per-seed MCC / prediction agreement."""
    old_by_seed = {r["seed"]: r for r in old}
    rows = []
    for r in new:
        o = old_by_seed[r["seed"]]
        n = min(len(r["losses"]), len(o["losses"]))
        diff = max(abs(a[k] - b[k]) for a, b in zip(r["losses"][:n], o["losses"][:n]) for k in ("loss", "ce", "kl"))
        prob_diff = max(abs(a - b) for ra, rb in zip(r["probs"], o["probs"]) for a, b in zip(ra, rb))
        whole = r["epochs"] == o["epochs"]  # test metrics compare only after the same number of epochs
        rows.append({"seed": r["seed"], "epochs": r["epochs"], "max_loss_diff": diff,
                     "bitwise_equal_losses": r["losses"][:n] == o["losses"][:n],
                     "max_prob_diff": prob_diff if whole else None, "mcc": r["mcc"], "mcc_before": o["mcc"],
                     "same_mcc": r["mcc"] == o["mcc"] if whole else None,
                     "same_predictions": r["pred"] == o["pred"] if whole else None})
    return {"seeds": rows, "all_same_mcc": all(x["same_mcc"] is not False for x in rows),
            "max_loss_diff": max(x["max_loss_diff"] for x in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MAGNET_FL_DATA", "/work/shared/data"))
                    / "tcga-ov-magnet")
    ap.add_argument("--seeds", default="10,20,30,40,50")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None, help="a trace written before the change")
    args = ap.parse_args()
    os.environ["MAGNET_FL_THREADS"] = str(args.threads)
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        r = trace(args.data, seed, args.epochs)
        print(f"seed {seed}: MCC {r['mcc']:.4f}  last loss {r['losses'][-1]['loss']:.6f}  {r['seconds']:.1f} s",
              flush=True)
        runs.append(r)
    payload = {"data": str(args.data), "threads": args.threads, "load_avg": os.getloadavg(), "runs": runs}
    if args.compare is not None:
        payload["compare"] = compare(runs, json.loads(args.compare.read_text())["runs"])
        for row in payload["compare"]["seeds"]:
            print(json.dumps(row))
        print(f"max per-epoch loss difference {payload['compare']['max_loss_diff']:.3g}; "
              f"same MCC on every seed (of those run for the recorded epochs): {payload['compare']['all_same_mcc']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload))
        print(f"wrote {args.out}")
    return 0 if args.compare is None or payload["compare"]["all_same_mcc"] else 1


if __name__ == "__main__":
    sys.exit(main())
