"""Exploratory, validation patients only: would client-drift control narrow the label-skew gap?

``benchmarks/graph_partition.py`` found the federated methods' shortfall on the label-skew cells in the
optimisation, not in the site-local graphs. This probe asks which kind of federated optimisation comes closer to one
optimiser over all sites, before any such method is built into ``simulate`` and the studies. It reads no test
patient: every variant trains on a cell's sites in the study's validation view (``validation:`` data path: each
site's test patients are replaced by validation patients held out of its training patients) and is scored on the
pooled validation patients. It is a small in-process loop, not the project's federated runner: full participation,
the example-weighted mean of the sites' weights (on the complete-data BRCA cell the same as modality-aware FedAvg),
the study's rounds x local epochs and learning-rate schedule, the sites' own graphs. Variants:

- ``fedavg``: a fresh local Adam every round (as ``SiteRuntime.fit`` trains);
- ``scaffold``: SCAFFOLD's control variates (Karimireddy et al., ICML 2020, option I): each site adds
  ``c - c_i`` to every local gradient, ``c_i`` its full-batch gradient at the last global model it received (its
  first local step's), ``c`` their example-weighted mean;
- ``stateful``: each site keeps its Adam moments across rounds instead of starting afresh;
- ``fedavg_1_epoch``: 1 local epoch x 10 times as many rounds (ten times the communication);
- ``site_graphs``: one optimiser over all sites' training patients on their own graphs side by side (the
  reference the graph-partition diagnostic found above the federated methods).

Output: per seed and variant the validation MCC, and each variant minus ``fedavg`` paired by seed (95% t interval,
Holm over the variants). Exploratory: it informs what to build next; it is not a study and chooses nothing.

    MAGNET_FL_THREADS=1 python benchmarks/drift_probe.py --data ../shared/data --study docs/studies/label-skew \\
        --cell rjive-label-skew-3 --result benchmarks/results/drift_probe_brca.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("fedavg", "scaffold", "stateful", "fedavg_1_epoch", "site_graphs")


class CorrectedStep:
    """An optimiser that adds SCAFFOLD's correction to each gradient before stepping, and keeps the first step's
    raw gradient (the site's full-batch gradient at the model it received)."""

    def __init__(self, inner, params, correction):
        self.inner, self.params, self.correction, self.first = inner, params, correction, None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        import torch

        if self.first is None:
            self.first = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        if self.correction is not None:
            for p, c in zip(self.params, self.correction):
                if p.grad is not None:
                    p.grad.add_(c)
        self.inner.step()


def validation_mcc(runtimes, params) -> float:
    from magnet_core.model.metrics import metrics_with_groups
    from magnet_core.model.train import predict_proba

    ys, ps = [], []
    for rt in runtimes:
        rt.set_params(params)
        ys.append(rt.test.y.numpy())
        ps.append(predict_proba(rt.model, rt.test).numpy())
    y, p = np.concatenate(ys), np.concatenate(ps)
    return float(metrics_with_groups(y, p, np.ones_like(y, bool), runtimes[0].cohort.num_classes)["mcc"])


def run_variant(variant: str, sites, preset, rounds: int, local_epochs: int, seed: int) -> float:
    import torch
    from graph_partition import block_diagonal

    from magnet_core.model.train import make_optimizer, split_sets, train_epochs
    from simulations.simulate import concat_cohorts, fresh_runtime, train_alone

    cfg = preset.train
    pooled = fresh_runtime("pooled", concat_cohorts(sites), preset, seed)  # every variant's initial weights
    runtimes = [fresh_runtime(s.name, s, preset, seed) for s in sites]
    if variant == "site_graphs":
        parts = [split_sets(s, preset.graph.sparsity, preset.graph.rule, preset.graph.k)[0] for s in sites]
        pooled = dataclasses.replace(pooled, train=block_diagonal(parts))
        return validation_mcc(runtimes, train_alone(pooled, preset, rounds * local_epochs, seed))
    epochs, n_rounds = (1, rounds * local_epochs) if variant == "fedavg_1_epoch" else (local_epochs, rounds)
    current = {k: v.clone() for k, v in pooled.model.state_dict().items()}
    weights = np.array([rt.train.n for rt in runtimes], float)
    weights /= weights.sum()
    c_global, c_site, optimisers = None, [None] * len(runtimes), [None] * len(runtimes)
    for rnd in range(1, n_rounds + 1):
        lr = cfg.lr * cfg.lr_gamma ** (((rnd - 1) * epochs) // cfg.lr_step)
        new, new_c = [], []
        for i, rt in enumerate(runtimes):
            rt.model.load_state_dict(current)
            torch.manual_seed(seed * 100_003 + rnd * 1_009 + i)
            params = list(rt.model.parameters())
            if variant == "stateful":
                if optimisers[i] is None:
                    optimisers[i], _ = make_optimizer(rt.model, cfg)
                for group in optimisers[i].param_groups:
                    group["lr"] = lr
                opt = optimisers[i]
            else:
                opt, _ = make_optimizer(rt.model, cfg.model_copy(update={"lr": lr}))
            if variant == "scaffold":
                correction = (None if c_global is None or c_site[i] is None
                              else [a - b for a, b in zip(c_global, c_site[i])])
                opt = CorrectedStep(opt, params, correction)
            train_epochs(rt.model, rt.train, cfg, epochs, optimizer=opt, scheduler=None)
            if variant == "scaffold":
                c_site[i] = opt.first
                new_c.append(opt.first)
            new.append({k: v.detach().clone() for k, v in rt.model.state_dict().items()})
        current = {k: sum(float(w) * n[k].double() for w, n in zip(weights, new)).to(new[0][k].dtype)
                   for k in new[0]}
        if variant == "scaffold":
            c_global = [sum(float(w) * c[j] for w, c in zip(weights, new_c)) for j in range(len(new_c[0]))]
    return validation_mcc(runtimes, current)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--study", type=Path, required=True, help="a stored study folder (its study.toml)")
    p.add_argument("--cell", required=True)
    p.add_argument("--seeds", help="comma-separated (default: the study's seeds)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--analyse-only", action="store_true", help="recompute the means and comparisons of --result's "
                                                               "stored per-seed values (nothing is trained)")
    args = p.parse_args(argv)
    if args.analyse_only:
        import json

        from simulations.reporting import write_json

        write_json(args.result, analyse(json.loads(args.result.read_text())))
        return 0
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()
    import tomli_w
    import torch

    from magnet_core.cohort.errors import DataError
    from magnet_core.consortium.simulated import VALIDATION_PREFIX, load_consortium
    from magnet_core.model.config import get_preset
    from simulations.reporting import write_json
    from simulations.study import load_study, resolve_dataset

    study = load_study(args.study / "study.toml")
    cell = {c.id: c for c in study.cells}[args.cell]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(study.seeds)
    variants = [v for v in args.variants.split(",") if v]
    preset = get_preset(cell.preset or study.preset)
    scenario = Path(tempfile.mkdtemp(prefix="drift-probe-")) / f"{cell.id}.toml"
    scenario.write_text(tomli_w.dumps(study.scenario_of(cell).model_dump(mode="json", exclude_none=True)))
    data_path = VALIDATION_PREFIX + str(resolve_dataset(args.data, cell.dataset or study.dataset))
    result = {"cell": cell.id, "study": str(args.study), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rounds": study.rounds, "local_epochs": study.local_epochs, "evaluation": "pooled validation patients",
              "seeds": {}}
    for seed in seeds:
        try:
            _, sites = load_consortium(data_path, str(scenario), seed, ",".join(cell.modalities))
        except DataError as exc:  # e.g. the OV data ship splits 10-50 only: say so, and go on
            print(f"seed {seed}: skipped ({exc})", flush=True)
            result.setdefault("skipped", {})[str(seed)] = str(exc)
            continue
        result["seeds"][str(seed)] = row = {}
        for v in variants:
            row[v] = run_variant(v, list(sites), preset, study.rounds, study.local_epochs, seed)
        print(f"seed {seed}: " + ", ".join(f"{v} {row[v]:.4f}" for v in variants), flush=True)
        write_json(args.result, result)
    write_json(args.result, analyse(result))
    return 0


def analyse(result: dict) -> dict:
    """``result`` with each variant's mean and each variant minus ``fedavg`` (paired by seed, Holm over variants)."""
    from simulations import statistics as st

    variants = list(next(iter(result["seeds"].values())))
    by = {v: {s: r[v] for s, r in result["seeds"].items()} for v in variants}
    result["means"] = {v: float(np.mean(list(by[v].values()))) for v in variants}
    others = [v for v in variants if v != "fedavg"]
    if "fedavg" in variants and others:
        comps = {v: st.paired_comparison(by[v], by["fedavg"]).to_dict() for v in others}
        for v, adj in zip(others, st.holm([comps[v]["p_value"] for v in others])):
            comps[v]["holm_p"] = float(adj)
        result["minus_fedavg"] = comps
    return result


if __name__ == "__main__":
    raise SystemExit(main())
