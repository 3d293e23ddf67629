"""``magnet-fl centralized``: the paper's protocol on pooled data, one model per seed.

Arguments are defined without importing the data and training modules (pandas, torch): ``--help`` and a bad argument
answer at once; :func:`run` imports them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from magnet_core.consortium.methods import DEFAULT_SEEDS
from magnet_core.model.config import DEFAULT_PRESET, PRESETS, get_preset

from .cli import existing_dir, parse_seeds, positive_int
from .outputs import check_output, run_staged
from .parallel import parse_workers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_dir, default=None,
                   help="cohort folder (MAGNET split layout or labels.csv + modality files); "
                        "omitted: a generated cohort")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help=f"comma-separated seeds (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"hyperparameter preset (default {DEFAULT_PRESET})")
    p.add_argument("--epochs", type=positive_int, default=None, help="override the preset's 200 epochs")
    p.add_argument("--out", type=Path, required=True, help="output directory for results.json")
    p.add_argument("--package", type=Path, default=None,
                   help="also write each seed's model as a signed package for `magnet-fl predict` (this path for "
                        "one seed, <stem>-seed<N>.magnet for several); needs --signing-key and --signing-cert")
    p.add_argument("--signing-key", type=Path, default=None,
                   help="Ed25519 model-signing key (magnet-fl pki signing-key: pki/signing/model_signing.key)")
    p.add_argument("--signing-cert", type=Path, default=None,
                   help="its certificate, issued by the consortium CA (pki/signing/model_signing.crt)")
    p.add_argument("--workers", type=parse_workers, default=1,
                   help="train seeds on this many worker processes, one torch thread each on a machine with that "
                        "many cores (auto: one per CPU); same results as one by one (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (default: refuse a folder that holds results)")


def run(args: argparse.Namespace) -> int:
    from magnet_core.cohort.data import available_seeds, detect_layout  # lazy: pandas

    from .centralized import PackageSpec, run_centralized  # lazy: torch (when training starts)

    seeds = args.seeds or list(DEFAULT_SEEDS)
    package = None
    if args.package is not None or args.signing_key is not None or args.signing_cert is not None:
        if args.package is None or args.signing_key is None or args.signing_cert is None:
            raise ValueError("--package, --signing-key and --signing-cert go together: a model package is always "
                             "signed (sites refuse unsigned ones)")
        package = PackageSpec(args.package.resolve(), args.signing_key, args.signing_cert)
    check_output(args.out, args.overwrite)
    if args.data is not None and detect_layout(args.data) == "split":
        have = available_seeds(args.data)
        missing = [s for s in seeds if s not in have]
        if missing:
            raise FileNotFoundError(f"{args.data}: no split folder for seed(s) {missing} (available: {have})")

    def staged(inner: argparse.Namespace) -> int:
        run_centralized(inner.data, seeds, get_preset(inner.preset), inner.out, epochs=inner.epochs,
                        shown_as=inner.out_final, package=package,
                        workers=args.workers)
        return 0

    return run_staged(args, "centralized", staged)
