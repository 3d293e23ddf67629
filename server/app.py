"""magnet-fl ServerApp: modality-aware FedAvg over sites, exact global evaluation, checkpoints and history."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from magnet_core.config import get_preset

from .config import FederatedConfig
from .loop import ModelSpec, run_federation

app = ServerApp()

# Called with each round's record when the ServerApp runs in this process (progress bars of `magnet-fl simulate`).
ROUND_CALLBACKS: list = []


def model_spec_and_evaluator(cfg: FederatedConfig):
    """Model shape from the manifest (deployment) or from the simulated cohort (+ a held-out evaluator)."""
    if cfg.manifest:
        from magnet_core.manifest import ConsortiumManifest

        manifest = ConsortiumManifest.load(cfg.manifest)
        spec = ModelSpec({m.name: len(m.features) for m in manifest.modalities}, manifest.num_classes)
        return spec, None
    from magnet_core.consortium import load_consortium

    from .evaluation import held_out_evaluator

    cohort, _ = load_consortium(cfg.data_path, cfg.scenario, cfg.seed, cfg.modalities)
    spec = ModelSpec({m: int(cohort.X[m].shape[1]) for m in cohort.modalities}, cohort.num_classes)
    return spec, held_out_evaluator(cohort, get_preset(cfg.preset)) if cfg.server_eval else None


def server_main(grid: Grid, context: Context, on_round=None):
    """The body of the ServerApp, shared by Flower's engines and the in-process engine."""
    cfg = FederatedConfig.from_run_config(context.run_config)
    if (not cfg.data_path or cfg.data_path.startswith("generated:")) and not cfg.manifest:
        from flwr.common.logger import log
        from logging import WARNING

        from magnet_core.synthetic import GENERATED_NOTICE

        log(WARNING, "data-path is empty: sites use a %s", GENERATED_NOTICE)
    spec, evaluator = model_spec_and_evaluator(cfg)
    def notify(record: dict) -> None:
        for callback in [on_round, *ROUND_CALLBACKS]:
            if callback is not None:
                callback(record)

    return run_federation(grid, cfg, spec, server_eval=evaluator, on_round=notify, grace=cfg.straggler_grace)


@app.main()
def main(grid: Grid, context: Context) -> None:
    server_main(grid, context)
