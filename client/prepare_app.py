"""ClientApp of federated preprocessing: a site sends per-feature statistics, then applies the consortium's plan."""

from __future__ import annotations

import json
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from magnet_core.data import DataError
from magnet_core.manifest import ConsortiumManifest
from magnet_core.preprocess import PrepareConfig, RawSite, SiteSpec, apply_manifest, site_statistics, \
    write_prepared_site

app = ClientApp()

# A site's raw data are read once for both messages when the same process handles them (always in deployment).
_SITES: dict[tuple[str, str], RawSite] = {}


def site_spec(config: ConfigRecord, context: Context) -> SiteSpec:
    """This node's site: its own folders in deployment (node_config ``raw-dir`` and ``prepared-dir``, optional
    ``site-name``), or the partition's entry of the simulated ``sites`` list."""
    node = context.node_config
    if "raw-dir" in node:
        if "prepared-dir" not in node:
            raise DataError("node_config has raw-dir but no prepared-dir (where this site writes its prepared data)")
        raw = str(node["raw-dir"])
        return SiteSpec(name=str(node.get("site-name", os.path.basename(raw.rstrip("/")) or "site")),
                        raw_dir=raw, out_dir=str(node["prepared-dir"]))
    sites = json.loads(str(config.get("sites", "[]")))
    pid = int(node.get("partition-id", -1))
    if not 0 <= pid < len(sites):
        raise DataError(f"simulated node with partition-id {pid} has no site (the run lists {len(sites)} sites)")
    return SiteSpec.model_validate(sites[pid])


def _site(config: ConfigRecord, spec: SiteSpec, keep: bool = True) -> tuple[PrepareConfig, RawSite]:
    """This site's settings and raw data; ``keep=False`` drops the cached raw data (after the last message)."""
    cfg = PrepareConfig.model_validate_json(str(config["prepare-config"]))
    key = (spec.model_dump_json(), cfg.model_dump_json())
    site = _SITES[key] if key in _SITES else spec.load(cfg, log=lambda *_: None)
    if keep:
        _SITES[key] = site
    else:
        _SITES.pop(key, None)
    return cfg, site


def _refusal(msg: Message, name: str, exc: Exception) -> Message:
    """A site's own data problem, reported to the server as text (no traceback, no data)."""
    return Message(content=RecordDict({"site": ConfigRecord({"name": name, "error": str(exc)})}), reply_to=msg)


@app.query("prepare_stats")
def stats(msg: Message, context: Context) -> Message:
    """Per-feature sums over this site's training patients: counts, sums, squares, minima, maxima per class."""
    config = msg.content["config"]
    name = f"node {context.node_id}"
    try:
        spec = site_spec(config, context)
        name = spec.name
        _, site = _site(config, spec)
        per_modality = site_statistics(site, int(config.get("num-classes", 0)) or None)
    except DataError as exc:
        return _refusal(msg, name, exc)
    arrays = {f"{m}/{f}": Array(a) for m, st in per_modality.items() for f, a in st.to_arrays().items()}
    content = RecordDict({
        "stats": ArrayRecord(arrays),
        "features": ConfigRecord({m: list(st.features) for m, st in per_modality.items()}),
        "site": ConfigRecord({"name": site.name, "num-classes": site.num_classes,
                              "summary": json.dumps(site.summary())}),
    })
    return Message(content=content, reply_to=msg)


@app.query("prepare_apply")
def apply(msg: Message, context: Context) -> Message:
    """Impute, scale and select locally with the consortium's manifest; write the prepared cohort; report counts."""
    config = msg.content["config"]
    name = f"node {context.node_id}"
    try:
        spec = site_spec(config, context)
        name = spec.name
        cfg, site = _site(config, spec, keep=False)
        manifest = ConsortiumManifest.model_validate_json(str(config["manifest"]))
        frames, report = apply_manifest(site, manifest, cfg.clip)
        write_prepared_site(spec.out_dir, site, frames)
    except DataError as exc:
        return _refusal(msg, name, exc)
    return Message(content=RecordDict({"site": ConfigRecord({"name": name, "out-dir": spec.out_dir,
                                                             "report": json.dumps(report)})}), reply_to=msg)
