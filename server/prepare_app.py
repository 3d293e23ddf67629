"""ServerApp of federated preprocessing: combine sites' statistics, decide the plan, write the manifest."""

from __future__ import annotations

import json
import time
import tomllib
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel, ConfigDict, Field

from magnet_core.data import DataError
from magnet_core.preprocess import (
    STAT_FIELDS, FeatureStats, ModalityPrep, PrepareConfig, SiteSpec, build_manifest, class_names, combine_sites,
    derive_all,
)

app = ServerApp()
RUN_KEY = "prepare-run"  # run-config key holding a whole PrepareRun as JSON (how simulation drivers pass it)


class PrepareRun(BaseModel):
    """One federated preparation: the thresholds, where the sites are (simulation) and where results go."""

    model_config = ConfigDict(extra="forbid")

    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    sites: list[SiteSpec] = Field(default_factory=list, description="simulation: one site per partition id")
    out_dir: str = "runs/prepare"
    min_sites: int = Field(0, ge=0, description="sites to wait for (0 = one per listed site)")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the sites' replies in each step")
    wait_timeout: float = Field(300.0, gt=0, description="seconds to wait for the sites to connect")

    def expected_sites(self) -> int:
        return self.min_sites or len(self.sites) or 1

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "PrepareRun":
        """Flower run config (kebab-case; ``prepare-config`` = a TOML file of thresholds; ``prepare-run`` = a
        whole PrepareRun as JSON, which then takes precedence)."""
        if isinstance(run_config.get(RUN_KEY), str):
            return cls.model_validate_json(run_config[RUN_KEY])
        raw = {k.replace("-", "_"): v for k, v in run_config.items()}
        if isinstance(raw.get("prepare_config"), str):
            raw["prepare"] = tomllib.loads(Path(raw.pop("prepare_config")).read_text())
        raw = {k: v for k, v in raw.items() if k in cls.model_fields}
        return cls.model_validate(raw)


def wait_for_sites(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once ``expected`` sites are connected (they register asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise DataError(f"only {len(nodes)} of {expected} sites connected within {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def ask(grid: Grid, nodes: list[int], action: str, config: dict, timeout: float) -> tuple[list[Message], dict]:
    """Send one query to every node; returns the replies sorted by site name and the sites that failed
    (name -> reason: a data problem the site reported, a crash, or no reply)."""
    msgs = [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=n, message_type=f"query.{action}")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    ok, failed = [], {}
    for r in replies:
        if r.has_error():
            failed[f"node {r.metadata.src_node_id}"] = f"crashed: {r.error.reason}"
        elif "error" in r.content["site"]:
            failed[str(r.content["site"]["name"])] = str(r.content["site"]["error"])
        else:
            ok.append(r)
    answered = {r.metadata.src_node_id for r in replies}
    for n in nodes:
        if n not in answered:
            failed[f"node {n}"] = f"no reply within {timeout:.0f} s"
    return sorted(ok, key=lambda r: str(r.content["site"]["name"])), failed


def stats_from_reply(reply: Message) -> dict[str, FeatureStats]:
    """A site's per-modality statistics, checked for consistency."""
    arrays, features = reply.content["stats"], reply.content["features"]
    name = str(reply.content["site"]["name"])
    return {m: FeatureStats.from_arrays(list(features[m]), {f: arrays[f"{m}/{f}"].numpy() for f in STAT_FIELDS},
                                        f"statistics of site {name!r}, {m}")
            for m in features.keys()}


def decide(per_site: list[dict[str, FeatureStats]], num_classes: int, cfg: PrepareConfig):
    """Combined statistics -> the consortium's decisions and manifest (pure; also used by in-process checks)."""
    combined = combine_sites(per_site)
    preps = derive_all(combined, cfg)
    manifest = build_manifest(preps, class_names(num_classes, cfg), cfg.missing_feature, cfg.name,
                              max_absent_features=cfg.max_absent_features)
    return manifest, preps, combined


def write_decisions(out: Path, preps: dict[str, ModalityPrep]) -> None:
    """Per-feature audit tables (aggregates only): missing fraction, mean, range, variance, F, each decision."""
    (out / "decisions").mkdir(parents=True, exist_ok=True)
    for m, p in preps.items():
        if p.table is not None:
            p.table.to_csv(out / "decisions" / f"{m}.csv", float_format="%.10g")


def prepare_main(grid: Grid, context: Context, run: PrepareRun | None = None) -> dict:
    """Statistics from every site -> combined -> decisions -> manifest -> every site applies them locally.
    ``run`` defaults to the one in the Flower run config."""
    run = run or PrepareRun.from_run_config(context.run_config)
    cfg, out = run.prepare, Path(run.out_dir)
    t0 = time.perf_counter()
    nodes = wait_for_sites(grid, run.expected_sites(), run.wait_timeout)
    base = {"prepare-config": cfg.model_dump_json(), "num-classes": len(cfg.class_names or []),
            "sites": json.dumps([s.model_dump() for s in run.sites])}
    replies, failed = ask(grid, nodes, "prepare_stats", base, run.timeout)
    if failed:
        raise DataError("sites could not compute their statistics:\n- " +
                        "\n- ".join(f"{k}: {v}" for k, v in failed.items()))
    names = [str(r.content["site"]["name"]) for r in replies]
    if len(set(names)) != len(names):
        raise DataError(f"two sites use the same name: {names}")
    per_site = [stats_from_reply(r) for r in replies]
    num_classes = len(cfg.class_names or []) or max(int(r.content["site"]["num-classes"]) for r in replies)
    manifest, preps, _ = decide(per_site, num_classes, cfg)
    t_stats = time.perf_counter() - t0
    manifest.save(out / "manifest.toml")
    write_decisions(out, preps)
    for m, p in preps.items():
        log(INFO, "%s: kept %d of %d features (dropped %d for missing values, %d for low variance, %d by F)", m,
            len(p.features), p.report["features_in"], p.dropped_missing, p.dropped_variance, p.dropped_f)
    applied, refused = ask(grid, nodes, "prepare_apply", {**base, "manifest": manifest.model_dump_json()},
                           run.timeout)
    for name, reason in refused.items():
        log(WARNING, "site %s did not prepare its data: %s", name, reason)
    summary = {
        "status": "ok" if not refused else "incomplete",
        "manifest": str(out / "manifest.toml"),
        "missing_feature": cfg.missing_feature,
        "modalities": {m: p.report for m, p in preps.items()},
        "sites": [{**json.loads(str(s["summary"])), "prepared": None}
                  for s in (r.content["site"] for r in replies)],
        "refused": refused,
        "seconds": {"statistics_and_decisions": t_stats, "total": time.perf_counter() - t0},
        "config": cfg.model_dump(),
    }
    reports = {str(r.content["site"]["name"]): r.content["site"] for r in applied}
    for site in summary["sites"]:
        if site["site"] in reports:
            site["prepared"] = {"out_dir": str(reports[site["site"]]["out-dir"]),
                                **json.loads(str(reports[site["site"]]["report"]))}
    (out / "prepare_report.json").write_text(json.dumps(summary, indent=1))
    return summary


def prepare_and_record(grid: Grid, context: Context, run: PrepareRun | None = None) -> dict:
    """:func:`prepare_main`, recording why in ``prepare_report.json`` when it fails (then failing the run)."""
    run = run or PrepareRun.from_run_config(context.run_config)
    try:
        return prepare_main(grid, context, run)
    except DataError as exc:
        out = Path(run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prepare_report.json").write_text(json.dumps({"status": "failed", "error": str(exc)}, indent=1))
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    prepare_and_record(grid, context)
