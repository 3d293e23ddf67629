"""Privacy study: the same consortium trained plain, under secure aggregation and under DP (central / distributed)."""

# python -m simulations.privacy_study --data /work/shared/data/tcga-ov-magnet --seeds 10,20,30,40,50 --out DIR
#
# Every (mode, seed) is one federated run (modality-aware FedAvg) through the project's own engine
# (simulations.simulate.run_engine: the very ServerApp and ClientApp code), so secure aggregation, clipping, noise
# and the (epsilon, delta) accountant are those of a real run and are read back from its history.json. Results
# of finished (mode, seed) pairs are kept in DIR/cells/ and not run again (resume by running the same command).
#
# The DP clip norm C is measured, not guessed: the median of the honest step norms (every site, every round) of
# the plain run of the first seed (the screening's `step_norms` in its history), unless --dp-clip is given; it is
# kept in DIR/clip.json and used for every seed. Half of the honest updates are then clipped (the target of
# adaptive clipping, Andrew et al. 2021). Seeds run one after the other, every mode within a seed.

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.consortium.methods import DEFAULT_SEEDS
from server.config import FederatedConfig

from . import statistics as st
from .cli import existing_dir, parse_seeds, positive_int
from .reporting import console, write_json

MODE_NAMES = ("plain", "secagg", "dp-central-z0.5", "dp-central-z1", "dp-secagg-z0.5", "dp-secagg-z1")
METRICS = ("mcc", "acc", "f1", "auroc", "auprc")
TIDY_FIELDS = ("mode", "seed", "secagg", "noise", "noise_multiplier", "clip_norm", *METRICS, "epsilon",
               "epsilon_rdp", "delta", "rounds", "secure_rounds", "seconds", "seconds_per_round",
               "secagg_up_bytes_per_site", "error")


class Mode(BaseModel):
    """One way of training the consortium: secure aggregation on/off, DP noise none / central / distributed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    secagg: bool = False
    noise: Literal["none", "central", "distributed"] = "none"
    noise_multiplier: float = Field(0.0, ge=0)

    @property
    def dp(self) -> bool:
        return self.noise != "none"


def mode_of(name: str) -> Mode:
    """``plain``, ``secagg``, ``dp-central-zZ`` (coordinator adds noise) or ``dp-secagg-zZ`` (sites add noise
    pieces under secure aggregation)."""
    if name == "plain":
        return Mode(name=name)
    if name == "secagg":
        return Mode(name=name, secagg=True)
    for prefix, secagg, noise in (("dp-central-z", False, "central"), ("dp-secagg-z", True, "distributed")):
        if name.startswith(prefix):
            try:
                z = float(name[len(prefix):])
            except ValueError:
                break
            if z > 0:
                return Mode(name=name, secagg=secagg, noise=noise, noise_multiplier=z)
    raise argparse.ArgumentTypeError(f"unknown mode {name!r}: use plain, secagg, dp-central-zZ or dp-secagg-zZ "
                                     f"with a noise multiplier Z > 0 (e.g. {', '.join(MODE_NAMES)})")


def parse_modes(text: str) -> list[Mode]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no mode given")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a mode is listed twice in {text!r}")
    return [mode_of(n) for n in names]


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_dir, default=None, help="cohort folder; omitted: a generated cohort")
    p.add_argument("--scenario", default=None, help="scenario (default: iid-3 with --data, demo-3 without)")
    p.add_argument("--seeds", type=parse_seeds, default=list(DEFAULT_SEEDS))
    p.add_argument("--modes", type=parse_modes, default=parse_modes(",".join(MODE_NAMES)),
                   help=f"comma-separated modes (default {','.join(MODE_NAMES)})")
    p.add_argument("--rounds", type=positive_int, default=FederatedConfig.model_fields["num_server_rounds"].default)
    p.add_argument("--local-epochs", type=positive_int,
                   default=FederatedConfig.model_fields["local_epochs"].default)
    p.add_argument("--dp-clip", type=positive_float, default=None,
                   help="DP clip norm C (default: the median honest step norm of the plain runs)")
    p.add_argument("--dp-delta", type=positive_float, default=FederatedConfig.model_fields["dp_delta"].default)
    p.add_argument("--secagg-clip", type=positive_float,
                   default=FederatedConfig.model_fields["secagg_clip_norm"].default,
                   help="clip norm of the sites under secure aggregation without DP (run config secagg-clip-norm)")
    p.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                   help="inprocess: the ServerApp and ClientApp code without transport; flower: Flower's "
                        "simulation engine (Ray)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--analyse-only", action="store_true",
                   help="write the outputs from the (mode, seed) results already in --out; run nothing")


# ------------------------------------------------------------------------------------------------- one run


def run_config(args: argparse.Namespace, mode: Mode, seed: int, clip: float | None, out_dir: Path
               ) -> FederatedConfig:
    """The FederatedConfig of one (mode, seed): only the privacy keys differ between modes."""
    kw: dict[str, Any] = {}
    if mode.secagg:
        kw.update(secagg=True, secagg_clip_norm=args.secagg_clip)
    if mode.dp:
        assert clip is not None
        kw.update(dp_clip_norm=clip, dp_noise_multiplier=mode.noise_multiplier, dp_delta=args.dp_delta,
                  dp_noise_seed=seed)  # seeded noise: reproducible (a deployment leaves it at -1: OS randomness)
        if mode.secagg:
            kw.update(secagg_clip_norm=clip)
    return FederatedConfig(num_server_rounds=args.rounds, local_epochs=args.local_epochs, seed=seed,
                           aggregation="modality-aware", data_path=str(args.data or ""), scenario=args.scenario,
                           min_sites=args.num_sites, out_dir=str(out_dir), overwrite=True, report=False, **kw)


def result_path(out: Path, mode: str, seed: int) -> Path:
    return out / "cells" / f"{mode}-seed{seed}.json"


def summarize_history(history: list[dict]) -> dict[str, Any]:
    """The final metrics, the privacy spent and the secure-aggregation record of one run's history."""
    last = history[-1]
    dp = last.get("dp") or {}
    secure = [(r.get("screening") or {}).get("secure_aggregation") for r in history]
    secure_ok = [s for s in secure if s and s.get("status") == "aggregated"]
    up = [b["up"] for s in secure_ok for b in (s.get("bytes_per_site") or {}).values()]
    rounds = [{"round": r["round"], **{m: r["global"].get(m) for m in METRICS},
               "epsilon": (r.get("dp") or {}).get("epsilon"), "seconds": r.get("seconds"),
               "secure": bool(((r.get("screening") or {}).get("secure_aggregation") or {}).get("status")
                              == "aggregated")} for r in history]
    return {"metrics": {m: last["global"].get(m) for m in METRICS},
            "epsilon": dp.get("epsilon"), "epsilon_rdp": dp.get("epsilon_rdp"), "delta": dp.get("delta"),
            "rounds": len(history), "secure_rounds": len(secure_ok),
            "seconds_per_round": float(np.mean([r["seconds"] for r in history])),
            "secagg_up_bytes_per_site": float(np.mean(up)) if up else None,
            "step_norms": [v for r in history for v in ((r.get("screening") or {}).get("step_norms") or {}).values()],
            "per_round": rounds}


def run_one(args: argparse.Namespace, mode: Mode, seed: int, clip: float | None, advance) -> dict[str, Any]:
    """Run one (mode, seed) through the engine; its result file (failures are recorded, not raised)."""
    from .simulate import run_engine

    path = result_path(args.out, mode.name, seed)
    if path.exists():
        advance(args.rounds)
        return json.loads(path.read_text())
    run_dir = args.out / "runs" / f"{mode.name}-seed{seed}"
    payload: dict[str, Any] = {"mode": mode.model_dump(), "seed": seed,
                               "clip_norm": clip if mode.dp else (args.secagg_clip if mode.secagg else None),
                               "run_dir": str(run_dir), "error": None}
    t0 = time.perf_counter()
    try:
        cfg = run_config(args, mode, seed, clip, run_dir)
        history = run_engine(args.engine, cfg, args.num_sites, on_round=lambda r: advance(1))
        if len(history) < args.rounds:
            raise RuntimeError(f"the run stopped after {len(history)} of {args.rounds} rounds")
        payload.update(summarize_history(history))
    except Exception as exc:  # noqa: BLE001 - a failing mode is a finding: record it and go on
        payload["error"] = f"{type(exc).__name__}: {exc}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".traceback.txt").write_text(traceback.format_exc())
        console.print(f"[red]{mode.name} seed {seed} failed: {payload['error']}[/]")
    payload["seconds"] = time.perf_counter() - t0
    write_json(path, payload)
    return payload


def measured_clip(args: argparse.Namespace, plain: list[dict]) -> dict[str, Any]:
    """The DP clip norm: --dp-clip, else the median honest step norm of the first seed's plain run (kept in
    clip.json so that every seed and a resumed study use the same C)."""
    path = args.out / "clip.json"
    if args.dp_clip is not None:
        info = {"clip_norm": args.dp_clip, "how": "given (--dp-clip)"}
    elif path.exists():
        return json.loads(path.read_text())
    else:
        norms = [v for r in plain if not r.get("error") for v in r.get("step_norms", [])]
        if not norms:
            raise RuntimeError("no plain run finished: cannot measure the honest update norms for the DP clip")
        q = np.quantile(norms, [0.1, 0.25, 0.5, 0.75, 0.9])
        info = {"clip_norm": float(q[2]),
                "how": f"median of {len(norms)} honest step norms (every site, every round) of the plain run "
                       f"of seed {sorted(r['seed'] for r in plain if not r.get('error'))[0]}",
                "quantiles": dict(zip(("q10", "q25", "q50", "q75", "q90"), map(float, q)))}
    write_json(path, info)
    return info


# ------------------------------------------------------------------------------------------------- outputs


def tidy_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        m = r["mode"]
        rows.append({"mode": m["name"], "seed": r["seed"], "secagg": m["secagg"], "noise": m["noise"],
                     "noise_multiplier": m["noise_multiplier"], "clip_norm": r.get("clip_norm"),
                     **{k: (r.get("metrics") or {}).get(k) for k in METRICS},
                     **{k: r.get(k) for k in ("epsilon", "epsilon_rdp", "delta", "rounds", "secure_rounds",
                                              "seconds", "seconds_per_round", "secagg_up_bytes_per_site",
                                              "error")}})
    return rows


def summary(rows: list[dict], modes: list[Mode], clip: dict | None, args: argparse.Namespace) -> dict[str, Any]:
    """Per mode: MCC mean, sample std and 95% t interval over seeds; paired difference vs plain; (eps, delta)."""
    plain = {r["seed"]: r["mcc"] for r in rows if r["mode"] == "plain" and not r["error"]}
    out: dict[str, Any] = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode.name]
        ok = [r for r in mine if not r["error"]]
        entry: dict[str, Any] = {"mode": mode.model_dump(), "seeds": [r["seed"] for r in ok],
                                 "failed": {r["seed"]: r["error"] for r in mine if r["error"]},
                                 "mcc": st.cell_stats([r["mcc"] for r in ok]).to_dict(),
                                 "seconds_per_round": st.cell_stats([r["seconds_per_round"] for r in ok]).to_dict()}
        if mode.name != "plain" and plain:
            entry["mcc_minus_plain"] = st.paired_comparison({r["seed"]: r["mcc"] for r in ok}, plain).to_dict()
        if mode.dp:
            eps = [r["epsilon"] for r in ok if st.is_finite(r["epsilon"])]
            entry.update(clip_norm=clip["clip_norm"] if clip else None, delta=args.dp_delta,
                         epsilon=max(eps) if eps else None, epsilon_min_over_seeds=min(eps) if eps else None,
                         epsilon_rdp=max((r["epsilon_rdp"] for r in ok if st.is_finite(r["epsilon_rdp"])),
                                         default=None))
        if mode.secagg:
            entry["secure_rounds"] = [r["secure_rounds"] for r in ok]
            up = [r["secagg_up_bytes_per_site"] for r in ok if st.is_finite(r["secagg_up_bytes_per_site"])]
            entry["secagg_up_bytes_per_site_per_round"] = float(np.mean(up)) if up else None
        out[mode.name] = entry
    return out


def plot(path: Path, summ: dict[str, Any], rows: list[dict]) -> Path:
    """MCC (mean and 95% t interval over seeds, seeds as dots) against the final epsilon; non-DP modes as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"plain": "tab:gray", "secagg": "tab:blue"}
    for name, e in summ.items():
        s = e["mcc"]
        if not s["n"]:
            continue
        if e["mode"]["noise"] == "none":
            ax.axhline(s["mean"], color=colors.get(name, "k"), lw=1.5, label=f"{name} (no DP, eps = inf)")
            if st.is_finite(s["ci_low"]):
                ax.axhspan(s["ci_low"], s["ci_high"], color=colors.get(name, "k"), alpha=0.12)
            continue
        eps = e.get("epsilon")
        if not st.is_finite(eps):
            continue
        marker = "o" if e["mode"]["noise"] == "central" else "s"
        yerr = None if not st.is_finite(s["ci_low"]) else [[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]]
        ax.errorbar([eps], [s["mean"]], yerr=yerr, fmt=marker, capsize=4,
                    label=f"{name} (z={e['mode']['noise_multiplier']:g})")
        seeds = [r["mcc"] for r in rows if r["mode"] == name and not r["error"]]
        ax.scatter([eps] * len(seeds), seeds, s=10, color="k", alpha=0.35)
    ax.set_ylim(-1.05, 1.05)  # MCC's range (a 2-seed t interval can be wider)
    delta = next((e["delta"] for e in summ.values() if e.get("delta")), "")
    ax.set_xlabel(f"final epsilon (site-level, delta = {delta})")
    ax.set_ylabel("global MCC after the last round")
    ax.set_title("MCC vs privacy spent (mean, 95% t interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, results: list[dict], modes: list[Mode], clip: dict | None,
                  args: argparse.Namespace) -> dict[str, Any]:
    rows = tidy_rows(results)
    with (out / "privacy_tidy.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TIDY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    with (out / "privacy_rounds.csv").open("w", newline="") as fh:
        fields = ("mode", "seed", "round", *METRICS, "epsilon", "secure", "seconds")
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in results:
            for rr in r.get("per_round", []):
                w.writerow({"mode": r["mode"]["name"], "seed": r["seed"], **{k: rr.get(k) for k in fields[2:]}})
    summ = summary(rows, modes, clip, args)
    payload = {"data": str(args.data) if args.data else "generated cohort", "scenario": args.scenario,
               "seeds": args.seeds, "rounds": args.rounds, "local_epochs": args.local_epochs,
               "engine": args.engine, "aggregation": "modality-aware", "dp_clip": clip,
               "secagg_clip_norm": args.secagg_clip, "modes": summ}
    write_json(out / "privacy_summary.json", payload)
    plot(out / "privacy_mcc_vs_epsilon.png", summ, rows)
    return payload


def print_table(summ: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="final MCC over seeds (mean ± sample std [95% t interval]); difference vs plain")
    for c in ("mode", "n", "MCC", "MCC - plain (p)", "epsilon", "s/round"):
        t.add_column(c)
    for name, e in summ.items():
        s, d = e["mcc"], e.get("mcc_minus_plain")
        diff = (f"{d['mean_diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (p={d['p_value']:.2g})"
                if d and d["n"] > 1 and st.is_finite(d["ci_low"]) else "" if not d else f"{d['mean_diff']:+.3f}")
        eps = e.get("epsilon")
        t.add_row(name, str(s["n"]), f"{s['mean']:.3f} ± {s['std']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
                  if s["n"] > 1 else (f"{s['mean']:.3f}" if s["n"] else "failed"), diff,
                  "inf" if e["mode"]["noise"] == "none" else (f"{eps:.3g}" if st.is_finite(eps) else "n/a"),
                  f"{e['seconds_per_round']['mean']:.2f}" if e["seconds_per_round"]["n"] else "")
    console.print(t)


# ------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    from magnet_core.consortium.simulated import load_consortium

    args.scenario = args.scenario or ("iid-3" if args.data else "demo-3")
    args.out.mkdir(parents=True, exist_ok=True)
    _, sites = load_consortium(str(args.data or ""), args.scenario, args.seeds[0], "")
    args.num_sites = len(sites)
    modes: list[Mode] = args.modes
    order = sorted(modes, key=lambda m: (m.dp, m.secagg))  # plain first: its honest update norms set the clip
    if any(m.dp for m in modes) and args.dp_clip is None and not any(m.name == "plain" for m in modes) \
            and not (args.out / "clip.json").exists():
        order = [mode_of("plain"), *order]
    total = len(order) * len(args.seeds) * args.rounds
    results: list[dict] = []
    clip: dict | None = None
    t0 = time.perf_counter()
    if args.analyse_only:
        results = [json.loads(result_path(args.out, m.name, seed).read_text()) for seed in args.seeds
                   for m in order if result_path(args.out, m.name, seed).exists()]
        if not results:
            raise FileNotFoundError(f"{args.out}/cells holds no result of the requested modes and seeds")
        clip = json.loads((args.out / "clip.json").read_text()) if (args.out / "clip.json").exists() else None
        order = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("privacy study", total=total)
        for seed in args.seeds:  # seed-major: an interrupted study has every mode for the seeds it finished
            for mode in order:
                if mode.dp and clip is None:
                    clip = measured_clip(args, [r for r in results if r["mode"]["name"] == "plain"])
                    console.print(f"DP clip norm C = {clip['clip_norm']:.4g} ({clip['how']})")
                progress.update(task, description=f"{mode.name} seed {seed}")
                results.append(run_one(args, mode, seed, clip["clip_norm"] if mode.dp and clip else None,
                                       lambda n: progress.advance(task, n)))
    shown = order if any(m.name == "plain" for m in order) else modes
    payload = write_outputs(args.out, results, shown, clip, args)
    print_table(payload["modes"])
    console.print(f"wrote {args.out}/privacy_tidy.csv, privacy_rounds.csv, privacy_summary.json, "
                  f"privacy_mcc_vs_epsilon.png ({time.perf_counter() - t0:.0f} s)")
    return 1 if all(r["error"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()
    p = argparse.ArgumentParser(prog="python -m simulations.privacy_study", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
