"""magnet-fl ServerApp: checked, modality-aware FedAvg over sites, pooled global evaluation, safe checkpoints."""

from __future__ import annotations

from logging import ERROR, WARNING

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from magnet_core.cohort.data import DataError
from magnet_core.model.config import get_preset
from magnet_core.protocol.enrolment import Enrolment

from .config import FederatedConfig, RunConfigError
from .loop import ModelSpec, run_federation

app = ServerApp()


def model_spec_enrolment_and_evaluator(cfg: FederatedConfig):
    """Model shape, enrolled sites, k, an optional held-out evaluator and the manifest the model package records:
    from the manifest (deployment) or from the simulated consortium (simulation)."""
    if cfg.manifest:
        from magnet_core.cohort.manifest import ConsortiumManifest

        manifest = ConsortiumManifest.load(cfg.manifest)
        spec = ModelSpec({m.name: len(m.features) for m in manifest.modalities}, manifest.num_classes)
        enrolment = Enrolment(sites=manifest.sites) if manifest.sites else None
        if enrolment is None:
            log(WARNING, "the manifest %s enrols no sites: replies are checked against the contract only, "
                "not against enrolled patient counts", cfg.manifest)
        return spec, enrolment, manifest.min_count, None, manifest
    from magnet_core.consortium.simulated import enrolment_of, load_consortium

    from .evaluation import held_out_evaluator

    cohort, sites = load_consortium(cfg.data_path, cfg.scenario, cfg.seed, cfg.modalities)
    spec = ModelSpec({m: int(cohort.X[m].shape[1]) for m in cohort.modalities}, cohort.num_classes)
    evaluator = held_out_evaluator(cohort, get_preset(cfg.preset)) if cfg.server_eval else None
    from magnet_core.artefacts.model_package import manifest_from_cohort

    return spec, enrolment_of(sites), cfg.min_count, evaluator, manifest_from_cohort(cohort)


def server_main(grid: Grid, context: Context, on_round=None):
    """The body of the ServerApp, shared by Flower's engines and the in-process engine."""
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()  # the server evaluates and aggregates with torch/numpy: no spinning OpenMP threads
    cfg = FederatedConfig.from_run_config(context.run_config)
    if (not cfg.data_path or cfg.data_path.startswith("generated:")) and not cfg.manifest:
        from magnet_core.cohort.generated import GENERATED_NOTICE

        log(WARNING, "no real data (data-path %r): sites use a %s", cfg.data_path, GENERATED_NOTICE)
    spec, enrolment, k, evaluator, manifest = model_spec_enrolment_and_evaluator(cfg)
    return run_federation(grid, cfg, spec, enrolment, server_eval=evaluator, on_round=on_round, min_count=k,
                          manifest=manifest)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        server_main(grid, context)
    except (RunConfigError, DataError) as exc:  # a user mistake (bad config or manifest, foreign checkpoint)
        log(ERROR, "run refused: %s", exc)
        raise SystemExit(2) from None
