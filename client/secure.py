"""A site's side of secure aggregation on Flower's Message API: train, clip, encode, then mask and unmask."""

# Messages (the server side is server/secure.py; the messages are magnet_core/protocol/secagg.py, the crypto
# magnet_core/federation/secagg.py):
#   train.secagg          arrays (one flat model) + layout + config + "secagg" (SecAggSetup, this site's secagg id,
#                         clip norm, weighting)
#                         -> "site" {name}, "secagg" KeyAdvert. The site trains, clips its update to the clip norm,
#                         encodes it (UpdateLayout + two loss slots) and keeps vector and SecAggSite in context.state.
#   query.secagg_share    KeyBook -> ShareBundle
#   query.secagg_mask     ShareInbox -> "masked" uint64 array (the only form in which the update leaves the site)
#   query.secagg_unmask   UnmaskRequest -> UnmaskShares; the site's secrets are then deleted from context.state
# Nothing individual leaves the site in the clear besides its name and public keys: not its patient counts, not
# its loss (both travel inside the masked vector).
# With "dp" in the setup record (differential privacy with distributed noise, magnet_core/federation/dp.py) the site
# clips its update to the clip norm over the blocks it holds, encodes it with uniform weights (1 per block held; no
# patient counts, no loss) and adds its own noise piece N(0, (z C)^2 / t), t = the setup's threshold, before masking.

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DEPLOYED_KEYS,
    LAYOUT_KEY,
    MASKED_KEY,
    NODE_DP_FLOOR,
    NODE_WORKER_SOCKET,
    SECAGG_ACTION,
    SECAGG_KEY,
    SECAGG_MASK,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SITE_KEY,
    STATE_SECAGG,
    STATE_SECAGG_SITE,
    STATE_VECTOR,
    STATE_VECTOR_ARRAY,
    TRAIN,
)
from magnet_core.protocol.messages import RoundConfig, TrainReply, site_record
from magnet_core.protocol.secagg import (
    ROUND_ID,
    KeyBook,
    SecAggError,
    SecAggStart,
    ShareInbox,
    UnmaskRequest,
)
from magnet_core.protocol.wire import Layout, flat_of, unpack

from .app import CONTRACT_ERROR_CODE, DATA_ERROR_CODE, app, error_reply, received_model

SECAGG_ERROR_CODE = 4005  # the secure-aggregation exchange cannot go on at this site; the reason says why
LOSS_SLOTS = 2  # after the UpdateLayout: loss * training patients, training patients with a finite loss


def _secagg():
    """magnet_core.federation.secagg, imported only after the thread policy (it loads torch; importing client.app
    must not)."""
    from magnet_core.model.threads import apply_thread_policy

    apply_thread_policy()
    from magnet_core.federation import secagg

    return secagg


def site_vector(global_params: Mapping[str, np.ndarray], new_params: Mapping[str, np.ndarray], num_train: int,
                modality_counts: Mapping[str, int], loss: float | None, clip_norm: float, modality_aware: bool
                ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """The site's secure-sum input: its update clipped to ``clip_norm`` (the coordinator cannot check norms under
    secure aggregation), encoded as count-weighted parameters + block weights, then the loss slots. Also returns
    the clipped parameters and the norm before clipping (both stay at the site)."""
    from magnet_core.federation.dp import clip_to_global

    clipped, norm = clip_to_global(new_params, global_params, clip_norm)
    layout = _secagg().UpdateLayout.from_params(global_params)
    vec = layout.encode_update(clipped, num_train, modality_counts, modality_aware)
    tail = [float(loss) * num_train, float(num_train)] if loss is not None else [0.0, 0.0]
    return np.concatenate([vec, np.asarray(tail, dtype=np.float64)]), clipped, norm


def dp_vector(global_params: Mapping[str, np.ndarray], new_params: Mapping[str, np.ndarray],
              modality_counts: Mapping[str, int], clip_norm: float, noise_multiplier: float, threshold: int,
              modality_aware: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """The site's secure-sum input under distributed DP: its clipped update with uniform block weights plus its
    noise piece, then zero loss slots. Also returns the same vector without the noise and the update's norm
    before clipping (both stay at the site)."""
    from magnet_core.federation.dp import DPConfig, dp_site_vector, noise_piece_std

    layout = _secagg().UpdateLayout.from_params(global_params)
    dp = DPConfig(clip_norm=clip_norm, noise_multiplier=noise_multiplier, noise="distributed")
    counts = modality_counts if modality_aware else dict.fromkeys(layout.modalities, 1)
    clean, norm = dp_site_vector(layout, new_params, global_params, counts, dp)
    noisy = clean.copy()
    std = noise_piece_std(dp, threshold)
    if std > 0:
        noisy[:layout.param_size] += rng.normal(0.0, std, layout.param_size)
    tail = np.zeros(LOSS_SLOTS)
    return np.concatenate([noisy, tail]), np.concatenate([clean, tail]), norm


def _train_locally(msg: Message, context: Context, cfg: RoundConfig, layout: Layout
                   ) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(site record, new parameters, train metrics) from the site's own training path (worker or in-process); the
    flat reply is split with the received ``layout`` (which the training path checked against the site's model)."""
    if NODE_WORKER_SOCKET in context.node_config:  # deployment: the site's persistent worker trains
        from .worker_link import forward

        metrics, site, new = forward(TRAIN, msg.content[CONFIG_KEY], msg.content[ARRAYS_KEY], context.node_id,
                                     context.node_config, msg.content[LAYOUT_KEY])
        return dict(site), unpack(flat_of(new), layout), dict(metrics)
    from .handlers import site_for, train_site

    site_for(cfg, context.node_config, context.node_id)
    metrics, site, new = train_site(cfg, context.node_config, context.node_id, *received_model(msg.content))
    return dict(site), unpack(new, layout), dict(metrics)


def _stored(context: Context, round_id: str):
    """This site's SecAggSite of secure sum ``round_id``, from context.state."""
    sa = _secagg()
    rec = context.state.config_records.get(STATE_SECAGG)
    if rec is None or rec.get(ROUND_ID) != round_id:
        raise SecAggError(f"this site holds no secure-aggregation state for {round_id!r} (it did not train "
                          "in this round, or it restarted since)")
    return sa.SecAggSite.from_state(str(rec[STATE_SECAGG_SITE]))


def _store(context: Context, site) -> None:
    context.state[STATE_SECAGG] = ConfigRecord({ROUND_ID: site.setup.round_id, STATE_SECAGG_SITE: site.to_state()})


def _forget(context: Context) -> None:
    for key in (STATE_SECAGG, STATE_VECTOR):
        if key in context.state:
            del context.state[key]


def start_secure_sum(context: Context, setup, site_id: int, vector: np.ndarray) -> dict:
    """Begin this site's part of a secure sum of ``vector`` (any float vector of the setup's length: a model
    update, preprocessing statistics): keep the vector and fresh secrets in context.state for the share / mask /
    unmask handlers below, return the key advert to send."""
    sa = _secagg()
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.shape[0] != setup.vector_length:
        raise SecAggError(f"the setup's vector length {setup.vector_length} does not fit this site's vector "
                          f"({vector.shape[0]})")
    _forget(context)
    site = sa.SecAggSite(setup, int(site_id))
    _store(context, site)
    context.state[STATE_VECTOR] = ArrayRecord({STATE_VECTOR_ARRAY: Array(vector)})
    return site.advertise().to_record()


def _reply(msg: Message, secagg: dict, arrays: dict[str, np.ndarray] | None = None, site: str | None = None
           ) -> Message:
    content = RecordDict({SECAGG_KEY: ConfigRecord(secagg)})
    if site is not None:
        content[SITE_KEY] = ConfigRecord(site_record(site))
    if arrays is not None:
        content[MASKED_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content=content, reply_to=msg)


def _guarded(msg: Message, context: Context, body: Callable[[Mapping[str, Any]], Message]) -> Message:
    """The site's policy and audit log (client/guard.py), clear error replies for every way a stage can fail at
    the site, and the site's own message log."""
    from .guard import screened
    from .site_log import record

    reply = screened(msg, context, lambda: _answered(msg, context, body))
    record(msg, reply, context.node_config)
    return reply


def _answered(msg: Message, context: Context, body: Callable[[Mapping[str, Any]], Message]) -> Message:
    from magnet_core.cohort.data import DataError

    from .worker_link import WORKER_ERROR_CODE, WorkerFailure

    try:
        if SECAGG_KEY not in msg.content.config_records:
            raise ContractError(f"secure-aggregation message without its {SECAGG_KEY!r} record")
        reply = body(msg.content[SECAGG_KEY])
    except SecAggError as exc:
        _forget(context)
        reply = error_reply(msg, SECAGG_ERROR_CODE, f"secure aggregation refused: {exc}")
    except DataError as exc:
        reply = error_reply(msg, DATA_ERROR_CODE, f"site data rejected: {exc}")
    except WorkerFailure as exc:
        code = {"data": DATA_ERROR_CODE, "contract": CONTRACT_ERROR_CODE}.get(exc.kind, WORKER_ERROR_CODE)
        reply = error_reply(msg, code, exc.reason)
    except (ContractError, KeyError, ValueError, TypeError) as exc:
        reply = error_reply(msg, CONTRACT_ERROR_CODE, f"secure-aggregation message rejected: "
                                                      f"{type(exc).__name__}: {exc}")
    return reply


guarded, secure_reply = _guarded, _reply  # for other ClientApps' secure-sum stage 0 (client/prepare_app.py)


# ------------------------------------------------------------------------------------------------- stages


@app.train(SECAGG_ACTION)
def secagg_train(msg: Message, context: Context) -> Message:
    """Stage 0: local epochs from the global weights, update clipped and encoded and kept here; reply keys."""

    def body(rec: Mapping[str, Any]) -> Message:
        _forget(context)
        cfg = RoundConfig.decode(msg.content[CONFIG_KEY])
        flat, layout_rec = received_model(msg.content)
        sa = _secagg()
        start = SecAggStart.from_record(rec, training=True)
        setup, terms = start.setup, start.train
        clip_norm, modality_aware, dp, z = terms.clip_norm, terms.modality_aware, terms.dp, terms.dp_noise_multiplier
        received = Layout.from_record(layout_rec)
        global_params = unpack(flat, received)
        layout = sa.UpdateLayout.from_params(global_params)
        expected = layout.length + LOSS_SLOTS
        if setup.vector_length != expected:
            raise SecAggError(f"the setup's vector length {setup.vector_length} does not fit the model "
                              f"({expected})")
        floor = float(context.node_config.get(NODE_DP_FLOOR, 0.0))
        if floor > 0 and not (dp and z >= floor):  # checked before any work: the site's own privacy floor
            raise SecAggError(f"this site requires differential privacy with noise multiplier >= {floor} "
                              f"({NODE_DP_FLOOR} in its node config); the round asks for "
                              f"{z if dp else 'no differential privacy'}")
        site, new, metrics = _train_locally(msg, context, cfg, received)
        reply = TrainReply.decode(metrics, site, layout.modalities)  # the site checks its own counts
        if dp:
            from magnet_core.federation.dp import site_noise_rng

            seed = terms.dp_noise_seed
            if DEPLOYED_KEYS & set(context.node_config):  # a real site: never noise the coordinator could know
                seed = -1
            rng = site_noise_rng(seed, cfg.server_round, start.site_id)
            vec, _, _ = dp_vector(global_params, new, reply.modality_counts, clip_norm, z, setup.threshold,
                                  modality_aware, rng)
        else:
            vec, _, _ = site_vector(global_params, new, reply.num_examples, reply.modality_counts, reply.loss,
                                    clip_norm, modality_aware)
        return _reply(msg, start_secure_sum(context, setup, start.site_id, vec), site=reply.site)

    return _guarded(msg, context, body)


# The three handlers below work for any vector stored by start_secure_sum; the preparation ClientApp registers them
# too (client/prepare_app.py).
@app.query(SECAGG_SHARE)
def secagg_share(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir shares of this site's secrets, encrypted for each other site."""

    def body(rec: Mapping[str, Any]) -> Message:
        book = KeyBook.from_record(rec)
        site = _stored(context, book.round_id)
        bundle = site.share(book)
        _store(context, site)
        return _reply(msg, bundle.to_record())

    return _guarded(msg, context, body)


@app.query(SECAGG_MASK)
def secagg_mask(msg: Message, context: Context) -> Message:
    """Stage 3: the masked vector; the plain one is deleted here."""

    def body(rec: Mapping[str, Any]) -> Message:
        inbox = ShareInbox.from_record(rec)
        site = _stored(context, inbox.round_id)
        if STATE_VECTOR not in context.state:
            raise SecAggError("this site holds no update to mask in this round")
        vec = context.state[STATE_VECTOR][STATE_VECTOR_ARRAY].numpy()
        masked = site.mask(inbox, vec)
        _store(context, site)
        del context.state[STATE_VECTOR]
        return _reply(msg, masked.to_record(), arrays={MASKED_KEY: masked.masked})

    return _guarded(msg, context, body)


@app.query(SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 4: shares that remove the masks of the survivors' sum (never both secrets of one site)."""

    def body(rec: Mapping[str, Any]) -> Message:
        request = UnmaskRequest.from_record(rec)
        site = _stored(context, request.round_id)
        shares = site.unmask(request)
        _forget(context)  # this round's secrets are no longer needed
        return _reply(msg, shares.to_record())

    return _guarded(msg, context, body)
