"""magnet-fl ServerApp: checked, modality-aware FedAvg over sites, pooled global evaluation, safe checkpoints."""

from __future__ import annotations

from logging import ERROR, WARNING

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from magnet_core.cohort.data import DataError
from magnet_core.protocol.enrolment import Enrolment

from .config import FederatedConfig, RunConfigError, preset_of
from .loop import ModelSpec, run_federation
from .names import SiteNames, read_site_keys

app = ServerApp()


def model_spec_enrolment_and_evaluator(cfg: FederatedConfig):
    """Model shape, enrolled sites, k, an optional held-out evaluator, the manifest the model package records and how
    nodes get their site names: from the manifest (deployment) or from the simulated consortium (simulation)."""
    if cfg.manifest:
        from magnet_core.cohort.manifest import ConsortiumManifest

        manifest = ConsortiumManifest.load(cfg.manifest)
        spec = ModelSpec({m.name: len(m.features) for m in manifest.modalities}, manifest.num_classes)
        enrolment = Enrolment(sites=manifest.sites) if manifest.sites else None
        return spec, enrolment, manifest.min_count, None, manifest, deployment_names(cfg, enrolment)
    from magnet_core.consortium.simulated import enrolment_of, load_consortium

    from .evaluation import held_out_evaluator

    cohort, sites = load_consortium(cfg.data_path, cfg.scenario, cfg.seed, cfg.modalities)
    spec = ModelSpec({m: int(cohort.X[m].shape[1]) for m in cohort.modalities}, cohort.num_classes)
    evaluator = held_out_evaluator(cohort, preset_of(cfg)) if cfg.server_eval else None
    from magnet_core.artefacts.model_package import manifest_from_cohort

    enrolment = enrolment_of(sites)
    return (spec, enrolment, cfg.min_count, evaluator, manifest_from_cohort(cohort),
            SiteNames.from_partitions(list(enrolment.sites)))


def deployment_names(cfg: FederatedConfig, enrolment: Enrolment | None) -> SiteNames:
    """Names bound to keys: every enrolled site's node public key, from its [sites] entry or ``site-keys``. A manifest
    without [sites], or a site without a key, is refused unless ``allow-unenrolled=true`` (names then come from each
    node's first reply, and every round's record says so)."""
    keys = read_site_keys(cfg.site_keys) if cfg.site_keys else {}
    if enrolment is not None:
        unknown = sorted(set(keys) - set(enrolment.sites))
        if unknown:
            raise RunConfigError(f"site-keys {cfg.site_keys} lists sites the manifest does not enrol: {unknown}")
        keys = {name: facts.public_key or keys.get(name) for name, facts in enrolment.sites.items()}
    missing = [name for name, key in keys.items() if not key]
    if enrolment is not None and not missing:
        try:
            return SiteNames.from_keys(keys)
        except ValueError as exc:
            raise RunConfigError(f"{cfg.manifest}: {exc}") from None
    problem = (f"the manifest {cfg.manifest} enrols no sites ([sites])" if enrolment is None else
               f"enrolled site(s) {missing} have no public key (public_key in [sites.NAME] or site-keys)")
    if not cfg.allow_unenrolled:
        raise RunConfigError(f"{problem}: site names cannot be bound to the nodes' keys; enrol every site with its "
                             f"node's public key, or set allow-unenrolled=true to take names from first replies")
    log(WARNING, "allow-unenrolled=true: %s; site names are taken from each node's first reply, NOT bound to keys%s",
        problem, "" if enrolment is not None else ", and replies are checked against the contract only, not "
                                                  "against enrolled patient counts")
    return SiteNames.at_first_contact()


def server_main(grid: Grid, context: Context, on_round=None):
    """The body of the ServerApp, shared by Flower's engines and the in-process engine."""
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()  # the server evaluates and aggregates with torch/numpy: no spinning OpenMP threads
    cfg = FederatedConfig.from_run_config(context.run_config)
    if (not cfg.data_path or cfg.data_path.startswith("generated:")) and not cfg.manifest:
        from magnet_core.cohort.generated import GENERATED_NOTICE

        log(WARNING, "no real data (data-path %r): sites use a %s", cfg.data_path, GENERATED_NOTICE)
    spec, enrolment, k, evaluator, manifest, names = model_spec_enrolment_and_evaluator(cfg)
    return run_federation(grid, cfg, spec, enrolment, server_eval=evaluator, on_round=on_round, min_count=k,
                          manifest=manifest, names=names)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        server_main(grid, context)
    except (RunConfigError, DataError) as exc:  # a user mistake (bad config or manifest, foreign checkpoint)
        log(ERROR, "run refused: %s", exc)
        raise SystemExit(2) from None
