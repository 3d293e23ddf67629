"""Where a site's policy meets the coordinator's messages: decode what a message asks, check it against the site's
policy and memory, remember it, answer, and append both to the site's audit log. One call per message:
``screened(msg, context, answer)``; without a policy in the node config it only calls ``answer``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context, Error, Message

from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.protocol.messages import ContractError, RoundConfig, round_of
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

POLICY_ERROR_CODE = 4006  # refused by the site's own policy; the reason names the policy file and line
REQUEST_ERROR_CODE = 4002  # as client.app.CONTRACT_ERROR_CODE: the request could not be read for the policy check
ROUND_KINDS = ("train", "evaluate", "train.secagg")
PREPARE_KINDS = ("query.prepare_stats", "query.prepare_secagg", "query.prepare_apply")
STAGE_KINDS = ("query.secagg_share", "query.secagg_mask", "query.secagg_unmask")

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
    if "arrays" not in content.array_records:
        return None
    flat = flat_of(content["arrays"])
    h = hashlib.sha256(f"{flat.dtype.str}{list(flat.shape)}".encode())
    h.update(flat.tobytes())
    return h.hexdigest()


def decode_request(msg: Message) -> SiteRequest:
    """What ``msg`` asks of this site; ContractError (or KeyError / ValueError / TypeError) when unreadable."""
    kind, run, content = msg.metadata.message_type, int(msg.metadata.run_id), msg.content
    if kind in ROUND_KINDS:
        cfg = RoundConfig.decode(content["config"])
        fields: dict[str, Any] = dict(round=cfg.server_round, local_epochs=cfg.local_epochs,
                                      histogram_bins=cfg.histogram_bins, min_count=cfg.min_count,
                                      model_sha256=model_sha256(content))
        if kind == "train.secagg":
            rec = content["secagg"]
            dp = bool(rec.get("dp", False))
            fields.update(secure=True, secure_round_id=str(rec["round-id"]), secagg_threshold=int(rec["threshold"]),
                          dp_noise_multiplier=float(rec["dp-noise-multiplier"]) if dp else None)
        return SiteRequest(kind=kind, run=run, **fields)
    if kind in PREPARE_KINDS:
        config = content["config"]
        cfg = PrepareConfig.model_validate_json(str(config["prepare-config"]))
        secure = kind == "query.prepare_secagg" or bool(config.get("secagg", False))
        round_id = str(content["secagg"]["round-id"]) if kind == "query.prepare_secagg" else None
        return SiteRequest(kind=kind, run=run, secure=secure, min_count=cfg.min_count, secure_round_id=round_id,
                           split_seed=cfg.seed, split_ratios=cfg.split_ratios, use_split_file=cfg.use_split_file)
    if kind in STAGE_KINDS:  # a later stage of a secure sum the site accepted (its state checks the round id)
        return SiteRequest(kind=kind, run=run, secure=True)
    raise ContractError(f"message type {kind!r} is not one this site answers")


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
    if "site-name" in node:
        return str(node["site-name"])
    return f"site{node['partition-id']}" if "partition-id" in node else f"node{context.node_id}"


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
    config = msg.content.config_records.get("config") if msg.has_content() else None
    audit = dict(site=_site_name(context), consortium=policy.consortium, round_=round_of(config) or None)
    try:
        req = decode_request(msg)
    except (ContractError, KeyError, ValueError, TypeError) as exc:
        reply = Message(Error(code=REQUEST_ERROR_CODE, reason=f"request refused before the site's policy check "
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
    append(folder, exchange_entry(msg, reply, decision="failed" if reply.has_error() else "answered", **audit))
    return reply
