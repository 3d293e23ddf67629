"""A site's handlers of the plain round messages: ``train`` (local epochs from the global weights; reply weights and
per-modality training counts) and ``evaluate`` (the global model on the local test patients; reply confusion counts
and score histograms released under k). Torch is imported only when a message is answered."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE,
    LAYOUT_KEY,
    METRICS_KEY,
    MODEL_KEY,
    NODE_DP_FLOOR,
    SITE_KEY,
    TRAIN,
)
from magnet_core.protocol.messages import RoundConfig
from magnet_core.protocol.wire import flat_of

from .site_path import Handler, SiteRefusal


def round_config(msg: Message) -> RoundConfig:
    """The round config of a round message; ContractError naming what is missing or wrong."""
    if CONFIG_KEY not in msg.content.config_records:
        raise ContractError(f"no round config ({CONFIG_KEY!r})")
    try:
        return RoundConfig.decode(msg.content[CONFIG_KEY])
    except ContractError as exc:
        raise ContractError(f"round config: {exc}") from None


def received_model(content: RecordDict) -> tuple[Any, dict]:
    """(flat model array, layout record) of a round message; ContractError when either is missing or the arrays
    are not exactly one flat model array."""
    if ARRAYS_KEY not in content.array_records:
        raise ContractError(f"no model weights ({ARRAYS_KEY!r})")
    if LAYOUT_KEY not in content.config_records:
        raise ContractError(f"no model layout ({LAYOUT_KEY!r})")
    return flat_of(content[ARRAYS_KEY]), dict(content[LAYOUT_KEY])


def model_record(flat) -> ArrayRecord:
    """A site's new weights as Flower moves them: one flat float32 array in the order it received."""
    return ArrayRecord({MODEL_KEY: Array(flat)})


def reply_with(msg: Message, metrics: dict, site: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({METRICS_KEY: MetricRecord(dict(metrics)), SITE_KEY: ConfigRecord(dict(site))})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return Message(content=content, reply_to=msg)


def dp_floor(context: Context) -> float:
    """The site's own noise floor (node config ``dp-min-noise-multiplier``), 0 without one."""
    return float(context.node_config.get(NODE_DP_FLOOR, 0.0) or 0.0)


def site_handlers():
    """client.handlers (torch, the site's data), loaded after the thread policy: passive OpenMP waits, threads
    from the CPUs this node may use."""
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()
    from . import handlers

    return handlers


def train_round(msg: Message, context: Context) -> Message:
    """Local epochs from the received global weights; reply weights + per-modality training counts."""
    cfg = round_config(msg)
    floor = dp_floor(context)
    if floor > 0:  # a plain or central-DP round would send this site's update without its noise
        raise SiteRefusal(f"this site trains only under secure aggregation with differential privacy, noise "
                          f"multiplier >= {floor} ({NODE_DP_FLOOR} in its node config); run with secagg=true and "
                          "dp-clip-norm, dp-noise-multiplier set")
    site = site_handlers()
    site.site_for(cfg, context.node_config, context.node_id)  # loads and validates the site's data once
    flat, layout = received_model(msg.content)
    metrics, name, new = site.train_site(cfg, context.node_config, context.node_id, flat, layout)
    return reply_with(msg, metrics, name, model_record(new))


def evaluate_round(msg: Message, context: Context) -> Message:
    """The global model on local test patients; reply confusion counts and score histograms only."""
    cfg = round_config(msg)
    site = site_handlers()
    site.site_for(cfg, context.node_config, context.node_id)
    flat, layout = received_model(msg.content)
    metrics, name = site.evaluate_site(cfg, context.node_config, context.node_id, flat, layout)
    return reply_with(msg, metrics, name)


HANDLERS: dict[str, Handler] = {TRAIN: train_round, EVALUATE: evaluate_round}
