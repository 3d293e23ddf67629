"""Exploratory, validation patients only: what does the coordinator's bounded-influence clip cost fedsgd?

``docs/studies/label-skew-fedsgd`` ran fedsgd with the coordinator's default update screen, which shortened its
honest gradients (``benchmarks/screening_record.py``). This probe trains fedsgd once more per seed of one cell
with the clip off (``clip-factor = 0``; the screen's other rules stay) on the study's validation-only view, exactly
as the study scores a method's validation MCC (``simulations.simulate.validation_scores``: the view drops every
test patient first), and pairs it by seed with the study's stored validation MCC of fedsgd with the clip. Seed
``--check-seed`` is also rerun with the clip, to show the stored value is reproduced. It reads no test patient
and chooses nothing: it informs what to declare next.

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
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    study = load_study(args.study / "study.toml")
    cell = next(c for c in study.cells if c.id == args.cell)
    tidy = pd.read_csv(args.study / f"{study.name}_tidy.csv")
    stored = tidy[(tidy["cell"] == cell.id) & (tidy["method"] == "fedsgd")].set_index("seed")["val_mcc"]
    result = {"study": str(args.study), "cell": cell.id, "threads": torch.get_num_threads(),
              "command": "python benchmarks/fedsgd_clip_probe.py " + " ".join(argv if argv is not None else
                                                                           sys.argv[1:]),
              "evaluation": "validation patients only (validation-only view), as the study's validation MCC",
              "clip_on_stored": {int(k): float(v) for k, v in stored.items()}, "clip_off": {}, "check": None}
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "scenario.toml"
        scenario.write_text(tomli_w.dumps(study.scenario_of(cell).model_dump(mode="json", exclude_none=True)))

        def score(seed: int, overrides: dict) -> float:
            spec = RunSpec(data_path=str(resolve_dataset(args.data, cell.dataset or study.dataset)),
                           scenario=str(scenario), seed=seed, preset=cell.preset or study.preset,
                           rounds=study.rounds, local_epochs=study.local_epochs, modalities=",".join(cell.modalities),
                           out_dir=Path(tmp) / f"seed{seed}", test_graph=study.test_graph_of(cell),
                           overrides={**study.overrides_of(cell), **overrides}, validation_metric=study.metric)
            return float(validation_scores(spec, ["fedsgd"])["fedsgd"])

        t0 = time.perf_counter()
        check = score(args.check_seed, {})
        result["check"] = {"seed": args.check_seed, "clip_on_rerun": check,
                           "equals_stored": check == result["clip_on_stored"][args.check_seed]}
        print(f"seed {args.check_seed}, clip on, rerun {check:.4f} (stored {stored[args.check_seed]:.4f})", flush=True)
        for seed in sorted(result["clip_on_stored"]):
            result["clip_off"][seed] = score(seed, {"clip_factor": 0.0})
            print(f"seed {seed}: clip off {result['clip_off'][seed]:.4f}, on {stored[seed]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seeds = sorted(result["clip_off"])
    c = st.paired_comparison({s: result["clip_off"][s] for s in seeds}, {s: result["clip_on_stored"][s] for s in seeds})
    result["clip_off_minus_on"] = c.to_dict()
    result["means"] = {"clip_off": sum(result["clip_off"].values()) / len(seeds),
                       "clip_on": sum(result["clip_on_stored"][s] for s in seeds) / len(seeds)}
    write_json(args.result, result)  # strict JSON: a value that is not a number is null
    print(json.dumps(result["means"]), json.dumps(result["clip_off_minus_on"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
