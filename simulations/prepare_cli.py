"""``magnet-fl prepare``: raw site matrices -> consortium-ready cohorts + manifest, locally or through Flower."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli import existing_dir
from .reporting import console


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", dest="sites", type=existing_dir, action="append", required=True,
                   help="a raw site folder (labels.csv + one matrix per modality, optional split.csv); repeat per site")
    p.add_argument("--out", type=Path, required=True, help="writes manifest.toml and one prepared folder per site")
    p.add_argument("--federated", action="store_true",
                   help="exchange statistics through Flower's simulation engine (one SuperNode per site)")
    p.add_argument("--name", default="consortium")
    p.add_argument("--classes", default="", help="comma-separated class names (labels are their indices)")
    p.add_argument("--seed", type=int, default=10, help="seed of the per-site 70/10/20 split (without split.csv)")
    p.add_argument("--n-features", type=int, default=1000)
    p.add_argument("--max-missing", type=float, default=0.1, help="drop features missing in more patients")
    p.add_argument("--variance-threshold", default="", help="per modality, e.g. 'mRNA=0.03,DNA=0.04'")
    p.add_argument("--missing-feature", choices=("impute", "error"), default="impute",
                   help="a site lacking a kept feature: fill it with the consortium mean, or refuse")
    p.add_argument("--orientation", choices=("auto", "samples-x-features", "features-x-samples"), default="auto")


def run(args: argparse.Namespace) -> int:
    from server.prepare_config import PrepareRunConfig

    cfg = PrepareRunConfig(site_dirs=",".join(str(s) for s in args.sites), out_dir=str(args.out), name=args.name,
                           classes=args.classes, seed=args.seed, n_features=args.n_features,
                           max_missing_fraction=args.max_missing, variance_threshold=args.variance_threshold,
                           missing_feature=args.missing_feature, orientation=args.orientation)
    summary = run_prepare(cfg, len(args.sites), federated=args.federated)
    for m, info in summary["modalities"].items():
        console.print(f"{m}: {info['features']} features kept ({info['dropped_missing']} dropped for missing "
                      f"values, {info['dropped_variance']} for low variance)")
    for site in summary["sites"]:
        for m, info in site["modalities"].items():
            if info.get("absent"):
                console.print(f"[yellow]{site['site']}: has no {m} matrix (modality absent, allowed)[/]")
            elif info["lacking_features_imputed"]:
                console.print(f"[yellow]{site['site']}: {m} lacks {len(info['lacking_features_imputed'])} kept "
                              f"feature(s), filled with the consortium mean: {info['lacking_features_imputed'][:5]}[/]")
    console.print(f"wrote {args.out}/manifest.toml, prepare_report.json and {len(args.sites)} prepared site folder(s)")
    return 0


def run_prepare(cfg, num_sites: int, federated: bool = False) -> dict:
    """Run the statistics protocol with the same ServerApp/ClientApp code, in-process or through Flower."""
    from client.prepare_app import app as client_app
    from server.prepare_app import app as server_app, prepare_main
    from server.prepare_config import ENV_OVERRIDE

    if federated:
        from flwr.simulation import run_simulation

        os.environ[ENV_OVERRIDE] = cfg.model_dump_json()
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"log_to_driver": False, "include_dashboard": False}})
        finally:
            os.environ.pop(ENV_OVERRIDE, None)
        report = Path(cfg.out_dir) / "prepare_report.json"
        if not report.exists():
            raise RuntimeError("federated preparation failed; see the log above")
        return json.loads(report.read_text())
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from .engine import InProcessGrid

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, num_sites)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    return prepare_main(grid, ctx)
