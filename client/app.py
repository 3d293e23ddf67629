"""magnet-fl ClientApp: a site loads only its own patients, trains locally and evaluates with counts."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE,
    LAYOUT_KEY,
    METRICS_KEY,
    MODEL_KEY,
    NODE_DP_FLOOR,
    NODE_WORKER_SOCKET,
    SITE_KEY,
    TRAIN,
)
from magnet_core.protocol.messages import RoundConfig
from magnet_core.protocol.wire import flat_of

DATA_ERROR_CODE = 4001  # the site's data failed validation; the reason names the file and the problem
CONTRACT_ERROR_CODE = 4002  # the coordinator's message broke the contract; the reason names the key


def optional_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for clipping (differential privacy on), else a no-op."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    # Flower's mod wants exactly one ConfigRecord: the model layout is set aside for it and handed back to the app
    layout = msg.content.config_records.get(LAYOUT_KEY)
    if layout is not None:
        del msg.content[LAYOUT_KEY]

    def with_layout(m: Message, c: Context) -> Message:
        if layout is not None:
            m.content[LAYOUT_KEY] = layout
        return call_next(m, c)

    return fixedclipping_mod(msg, context, with_layout)


app = ClientApp()


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A clear error reply instead of a crash (the server logs it with this node's id)."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


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


def handle(msg: Message, context: Context, kind: str) -> Message:
    """Decode the round config, then train or evaluate here (torch is imported only on this path)."""
    try:
        cfg = RoundConfig.decode(msg.content[CONFIG_KEY])
    except (ContractError, KeyError) as exc:
        return error_reply(msg, CONTRACT_ERROR_CODE, f"round config rejected: {exc}")
    floor = float(context.node_config.get(NODE_DP_FLOOR, 0.0) or 0.0)
    if kind == TRAIN and floor > 0:  # a plain or central-DP round would send this site's update without its noise
        return error_reply(msg, DATA_ERROR_CODE, f"this site trains only under secure aggregation with differential "
                           f"privacy, noise multiplier >= {floor} ({NODE_DP_FLOOR} in its node config); run with "
                           "secagg=true and dp-clip-norm, dp-noise-multiplier set")
    if NODE_WORKER_SOCKET in context.node_config:  # deployment: the site's persistent worker trains (no torch here)
        from .worker_link import WORKER_ERROR_CODE, WorkerFailure, forward

        try:
            arrays = msg.content[ARRAYS_KEY] if ARRAYS_KEY in msg.content else None
            layout = msg.content[LAYOUT_KEY] if LAYOUT_KEY in msg.content.config_records else None
            metrics, site, new = forward(kind, msg.content[CONFIG_KEY], arrays, context.node_id, context.node_config,
                                         layout)
        except WorkerFailure as exc:
            code = {"data": DATA_ERROR_CODE, "contract": CONTRACT_ERROR_CODE}.get(exc.kind, WORKER_ERROR_CODE)
            return error_reply(msg, code, exc.reason)
        return reply_with(msg, metrics, site, new)
    from magnet_core.cohort.data import DataError
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()  # before torch loads: passive OpenMP waits, threads from the CPUs this node may use
    from .handlers import evaluate_site, site_for, train_site

    try:
        site_for(cfg, context.node_config, context.node_id)  # loads and validates the site's data once
        flat, layout = received_model(msg.content)
        if kind == TRAIN:
            metrics, site, new = train_site(cfg, context.node_config, context.node_id, flat, layout)
            return reply_with(msg, metrics, site, model_record(new))
        metrics, site = evaluate_site(cfg, context.node_config, context.node_id, flat, layout)
        return reply_with(msg, metrics, site)
    except DataError as exc:
        return error_reply(msg, DATA_ERROR_CODE, f"site data rejected: {exc}")
    except ContractError as exc:
        return error_reply(msg, CONTRACT_ERROR_CODE, f"round message rejected: {exc}")


def logged(msg: Message, context: Context, kind: str) -> Message:
    """``handle`` behind the site's policy and audit log (node config ``site-policy``), plus the site's own log of
    what it received and sent (node config ``site-log-dir``)."""
    from .guard import screened
    from .site_log import record

    reply = screened(msg, context, lambda: handle(msg, context, kind))

    record(msg, reply, context.node_config)
    return reply


@app.train(mods=[optional_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the received global weights; reply weights + per-modality training counts."""
    return logged(msg, context, TRAIN)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local test patients; reply confusion counts and score histograms only."""
    return logged(msg, context, EVALUATE)


from . import secure  # noqa: E402,F401  registers the secure-aggregation handlers (train.secagg, query.secagg_*)
