"""Where a site's policy meets the coordinator's messages: decode what a message asks, check it against the site's
policy and memory, remember it, answer, and append both to the site's audit log. One call per message, on the site's
one message path (client/site_path.py): ``screened(msg, context, answer)``; without a policy in the node config it
only calls ``answer``. In deployment it runs in the site's own worker, whose node config names the policy of the
worker's command line (client/worker.py), never one the coordinator's bundle chose."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context, Error, Message, RecordDict

from magnet_core.protocol.errors import CONTRACT_ERROR_CODE, POLICY_ERROR_CODE, ContractError
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE,
    LAYOUT_KEY,
    NODE_DATA_DIR,
    NODE_PARTITION_ID,
    NODE_SECAGG_IDENTITY_KEY,
    NODE_SECAGG_ROSTER,
    NODE_SITE_NAME,
    PREPARE_APPLY,
    PREPARE_SECAGG,
    PREPARE_STATS,
    QUERY,
    SECAGG_ACTION,
    SECAGG_CONSISTENCY,
    SECAGG_EXCLUDE,
    SECAGG_KEY,
    SECAGG_MASK,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    TRAIN,
    message_type,
)
from magnet_core.protocol.messages import RoundConfig, round_of
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import (
    KeyBook,
    SecAggError,
    SecAggSetup,
    SecAggStart,
    ShareInbox,
    UnmaskRequest,
)
from magnet_core.protocol.wire import flat_of

from .accountant import round_multiplier
from .audit import append, exchange_entry
from .policy import (
    POLICY_KEY,
    PolicyError,
    PolicyRefusal,
    SitePolicy,
    SiteRequest,
    check_request,
    load_policy,
    remember,
)
from .site_state import SiteState

SECURE_TRAIN = message_type(TRAIN, SECAGG_ACTION)
SECURE_EVALUATE = message_type(EVALUATE, SECAGG_ACTION)
SECURE_PREPARE = message_type(QUERY, PREPARE_SECAGG)
ROUND_KINDS = (TRAIN, EVALUATE, SECURE_TRAIN, SECURE_EVALUATE)
PREPARE_KINDS = tuple(message_type(QUERY, a) for a in (PREPARE_STATS, PREPARE_SECAGG, PREPARE_APPLY))
STAGE_KINDS = tuple(message_type(QUERY, a) for a in (SECAGG_SHARE, SECAGG_MASK, SECAGG_CONSISTENCY, SECAGG_UNMASK,
                                                     SECAGG_EXCLUDE))
MASK, UNMASK = message_type(QUERY, SECAGG_MASK), message_type(QUERY, SECAGG_UNMASK)

_POLICIES: dict[tuple[str, int, int], SitePolicy] = {}


def policy_of(node_config: Mapping[str, Any]) -> SitePolicy | None:
    """The site's policy named by its node config (re-read when the file changes), or None without one."""
    path = node_config.get(POLICY_KEY)
    if not path:
        return None
    st = os.stat(str(path))
    key = (str(Path(str(path)).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _POLICIES:
        _POLICIES.clear()
        _POLICIES[key] = load_policy(str(path))
    return _POLICIES[key]


def model_sha256(content) -> str | None:
    """sha256 of the received flat model (dtype, shape and bytes), or None without one."""
    if ARRAYS_KEY not in content.array_records:
        return None
    flat = flat_of(content[ARRAYS_KEY])
    h = hashlib.sha256(f"{flat.dtype.str}{list(flat.shape)}".encode())
    h.update(flat.tobytes())
    return h.hexdigest()


def preparation_digest(kind: str, request: PrepareRequest, layout: Mapping[str, Any] | None = None,
                       setup: SecAggSetup | None = None, site_id: int | None = None) -> tuple[str, tuple[str, ...]]:
    """(sha256, participants) of what defines a release of preparation statistics: the request's thresholds, split,
    classes, mode and simulated sites, and for a secure sum its statistics layout and setup (the site ids, this
    site's id, threshold, length; not the round id, new on every retry). The manifest is left out: it comes only
    with query.prepare_apply, which releases nothing."""
    participants = [f"site {s.name}" for s in request.sites]
    fields: dict[str, Any] = {"kind": kind, "request": request.model_dump(mode="json", exclude={"manifest"})}
    if setup is not None:
        participants += [f"secure-sum id {i}" for i in setup.site_ids]
        fields.update(layout=dict(layout or {}), site_ids=list(setup.site_ids), site_id=site_id,
                      threshold=setup.threshold, vector_length=setup.vector_length, frac_bits=setup.frac_bits,
                      graph_degree=setup.graph_degree)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest(), tuple(participants)


def holders(setup: SecAggSetup) -> int:
    """How many sites hold shares of one site's secrets: every site, or a site and its neighbours."""
    return setup.graph_degree + 1 if setup.graph_degree else len(setup.site_ids)


def sum_sites(kind: str, secagg: Mapping[str, Any], state: RecordDict | None) -> tuple[str | None, tuple | None]:
    """(round id, enrolled names of the sites) of what a masking or unmasking message asks this site to join: at
    masking the sites whose shares it holds (U2: every site that can end up in the sum), at unmasking the
    survivors whose inputs the sum holds. The names are those this site checked against its own roster (the key
    book in its secure-sum state, client/secure.py ``sum_names``), "secure-sum id N" where it has none (an
    unauthenticated sum names nobody); None when the site holds no state of that sum (the handler refuses it)."""
    if kind == MASK:
        inbox = ShareInbox.from_record(secagg)
        rid = inbox.round_id
    else:
        request = UnmaskRequest.from_record(secagg)
        rid = request.round_id
    held = None
    if state is not None:
        from .secure import sum_names

        held = sum_names(state, rid)
    if held is None:
        return rid, None
    own, names = held
    if kind == MASK:  # a neighbourhood sum lists every dealer; a complete one: the senders of this site's shares
        ids = set(inbox.participants) or set(inbox.ciphertexts) | {own}
        names = {**{i: n for i, n in inbox.participants.items() if n}, **names}
    else:
        ids = set(request.survivors)
    return rid, tuple(sorted(names.get(i) or f"secure-sum id {i}" for i in ids))


def decode_request(msg: Message, node_config: Mapping[str, Any] | None = None,
                   state: RecordDict | None = None) -> SiteRequest:
    """What ``msg`` asks of this site, read with the protocol's own message classes; ContractError (or KeyError /
    ValueError / TypeError) when unreadable. ``node_config`` (the site's own): whether it can sign and check a
    secure sum (its roster and identity key); ``state`` (its context.state): the secure sum it is in, whose
    verified site names a masking or unmasking message is checked by."""
    kind, run, content = msg.metadata.message_type, int(msg.metadata.run_id), msg.content
    node = node_config or {}
    signs = bool(node.get(NODE_SECAGG_ROSTER)) and bool(node.get(NODE_SECAGG_IDENTITY_KEY))
    if kind in ROUND_KINDS:
        cfg = RoundConfig.decode(content[CONFIG_KEY])
        fields: dict[str, Any] = dict(round=cfg.server_round, local_epochs=cfg.local_epochs,
                                      local_update=cfg.local_update,
                                      histogram_bins=cfg.histogram_bins, min_count=cfg.min_count,
                                      prototype_weight=cfg.prototype_weight, run_seed=cfg.seed,
                                      split_follows_run=NODE_DATA_DIR not in (node_config or {}),
                                      model_sha256=model_sha256(content))
        if kind == SECURE_TRAIN:
            start = SecAggStart.from_record(content[SECAGG_KEY], training=True)
            terms = start.train
            fields.update(secure=True, secure_round_id=start.setup.round_id, secagg_threshold=start.setup.threshold,
                          secagg_holders=holders(start.setup), authenticated=signs,
                          dp_noise_multiplier=terms.dp_noise_multiplier if terms is not None and terms.dp else None)
        if kind == SECURE_EVALUATE:
            setup = SecAggStart.from_record(content[SECAGG_KEY]).setup
            fields.update(secure=True, secure_round_id=setup.round_id, secagg_threshold=setup.threshold,
                          secagg_holders=holders(setup), authenticated=signs)
        return SiteRequest(kind=kind, run=run, **fields)
    if kind in PREPARE_KINDS:
        request = PrepareRequest.decode(content[CONFIG_KEY])
        cfg = request.prepare
        secure = kind == SECURE_PREPARE or request.secagg
        start = SecAggStart.from_record(content[SECAGG_KEY]) if kind == SECURE_PREPARE else None
        digest, participants = None, None
        if kind != message_type(QUERY, PREPARE_APPLY):  # applying the agreed statistics releases nothing
            layout = dict(content[LAYOUT_KEY]) if start is not None else None
            digest, participants = preparation_digest(kind, request, layout, start and start.setup,
                                                      start and start.site_id)
        return SiteRequest(kind=kind, run=run, secure=secure, min_count=cfg.min_count,
                           secure_round_id=start.setup.round_id if start is not None else None,
                           split_seed=cfg.seed, split_ratios=cfg.split_ratios, use_split_file=cfg.use_split_file,
                           preparation_sha256=digest, participants=participants,
                           authenticated=signs if kind == SECURE_PREPARE else None,
                           secagg_threshold=start.setup.threshold if start is not None else None,
                           secagg_holders=holders(start.setup) if start is not None else None)
    if kind in STAGE_KINDS:  # a later stage of a secure sum the site accepted (its state checks the round id)
        signed = None
        if kind == message_type(QUERY, SECAGG_SHARE):  # the key book: every advert signed by an enrolled name
            book = KeyBook.from_record(content[SECAGG_KEY])
            signed = bool(book.keys) and all(book.signatures.get(i) and book.names.get(i) for i in book.keys)
        rid, sites = sum_sites(kind, content[SECAGG_KEY], state) if kind in (MASK, UNMASK) else (None, None)
        return SiteRequest(kind=kind, run=run, secure=True, authenticated=signed, sum_round_id=rid, sum_sites=sites)
    raise ContractError(f"message type {kind!r} is not one this site answers")


def split_record(req: SiteRequest, policy: SitePolicy, node_config: Mapping[str, Any]) -> int | str:
    """What split the class means were taken over, for the audit entry: the run's seed (a simulated site),
    "split.csv" (a deployed site's prepared folder has one), or the policy's split seed."""
    if req.split_follows_run:
        return int(req.run_seed) if req.run_seed is not None else "run seed"
    if (Path(str(node_config[NODE_DATA_DIR])) / "split.csv").exists():
        return "split.csv"
    return policy.preparation.split_seed


def admit(policy: SitePolicy, req: SiteRequest, folder: Path) -> None:
    """Check ``req`` against the policy and the site's memory; if it passes, remember it and charge its privacy
    (under the state folder's lock, before any work). PolicyRefusal otherwise, with nothing recorded."""
    with SiteState(folder) as state:
        memory = state.consortium(policy.consortium)
        p = policy.privacy
        multiplier = None
        if req.training and req.dp_noise_multiplier is not None and req.secagg_threshold:
            multiplier = round_multiplier(req.dp_noise_multiplier, req.secagg_threshold, p.colluding_sites)
        spent_with = None if multiplier is None else state.accountant.spent_with(
            policy.consortium, multiplier, p.delta, p.accounting)
        check_request(policy, req, memory, spent_with)
        remember(memory, req)
        if multiplier is not None:
            state.accountant.charge(policy.consortium, req.run, req.round, multiplier)
        state.save()


def _site_name(context: Context) -> str:
    node = context.node_config
    if NODE_SITE_NAME in node:
        return str(node[NODE_SITE_NAME])
    return f"site{node[NODE_PARTITION_ID]}" if NODE_PARTITION_ID in node else f"node{context.node_id}"


def refused_before_screening(msg: Message, context: Context, code: int, reason: str, rule: str) -> Message:
    """The error reply of a request the site refuses before its policy check (``rule`` names the check), appended
    to the site's audit log when the node config names a policy."""
    reply = Message(Error(code=code, reason=reason), reply_to=msg)
    try:
        policy = policy_of(context.node_config)
    except (OSError, PolicyError):
        return reply
    if policy is not None:
        config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
        append(policy.state_path(), exchange_entry(msg, reply, decision="refused", rule=rule, where=None,
                                                   site=_site_name(context), consortium=policy.consortium,
                                                   round_=round_of(config) or None))
    return reply


def screened(msg: Message, context: Context, answer: Callable[[], Message]) -> Message:
    """``answer()`` if the site's policy admits ``msg``, else a refusal naming the policy line; both recorded in
    the site's audit log. Without a policy (node config ``site-policy``) just ``answer()``."""
    try:
        policy = policy_of(context.node_config)
    except (OSError, PolicyError) as exc:  # a site that cannot read its own policy answers nothing
        return Message(Error(code=POLICY_ERROR_CODE, reason=f"this site's policy cannot be read: {exc}"),
                       reply_to=msg)
    if policy is None:
        return answer()
    folder = policy.state_path()
    config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
    audit = dict(site=_site_name(context), consortium=policy.consortium, round_=round_of(config) or None)
    try:
        req = decode_request(msg, context.node_config, context.state)
    except (ContractError, SecAggError, KeyError, ValueError, TypeError) as exc:
        reply = Message(Error(code=CONTRACT_ERROR_CODE, reason=f"request refused before the site's policy check "
                                                              f"(it cannot be read): {type(exc).__name__}: {exc}"),
                        reply_to=msg)
        append(folder, exchange_entry(msg, reply, decision="refused", **audit))
        return reply
    try:
        admit(policy, req, folder)
    except PolicyRefusal as exc:
        reply = Message(Error(code=POLICY_ERROR_CODE, reason=str(exc)), reply_to=msg)
        append(folder, exchange_entry(msg, reply, decision="refused", rule=exc.rule, where=exc.where, **audit))
        return reply
    reply = answer()
    entry = exchange_entry(msg, reply, decision="failed" if reply.has_error() else "answered", **audit)
    if req.training and req.prototype_weight and not reply.has_error():
        # what the update carries besides weights: class means of the classes with >= k training patients (k as
        # the site's training handler applies it: the request's, the policy's and its manifest's, the largest)
        from .handlers import release_min_count

        k = release_min_count(max(req.min_count or 0, policy.min_count), context.node_config)
        entry["class_prototypes"] = {"k": k, "weight": req.prototype_weight, "run_seed": req.run_seed,
                                     "split": split_record(req, policy, context.node_config)}
    if req.training and req.local_update == "gradient" and not reply.has_error():
        # what the update is: minus this site's gradient over all its training patients at the received model
        entry["local_update"] = "gradient"
    append(folder, entry)
    return reply
