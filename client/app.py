"""magnet-fl ClientApp: a site loads only its own patients, trains locally and evaluates with counts."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.app import Error, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from magnet_core.config import get_preset
from magnet_core.data import DataError
from server.strategy import to_numpy, to_record  # the one ArrayRecord <-> numpy conversion

from magnet_core.site import SiteRuntime

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


def site_for(config: ConfigRecord, context: Context) -> SiteRuntime:
    """This node's site: a deployment data directory (node_config data-dir) or a simulated partition."""
    preset = get_preset(str(config["preset"]))
    seed = int(config["seed"])
    node = context.node_config
    if "data-dir" in node:
        from magnet_core.site_validation import load_site_cohort  # deployment only
        from magnet_core.manifest import ConsortiumManifest

        key = ("dir", str(node["data-dir"]), str(node.get("manifest", "")), seed, preset.name)
        if key not in _SITES:
            manifest = ConsortiumManifest.load(str(node["manifest"]))
            cohort = load_site_cohort(str(node["data-dir"]), manifest, seed)
            name = str(node.get("site-name", f"node{context.node_id}"))
            _SITES[key] = SiteRuntime.build(name, cohort, preset.model, preset.graph.sparsity)
        return _SITES[key]
    from magnet_core.consortium import load_consortium

    pid = int(node["partition-id"])
    modalities = str(config.get("modalities", ""))
    key = ("sim", str(config["data-path"]), str(config["scenario"]), modalities, seed, pid, preset.name)
    if key not in _SITES:
        _, sites = load_consortium(str(config["data-path"]), str(config["scenario"]), seed, modalities)
        _SITES[key] = SiteRuntime.build(f"site{pid}", sites[pid], preset.model, preset.graph.sparsity)
    return _SITES[key]


DATA_ERROR_CODE = 4001  # the site's data failed validation; the reason names the file and the problem


def data_error_reply(msg: Message, exc: Exception) -> Message:
    """A clear error reply instead of a crash (the server logs it with this node's id)."""
    return Message(Error(code=DATA_ERROR_CODE, reason=f"site data rejected: {exc}"), reply_to=msg)


@app.train(mods=[optional_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the received global weights; reply weights + per-modality training counts."""
    config = msg.content["config"]
    try:
        site = site_for(config, context)
    except DataError as exc:
        return data_error_reply(msg, exc)
    preset = get_preset(str(config["preset"]))
    params, stats = site.fit(to_numpy(msg.content["arrays"]), preset.train, int(config["local-epochs"]),
                             int(config["server-round"]), int(config["seed"]))
    params = poison_for_testing(params, context)
    metrics = {"num-examples": site.train.n, "loss": float(stats.get("loss", float("nan")))}
    metrics.update({f"count-{m}": c for m, c in site.modality_counts.items()})
    content = RecordDict({"arrays": to_record(params), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


def poison_for_testing(params: dict[str, np.ndarray], context: Context) -> dict[str, np.ndarray]:
    """node_config ``test-poison`` = "nan" | "scale": corrupt this site's update, to test the server's defences.
    Never set it on a real site."""
    mode = str(context.node_config.get("test-poison", ""))
    if mode == "nan":
        params = dict(params)
        name = next(k for k in params if k.startswith("attention"))
        params[name] = np.full_like(params[name], np.nan)
    elif mode == "scale":
        params = {k: v * 1e4 if v.dtype.kind == "f" else v for k, v in params.items()}
    return params


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local test patients; reply confusion counts and score histograms only."""
    config = msg.content["config"]
    try:
        site = site_for(config, context)
    except DataError as exc:
        return data_error_reply(msg, exc)
    counts = site.evaluate_counts(to_numpy(msg.content["arrays"]), int(config.get("histogram-bins", 1000)))
    metrics: dict = {"num-examples": counts.num}
    for group, cm in counts.confusion.items():
        metrics[f"cm-{group}"] = cm.astype(np.int64).ravel().tolist()
    for group, hist in counts.histogram.items():
        metrics[f"hist-{group}"] = hist.astype(np.int64).ravel().tolist()
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
