"""The run report: one self-contained HTML page (embedded PNG figures, no external resources) from a run's records."""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from magnet_core.artefacts.audit_chain import AUDIT_FILE, verify_chain
from magnet_core.cohort.data import Cohort, DataError
from magnet_core.cohort.generated import GENERATED_NOTICE
from magnet_core.cohort.manifest import DEFAULT_MIN_COUNT
from magnet_core.consortium import methods as vocabulary
from magnet_core.consortium.methods import METHOD_NAMES

REPORT_FILE = "report.html"
SITE_LOG_FILE = "site_log.jsonl"
METRICS = ("mcc", "acc", "f1", "auroc", "auprc")
GROUPS = ("", "paired_", "unpaired_")
ARTEFACT_PATTERNS = ("model.pt", "*.magnet", "model.pkg*", "*.sig")
# Round-table columns shown only when some round has them.
OPTIONAL_COLUMNS = {"norms": "update norms", "eval_flags": "evaluations out of line (flagged)",
                    "withheld": "groups withheld (< k)", "dp": "differential privacy"}


# ------------------------------------------------------------------------------------------- reading records


def read_json(path: Path) -> Any:
    """A JSON file, or one clear error naming the file and the position."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def read_history(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of per-round records (objects)")
    return data


def read_site_log(path: Path) -> list[dict]:
    """The JSON lines of a site log; a last line still being written (no newline yet) is skipped."""
    text = path.read_text()
    lines = text.splitlines()
    entries = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) and not text.endswith("\n"):
                break
            raise DataError(f"{path}, line {i}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(entry, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object, got {type(entry).__name__}")
        entries.append(entry)
    return entries


def _read_checkpoint(path: Path) -> dict:
    """config and history from a checkpoint (tensors only through torch's safe loader), {} if unreadable."""
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint we cannot read only hides optional details
        return {}
    return state if isinstance(state, dict) else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class RunRecords:
    """Everything the coordinator's report shows, read from a run directory (or handed over in memory)."""

    run_dir: Path
    kind: str  # "simulation" | "federated"
    generated: bool
    config: dict[str, dict[str, Any]]  # table title -> settings
    histories: dict[str, list[dict]]  # label -> per-round records
    results: dict | None = None  # results.json of a simulation
    site_data: dict[str, dict] | None = None  # site -> {"patients", "splits", "modalities", "classes"}
    site_data_note: str = ""
    min_count: int = DEFAULT_MIN_COUNT
    min_count_source: str = "default (no manifest)"
    artefacts: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    package: dict = dataclasses.field(default_factory=dict)  # a ``package`` entry of the records (fields shown)
    checkpoint_fingerprint: str | None = None  # the fingerprint stored in the (first) checkpoint
    wall_seconds: float | None = None


def _history_label(name: str) -> tuple[str, str]:
    """"federated-seed10" -> ("federated · seed 10", "federated")."""
    method, _, seed = name.rpartition("-seed")
    if method and seed.isdigit():
        return f"{method} · seed {seed}", method
    return name, name


def _method_rank(method: str) -> int:
    return METHOD_NAMES.index(method) if method in METHOD_NAMES else len(METHOD_NAMES)


def _read_histories(run_dir: Path) -> tuple[str, dict[str, list[dict]], dict, list[str]]:
    """(kind, label -> history, first checkpoint's content, notes) of a simulate or a federated run directory."""
    histories: dict[str, list[dict]] = {}
    notes: list[str] = []
    if (run_dir / "results.json").exists():
        found = []
        for path in (run_dir / "runs").glob("*/history.json"):
            label, method = _history_label(path.parent.name)
            seed = path.parent.name.rpartition("-seed")[2]
            found.append(((_method_rank(method), int(seed) if seed.isdigit() else 0, label), path))
        for (_, _, label), path in sorted(found):
            histories[label] = read_history(path)
        first = sorted(found)[0][1].parent / "checkpoint.pt" if found else None
        return "simulation", histories, _read_checkpoint(first) if first and first.exists() else {}, notes
    if (run_dir / "history.json").exists() or (run_dir / "checkpoint.pt").exists():
        ckpt = _read_checkpoint(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").exists() else {}
        if (run_dir / "history.json").exists():
            histories["federated run"] = read_history(run_dir / "history.json")
        else:
            histories["federated run (in progress)"] = list(ckpt.get("history") or [])
            notes.append("history.json is not written yet: rounds are read from the last checkpoint")
        return "federated", histories, ckpt, notes
    raise DataError(f"{run_dir}: not a run directory (no results.json, history.json, checkpoint.pt or "
                    f"{SITE_LOG_FILE}); for a site's log use `magnet-fl report DIR --site NAME`")


def _run_config(run_dir: Path, ckpt: Mapping[str, Any], histories: Mapping[str, list[dict]]) -> dict:
    """The run's configuration: run_config.json / config.json where written, else the checkpoint's, else the
    first record's ``config``."""
    for name in ("run_config.json", "config.json"):
        if (run_dir / name).exists():
            loaded = read_json(run_dir / name)
            if isinstance(loaded, dict) and loaded:
                return loaded
    if isinstance(ckpt.get("config"), Mapping) and ckpt["config"]:
        return dict(ckpt["config"])
    first = next((h[0] for h in histories.values() if h), {})
    return dict(first["config"]) if isinstance(first.get("config"), Mapping) else {}


def _simulation_settings(results: Mapping[str, Any]) -> dict[str, Any]:
    sc = results.get("scenario") if isinstance(results.get("scenario"), Mapping) else {}
    rc = results.get("rounds_config") if isinstance(results.get("rounds_config"), Mapping) else {}
    return {
        "data": results.get("data"), "scenario": sc.get("name", results.get("scenario")),
        "scenario description": sc.get("description"), "partition": sc.get("partition"),
        "missingness rules (all sites)": sc.get("missing"), "missingness rules (per site)": sc.get("sites"),
        "engine": results.get("engine"), "preset": results.get("preset"), "seeds": results.get("seeds"),
        "rounds": rc.get("rounds"), "local epochs per round": rc.get("local_epochs"),
        "methods": list((results.get("results") or {}).keys()), "evaluation": results.get("evaluation"),
    }


def _package_entry(results: Mapping[str, Any] | None, histories: Mapping[str, list[dict]]) -> dict[str, str]:
    """A ``package`` entry of results.json or of the latest round record that has one, as display fields."""
    entry = (results or {}).get("package") or next(
        (rec["package"] for h in histories.values() for rec in reversed(h) if rec.get("package")), None)
    if isinstance(entry, str):
        entry = {"path": entry}
    return {str(k): _short(_describe(v), 120) for k, v in entry.items()} if isinstance(entry, Mapping) else {}


def load_run(run_dir: str | Path, rebuild_sites: bool = True) -> RunRecords:
    """Read a simulate output directory (results.json, runs/*/history.json) or a federated run directory
    (history.json, or checkpoint.pt while the run goes on). ``rebuild_sites``: summarize a simulated
    consortium's sites from its configuration when the records hold no per-site data."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    results = read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else None
    if results is not None and not isinstance(results, dict):
        raise DataError(f"{run_dir / 'results.json'}: expected a JSON object")
    kind, histories, ckpt, notes = _read_histories(run_dir)
    notes += _unbound_names(histories)
    run_config = _run_config(run_dir, ckpt, histories)
    config: dict[str, dict[str, Any]] = {}
    if results is not None:
        config["simulation"] = _simulation_settings(results)
    if run_config:
        title = "federated run configuration" + (f" ({next(iter(histories))})" if kind == "simulation" else "")
        config[title] = run_config
    generated = bool(results.get("generated_data")) if results is not None else _is_generated(run_config)
    min_count, k_source = _min_count(run_config, histories, notes)
    records = RunRecords(run_dir=run_dir, kind=kind, generated=generated, config=config, histories=histories,
                         results=results, min_count=min_count, min_count_source=k_source, notes=notes,
                         artefacts=find_artefacts(run_dir), package=_package_entry(results, histories),
                         checkpoint_fingerprint=str(ckpt["fingerprint"]) if ckpt.get("fingerprint") else None,
                         wall_seconds=results.get("wall_seconds") if results else None)
    reported = _reported_site_data(histories)
    if reported:
        records.site_data = {s: summarize_counts(d, min_count) for s, d in reported.items()}
        records.site_data_note = "as released by the sites in their replies (latest round that has them)"
    elif rebuild_sites and run_config and not run_config.get("manifest"):
        records.site_data, records.site_data_note = rebuild_site_data(run_config, min_count)
    else:
        records.site_data_note = "the sites did not report modality availability or class balance in this run"
    return records


def _unbound_names(histories: Mapping[str, list[dict]]) -> list[str]:
    """A warning when site names were not bound to the sites' keys (the coordinator's allow-unenrolled=true: each
    round's screening records how names were bound, server/names.py)."""
    rounds = [r.get("round") for h in histories.values() for r in h
              if str((r.get("screening") or {}).get("site_names", "")).startswith("taken from the first reply")]
    if not rounds:
        return []
    return [f"Site names were taken from each node's first reply, NOT bound to enrolled keys (allow-unenrolled=true), "
            f"in {len(rounds)} round(s): a node could have answered under another site's name."]


def _is_generated(run_config: Mapping[str, Any]) -> bool:
    if not run_config:
        return False
    data = str(run_config.get("data_path", run_config.get("data-path", "")) or "")
    manifest = run_config.get("manifest")
    return not manifest and (not data or data.startswith("generated:"))


def _min_count(run_config: Mapping[str, Any], histories: Mapping[str, list[dict]], notes: list[str]
               ) -> tuple[int, str]:
    """k from the run records, else the manifest named in the run configuration, else the default."""
    for hist in histories.values():
        for rec in reversed(hist):
            privacy = rec.get("privacy")
            if isinstance(privacy, dict) and isinstance(privacy.get("min_count"), int):
                return int(privacy["min_count"]), "run records"
    for key in ("min_count", "min-count"):
        if isinstance(run_config.get(key), int):
            return int(run_config[key]), "run configuration"
    manifest = run_config.get("manifest")
    if manifest:
        from magnet_core.cohort.manifest import ConsortiumManifest

        try:
            return ConsortiumManifest.load(str(manifest)).min_count, f"manifest {manifest}"
        except DataError as exc:
            notes.append(f"could not read the manifest for k ({exc}); the default k is used")
    return DEFAULT_MIN_COUNT, "default (no manifest)"


def _reported_site_data(histories: Mapping[str, list[dict]]) -> dict[str, dict]:
    """Per-site aggregates the sites released (``site_data`` of the latest round that has it)."""
    for hist in histories.values():
        for rec in reversed(hist):
            data = rec.get("site_data")
            if isinstance(data, dict) and data:
                return {str(s): d for s, d in data.items() if isinstance(d, dict)}
    return {}


def rebuild_site_data(run_config: Mapping[str, Any], k: int) -> tuple[dict[str, dict] | None, str]:
    """A simulated consortium's sites rebuilt from the run configuration (same data, scenario and seed)."""
    from magnet_core.consortium.simulated import load_consortium

    get = lambda key, default="": run_config.get(key, run_config.get(key.replace("_", "-"), default))  # noqa: E731
    seed = int(get("seed", 0))
    try:
        _, sites = load_consortium(str(get("data_path")), str(get("scenario", "iid-3")), seed,
                                   str(get("modalities")))
    except (DataError, OSError, ValueError) as exc:
        return None, f"the simulated sites could not be rebuilt ({exc})"
    return ({s.name: summarize_counts(cohort_counts(s), k) for s in sites},
            f"the simulated sites, rebuilt from the run configuration (seed {seed}); in a deployment only what "
            f"the sites release is shown")


# ---------------------------------------------------------------------------------- small-count suppression


def cohort_counts(cohort: Cohort, class_names: list[str] | None = None) -> dict:
    """Raw per-site counts (never leaves the report code unsuppressed)."""
    names = class_names or [f"class {c}" for c in range(cohort.num_classes)]
    splits = {}
    if cohort.split is not None:
        splits = {s: int(np.sum(cohort.split == s)) for s in ("train", "val", "test")}
    return {
        "patients": cohort.n,
        "splits": splits,
        "modalities": {m: int(cohort.mask[:, j].sum()) for j, m in enumerate(cohort.modalities)},
        "complete": int(cohort.mask.all(axis=1).sum()),
        "classes": {names[c]: int(np.sum(cohort.labels == c)) for c in range(cohort.num_classes)},
    }


def suppress_partition(counts: Mapping[str, int | None], k: int) -> dict[str, int | None]:
    """Cells of a partition of a total: 1..k-1 withheld (None), and when exactly one cell is withheld the next
    smallest non-zero cell too, so no withheld cell follows from the total by subtraction."""
    out = {c: (None if v is None or 0 < int(v) < k else int(v)) for c, v in counts.items()}
    hidden = [c for c, v in out.items() if v is None]
    if len(hidden) == 1:
        shown = sorted((v, c) for c, v in out.items() if v)
        if shown:
            out[shown[0][1]] = None
    return out


def summarize_counts(raw: Mapping[str, Any], k: int) -> dict:
    """Per-site aggregates safe to show: a site with fewer than k patients shows nothing; modality counts are
    withheld when the holders or the non-holders number 1..k-1; classes and splits by ``suppress_partition``."""
    n = raw.get("patients")
    n = int(n) if isinstance(n, (int, float)) else None
    if n is None or n < k:
        return {"patients": None, "splits": {}, "modalities": {}, "complete": None, "classes": {},
                "withheld_site": True}
    def binary(v: Any) -> int | None:
        if not isinstance(v, (int, float)):
            return None
        v = int(v)
        return None if 0 < v < k or 0 < n - v < k else v
    return {
        "patients": n,
        "splits": suppress_partition(dict(raw.get("splits") or {}), k),
        "modalities": {m: binary(v) for m, v in (raw.get("modalities") or {}).items()},
        "complete": binary(raw.get("complete")),
        "classes": suppress_partition(dict(raw.get("classes") or {}), k),
        "withheld_site": False,
    }


# ----------------------------------------------------------------------------------------- round records


def _entries(value: Any, nodes: Mapping[str, Any] | None = None) -> list[dict]:
    """accepted / rejected / failed in any of their shapes -> [{"site", "node", "reason"}] (node ids from the
    record's ``nodes`` map when the entries carry none)."""
    out: list[dict] = []
    if isinstance(value, Mapping):
        for site, v in value.items():
            if isinstance(v, Mapping):
                out.append({"site": str(site), "node": v.get("node", v.get("node_id")),
                            "reason": v.get("reason", v.get("error", ""))})
            else:
                out.append({"site": str(site), "node": None, "reason": "" if v is None else str(v)})
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, Mapping):
                out.append({"site": str(v.get("site", v.get("name", "?"))), "node": v.get("node", v.get("node_id")),
                            "reason": str(v.get("reason", ""))})
            else:
                out.append({"site": str(v), "node": None, "reason": ""})
    for e in out:
        if e["node"] is None and isinstance(nodes, Mapping):
            e["node"] = nodes.get(e["site"])
    return out


def metric_with_bounds(metrics: Mapping[str, Any], name: str) -> dict:
    """{"value", "low", "high"}: ``name_low``/``name_high`` (or ``bounds[name]``) when the metric is binned."""
    lo, hi = metrics.get(f"{name}_low"), metrics.get(f"{name}_high")
    bounds = metrics.get("bounds")
    if lo is None and isinstance(bounds, Mapping) and isinstance(bounds.get(name), (list, tuple)):
        lo, hi = bounds[name][0], bounds[name][1]
    return {"value": metrics.get(name), "low": lo, "high": hi}


def _describe(value: Any) -> str:
    """Any record value as short text: mappings as "key value, ...", lists joined."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ", ".join(f"{str(k).replace('_', ' ')} {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return _fmt(value)


def _pooled(value: Any) -> str:
    """``pooled_over`` ({"sites": [...], "patients": n}, or (sites, patients)) as text."""
    if isinstance(value, Mapping):
        sites, patients = value.get("sites"), value.get("patients")
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        sites, patients = value
    else:
        return _describe(value)
    if isinstance(sites, (list, tuple)):
        sites = f"{len(sites)} sites ({', '.join(map(str, sites))})" if sites else "no site"
    else:
        sites = f"{_fmt(sites)} sites"
    return f"{sites}, {_fmt(patients)} patients"


def _step_norms(screening: Any) -> str:
    norms = screening.get("step_norms") if isinstance(screening, Mapping) else None
    if not isinstance(norms, Mapping):
        return ""
    return ", ".join(f"{s} {v:.3g}" if isinstance(v, (int, float)) else f"{s} {v}" for s, v in norms.items())


def _eval_flags(screening: Any) -> str:
    """Flagged evaluation replies: site, correct of n against the expected, p-value, MCC shift, excluded or not."""
    ev = screening.get("evaluation") if isinstance(screening, Mapping) else None
    if not isinstance(ev, Mapping) or not ev.get("flagged"):
        return ""
    checks = ev.get("checks") if isinstance(ev.get("checks"), Mapping) else {}
    excluded = set(ev.get("excluded") or [])
    parts = []
    for site in ev["flagged"]:
        c = checks.get(site) if isinstance(checks.get(site), Mapping) else {}
        text = f"{site}: {c.get('correct')} of {c.get('num')} correct"
        if isinstance(c.get("expected"), (int, float)) and isinstance(c.get("p_value"), (int, float)):
            text += f" ({c['expected']:.1f} expected, p {c['p_value']:.2g})"
        if isinstance(c.get("shift"), (int, float)):
            text += f", pooled MCC {c['shift']:+.3f}"
        parts.append(text + (" — excluded" if site in excluded else " — kept in the pooled metric"))
    return "; ".join(parts)


def round_rows(history: Iterable[dict]) -> list[dict]:
    """One display row per round record; unknown or missing fields never break it."""
    rows = []
    for rec in history:
        g = rec.get("global") if isinstance(rec.get("global"), Mapping) else {}
        server = rec.get("server") if isinstance(rec.get("server"), Mapping) else {}
        nodes = rec.get("nodes") if isinstance(rec.get("nodes"), Mapping) else None
        rows.append({
            "round": rec.get("round"), "seconds": rec.get("seconds"), "train_seconds": rec.get("train_seconds"),
            "train_loss": rec.get("train_loss"),
            "metrics": {m: metric_with_bounds(g, m) for m in METRICS},
            "server_mcc": server.get("mcc"),
            "accepted": _entries(rec.get("accepted"), nodes), "rejected": _entries(rec.get("rejected"), nodes),
            "failed": _entries(rec.get("failed"), nodes),
            "pooled_over": _pooled(rec.get("pooled_over")) if rec.get("pooled_over") else "",
            "withheld": _describe(rec.get("withheld")), "norms": _step_norms(rec.get("screening")),
            "eval_flags": _eval_flags(rec.get("screening")),
            "dp": _describe(rec.get("dp")), "fingerprint": rec.get("config_fingerprint"),
        })
    return rows


def participation(histories: Mapping[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Per site: rounds aggregated / rejected / failed, over every history."""
    out: dict[str, dict[str, int]] = {}
    for hist in histories.values():
        for rec in hist:
            for key in ("accepted", "rejected", "failed"):
                for e in _entries(rec.get(key)):
                    out.setdefault(e["site"], {"accepted": 0, "rejected": 0, "failed": 0})[key] += 1
    return dict(sorted(out.items()))


def site_metrics(history: list[dict], k: int) -> dict[str, dict]:
    """Final-round per-site test metrics, withheld for sites with fewer than k test patients."""
    last = history[-1] if history else {}
    out = {}
    for site, m in sorted((last.get("sites") or {}).items()):
        if not isinstance(m, Mapping):
            continue
        num = m.get("num")
        ok = isinstance(num, (int, float)) and num >= k
        out[site] = {"num": num if ok else None, **{x: (m.get(x) if ok else None) for x in METRICS}}
    return out


def find_artefacts(run_dir: Path) -> list[dict]:
    """Model files (weights, packages, signatures) with size and sha256; JSON packages show their fields."""
    paths: set[Path] = set()
    for pattern in ARTEFACT_PATTERNS:
        paths.update(run_dir.glob(pattern))
        paths.update(run_dir.glob(f"runs/*/{pattern}"))
    out = []
    for p in sorted(paths):
        if not p.is_file():
            continue
        info: dict[str, Any] = {"path": str(p.relative_to(run_dir)), "bytes": p.stat().st_size,
                                "sha256": _sha256(p), "fields": {}}
        if zipfile.is_zipfile(p):
            info["fields"] = package_fields(p)
        elif p.suffix in (".json", ".sig") and p.stat().st_size < 1 << 20:
            try:
                data = json.loads(p.read_text())
                if isinstance(data, dict):
                    info["fields"] = {k: _short(v) for k, v in data.items() if not isinstance(v, (dict, list))}
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        out.append(info)
    return out


def package_fields(path: Path) -> dict[str, str]:
    """What a signed model package (zip: metadata.json + signature.json) says about itself and its signer. Shown,
    not verified: verification needs the consortium CA (``magnet-fl predict`` verifies before any use)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {"metadata.json", "signature.json"} <= names:
                return {}
            sizes = {i.filename: i.file_size for i in zf.infolist()}
            if sizes["metadata.json"] > 64 << 20 or sizes["signature.json"] > 1 << 20:
                return {"package": "metadata too large to show"}
            meta = json.loads(zf.read("metadata.json"))
            sig = json.loads(zf.read("signature.json"))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {"package": f"unreadable ({exc})"}
    if not isinstance(meta, dict) or not isinstance(sig, dict):
        return {"package": "unreadable (metadata is not a JSON object)"}
    weights = meta.get("weights") if isinstance(meta.get("weights"), list) else []
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), Mapping) else {}
    versions = meta.get("versions") if isinstance(meta.get("versions"), Mapping) else {}
    fields = {
        "format": f"{meta.get('format')} v{meta.get('format_version')}", "method": meta.get("method"),
        "created": meta.get("created"), "round": meta.get("round"), "preset": meta.get("preset"),
        "classes": _describe(meta.get("classes")), "run fingerprint": meta.get("run_fingerprint"),
        "manifest sha256": meta.get("manifest_sha256"), "weights": f"{len(weights)} arrays",
        "metrics": ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k in METRICS),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("magnet-fl", "torch", "flwr")),
        "signature": f"{sig.get('algorithm')}, {len(str(sig.get('signature', '')))} base64 characters",
        "signer": _certificate_subject(sig.get("certificate")),
        "verified": "not by this report (needs the consortium CA; `magnet-fl predict` verifies before use)",
    }
    return {k: _short(v, 96) for k, v in fields.items() if v not in (None, "")}


def _certificate_subject(pem: Any) -> str:
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(str(pem).encode())
    except (ValueError, TypeError):
        return "no readable certificate"
    return (f"{cert.subject.rfc4514_string()}, issued by {cert.issuer.rfc4514_string()}, valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d}")


def _short(v: Any, n: int = 72) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def fingerprint_of(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a configuration (used only when the records carry no fingerprint)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def privacy_settings(records: RunRecords) -> list[dict]:
    """(setting, value, source) rows of the privacy protections in force."""
    rc = next((v for k, v in records.config.items() if k.startswith("federated run")), {})
    rows = [{"setting": "minimum count k (no statistic of fewer than k patients is shown)",
             "value": records.min_count, "source": records.min_count_source}]
    privacy = _latest(records.histories, "privacy")
    secagg = privacy.get("secure_aggregation", _latest(records.histories, "secure_aggregation") or
                         rc.get("secure_aggregation"))
    rows.append({"setting": "secure aggregation", "value": _describe(secagg) if secagg else "off",
                 "source": "run records" if secagg is not None else "not configured in this run"})
    dp = _latest(records.histories, "dp")
    if dp:
        for key, v in dp.items():
            rows.append({"setting": f"differential privacy: {key.replace('_', ' ')}", "value": _fmt(v),
                         "source": "last round record"})
        if "epsilon" not in dp:
            rows.append({"setting": "differential privacy: epsilon", "value": "not reported by this run",
                         "source": "last round record"})
    else:
        rows.append({"setting": "differential privacy", "value": "off", "source": "run records"})
    for key, label in (("norm_ratio", "update check: reject norms above x times the others' median"),
                       ("robust", "robust aggregation"), ("histogram_bins", "score histogram bins (evaluation)")):
        if key in rc:
            rows.append({"setting": label, "value": rc[key], "source": "run configuration"})
    for key, v in privacy.items():
        if key not in ("min_count", "secure_aggregation"):
            rows.append({"setting": key.replace("_", " "), "value": _describe(v), "source": "run records"})
    return rows


def _latest(histories: Mapping[str, list[dict]], key: str) -> dict:
    """The value of ``key`` in the latest round record (of the first history) that has it as a non-empty mapping."""
    for hist in histories.values():
        for rec in reversed(hist):
            if isinstance(rec.get(key), Mapping) and rec[key]:
                return dict(rec[key])
        return {}
    return {}


# A simulation's two evaluations of every method (simulations.pooled_evaluation): results.json key prefix -> label.
EVALUATIONS = {"": "own sites' test patients", "consortium_": "consortium test patients"}


def _per_seed_range(stat: Mapping[str, Any] | None) -> str | None:
    """"62" when every seed has the same count, "58-66" otherwise; None when not recorded."""
    values = [int(v) for v in (stat or {}).get("per_seed") or [] if isinstance(v, (int, float))]
    if not values:
        return None
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def pooled_over(metrics: Mapping[str, Any], key: str) -> str:
    """Over how many test sites and distinct test patients a row is pooled, per seed, and by how many models they
    were scored ("" for results written before these counts were recorded). ``key``: evaluation + group prefix."""
    sites, patients = _per_seed_range(metrics.get(f"{key}sites")), _per_seed_range(metrics.get(f"{key}patients"))
    if sites is None or patients is None:
        return ""
    text = f"{sites} site{'' if sites == '1' else 's'}, {patients} patients"
    models, pairs = _per_seed_range(metrics.get(f"{key}models")), _per_seed_range(metrics.get(f"{key}pairs"))
    if models in (None, "0", "1"):
        return text
    if pairs == sites:
        return f"{text}, each by its own model"
    return f"{text}, each by {models} models"


def comparison_rows(results: Mapping[str, Any] | None) -> list[dict]:
    """Methods x evaluations x groups x metrics (mean ± sample std over seeds) from a simulation's results.json, each
    row with the evaluation's label and over how many sites and patients it is pooled (``pooled_over``)."""
    if not results or not isinstance(results.get("results"), Mapping):
        return []
    rows = []
    methods = sorted(results["results"], key=_method_rank)
    for method in methods:
        metrics = results["results"][method]
        for prefix, evaluation in EVALUATIONS.items():
            for g in GROUPS:
                key = f"{prefix}{g}"
                if not any(f"{key}{m}" in metrics for m in METRICS):
                    continue
                cells = {}
                for m in METRICS:
                    stat = metrics.get(f"{key}{m}") or {}
                    cells[m] = {"mean": stat.get("mean"), "std": stat.get("std"),
                                "n": len([v for v in stat.get("per_seed") or [] if v is not None])}
                rows.append({"method": method, "label": vocabulary.detail(method), "evaluation": evaluation,
                             "group": g.rstrip("_") or "all", "pooled_over": pooled_over(metrics, key),
                             "cells": cells})
    return rows


# ------------------------------------------------------------------------------------------------ figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_rounds(histories: Mapping[str, list[dict]]) -> str | None:
    """Global metrics per round (one history: every metric with its bounds; several: MCC of each)."""
    if not any(histories.values()):
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3.8))
    if len(histories) == 1:
        rows = round_rows(next(iter(histories.values())))
        rs = [r["round"] for r in rows]
        for m in METRICS:
            vals = [r["metrics"][m]["value"] for r in rows]
            if all(v is None for v in vals):
                continue
            line, = ax.plot(rs, [np.nan if v is None else v for v in vals], marker="o", ms=3, label=m.upper())
            lo = [r["metrics"][m]["low"] for r in rows]
            hi = [r["metrics"][m]["high"] for r in rows]
            if any(v is not None for v in lo):
                ax.fill_between(rs, [np.nan if v is None else v for v in lo], [np.nan if v is None else v for v in hi],
                                color=line.get_color(), alpha=0.2)
        for r in rows:
            if r["rejected"] or r["failed"]:
                ax.axvline(r["round"], color="tab:red", ls=":", lw=1)
        ax.set_ylabel("global test metric")
    else:
        colors: dict[str, str] = {}
        for label, hist in histories.items():
            method = label.split(" · ")[0]
            first = method not in colors
            color = colors.setdefault(method, f"C{_method_rank(method)}")
            rows = round_rows(hist)
            mcc = [r["metrics"]["mcc"]["value"] for r in rows]
            ax.plot([r["round"] for r in rows], [np.nan if v is None else v for v in mcc], marker="o", ms=2,
                    color=color, alpha=0.8, label=vocabulary.detail(method) if first else None)
        ax.set_ylabel("global test MCC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def figure_comparison(rows: list[dict]) -> str | None:
    """MCC (mean ± std over seeds) per method and evaluation, all test patients (consortium evaluation hatched)."""
    rows = [r for r in rows if r["group"] == "all" and r["cells"]["mcc"]["mean"] is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.55 * len(rows)))
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["cells"]["mcc"]["mean"] for r in rows], xerr=[r["cells"]["mcc"]["std"] or 0 for r in rows],
            color=[f"C{_method_rank(r['method'])}" for r in rows], alpha=0.85, capsize=3,
            hatch=["//" if r.get("evaluation") == EVALUATIONS["consortium_"] else "" for r in rows])
    ax.set_yticks(y, [f"{r['label']}\n{r.get('evaluation', '')}".strip() for r in rows], fontsize=7)
    ax.set_xlabel("test MCC (mean ± sample std over seeds)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _png(fig)


def figure_availability(site_data: Mapping[str, dict] | None) -> str | None:
    """Share of each site's patients holding each modality; withheld cells hatched."""
    if not site_data:
        return None
    sites = list(site_data)
    mods = list(dict.fromkeys(m for d in site_data.values() for m in d.get("modalities", {})))
    if not mods:
        return None
    plt = _plt()
    grid = np.full((len(sites), len(mods)), np.nan)
    for i, s in enumerate(sites):
        n = site_data[s].get("patients")
        for j, m in enumerate(mods):
            v = site_data[s].get("modalities", {}).get(m)
            if v is not None and n:
                grid[i, j] = v / n
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(mods), 0.8 + 0.45 * len(sites)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    for i in range(len(sites)):
        for j in range(len(mods)):
            if np.isnan(grid[i, j]):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", color="0.6"))
                ax.text(j, i, "withheld", ha="center", va="center", fontsize=7, color="0.3")
            else:
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(mods)), mods)
    ax.set_yticks(range(len(sites)), sites)
    fig.colorbar(im, ax=ax, fraction=0.05, label="patients holding it")
    fig.tight_layout()
    return _png(fig)


def figure_traffic(entries: list[dict]) -> str | None:
    """Bytes sent and received per round (site view)."""
    if not entries:
        return None
    per_round: dict[Any, list[int]] = {}
    for e in entries:
        tot = per_round.setdefault(e["round"], [0, 0])
        tot[0] += e["sent_bytes"]
        tot[1] += e["received_bytes"]
    plt = _plt()
    rs = list(per_round)
    x = np.arange(len(rs))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(x - 0.2, [per_round[r][0] / 1e6 for r in rs], 0.4, label="sent by the site")
    ax.bar(x + 0.2, [per_round[r][1] / 1e6 for r in rs], 0.4, label="received from the coordinator")
    ax.set_xticks(x, [str(r) for r in rs])
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------- rendering


def _env():
    from jinja2 import DictLoader, Environment, StrictUndefined, select_autoescape

    from magnet_core.artefacts.report_templates import TEMPLATES

    env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _fmt
    env.filters["show"] = lambda v: "none" if v in ({}, [], None) else _describe(v)
    env.filters["bytes"] = fmt_bytes
    env.filters["pct"] = lambda v, n: "withheld" if v is None else f"{v} ({v / n:.0%})" if n else str(v)
    env.filters["count"] = lambda v: "withheld" if v is None else str(v)
    env.filters["when"] = fmt_time
    return env


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_time(v: Any) -> str:
    if isinstance(v, (int, float)):
        return _dt.datetime.fromtimestamp(v, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if v is None else str(v)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_report(records: RunRecords) -> str:
    """The coordinator's report as one HTML string."""
    comparison = comparison_rows(records.results)
    fingerprints = {label: sorted({str(r["config_fingerprint"]) for r in h if r.get("config_fingerprint")})
                    for label, h in records.histories.items()}
    computed = None
    if not any(fingerprints.values()):
        computed = records.checkpoint_fingerprint or fingerprint_of(records.config)
    first = next(iter(records.histories.values()), [])
    return _env().get_template("report.html.j2").render(
        r=records, generated_notice=GENERATED_NOTICE, created=_now(),
        histories={label: round_rows(h) for label, h in records.histories.items()},
        fingerprints=fingerprints, computed_fingerprint=computed,
        fig_rounds=figure_rounds(records.histories), fig_comparison=figure_comparison(comparison),
        fig_availability=figure_availability(records.site_data), comparison=comparison,
        participation=participation(records.histories), privacy=privacy_settings(records),
        site_metrics=site_metrics(first, records.min_count), first_label=next(iter(records.histories), ""),
        metrics=METRICS, site_columns=site_columns(records.site_data), optional_columns=OPTIONAL_COLUMNS,
        packages=[a for a in records.artefacts if a["fields"] or ".pkg" in a["path"] or a["path"].endswith(".sig")],
    )


def site_columns(site_data: Mapping[str, dict] | None) -> tuple[list[str], list[str], list[str]]:
    """(splits, modalities, classes) present in any site's summary, in first-seen order."""
    cols: tuple[dict, dict, dict] = ({}, {}, {})
    for d in (site_data or {}).values():
        for col, key in zip(cols, ("splits", "modalities", "classes")):
            col.update(dict.fromkeys(d.get(key) or {}))
    return list(cols[0]), list(cols[1]), list(cols[2])


# ------------------------------------------------------------------------------------------------ site view


def _items(value: Any) -> list[dict]:
    out = []
    for it in value if isinstance(value, list) else []:
        if isinstance(it, Mapping):
            b = it.get("bytes")
            out.append({"name": str(it.get("name", "")), "kind": str(it.get("kind", "")),
                        "shape": "×".join(map(str, it["shape"])) if isinstance(it.get("shape"), list)
                        else _fmt(it.get("shape")) if it.get("shape") is not None else "",
                        "bytes": int(b) if isinstance(b, (int, float)) else 0})
    return out


def _by_kind(items: list[dict]) -> list[dict]:
    kinds: dict[str, dict] = {}
    for it in items:
        k = kinds.setdefault(it["kind"] or "unlabelled", {"kind": it["kind"] or "unlabelled", "count": 0, "bytes": 0})
        k["count"] += 1
        k["bytes"] += it["bytes"]
    return list(kinds.values())


def site_log_rows(entries: Iterable[dict]) -> list[dict]:
    rows = []
    for e in entries:
        sent, received = _items(e.get("sent")), _items(e.get("received"))
        rows.append({"round": e.get("round"), "kind": e.get("kind", ""), "time": e.get("time"),
                     "sent": sent, "received": received, "sent_kinds": _by_kind(sent),
                     "received_kinds": _by_kind(received), "sent_bytes": sum(i["bytes"] for i in sent),
                     "received_bytes": sum(i["bytes"] for i in received), "error": e.get("error")})
    return rows


def find_site_logs(run_dir: Path, site: str | None) -> list[Path]:
    """``run_dir``'s own audit log or site log (a site's own state / log directory), else the logs of ``site``
    below ``run_dir``. A site's audit log (client/audit.py: the same items per message, in a hash chain) stands
    in for its site logs when there is one."""
    for name in (AUDIT_FILE, SITE_LOG_FILE):
        if (run_dir / name).exists() and (site is None or not run_dir.joinpath("history.json").exists()):
            return [run_dir / name]
    if site is None:
        return []
    for name in (AUDIT_FILE, SITE_LOG_FILE):
        found = []
        for p in sorted(run_dir.rglob(name)):
            if p.parent.name == site:
                found.append(p)
                continue
            try:
                if any(str(e.get("site", "")) == site for e in read_site_log(p)[:1]):
                    found.append(p)
            except DataError:
                continue
        if found:
            return found
    return []


def log_label(path: Path, run_dir: Path) -> str:
    """How the site view names a log: its folder, and for an audit log whether its chain verifies."""
    label = str(path.parent.relative_to(run_dir)) if path.parent != run_dir else path.parent.name
    if path.name != AUDIT_FILE:
        return label
    check = verify_chain(path)
    if check.ok:
        return f"{label} (audit log, hash chain verified: {check.entries} entries)"
    return f"{label} (audit log, HASH CHAIN BROKEN: {check.problems[0]})"


def coordinator_view_of(site: str, histories: Mapping[str, list[dict]]) -> list[dict]:
    """What the coordinator recorded about ``site`` each round (status, reason, test patients evaluated)."""
    rows = []
    for label, hist in histories.items():
        for rec in hist:
            status, reason = "not in this round", ""
            for key, word in (("accepted", "aggregated"), ("rejected", "rejected"), ("failed", "failed")):
                for e in _entries(rec.get(key)):
                    if e["site"] == site:
                        status, reason = word, e["reason"]
            sites = rec.get("sites")
            sm = sites.get(site) if isinstance(sites, Mapping) else None
            rows.append({"run": label, "round": rec.get("round"), "status": status, "reason": reason,
                         "evaluated": isinstance(sm, Mapping)})
    return rows


def render_site_report(site: str, logs: Mapping[str, list[dict]], records: RunRecords | None = None,
                       generated: bool = False) -> str:
    """A site's view: what it sent and received each round (from its site logs), and the coordinator's record."""
    logs_rows = {label: site_log_rows(entries) for label, entries in logs.items()}
    all_rows = [r for rows in logs_rows.values() for r in rows]
    kinds_sent = _by_kind([i for r in all_rows for i in r["sent"]])
    first_rows = next(iter(logs_rows.values()), [])
    return _env().get_template("site_report.html.j2").render(
        site=site, logs=logs_rows, created=_now(), generated=generated or bool(records and records.generated),
        generated_notice=GENERATED_NOTICE, kinds_sent=kinds_sent,
        total_sent=sum(r["sent_bytes"] for r in all_rows), total_received=sum(r["received_bytes"] for r in all_rows),
        messages=len(all_rows), fig_traffic=figure_traffic(first_rows),
        coordinator=coordinator_view_of(site, records.histories) if records else [],
        run_dir=str(records.run_dir) if records else "",
    )


# ------------------------------------------------------------------------------------------------- writing


def write_report(run_dir: str | Path, site: str | None = None, out: str | Path | None = None,
                 shown_as: str | Path | None = None) -> Path:
    """Write ``report.html`` in ``run_dir`` (coordinator's view), or the site view of ``site`` (or of the site log
    in ``run_dir``) to ``report-site-<site>.html`` / ``report.html`` of a site log directory.

    ``shown_as``: the folder ``run_dir`` is about to become (a staging folder renamed when the run succeeds); the
    report names that folder and the returned path is the report's path there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    shown = Path(shown_as) if shown_as is not None else run_dir
    logs = find_site_logs(run_dir, site)
    is_site_dir = any(logs == [run_dir / name] for name in (AUDIT_FILE, SITE_LOG_FILE))
    if site is None and not is_site_dir:
        records = load_run(run_dir)
        records.run_dir = shown
        html = render_report(records)
        name = REPORT_FILE
    else:
        records = None if is_site_dir else load_run(run_dir, rebuild_sites=False)
        entries = {log_label(p, run_dir): read_site_log(p) for p in logs}
        site = site or next((str(e["site"]) for es in entries.values() for e in es if e.get("site")), shown.name)
        if records is not None and not logs and not any(
                r["status"] != "not in this round" for r in coordinator_view_of(site, records.histories)):
            raise DataError(f"{run_dir}: no site log ({SITE_LOG_FILE}) of site {site!r} below it and the run "
                            f"records never name it; sites in this run: {sorted(participation(records.histories))}")
        if records is not None:
            records.run_dir = shown
        html = render_site_report(site, entries, records)
        name = REPORT_FILE if is_site_dir else f"report-site-{site}.html"
    if shown != run_dir:  # paths inside the records (e.g. a run's out-dir) name the staging folder too
        parts = re.split(r"(data:image/png;base64,[A-Za-z0-9+/=]*)", html)  # never inside an embedded figure
        html = "".join(p if p.startswith("data:") else p.replace(str(run_dir), str(shown)) for p in parts)
    path = Path(out) if out else run_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path if out else shown / name
