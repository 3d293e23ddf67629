"""magnet-fl ClientApp: a site loads only its own patients, trains locally and evaluates with counts."""

from __future__ import annotations

from typing import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from magnet_core.config import get_preset
from magnet_core.contract import ContractError, EvalReply, RoundConfig, TrainReply
from magnet_core.data import DataError
from magnet_core.site import SiteRuntime

DATA_ERROR_CODE = 4001  # the site's data failed validation; the reason names the file and the problem
CONTRACT_ERROR_CODE = 4002  # the coordinator's message broke the contract; the reason names the key


def optional_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for clipping (differential privacy on), else a no-op."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp()

# Sites (data, graphs, model) are built once per process and reused across rounds.
_SITES: dict[tuple, SiteRuntime] = {}


def site_for(cfg: RoundConfig, context: Context) -> SiteRuntime:
    """This node's site: a deployment data directory (node_config data-dir) or a simulated partition."""
    preset = get_preset(cfg.preset)
    node = context.node_config
    if "data-dir" in node:
        from magnet_core.manifest import ConsortiumManifest
        from magnet_core.site_validation import load_site_cohort

        key = ("dir", str(node["data-dir"]), str(node.get("manifest", "")), cfg.seed, preset.name)
        if key not in _SITES:
            manifest = ConsortiumManifest.load(str(node["manifest"]))
            cohort = load_site_cohort(str(node["data-dir"]), manifest, cfg.seed)
            name = str(node.get("site-name", f"node{context.node_id}"))
            _SITES[key] = SiteRuntime.build(name, cohort, preset.model, preset.graph.sparsity)
        return _SITES[key]
    from magnet_core.consortium import load_consortium, site_name

    pid = int(node["partition-id"])
    key = ("sim", cfg.data_path, cfg.scenario, cfg.modalities, cfg.seed, pid, preset.name)
    if key not in _SITES:
        _, sites = load_consortium(cfg.data_path, cfg.scenario, cfg.seed, cfg.modalities)
        _SITES[key] = SiteRuntime.build(site_name(pid), sites[pid], preset.model, preset.graph.sparsity)
    return _SITES[key]


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A clear error reply instead of a crash (the server logs it with this node's id)."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _setup(msg: Message, context: Context) -> tuple[RoundConfig, SiteRuntime] | Message:
    try:
        cfg = RoundConfig.decode(msg.content["config"])
    except (ContractError, KeyError) as exc:
        return error_reply(msg, CONTRACT_ERROR_CODE, f"round config rejected: {exc}")
    try:
        return cfg, site_for(cfg, context)
    except DataError as exc:
        return error_reply(msg, DATA_ERROR_CODE, f"site data rejected: {exc}")


def _reply(msg: Message, metrics: Mapping, site: Mapping, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(dict(metrics)), "site": ConfigRecord(dict(site))})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train(mods=[optional_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the received global weights; reply weights + per-modality training counts."""
    setup = _setup(msg, context)
    if isinstance(setup, Message):
        return setup
    cfg, site = setup
    state, stats = site.fit(msg.content["arrays"].to_torch_state_dict(), get_preset(cfg.preset).train,
                            cfg.local_epochs, cfg.server_round, cfg.seed)
    state = poison_for_testing(state, context)
    loss = stats.get("loss")
    reply = TrainReply(site=site.name, num_examples=site.train.n, modality_counts=site.modality_counts,
                       loss=float(loss) if loss is not None and torch.isfinite(torch.tensor(loss)) else None)
    metrics, name = reply.encode()
    return _reply(msg, metrics, name, ArrayRecord(state))


def poison_for_testing(state: dict[str, torch.Tensor], context: Context) -> dict[str, torch.Tensor]:
    """node_config ``test-poison`` = "nan" | "scale": corrupt this site's update, to test the server's defences
    in deployment tests. Never set it on a real site."""
    mode = str(context.node_config.get("test-poison", ""))
    if mode == "nan":
        state = dict(state)
        name = next(k for k in state if k.startswith("attention"))
        state[name] = torch.full_like(state[name], float("nan"))
    elif mode == "scale":
        state = {k: v * 1e4 if v.is_floating_point() else v for k, v in state.items()}
    return state


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local test patients; reply confusion counts and score histograms only."""
    setup = _setup(msg, context)
    if isinstance(setup, Message):
        return setup
    cfg, site = setup
    counts = site.evaluate_counts(msg.content["arrays"].to_torch_state_dict(), cfg.histogram_bins)
    metrics, name = EvalReply.from_counts(counts).encode()
    return _reply(msg, metrics, name)
