"""ServerApp of federated preprocessing: combine sites' statistics, decide the plan, write the manifest."""

from __future__ import annotations

import json
import os
from logging import INFO
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from magnet_core.data import DataError
from magnet_core.preprocess import FeatureStats, ModalityPrep, build_manifest, combine_stats, derive_preparation

from .prepare_config import PrepareRunConfig

app = ServerApp()
STAT_FIELDS = ("n_per_class", "count", "total", "total_sq", "minimum", "maximum")


def _ask(grid: Grid, content: RecordDict, action: str, nodes: list[int]) -> list[Message]:
    msgs = [Message(content=content, dst_node_id=n, message_type=f"query.{action}") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=600))
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) < len(nodes):
        reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed)
        raise DataError(f"{len(nodes) - len(replies) + len(failed)} site(s) failed during '{action}': {reasons}")
    return sorted(replies, key=lambda r: str(r.content["site"]["name"]) if "site" in r.content else "")


def wait_for_sites(grid: Grid, expected: int, timeout: float = 300.0) -> list[int]:
    """Node ids once ``expected`` sites are connected (they register asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise DataError(f"only {len(nodes)} of {expected} sites connected within {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


def stats_from_reply(reply: Message) -> dict[str, FeatureStats]:
    arrays, features = reply.content["stats"], reply.content["features"]
    return {m: FeatureStats(list(features[m]), *[arrays[f"{m}/{f}"].numpy() for f in STAT_FIELDS])
            for m in features.keys()}


def plan_from_stats(per_site: list[dict[str, FeatureStats]], cfg: PrepareRunConfig) -> dict[str, ModalityPrep]:
    """Combine sites' statistics per modality and derive the consortium's plan."""
    modalities = list(dict.fromkeys(m for site in per_site for m in site))
    pcfg = cfg.prepare_config()
    return {m: derive_preparation(combine_stats([s[m] for s in per_site if m in s]), pcfg, m) for m in modalities}


def prepare_main(grid: Grid, context: Context) -> dict:
    cfg = PrepareRunConfig.from_run_config(context.run_config)
    nodes = wait_for_sites(grid, cfg.expected_sites())
    base = ConfigRecord({"plan": cfg.model_dump_json(), "num-classes": len(cfg.classes.split(",")) if cfg.classes else 0})
    replies = _ask(grid, RecordDict({"config": base}), "stats", nodes)
    per_site = [stats_from_reply(r) for r in replies]
    num_classes = max(int(r.content["site"]["max-label"]) for r in replies) + 1
    classes = cfg.classes.split(",") if cfg.classes else [f"class{k}" for k in range(num_classes)]
    plan = plan_from_stats(per_site, cfg)
    for m, p in plan.items():
        log(INFO, "%s: kept %d features (dropped %d for missing values, %d for low variance)", m, len(p.features),
            p.dropped_missing, p.dropped_variance)
    arrays = ArrayRecord({f"{m}/{k}": Array(np.ascontiguousarray(getattr(p, k), dtype=np.float64))
                          for m, p in plan.items() for k in ("impute_means", "scale_min", "scale_max")})
    features = ConfigRecord({m: p.features for m, p in plan.items()})
    reports = _ask(grid, RecordDict({"config": base, "plan": arrays, "features": features}), "apply", nodes)
    out = Path(cfg.out_dir)
    manifest = build_manifest(plan, classes, cfg.missing_feature, cfg.name)
    manifest.save(out / "manifest.toml")
    summary = {"sites": [json.loads(str(r.content["report"]["json"])) for r in reports],
               "modalities": {m: {"features": len(p.features), "dropped_missing": p.dropped_missing,
                                  "dropped_variance": p.dropped_variance} for m, p in plan.items()}}
    (out / "prepare_report.json").write_text(json.dumps(summary, indent=2))
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    prepare_main(grid, context)
