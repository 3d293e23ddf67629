"""Does `magnet-fl predict` reproduce the federated evaluation? Scores each site's test patients from a package."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.predict_cli import attach_rule, reference_patients, score_patients, split_patients
from magnet_core.artefacts.model_package import manifest_from_cohort, read_package, write_package
from magnet_core.consortium.simulated import load_consortium
from magnet_core.model.config import get_preset
from magnet_core.model.metrics import confusion_counts, metrics_from_confusion
from magnet_core.model.site import SiteRuntime
from server.pki import init_ca, issue_signing_key

from .cli import existing_dir, positive_int
from .reporting import console, write_json

RULE = "attach-to-train"
COMPARED = ("acc", "f1", "mcc")
TOL = 1e-9  # metrics from the same confusion matrix agree to rounding


def _site_runtime(site, preset, seed: int) -> SiteRuntime:
    torch.manual_seed(seed)  # as simulate's fresh_runtime
    return SiteRuntime.build(site.name, site, preset.model, preset.graph.sparsity, preset.graph.rule, preset.graph.k)


def _sign(params: dict, pooled, preset, run_config: dict, work: Path, method: str = "federated"):
    """Write the run's weights as a package signed by a throw-away consortium PKI and read it back verified."""
    init_ca(work / "pki")
    key, cert = issue_signing_key(work / "pki")
    manifest = manifest_from_cohort(pooled)
    path = write_package(work / "model.magnet", params, manifest=manifest, preset=preset.name,
                         model_cfg=preset.model, graph_cfg=preset.graph, run_config=run_config, signing_key=key,
                         signing_cert=cert, method=method)
    return read_package(path, ca_cert=work / "pki" / "ca" / "ca.crt", manifest=manifest)


def _metric_diffs(mine: dict, reported: dict | None) -> dict:
    if not reported:
        return {"reported": None}
    out = {}
    for k in COMPARED:
        a, b = mine.get(k), reported.get(k)
        out[k] = {"predict": a, "evaluation": b,
                  "equal": (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= TOL)}
    return out


def check_seed(data: str, scenario: str, seed: int, preset_name: str, modalities: str, params: dict,
               history: list[dict], history_rule: str) -> dict:
    """Per site: predict's classes vs the evaluation code's (same weights, same rule), and predict's metrics vs
    those the federated run reported (per site and pooled) when the run used the attach-to-train rule."""
    preset = get_preset(preset_name)
    pooled, sites = load_consortium(data, scenario, seed, modalities)
    run_config = {"data": data, "scenario": scenario, "seed": seed, "preset": preset_name, "test_graph": RULE}
    last = history[-1] if history else {}
    comparable = history_rule == RULE
    with tempfile.TemporaryDirectory(prefix="predict-check-") as tmp:
        pkg = _sign(params, pooled, preset, run_config, Path(tmp))
        per_site, cms, exact_scores = {}, [], []
        for site in sites:
            ref = reference_patients(site, site.name)
            test = split_patients(site, "test")
            rule = attach_rule("auto", preset.graph.k, False, ref.n)
            scored = score_patients(pkg, ref, test, rule)
            pred = scored.probs.argmax(axis=1)
            runtime = _site_runtime(site, preset, seed)
            runtime.set_params(params)
            eval_probs = runtime.test_probabilities(RULE)
            cm = confusion_counts(test.labels, pred, site.num_classes)
            cms.append(cm)
            mine = metrics_from_confusion(cm)
            if site.num_classes == 2:
                exact_scores.append((test.labels, scored.probs[:, 1]))
            reported = (last.get("sites") or {}).get(site.name) if comparable else None
            per_site[site.name] = {
                "test_patients": int(len(test.ids)), "reference_patients": int(ref.n), "attach_rule": scored.rule,
                "classes_agree": int((pred == eval_probs.argmax(axis=1)).sum()),
                "classes_differ": int((pred != eval_probs.argmax(axis=1)).sum()),
                "max_abs_probability_difference": float(np.abs(scored.probs - eval_probs).max()) if len(pred) else 0.0,
                "patients_reported": None if not reported else reported.get("num"),
                "metrics": _metric_diffs(mine, reported),
            }
    pooled_metrics = metrics_from_confusion(np.sum(cms, axis=0))
    glob = last.get("global") if comparable else None
    out = {"seed": seed, "round": last.get("round"), "evaluation_rule": history_rule, "sites": per_site,
           "pooled": _metric_diffs(pooled_metrics, glob),
           "pooled_patients": {"predict": int(np.sum(cms)),
                               "evaluation": (last.get("pooled_over") or {}).get("patients")}}
    if exact_scores and glob:
        from sklearn.metrics import roc_auc_score

        y = np.concatenate([s[0] for s in exact_scores])
        p = np.concatenate([s[1] for s in exact_scores])
        exact = float(roc_auc_score(y, p))
        lo, hi = glob.get("auroc_low"), glob.get("auroc_high")
        out["auroc"] = {"exact_from_predict": exact, "reported_low": lo, "reported_high": hi,
                        "inside_bound": lo is not None and hi is not None and lo - 1e-12 <= exact <= hi + 1e-12}
    out["all_classes_agree"] = all(s["classes_differ"] == 0 for s in per_site.values())
    out["all_reported_metrics_equal"] = comparable and all(
        v["equal"] for part in [out["pooled"], *(s["metrics"] for s in per_site.values())]
        for v in part.values() if isinstance(v, dict))
    return out


def _from_simulate(run_dir: Path, seeds: list[int] | None) -> list[tuple]:
    """(data, scenario, seed, preset, modalities, params, history, rule) per federated seed of a simulate out-dir."""
    res = json.loads((run_dir / "results.json").read_text())
    data = res["data"]
    if res.get("generated_data") and not str(data).startswith("generated:"):
        data = ""  # simulate before named generated cohorts: the default one
    rule = res.get("test_graph", "among-test")
    out = []
    for seed in seeds or res["seeds"]:
        d = run_dir / "runs" / f"federated-seed{seed}"
        if not (d / "model.pt").exists():
            raise FileNotFoundError(f"{d}/model.pt: no federated run for seed {seed} in {run_dir}")
        state = torch.load(d / "model.pt", weights_only=True)
        params = {k: v.numpy() for k, v in state.items()}
        history = json.loads((d / "history.json").read_text())
        out.append((data, res["scenario"]["name"] if isinstance(res["scenario"], dict) else res["scenario"], seed,
                    res["preset"], "", params, history, rule))
    return out


def _train(args: argparse.Namespace) -> list[tuple]:
    """A small federated run per seed (the simulate code path, attach-to-train evaluation) into --out/runs."""
    from .simulate import RunSpec, run_methods

    out = []
    for seed in args.seeds:
        spec = RunSpec(data_path=str(args.data) if args.data else "", scenario=args.scenario, seed=seed,
                       preset=args.preset, rounds=args.rounds, local_epochs=args.local_epochs, engine="inprocess",
                       out_dir=args.out, test_graph=RULE)
        console.print(f"training seed {seed}: {args.rounds} rounds x {args.local_epochs} local epochs ...")
        run_methods(spec, ["federated"])
        d = args.out / "runs" / f"federated-seed{seed}"
        params = {k: v.numpy() for k, v in torch.load(d / "model.pt", weights_only=True).items()}
        history = json.loads((d / "history.json").read_text())
        out.append((spec.data_path, args.scenario, seed, args.preset, "", params, history, RULE))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.predict_check", description=__doc__)
    p.add_argument("--run", type=existing_dir, help="a finished `magnet-fl simulate` out-dir (uses its federated runs)")
    p.add_argument("--data", type=existing_dir, help="train a small federated run on this cohort instead")
    p.add_argument("--scenario", default="iid-3")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--preset", default="ov")
    p.add_argument("--rounds", type=positive_int, default=20)
    p.add_argument("--local-epochs", type=positive_int, default=10)
    p.add_argument("--out", type=Path, required=True, help="folder for predict_check.json (and trained runs)")
    args = p.parse_args(argv)
    if (args.run is None) == (args.data is None):
        p.error("give exactly one of --run (a simulate out-dir) or --data (train a small run)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.run is not None:
        runs = _from_simulate(args.run, args.seeds)
    else:
        args.seeds = args.seeds or [10]
        runs = _train(args)
    results = []
    for data, scenario, seed, preset, modalities, params, history, rule in runs:
        r = check_seed(data, scenario, seed, preset, modalities, params, history, rule)
        results.append(r)
        sites = ", ".join(f"{n} {s['classes_agree']}/{s['test_patients']} (max |dp| "
                          f"{s['max_abs_probability_difference']:.1e})" for n, s in r["sites"].items())
        pooled = r["pooled"].get("mcc", {})
        console.print(f"seed {seed}: classes agree with the evaluation code: {sites}; pooled MCC predict "
                      f"{pooled.get('predict')} vs reported {pooled.get('evaluation')}; all reported metrics equal: "
                      f"{r['all_reported_metrics_equal']}"
                      + (f"; exact AUROC {r['auroc']['exact_from_predict']:.4f} in reported "
                         f"[{r['auroc']['reported_low']:.4f}, {r['auroc']['reported_high']:.4f}]: "
                         f"{r['auroc']['inside_bound']}" if "auroc" in r else ""))
    payload = {"rule": RULE, "source": str(args.run or args.data), "seeds": [r["seed"] for r in results],
               "all_classes_agree": all(r["all_classes_agree"] for r in results),
               "all_reported_metrics_equal": all(r["all_reported_metrics_equal"] for r in results),
               "results": results, "wall_seconds": time.perf_counter() - t0}
    path = write_json(args.out / "predict_check.json", payload)
    console.print(f"wrote {path}")
    return 0 if payload["all_classes_agree"] and payload["all_reported_metrics_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
