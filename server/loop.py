"""The federated round loop: train, check, aggregate, evaluate, checkpoint; resumable after a restart."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from magnet_core.artefacts.run_record import RoundRecord
from magnet_core.federation.screening import ScreenMemory
from magnet_core.model.config import get_preset
from magnet_core.model.network import build_model
from magnet_core.protocol.enrolment import Enrolment
from magnet_core.protocol.messages import RoundConfig

from .config import FederatedConfig, RunConfigError, preset_of
from .names import SiteNames
from .secure_strategy import SecureMagnetFedAvg
from .strategy import MagnetFedAvg

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "magnet-fl-checkpoint/2"
RUN_FILES = (CHECKPOINT, "history.json", "model.pt")


class CheckpointError(RunConfigError):
    """A checkpoint that cannot be used: damaged, foreign, or from a different run."""


@dataclasses.dataclass
class ModelSpec:
    """What the server must know to create the global model (from the manifest or the simulated cohort)."""

    in_dims: dict[str, int]
    num_classes: int


def initial_params(spec: ModelSpec, cfg: FederatedConfig) -> dict[str, np.ndarray]:
    model = build_model(spec.in_dims, spec.num_classes, preset_of(cfg).model, cfg.seed)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- files, atomically


def atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_history(out: Path, history: list[dict]) -> None:
    atomic_write_bytes(out / "history.json", lambda p: p.write_text(json.dumps(history, indent=1)))


def save_checkpoint(out: Path, round_done: int, params: dict[str, np.ndarray], history: list[dict],
                    cfg: FederatedConfig, memory: ScreenMemory, accountant: dict | None = None,
                    server_opt: dict | None = None) -> None:
    """Params, history, the run's identity and the update screen's memory after a completed round. Only
    tensors, numbers, strings and lists/dicts of them: loadable with ``weights_only=True``."""
    state = {
        "format": CHECKPOINT_FORMAT, "round": round_done, "fingerprint": cfg.fingerprint(),
        "config": json.loads(json.dumps(cfg.identity())),
        "params": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()},
        "history": history,
        "memory": {"norms": memory.norms,
                   "direction": None if memory.direction is None else torch.from_numpy(memory.direction)},
        "accountant": accountant,
        "server_opt": server_opt,  # the server optimizer's moments (FedAdam / FedYogi), None without one
    }
    atomic_write_bytes(out / CHECKPOINT, lambda p: torch.save(state, p))


def load_checkpoint(out: Path, cfg: FederatedConfig, template: dict[str, np.ndarray]
                    ) -> tuple[int, dict[str, np.ndarray], list[dict], ScreenMemory, Any, Any] | None:
    """The checkpoint in ``out`` (None if there is none), loaded without unpickling code and checked: format,
    the run it belongs to (fingerprint; differing settings are named), arrays against the model's."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a damaged checkpoint, never a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: damaged or not a magnet-fl checkpoint ({type(exc).__name__}: "
                              f"{first[:200]}); remove it or set overwrite=true to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file; remove it or set overwrite=true")
    if state.get("fingerprint") != cfg.fingerprint():
        stored = state.get("config") if isinstance(state.get("config"), dict) else {}
        now = json.loads(json.dumps(cfg.identity()))
        diff = [f"{k.replace('_', '-')}: checkpoint {stored.get(k)!r}, now {now.get(k)!r}"
                for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        raise CheckpointError(f"{path} belongs to a different run; refusing to resume ("
                              + ("; ".join(diff) if diff else "fingerprint differs") + ")")
    try:
        rnd = int(state["round"])
        params = {k: v.numpy() for k, v in state["params"].items()}
        history = [RoundRecord.model_validate(r).dump() for r in state["history"]]
        mem = state.get("memory") or {}
        memory = ScreenMemory(norms=[[float(v) for v in r] for r in mem.get("norms", [])],
                              direction=None if mem.get("direction") is None else mem["direction"].numpy())
        accountant = None
        if state.get("accountant") is not None:
            from magnet_core.federation.dp import PrivacyAccountant

            accountant = PrivacyAccountant.from_dict(state["accountant"])
        server_opt = None
        if state.get("server_opt") is not None:
            from magnet_core.federation.aggregate import ServerOptState

            server_opt = ServerOptState.from_tensors(state["server_opt"], params)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: damaged checkpoint content ({type(exc).__name__}: {exc})") from None
    bad = sorted(set(params) ^ set(template)) or [k for k in template
                                                   if params[k].shape != template[k].shape
                                                   or params[k].dtype != template[k].dtype]
    if bad:
        raise CheckpointError(f"{path}: arrays do not fit the model ({bad[:3]})")
    if not all(np.isfinite(v).all() for v in params.values()):
        raise CheckpointError(f"{path}: non-finite weights")
    return rnd, params, history, memory, accountant, server_opt


def prepare_out_dir(out: Path, cfg: FederatedConfig) -> None:
    """Refuse to mix runs: an out-dir holding a run is continued only with resume=true, replaced only with
    overwrite=true."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if not existing or cfg.resume:
        return
    if not cfg.overwrite:
        raise RunConfigError(f"{out} already holds a run ({', '.join(existing)}); set resume=true to continue it "
                             f"or overwrite=true to replace it")
    for name in existing:
        (out / name).unlink()
    log(WARNING, "overwrite=true: removed the previous run's %s from %s", ", ".join(existing), out)


# ------------------------------------------------------------------------------------------------ the loop


def round_config(cfg: FederatedConfig, rnd: int, min_count: int) -> ConfigRecord:
    """The typed round configuration; with DP on, it asks sites to clip their update (Flower's clipping mod)."""
    return ConfigRecord(RoundConfig(
        server_round=rnd, seed=cfg.seed, preset=cfg.preset, local_epochs=cfg.local_epochs,
        histogram_bins=cfg.histogram_bins, test_graph=cfg.test_graph, min_count=min_count,
        data_path=cfg.data_path, scenario=cfg.scenario, modalities=cfg.modalities, proximal_mu=cfg.proximal_mu,
        label_adjustment=cfg.label_adjustment, label_tau=cfg.label_tau, prototype_weight=cfg.prototype_weight,
        local_update=cfg.local_update, clipping_norm=cfg.dp_clip_norm if cfg.dp_clip_norm > 0 else None).encode())


def run_federation(
    grid: Grid,
    cfg: FederatedConfig,
    spec: ModelSpec,
    enrolment: Enrolment | None,
    server_eval: Callable[[dict[str, np.ndarray]], dict] | None = None,
    on_round: Callable[[dict], None] | None = None,
    min_count: int | None = None,
    manifest=None,
    names: SiteNames | None = None,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Run (or resume) ``cfg.num_server_rounds`` rounds; returns final global params and per-round history.
    ``names``: how nodes get their site names (server/names.py; default: at first contact)."""
    out = Path(cfg.out_dir)
    prepare_out_dir(out, cfg)
    k = cfg.min_count if min_count is None else min_count
    params, history, start, memory, accountant = initial_params(spec, cfg), [], 1, ScreenMemory(), None
    server_opt = None
    if cfg.resume and (ckpt := load_checkpoint(out, cfg, params)) is not None:
        done, params, history, memory, accountant, server_opt = ckpt
        start = done + 1
        log(INFO, "resuming from %s after round %d", out / CHECKPOINT, done)
    elif cfg.resume:
        log(WARNING, "resume=true but %s holds no checkpoint: starting at round 1", out)
    strategy_class = SecureMagnetFedAvg if cfg.secagg else MagnetFedAvg  # secagg: the coordinator sees sums only
    magnet = strategy_class(cfg, list(spec.in_dims), spec.num_classes, enrolment, memory, min_count=k,
                            accountant=accountant, server_opt=server_opt, names=names)
    fp = cfg.fingerprint()
    for rnd in range(start, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        new_params = magnet.train_round(grid, params, rnd, round_config(cfg, rnd, k))
        if new_params is not None:
            params = new_params
        t_train = time.perf_counter() - t0
        magnet.evaluate_round(grid, params, rnd, round_config(cfg, rnd, k))
        rep = magnet.report  # one report per round: training and evaluation outcomes together
        record = RoundRecord(
            round=rnd, train_seconds=t_train, seconds=time.perf_counter() - t0, accepted=rep.accepted,
            rejected=rep.rejected, failed=rep.failed, nodes=rep.nodes, train_loss=rep.train_loss,
            global_metrics=rep.global_metrics, sites=rep.site_metrics, withheld=rep.withheld,
            pooled_over={"sites": rep.pooled_sites, "patients": rep.pooled_patients},
            screening={**rep.screening, "site_names": magnet.names.description},
            dp=rep.dp if cfg.dp_clip_norm > 0 else None,
            server=server_eval(params) if server_eval is not None else None, config_fingerprint=fp)
        history.append(_jsonable(record.dump()))
        save_checkpoint(out, rnd, params, history, cfg, magnet.memory,
                        magnet.accountant.to_dict() if magnet.dp is not None else None, magnet.server_opt_state())
        write_history(out, history)
        refresh_report(out, cfg)
        mcc = rep.global_metrics.get("mcc")
        log(INFO, "round %d/%d: global MCC %s over %d site(s) / %d patients, %d update(s) aggregated, %.1fs",
            rnd, cfg.num_server_rounds, "n/a" if mcc is None else f"{mcc:.3f}", len(rep.pooled_sites),
            rep.pooled_patients, len(rep.accepted), record.seconds)
        if on_round is not None:
            on_round(history[-1])
    atomic_write_bytes(out / "model.pt", lambda p: torch.save({k: torch.from_numpy(v) for k, v in params.items()}, p))
    write_history(out, history)
    if cfg.signing_key and manifest is not None:
        write_model_package(out, params, history, cfg, manifest)
    refresh_report(out, cfg)
    return params, history


def write_model_package(out: Path, params: dict[str, np.ndarray], history: list[dict], cfg: FederatedConfig,
                        manifest) -> Path:
    """The signed, self-describing model package: weights, manifest, classes, preset, run settings and fingerprint,
    round, global metrics, versions (magnet_core.artefacts.model_package); a site verifies it before use."""
    from magnet_core.artefacts.model_package import write_package
    from magnet_core.model.prototypes import prediction_params

    preset = get_preset(cfg.preset)  # a package carries no class prototypes (sites released them to the coordinator)
    params = prediction_params(params)
    last = history[-1] if history else {}
    metrics = {k: v for k, v in (last.get("global") or {}).items() if isinstance(v, (int, float))}
    path = write_package(out / "model.magnet", params, manifest=manifest, preset=cfg.preset, model_cfg=preset.model,
                         graph_cfg=preset.graph, run_config=cfg.identity(), signing_key=Path(cfg.signing_key),
                         signing_cert=Path(cfg.signing_cert), round=last.get("round"), metrics=metrics)
    log(INFO, "wrote the signed model package %s", path)
    return path


def refresh_report(out: Path, cfg: FederatedConfig) -> None:
    """Rewrite the run's HTML report (a report problem is logged, never ends the run)."""
    if not cfg.report:
        return
    try:
        from magnet_core.artefacts.report import write_report

        write_report(out)
    except Exception as exc:  # noqa: BLE001 - the report is a view of the run, not part of it
        log(WARNING, "could not write %s/report.html: %s", out, exc)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
