"""The federated round loop: train, validate, aggregate, evaluate, checkpoint; resumable after a restart."""

from __future__ import annotations

import dataclasses
import json
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from magnet_core.config import get_preset
from magnet_core.model import build_model

from .config import FederatedConfig
from .strategy import MagnetFedAvg, to_numpy, to_record

CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass
class ModelSpec:
    """What the server must know to create the global model (from the manifest or the simulated cohort)."""

    in_dims: dict[str, int]
    num_classes: int


def collect(grid: Grid, messages: Iterable[Message], timeout: float, min_replies: int,
            grace: float = 30.0, destinations: dict[str, int] | None = None) -> list[Message]:
    """Send and wait for replies; stop at ``timeout``, or ``grace`` seconds after ``min_replies`` successful
    replies have arrived (so one dead site delays a round by at most ``grace`` once enough sites have answered;
    error replies, e.g. the SuperLink's for a node that went away, are returned but do not count).
    ``destinations``, if given, receives message id -> addressed node for every message sent."""
    messages = list(messages)
    pushed = list(grid.push_messages(messages))  # the grid sets each message's id
    if destinations is not None:
        destinations.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})
    ids = {mid for mid in pushed if mid}
    if len(ids) < len(messages):
        log(WARNING, "%d message(s) could not be sent", len(messages) - len(ids))
    replies: list[Message] = []
    start, enough_at = time.monotonic(), None
    while ids:
        for msg in grid.pull_messages(list(ids)):
            replies.append(msg)
            ids.discard(msg.metadata.reply_to_message_id)
        now = time.monotonic()
        if enough_at is None and sum(not m.has_error() for m in replies) >= min_replies:
            enough_at = now
        if not ids or now - start > timeout or (enough_at is not None and now - enough_at > grace):
            break
        time.sleep(0.05)
    if ids:
        log(WARNING, "%d site(s) did not reply in time; continuing with %d replies", len(ids), len(replies))
    return replies


def with_differential_privacy(strategy: MagnetFedAvg, cfg: FederatedConfig):
    """Wrap in Flower's client-side fixed-clipping DP strategy when ``dp-clip-norm`` > 0 (sites clip with
    ``fixedclipping_mod``, the server adds Gaussian noise of std noise_multiplier * clip / sites)."""
    if cfg.dp_clip_norm <= 0:
        return strategy
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    log(INFO, "differential privacy on: clipping norm %s, noise multiplier %s", cfg.dp_clip_norm,
        cfg.dp_noise_multiplier)
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=cfg.dp_noise_multiplier,
                                                       clipping_norm=cfg.dp_clip_norm,
                                                       num_sampled_clients=cfg.min_sites)


def initial_params(spec: ModelSpec, cfg: FederatedConfig) -> dict[str, np.ndarray]:
    model = build_model(spec.in_dims, spec.num_classes, get_preset(cfg.preset).model, cfg.seed)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def save_checkpoint(out: Path, round_done: int, params: dict[str, np.ndarray], history: list[dict],
                    cfg: FederatedConfig) -> None:
    """Atomically write params + history after a completed round."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save({"round": round_done, "params": {k: torch.from_numpy(v) for k, v in params.items()},
                "history": history, "config": cfg.model_dump()}, tmp)
    tmp.replace(out / CHECKPOINT)


def load_checkpoint(out: Path) -> tuple[int, dict[str, np.ndarray], list[dict]] | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    return int(state["round"]), {k: v.numpy() for k, v in state["params"].items()}, list(state["history"])


def run_federation(
    grid: Grid,
    cfg: FederatedConfig,
    spec: ModelSpec,
    server_eval: Callable[[dict[str, np.ndarray]], dict] | None = None,
    on_round: Callable[[dict], None] | None = None,
    grace: float = 30.0,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Run (or resume) ``cfg.num_server_rounds`` rounds; returns final global params and per-round history."""
    out = Path(cfg.out_dir)
    modalities = list(spec.in_dims)
    magnet = MagnetFedAvg(cfg, modalities)
    strategy = with_differential_privacy(magnet, cfg)
    params, history, start = initial_params(spec, cfg), [], 1
    if cfg.resume and (ckpt := load_checkpoint(out)) is not None:
        done, params, history = ckpt
        start = done + 1
        log(INFO, "resuming from %s after round %d", out / CHECKPOINT, done)
    base = {"preset": cfg.preset, "seed": cfg.seed, "local-epochs": cfg.local_epochs, "data-path": cfg.data_path,
            "scenario": cfg.scenario, "modalities": cfg.modalities, "histogram-bins": cfg.histogram_bins}
    for rnd in range(start, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        msgs = strategy.configure_train(rnd, to_record(params), ConfigRecord(dict(base)), grid)
        replies = collect(grid, msgs, cfg.round_timeout, cfg.min_sites, grace, magnet.destinations)
        new, _ = strategy.aggregate_train(rnd, replies)
        if new is not None:
            params = to_numpy(new)
        t_train = time.perf_counter() - t0
        msgs = strategy.configure_evaluate(rnd, to_record(params), ConfigRecord(dict(base)), grid)
        replies = collect(grid, msgs, cfg.round_timeout, cfg.min_sites, grace, magnet.destinations)
        strategy.aggregate_evaluate(rnd, replies)
        rep = magnet.report
        record = {"round": rnd, "train_seconds": t_train, "seconds": time.perf_counter() - t0,
                  "accepted": rep.accepted, "rejected": rep.rejected, "failed": rep.failed,
                  "train_loss": rep.train_loss, "global": rep.global_metrics, "sites": rep.site_metrics,
                  "dp": {"clipping_norm": cfg.dp_clip_norm, "noise_multiplier": cfg.dp_noise_multiplier}
                  if cfg.dp_clip_norm > 0 else None}
        if server_eval is not None:
            record["server"] = server_eval(params)
        history.append(record)
        save_checkpoint(out, rnd, params, history, cfg)
        mcc = rep.global_metrics.get("mcc")
        log(INFO, "round %d/%d: global MCC %s, %d site(s) aggregated, %.1fs", rnd, cfg.num_server_rounds,
            "n/a" if mcc is None else f"{mcc:.3f}", len(rep.accepted), record["seconds"])
        if on_round is not None:
            on_round(record)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v) for k, v in params.items()}, out / "model.pt")
    (out / "history.json").write_text(json.dumps(_jsonable(history), indent=1))
    return params, history


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
