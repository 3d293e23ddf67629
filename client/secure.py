"""A site's side of secure aggregation on Flower's Message API: train, clip, encode, then mask and unmask."""

# Messages (the server side is server/secure.py; the messages are magnet_core/protocol/secagg.py, the crypto
# magnet_core/federation/secagg.py):
#   train.secagg          arrays (one flat model) + layout + config + "secagg" (SecAggSetup, this site's secagg id,
#                         clip norm, weighting)
#                         -> "site" {name}, "secagg" KeyAdvert. The site trains, clips its update to the clip norm,
#                         encodes it (UpdateLayout + two loss slots) and keeps vector and SecAggSite in context.state.
#   evaluate.secagg       arrays + layout + config + "secagg" (SecAggSetup, frac_bits 1, this site's secagg id)
#                         -> "site" {name}, "secagg" KeyAdvert. The site evaluates the global model on its test
#                         patients and keeps its counts (EvalLayout: confusion matrices, score histograms) to mask:
#                         secure evaluation, k applied by the coordinator to the sum; no per-site release.
#   query.secagg_share    KeyBook -> ShareBundle
#   query.secagg_mask     ShareInbox -> "masked" uint64 array (the only form in which the update leaves the site)
#   query.secagg_consistency  authenticated only (stage 3a, Bonawitz et al. 2017's consistency check): SurvivorList
#                         -> SurvivorSignature: the site signs U3 with its identity key, one list per sum (a second,
#                         different list is refused, naming the consistency check, and the sum abandoned)
#   query.secagg_unmask   UnmaskRequest -> UnmaskShares (authenticated: only for the list the site signed and >= t
#                         survivors signed); the site's secrets are then deleted from context.state
#                         (authenticated: kept until the sum is done, for stage 4b)
#   query.secagg_exclude  authenticated only: ExclusionRequest (evidence that a dealer's signed shares contradict
#                         its commitment) -> PairwiseSeeds with that dealer; the site checks the evidence itself.
# Authenticated secure aggregation (node config secagg-roster + secagg-identity-key; in deployment the site
# worker's own command line): the site signs its keys with its enrolled identity, checks every other advert against
# ITS roster, signs its shares and the transcript (context = the global model and round config it received) and
# refuses to unmask unless every site in the sum signed the same transcript. A site holding a roster takes part only
# in authenticated secure sums, training and preparation alike (an unsigned key book is refused).
# Nothing individual leaves the site in the clear besides its name and public keys: not its patient counts, not
# its loss (both travel inside the masked vector). In deployment these handlers run in the site's own worker
# (client/worker.py): context.state is then the worker's memory of the run, never the SuperNode's.
# With "dp" in the setup record (differential privacy with distributed noise, magnet_core/federation/dp.py) the site
# clips its update to the clip norm over the blocks it holds, encodes it with uniform weights (1 per block held; no
# patient counts, no loss) and adds its own noise piece N(0, (z C)^2 / t), t = the setup's threshold, before masking.

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity, context_digest
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    DEPLOYED_KEYS,
    EVALUATE,
    MASKED_KEY,
    NODE_DP_FLOOR,
    NODE_SECAGG_IDENTITY_KEY,
    NODE_SECAGG_ROSTER,
    QUERY,
    SECAGG_ACTION,
    SECAGG_CONSISTENCY,
    SECAGG_EXCLUDE,
    SECAGG_KEY,
    SECAGG_MASK,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SITE_KEY,
    STATE_SECAGG,
    STATE_SECAGG_IDENTITY,
    STATE_SECAGG_SITE,
    STATE_VECTOR,
    STATE_VECTOR_ARRAY,
    TRAIN,
    message_type,
)
from magnet_core.protocol.messages import RoundConfig, TrainReply, site_record
from magnet_core.protocol.secagg import (
    ROUND_ID,
    ExclusionRequest,
    KeyBook,
    SecAggError,
    SecAggStart,
    ShareInbox,
    SurvivorList,
    UnmaskRequest,
)
from magnet_core.protocol.wire import Layout, unpack

from .rounds import dp_floor, received_model, site_handlers
from .site_path import Handler

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
    """(site record, new parameters, train metrics) from the site's own training path; the flat reply is split with
    the received ``layout`` (which the training path checked against the site's model)."""
    site = site_handlers()
    site.site_for(cfg, context.node_config, context.node_id)
    metrics, name, new = site.train_site(cfg, context.node_config, context.node_id, *received_model(msg.content))
    return dict(name), unpack(new, layout), dict(metrics)


def site_auth(node_config: Mapping, name: str):
    """This site's SiteAuth (its identity key and its own roster, both named by its node config) signing as
    ``name``, or None when the node config names neither; a clear error naming the key when only one is given or a
    file is wrong."""
    roster, key = node_config.get(NODE_SECAGG_ROSTER), node_config.get(NODE_SECAGG_IDENTITY_KEY)
    if not roster and not key:
        return None
    if not roster or not key:
        missing = NODE_SECAGG_ROSTER if not roster else NODE_SECAGG_IDENTITY_KEY
        raise SecAggError(f"authenticated secure aggregation needs both {NODE_SECAGG_ROSTER} and "
                          f"{NODE_SECAGG_IDENTITY_KEY} in the site's node config; {missing} is missing")
    try:
        return SiteAuth(SiteIdentity.from_key_file(name, str(key)), Roster.from_file(str(roster)))
    except (OSError, ValueError) as exc:
        raise SecAggError(f"authenticated secure aggregation ({NODE_SECAGG_ROSTER}={roster!r}, "
                          f"{NODE_SECAGG_IDENTITY_KEY}={key!r}): {exc}") from None


def _stored(context: Context, round_id: str):
    """This site's SecAggSite of secure sum ``round_id``, from context.state (with its identity again when the sum
    is authenticated: the identity key is never in the state)."""
    sa = _secagg()
    rec = context.state.config_records.get(STATE_SECAGG)
    if rec is None or rec.get(ROUND_ID) != round_id:
        raise SecAggError(f"this site holds no secure-aggregation state for {round_id!r} (it did not train "
                          "in this round, or it restarted since)")
    name = str(rec.get(STATE_SECAGG_IDENTITY, ""))
    auth = site_auth(context.node_config, name) if name else None
    return sa.SecAggSite.from_state(str(rec[STATE_SECAGG_SITE]), auth)


def sum_names(state, round_id: str) -> tuple[int, dict[int, str]] | None:
    """(this site's secagg id, secagg id -> enrolled name) of the secure sum ``round_id`` whose state this site
    holds in ``state`` (its context.state), or None when it holds none: the names come from the key book the site
    checked against its own roster, never from the message asking (client/guard.py reads them at masking and
    unmasking)."""
    rec = state.config_records.get(STATE_SECAGG)
    if rec is None or rec.get(ROUND_ID) != round_id:
        return None
    return _secagg().SecAggSite.names_in_state(str(rec[STATE_SECAGG_SITE]))


def _store(context: Context, site) -> None:
    name = site.auth.identity.name if site.auth is not None else ""
    context.state[STATE_SECAGG] = ConfigRecord({ROUND_ID: site.setup.round_id, STATE_SECAGG_SITE: site.to_state(),
                                                STATE_SECAGG_IDENTITY: name})


def _forget(context: Context) -> None:
    for key in (STATE_SECAGG, STATE_VECTOR):
        if key in context.state:
            del context.state[key]


def start_secure_sum(context: Context, setup, site_id: int, vector: np.ndarray, auth=None, sum_context: bytes = b""
                     ) -> dict:
    """Begin this site's part of a secure sum of ``vector`` (any float vector of the setup's length: a model
    update, preprocessing statistics): keep the vector and fresh secrets in context.state for the share / mask /
    unmask handlers below, return the key advert to send. ``auth`` (SiteAuth): authenticated, with
    ``sum_context`` the digest of what the coordinator sent this site (secagg_auth.context_digest)."""
    sa = _secagg()
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.shape[0] != setup.vector_length:
        raise SecAggError(f"the setup's vector length {setup.vector_length} does not fit this site's vector "
                          f"({vector.shape[0]})")
    _forget(context)
    site = sa.SecAggSite(setup, int(site_id), auth, sum_context)
    _store(context, site)
    context.state[STATE_VECTOR] = ArrayRecord({STATE_VECTOR_ARRAY: Array(vector)})
    return site.advertise().to_record()


def secure_reply(msg: Message, secagg: dict, arrays: dict[str, np.ndarray] | None = None, site: str | None = None
                 ) -> Message:
    """A stage's reply: its secagg record, optionally the site's name and the masked vector."""
    content = RecordDict({SECAGG_KEY: ConfigRecord(secagg)})
    if site is not None:
        content[SITE_KEY] = ConfigRecord(site_record(site))
    if arrays is not None:
        content[MASKED_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content=content, reply_to=msg)


def secagg_record(msg: Message) -> ConfigRecord:
    """The stage's secure-aggregation record; ContractError without one."""
    if SECAGG_KEY not in msg.content.config_records:
        raise ContractError(f"secure-aggregation message without its {SECAGG_KEY!r} record")
    return msg.content[SECAGG_KEY]


@contextmanager
def abandoned_on_refusal(context: Context) -> Iterator[None]:
    """A stage that refuses (SecAggError) drops this site's secure-sum state: the sum cannot go on with it."""
    try:
        yield
    except SecAggError:
        _forget(context)
        raise


# ------------------------------------------------------------------------------------------------- stages
# Each stage is a handler of the site's one message path (client/site_path.py: policy, audit, error replies).


def secagg_train(msg: Message, context: Context) -> Message:
    """Stage 0: local epochs from the global weights, update clipped and encoded and kept here; reply keys."""
    with abandoned_on_refusal(context):
        _forget(context)
        start = SecAggStart.from_record(secagg_record(msg), training=True)
        cfg = RoundConfig.decode(msg.content[CONFIG_KEY])
        flat, layout_rec = received_model(msg.content)
        sa = _secagg()
        setup, terms = start.setup, start.train
        clip_norm, modality_aware, dp, z = terms.clip_norm, terms.modality_aware, terms.dp, terms.dp_noise_multiplier
        received = Layout.from_record(layout_rec)
        global_params = unpack(flat, received)
        layout = sa.UpdateLayout.from_params(global_params)
        expected = layout.length + LOSS_SLOTS
        if setup.vector_length != expected:
            raise SecAggError(f"the setup's vector length {setup.vector_length} does not fit the model "
                              f"({expected})")
        floor = dp_floor(context)
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
        auth = site_auth(context.node_config, reply.site)
        digest = b""
        if auth is not None:
            digest = context_digest(global_params, dict(msg.content[CONFIG_KEY]))
        return secure_reply(msg, start_secure_sum(context, setup, start.site_id, vec, auth, digest), site=reply.site)


def secagg_evaluate(msg: Message, context: Context) -> Message:
    """Stage 0 of a secure evaluation (evaluate.secagg): the global model on this site's test patients, the counts
    encoded in the fixed evaluation layout (magnet_core/federation/secure_eval.py) and kept here for masking; reply
    name + keys only. Nothing per-site is released in this round, whatever the site's size: its counts leave only
    masked, inside the consortium's sum (a clear release next to the sum could be subtracted from it)."""
    with abandoned_on_refusal(context):
        _forget(context)
        start = SecAggStart.from_record(secagg_record(msg))
        cfg = RoundConfig.decode(msg.content[CONFIG_KEY])
        flat, layout_rec = received_model(msg.content)
        from magnet_core.federation.privacy import DEFAULT_MAX_BINS as SITE_MAX_BINS
        from magnet_core.federation.secure_eval import EVAL_FRAC_BITS, EvalLayout

        setup = start.setup
        if setup.frac_bits != EVAL_FRAC_BITS:
            raise SecAggError(f"a secure evaluation carries whole counts with frac_bits {EVAL_FRAC_BITS}; the setup "
                              f"asks for {setup.frac_bits}")
        name, counts = site_handlers().evaluation_counts(cfg, context.node_config, context.node_id, flat, layout_rec)
        layout = EvalLayout.for_task(counts.confusion["all"].shape[0], min(cfg.histogram_bins, SITE_MAX_BINS))
        if setup.vector_length != layout.length:
            raise SecAggError(f"the setup's vector length {setup.vector_length} does not fit this site's evaluation "
                              f"layout ({layout.length}: {layout.num_classes} classes, {layout.bins} score bins)")
        auth = site_auth(context.node_config, name)
        digest = b""
        if auth is not None:
            digest = context_digest(unpack(flat, Layout.from_record(layout_rec)), dict(msg.content[CONFIG_KEY]))
        return secure_reply(msg, start_secure_sum(context, setup, start.site_id, layout.encode(counts), auth, digest),
                            site=name)


# The three handlers below work for any vector stored by start_secure_sum; the preparation ClientApp answers them
# too (client/prepare_app.py).
def secagg_share(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir shares of this site's secrets, encrypted for each other site."""
    with abandoned_on_refusal(context):
        book = KeyBook.from_record(secagg_record(msg))
        site = _stored(context, book.round_id)
        bundle = site.share(book)
        _store(context, site)
        return secure_reply(msg, bundle.to_record())


def secagg_mask(msg: Message, context: Context) -> Message:
    """Stage 2: the masked vector; the plain one is deleted here."""
    with abandoned_on_refusal(context):
        inbox = ShareInbox.from_record(secagg_record(msg))
        site = _stored(context, inbox.round_id)
        if STATE_VECTOR not in context.state:
            raise SecAggError("this site holds no update to mask in this round")
        vec = context.state[STATE_VECTOR][STATE_VECTOR_ARRAY].numpy()
        masked = site.mask(inbox, vec)
        _store(context, site)
        del context.state[STATE_VECTOR]
        return secure_reply(msg, masked.to_record(), arrays={MASKED_KEY: masked.masked})


def secagg_consistency(msg: Message, context: Context) -> Message:
    """Stage 3a (authenticated): sign the survivor list with this site's identity key, once per sum."""
    with abandoned_on_refusal(context):
        request = SurvivorList.from_record(secagg_record(msg))
        site = _stored(context, request.round_id)
        signature = site.sign_survivors(request)
        _store(context, site)
        return secure_reply(msg, signature.to_record())


def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 3: shares that remove the masks of the survivors' sum (never both secrets of one site)."""
    with abandoned_on_refusal(context):
        request = UnmaskRequest.from_record(secagg_record(msg))
        site = _stored(context, request.round_id)
        shares = site.unmask(request)
        if site.auth is None:
            _forget(context)  # this round's secrets are no longer needed
        else:  # kept for stage 4b (an exclusion request), which the site answers at most once
            _store(context, site)
        return secure_reply(msg, shares.to_record())


def secagg_exclude(msg: Message, context: Context) -> Message:
    """Stage 4b (authenticated): check the evidence against each named dealer, give this site's pairwise seed with
    it (the dealer's input is then taken out of the sum); never without valid evidence."""
    with abandoned_on_refusal(context):
        request = ExclusionRequest.from_record(secagg_record(msg))
        site = _stored(context, request.round_id)
        seeds = site.exclude(request)
        _forget(context)
        return secure_reply(msg, seeds.to_record())


STAGE_HANDLERS: dict[str, Handler] = {message_type(QUERY, SECAGG_SHARE): secagg_share,
                                      message_type(QUERY, SECAGG_MASK): secagg_mask,
                                      message_type(QUERY, SECAGG_CONSISTENCY): secagg_consistency,
                                      message_type(QUERY, SECAGG_UNMASK): secagg_unmask,
                                      message_type(QUERY, SECAGG_EXCLUDE): secagg_exclude}
HANDLERS: dict[str, Handler] = {message_type(TRAIN, SECAGG_ACTION): secagg_train,
                                message_type(EVALUATE, SECAGG_ACTION): secagg_evaluate, **STAGE_HANDLERS}
