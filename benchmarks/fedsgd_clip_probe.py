"""Exploratory, validation patients only: what does the coordinator's update screen cost fedsgd?

``docs/studies/label-skew-fedsgd`` ran fedsgd with the step screen (pinned there: ``update-screen = "step"``),
which shortened and rejected honest gradients (``benchmarks/screening_record.py``). This probe trains fedsgd once
more per seed of one cell with a ``--variant`` of the screen on the study's validation-only view, exactly as the
study scores a method's validation MCC (``simulations.simulate.validation_scores``: the view drops every test
patient first), and pairs it by seed with the study's stored validation MCC of fedsgd under the step screen:

* ``clip-off``: the step screen with its clip off (``clip-factor = 0``; its rejections stay);
* ``gradient-screen``: the gradient screen, fedsgd's default since (``update-screen = "auto"``,
  ``magnet_core/federation/screening.py screen_gradients``).

Seed ``--check-seed`` is also rerun with the study's own settings, to show the stored value is reproduced. With
``--runs DIR`` the variant's runs are kept there and the result carries their screening record (clip factors and
rejections, as ``benchmarks/screening_record.py``). It reads no test patient and chooses nothing.

    MAGNET_FL_THREADS=1 python benchmarks/fedsgd_clip_probe.py --data ../shared/data \\
        --study docs/studies/label-skew-fedsgd --cell rjive-label-skew-3 \\
        --result benchmarks/results/fedsgd_clip_probe_brca.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

VARIANTS = {"clip-off": {"clip_factor": 0.0}, "gradient-screen": {"update_screen": "auto"}}

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()
    import tomli_w
    import torch

    from simulations import statistics as st
    from simulations.reporting import write_json
    from simulations.simulate import RunSpec, validation_scores
    from simulations.study import load_study, resolve_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--study", type=Path, required=True, help="a stored study folder (study.toml, tidy CSV)")
    p.add_argument("--cell", required=True)
    p.add_argument("--check-seed", type=int, default=10)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="clip-off")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: every stored seed of the cell)")
    p.add_argument("--runs", type=Path, default=None, help="keep the variant's runs here (default: discarded)")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    key = args.variant.replace("-", "_")
    study = load_study(args.study / "study.toml")
    cell = next(c for c in study.cells if c.id == args.cell)
    tidy = pd.read_csv(args.study / f"{study.name}_tidy.csv")
    stored = tidy[(tidy["cell"] == cell.id) & (tidy["method"] == "fedsgd")].set_index("seed")["val_mcc"]
    result = {"study": str(args.study), "cell": cell.id, "threads": torch.get_num_threads(),
              "command": "python benchmarks/fedsgd_clip_probe.py " + " ".join(argv if argv is not None else
                                                                           sys.argv[1:]),
              "evaluation": "validation patients only (validation-only view), as the study's validation MCC",
              "variant": args.variant, "overrides": VARIANTS[args.variant],
              "clip_on_stored": {int(k): float(v) for k, v in stored.items()}, key: {}, "check": None}
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else sorted(result["clip_on_stored"])
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp) / "runs"
        scenario = Path(tmp) / "scenario.toml"
        scenario.write_text(tomli_w.dumps(study.scenario_of(cell).model_dump(mode="json", exclude_none=True)))

        def score(seed: int, overrides: dict) -> float:
            spec = RunSpec(data_path=str(resolve_dataset(args.data, cell.dataset or study.dataset)),
                           scenario=str(scenario), seed=seed, preset=cell.preset or study.preset,
                           rounds=study.rounds, local_epochs=study.local_epochs, modalities=",".join(cell.modalities),
                           out_dir=runs / f"seed{seed}-{args.variant if overrides else 'check'}",
                           test_graph=study.test_graph_of(cell),
                           overrides={**study.overrides_of(cell), **overrides}, validation_metric=study.metric)
            return float(validation_scores(spec, ["fedsgd"])["fedsgd"])

        t0 = time.perf_counter()
        check = score(args.check_seed, {})
        result["check"] = {"seed": args.check_seed, "clip_on_rerun": check,
                           "equals_stored": check == result["clip_on_stored"][args.check_seed]}
        print(f"seed {args.check_seed}, the study's settings, rerun {check:.4f} "
              f"(stored {stored[args.check_seed]:.4f})", flush=True)
        for seed in seeds:
            result[key][seed] = score(seed, VARIANTS[args.variant])
            print(f"seed {seed}: {args.variant} {result[key][seed]:.4f}, stored {stored[seed]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.variant != "clip-off":  # what the variant's screen did to the honest gradients
            from benchmarks.screening_record import record_of

            result["screening"] = record_of(sorted(runs.glob(f"seed*-{args.variant}/validation/runs/*/history.json")))
    c = st.paired_comparison({s: result[key][s] for s in seeds}, {s: result["clip_on_stored"][s] for s in seeds})
    result[f"{key}_minus_on"] = c.to_dict()
    result["means"] = {key: sum(result[key].values()) / len(seeds),
                       "clip_on": sum(result["clip_on_stored"][s] for s in seeds) / len(seeds)}
    write_json(args.result, result)  # strict JSON: a value that is not a number is null
    print(json.dumps(result["means"]), json.dumps(result[f"{key}_minus_on"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
