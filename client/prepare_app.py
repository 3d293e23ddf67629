"""ClientApp of federated preprocessing: a site sends per-feature statistics, then applies the consortium's plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from magnet_core.preprocess import ModalityPrep
from server.prepare_config import PrepareRunConfig

from .prepare_site import RawSite, load_raw_site

app = ClientApp()
STAT_FIELDS = ("n_per_class", "count", "total", "total_sq", "minimum", "maximum")
_SITES: dict[tuple, RawSite] = {}


def _site(cfg: PrepareRunConfig, context: Context) -> tuple[RawSite, Path]:
    node = context.node_config
    if "raw-dir" in node:  # deployment: the site's own folders
        folder, out = Path(str(node["raw-dir"])), Path(str(node["out-dir"]))
    else:  # simulation: one raw folder per partition
        folder = Path(cfg.site_dirs.split(",")[int(node["partition-id"])])
        out = Path(cfg.out_dir) / folder.name
    key = (str(folder), cfg.seed, cfg.orientation)
    if key not in _SITES:
        _SITES[key] = load_raw_site(folder, cfg.seed, cfg.orientation)
    return _SITES[key], out


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Per-feature sums over this site's training patients: counts, sums, squares, minima, maxima per class."""
    cfg = PrepareRunConfig.model_validate_json(str(msg.content["config"]["plan"]))
    site, _ = _site(cfg, context)
    num_classes = int(msg.content["config"]["num-classes"]) or int(site.labels.max()) + 1
    arrays, features = {}, {}
    for m, st in site.stats(num_classes).items():
        for f in STAT_FIELDS:
            arrays[f"{m}/{f}"] = Array(np.ascontiguousarray(getattr(st, f), dtype=np.float64))
        features[m] = st.features
    content = RecordDict({"stats": ArrayRecord(arrays), "features": ConfigRecord(features),
                          "site": ConfigRecord({"name": site.name, "max-label": int(site.labels.max())})})
    return Message(content=content, reply_to=msg)


@app.query("apply")
def apply(msg: Message, context: Context) -> Message:
    """Impute, scale and select locally with the consortium's plan; write the prepared cohort; reply a report."""
    cfg = PrepareRunConfig.model_validate_json(str(msg.content["config"]["plan"]))
    site, out = _site(cfg, context)
    arrays, features = msg.content["plan"], msg.content["features"]
    preps = {m: ModalityPrep(list(features[m]), arrays[f"{m}/impute_means"].numpy(), arrays[f"{m}/scale_min"].numpy(),
                             arrays[f"{m}/scale_max"].numpy(), np.zeros(0), 0, 0) for m in features.keys()}
    report = site.write_prepared(preps, out, cfg.missing_feature)
    return Message(content=RecordDict({"report": ConfigRecord({"json": json.dumps(report)})}), reply_to=msg)
