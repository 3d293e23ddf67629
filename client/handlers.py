"""What a site does for one message, without Flower: find its data, train or evaluate, build the typed reply."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from magnet_core.federation.privacy import DEFAULT_MAX_BINS as SITE_MAX_BINS
from magnet_core.federation.privacy import release_eval
from magnet_core.model.config import get_preset
from magnet_core.model.metrics import DEFAULT_BINS
from magnet_core.model.site import SiteRuntime
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    NODE_DATA_DIR,
    NODE_MANIFEST,
    NODE_PARTITION_ID,
    NODE_SITE_NAME,
)
from magnet_core.protocol.messages import EvalReply, RoundConfig, TrainReply
from magnet_core.protocol.wire import Layout, pack, unpack

# Sites (data, graphs, model) are built once per process and reused across rounds.
_SITES: dict[tuple, SiteRuntime] = {}


def site_for(cfg: RoundConfig, node_config: Mapping[str, Any], node_id: int) -> SiteRuntime:
    """This node's site: a deployment data directory (node_config data-dir) or a simulated partition."""
    preset = get_preset(cfg.preset, prototypes=cfg.prototype_weight > 0)
    if NODE_DATA_DIR in node_config:
        from magnet_core.cohort.manifest import ConsortiumManifest
        from magnet_core.cohort.validation import load_site_cohort

        split = own_split(node_config, cfg.seed)
        key = ("dir", str(node_config[NODE_DATA_DIR]), str(node_config.get(NODE_MANIFEST, "")),
               tuple(split.values()), preset.name, preset.model.prototypes)
        if key not in _SITES:
            manifest = ConsortiumManifest.load(str(node_config[NODE_MANIFEST]))
            cohort = load_site_cohort(str(node_config[NODE_DATA_DIR]), manifest, **split)
            name = str(node_config.get(NODE_SITE_NAME, f"node{node_id}"))
            _SITES[key] = SiteRuntime.build(name, cohort, preset.model, preset.graph.sparsity, preset.graph.rule,
                                            preset.graph.k)
        return _SITES[key]
    from magnet_core.consortium.simulated import load_consortium, site_name

    pid = int(node_config[NODE_PARTITION_ID])
    consortium = ("sim", cfg.data_path, cfg.scenario, cfg.modalities, cfg.seed, preset.name, preset.model.prototypes)
    key = (*consortium, pid)
    if key not in _SITES:
        # a process simulates one consortium at a time (a study's worker runs many in turn): the sites of others
        # are dropped, so memory follows the current consortium, not every one this process ever ran
        for old in [k for k in _SITES if k[0] == "sim" and k[:-1] != consortium]:
            del _SITES[old]
        _, sites = load_consortium(cfg.data_path, cfg.scenario, cfg.seed, cfg.modalities)
        # simulated sites share the process's one working model (magnet_core.model.site.scratch_model): each
        # message loads the weights it carries first, so no site needs a model of its own between messages
        _SITES[key] = SiteRuntime.build(site_name(pid), sites[pid], preset.model, preset.graph.sparsity,
                                        preset.graph.rule, preset.graph.k, shared_model=True)
    return _SITES[key]


def own_split(node_config: Mapping[str, Any], run_seed: int) -> dict[str, Any]:
    """The split a deployed site trains, validates and evaluates on (keyword arguments of ``load_site_cohort``):
    when its node config names a policy, its prepared folder's split.csv (the preparation wrote it from the
    policy's lines), else the policy's ``preparation.split_seed`` and ``split_ratios`` (``Preparation.split``),
    so that no run's seed moves its patients between training, validation and test (a coordinator varying the seed
    would otherwise have a site train on the patients it tested on in another run, and evaluate on test sets that
    differ by a few patients); without a policy the site follows the run's seed."""
    from .guard import policy_of

    policy = policy_of(node_config)
    if policy is None:
        return dict(seed=run_seed)
    return policy.preparation.split()


def forget_sites() -> None:
    """Drop every cached site (their data changed, or a test wants a cold start)."""
    _SITES.clear()


def received_state(site: SiteRuntime, cfg: RoundConfig, flat: np.ndarray, layout: Mapping[str, Any]
                   ) -> tuple[Layout, dict[str, torch.Tensor]]:
    """The coordinator's flat model as this site's tensors, after the layout it names (a ConfigRecord) was
    checked against the model this site built itself from the preset and its manifest. ContractError otherwise."""
    got = Layout.from_record(layout)
    own = Layout.from_params(site.model.state_dict())
    problem = got.mismatch(own)
    if problem:
        raise ContractError(f"the coordinator's model does not fit this site's model (preset {cfg.preset!r}, "
                            f"built from the site's own data and manifest): {problem}")
    arrays = unpack(flat, got.with_dtypes_of(own))
    return got, {k: torch.from_numpy(v) for k, v in arrays.items()}


def train_site(cfg: RoundConfig, node_config: Mapping[str, Any], node_id: int, flat: np.ndarray,
               layout: Mapping[str, Any]) -> tuple[dict, dict, np.ndarray]:
    """Local epochs from the global weights (one flat array and its layout record): (metrics record, site
    record, new weights as one flat float32 array in the received order)."""
    site = site_for(cfg, node_config, node_id)
    got, state = received_state(site, cfg, flat, layout)
    new, stats = site.fit(state, get_preset(cfg.preset).train, cfg.local_epochs, cfg.server_round, cfg.seed,
                          proximal_mu=cfg.proximal_mu, label_adjustment=cfg.label_adjustment,
                          label_tau=cfg.label_tau, prototype_weight=cfg.prototype_weight,
                          min_count=release_min_count(cfg.min_count, node_config), local_update=cfg.local_update)
    loss = stats.get("loss")
    reply = TrainReply(site=site.name, num_examples=site.train.n, modality_counts=site.modality_counts,
                       loss=float(loss) if loss is not None and math.isfinite(loss) else None)
    metrics, name = reply.encode()
    return metrics, name, pack(new, got)


def evaluate_site(cfg: RoundConfig, node_config: Mapping[str, Any], node_id: int, flat: np.ndarray,
                  layout: Mapping[str, Any]) -> tuple[dict, dict]:
    """The global model on the site's test patients: (metrics record of counts, site record), released under the
    minimum count k (the larger of the coordinator's and the site's own manifest's) with at most
    SITE_MAX_BINS score bins, whatever the coordinator asks."""
    site = site_for(cfg, node_config, node_id)
    _, state = received_state(site, cfg, flat, layout)
    counts = site.evaluate_counts(state, DEFAULT_BINS, cfg.test_graph)
    k = release_min_count(cfg.min_count, node_config)
    release = release_eval(counts, k, max_bins=min(cfg.histogram_bins, SITE_MAX_BINS))
    return EvalReply.from_release(release).encode()


def evaluation_counts(cfg: RoundConfig, node_config: Mapping[str, Any], node_id: int, flat: np.ndarray,
                      layout: Mapping[str, Any]):
    """(site name, EvalCounts of the global model on the site's test patients): the counts of a secure evaluation,
    which leave the site only masked (client/secure.py), never released on their own."""
    site = site_for(cfg, node_config, node_id)
    _, state = received_state(site, cfg, flat, layout)
    return site.name, site.evaluate_counts(state, DEFAULT_BINS, cfg.test_graph)


def release_min_count(requested: int, node_config: Mapping[str, Any]) -> int:
    """The k a release of this site applies: the larger of the request's and the site's manifest's (the site's
    policy refuses a request below its own k before this point, client/policy.py)."""
    return max(requested, site_min_count(node_config))


def site_min_count(node_config: Mapping[str, Any]) -> int:
    """The k of the site's own consortium manifest (deployment); the floor otherwise."""
    from magnet_core.cohort.manifest import MIN_COUNT_FLOOR, ConsortiumManifest

    if NODE_MANIFEST in node_config:
        return ConsortiumManifest.load(str(node_config[NODE_MANIFEST])).min_count
    return MIN_COUNT_FLOOR

