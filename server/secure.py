"""Secure sums on Flower's Message API (training rounds, preparation statistics): the coordinator sees masks only."""

# secure_sum_stages (stages 1-3 below) serves any secure sum: the secure-aggregation strategy
# (server/secure_strategy.py) runs it on the sites' updates after its stage 0 (train.secagg), server/prepare_app.py
# on the sites' preprocessing statistics after its own stage 0 (query.prepare_secagg).

# Stages (the site side is client/secure.py, the messages magnet_core/protocol/secagg.py, the crypto
# magnet_core/federation/secagg.py):
#   0  train.secagg         global weights + SecAggSetup (planned secagg ids 1..n for the sampled nodes, threshold
#                           t = n - max dropouts) -> site name + public keys. The site trains, clips, encodes.
#   1  query.secagg_share   key book of U1 -> encrypted Shamir shares (ShareBundle)
#   2  query.secagg_mask    each site's inbox -> its masked vector, added at once to the running sum (U3)
#   3a query.secagg_consistency  authenticated only (the consistency check, Bonawitz et al. 2017 round 3): the
#                           survivor list U3 to every survivor -> its identity-key signature over it (each site signs
#                           one list per sum); needs >= t valid signatures, checked here against the roster.
#   3  query.secagg_unmask  survivors / dropped (authenticated: + the survivor-list signatures, sent to the signers)
#                           -> shares; the server removes the masks and decodes the sum.
#   4b query.secagg_exclude authenticated only, when a dealer's signed shares contradict its commitment
#                           (SharesRefuted): the evidence to every honest survivor -> its pairwise seeds with the
#                           dealer, which take the dealer's input out; the sum is then over server.included.
# A site failing (error reply, no reply, rejected name) before stage 2's reply is left out of the sum; a site of U3
# failing afterwards is still in it. Fewer than t sites at any stage: the round fails, the model is unchanged.

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from magnet_core.federation.secagg import SecAggServer, SharesRefuted
from magnet_core.federation.secagg_auth import Roster
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    MASKED_KEY,
    QUERY,
    SECAGG_CONSISTENCY,
    SECAGG_EXCLUDE,
    SECAGG_KEY,
    SECAGG_MASK,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SITE_KEY,
    message_type,
)
from magnet_core.protocol.messages import site_name_of
from magnet_core.protocol.secagg import (
    KeyAdvert,
    MaskedInput,
    PairwiseSeeds,
    SecAggError,
    ShareBundle,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
)

from .collect import collect
from .ledger import Ledger
from .replies import decode_one, one_per_node

__all__ = ["Ledger", "Stage", "advert_check", "decode_advert", "effective_max_dropouts", "payload_bytes",
           "secure_sum_stages"]

T = TypeVar("T")


class Stage:
    """Bookkeeping of one exchange: which planned sites answered well, and bytes per site both ways."""

    def __init__(self, ledger: Ledger, group: str, node_of_sid: Mapping[int, int], timeout: float, grace: float):
        self.ledger, self.group, self.node_of_sid = ledger, group, dict(node_of_sid)
        self.timeout, self.grace = timeout, grace
        self.sid_of_node = {n: s for s, n in node_of_sid.items()}
        self.up: dict[int, int] = dict.fromkeys(node_of_sid, 0)
        self.down: dict[int, int] = dict.fromkeys(node_of_sid, 0)

    def run(self, grid: Grid, action: str, payloads: Mapping[int, tuple[RecordDict, int]], min_replies: int
            ) -> dict[int, Message]:
        """Send each secagg id its message, collect; returns sid -> good reply (errors and strays recorded)."""
        msgs = []
        for sid, (content, down_bytes) in payloads.items():
            self.down[sid] += down_bytes
            msgs.append(Message(content=content, message_type=action, dst_node_id=self.node_of_sid[sid],
                                group_id=self.group))
        replies = collect(grid, msgs, self.timeout, min_replies, self.grace, self.ledger.destinations)
        asked = {self.node_of_sid[sid] for sid in payloads}
        answered = {self.ledger.node_of(m) for m in replies} & asked  # replies of nodes not asked are ignored
        good: dict[int, Message] = {}
        for node, msg in one_per_node(replies, self.ledger, f"{action}: more than one reply", asked).items():
            good[self.sid_of_node[node]] = msg
            self.up[self.sid_of_node[node]] += payload_bytes(msg.content)
        for sid in sorted(payloads):
            if self.node_of_sid[sid] not in answered:
                self.ledger.no_reply(self.node_of_sid[sid], action)
        return good

    def exchange(self, grid: Grid, action: str, payloads: Mapping[int, tuple[RecordDict, int]], min_replies: int,
                 decode: Callable[[Message], T], what: str, check: Callable[[int, T], str | None],
                 keep: bool = True) -> dict[int, T | None]:
        """``run``, then each good reply decoded and checked in turn (``check``: sid, item -> problem or None); a
        reply that does not decode or fails its check rejects its site. Returns sid -> accepted item (None unless
        ``keep``: a check that consumes the item, e.g. adds it to a sum, need not hold every item at once)."""
        out: dict[int, T | None] = {}
        for sid, msg in self.run(grid, action, payloads, min_replies).items():
            item, problem = decode_one(msg, decode, what, contract_errors=False)
            problem = problem or check(sid, item)
            if problem:
                self.reject(sid, problem)
            else:
                out[sid] = item if keep else None
            del item
        return out

    def reject(self, sid: int, reason: str) -> None:
        self.ledger.reject(self.node_of_sid[sid], reason)


def decode_advert(msg: Message) -> tuple[str, KeyAdvert]:
    """A stage-0 reply of a secure sum (training or evaluation): the site's claimed name and its key advert."""
    return site_name_of(msg.content[SITE_KEY]), KeyAdvert.from_record(msg.content[SECAGG_KEY])


def advert_check(strategy: Any, server: SecAggServer, roster: Roster | None, node_of_sid: Mapping[int, int],
                 names: dict[int, str]) -> Callable[[int, tuple[str, KeyAdvert]], str | None]:
    """The one check of a stage-0 reply, for every secure sum: the name is the node's enrolled one
    (``strategy.names``), the site is enrolled (``strategy.facts``), it answers as the secagg id it was given, its
    advert is well formed and, with a roster, its keys are signed under the node's name. A reply that passes is
    recorded in ``names`` (secagg id -> site name); the check returns the problem, or None."""
    def enrolled(sid: int, reply: tuple[str, KeyAdvert]) -> str | None:
        name, advert = reply
        problem = strategy.names.check(node_of_sid[sid], name) or (
            None if strategy.facts(name) is not None else f"site {name!r} is not enrolled")
        if not problem and advert.site_id != sid:
            problem = f"answers as secagg site {advert.site_id}, was told {sid}"
        problem = problem or server.check_advert(advert) or None
        if not problem and roster is not None and advert.site_name != name:
            problem = f"its secure-aggregation keys are signed as {advert.site_name!r}, the node is {name!r}"
        if not problem:
            names[sid] = name
        return problem
    return enrolled


def payload_bytes(content: RecordDict) -> int:
    """Bytes a message carries in its records (array data, bytes/str lengths, 8 per number)."""
    total = 0
    for rec in content.array_records.values():
        total += sum(len(a.data) for a in rec.values())
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in items)
    return total


def record_size(rec: ConfigRecord) -> int:
    """Bytes of one secure-aggregation record as Flower carries it."""
    return payload_bytes(RecordDict({SECAGG_KEY: rec}))


def effective_max_dropouts(n: int, wanted: int) -> int:
    """The largest dropout allowance <= ``wanted`` whose threshold n - d stays a majority and >= 2."""
    d = max(0, min(wanted, n - 2))
    while d > 0 and not n - d > n // 2:
        d -= 1
    return d


def secure_sum_stages(grid: Grid, stage: Stage, server: SecAggServer, adverts: list[KeyAdvert],
                      config: ConfigRecord) -> tuple[np.ndarray, UnmaskRequest, set[int]]:
    """Stages 1-3 of one secure sum of any vector the sites hold (training updates, preprocessing statistics):
    key book -> shares -> masked vectors (summed as they arrive) -> unmask. ``adverts``: the keys of the sites
    whose stage-0 reply was accepted. Returns the float64 sum over the survivors, the unmask request (survivors,
    dropped before masking) and the survivors that answered the unmask request. SecAggError when too few remain.
    ``config`` travels with every message (the sites' handlers log it)."""
    t = server.setup.threshold
    book = server.collect_keys(adverts)

    # stage 1: shares
    # (neighbourhood graph: each site gets its own neighbours' keys only; complete graph: the same book for all)
    recs = {sid: ConfigRecord(server.book_for(sid).to_record()) for sid in book.keys}
    payloads = {sid: (RecordDict({CONFIG_KEY: config, SECAGG_KEY: rec}), record_size(rec)) for sid, rec in recs.items()}

    def for_the_others(sid: int, bundle: ShareBundle) -> str | None:
        if bundle.site_id != sid or set(bundle.ciphertexts) != set(server.book_for(sid).keys) - {sid}:
            return "share bundle from the wrong site or for the wrong recipients"
        return None

    bundles = stage.exchange(grid, message_type(QUERY, SECAGG_SHARE), payloads, t,
                             lambda msg: ShareBundle.from_record(msg.content[SECAGG_KEY]), "share bundle",
                             for_the_others)
    inboxes = server.route_shares(list(bundles.values()))

    # stage 2: masked vectors, summed as they arrive (each dropped once added)
    payloads = {}
    for sid, inbox in inboxes.items():
        r = ConfigRecord(inbox.to_record())
        payloads[sid] = (RecordDict({CONFIG_KEY: config, SECAGG_KEY: r}), record_size(r))

    def added(sid: int, masked: MaskedInput) -> str | None:
        if masked.site_id != sid:
            return f"masked input claims secagg site {masked.site_id}, was told {sid}"
        try:
            server.add_masked(MaskedInput(sid, masked.masked, masked.transcript_signature))
        except SecAggError as exc:  # one bad vector is that site's problem, not the round's
            return str(exc)
        return None

    stage.exchange(grid, message_type(QUERY, SECAGG_MASK), payloads, t,
                   lambda msg: MaskedInput.from_record(msg.content[SECAGG_KEY],
                                                       msg.content[MASKED_KEY][MASKED_KEY].numpy()),
                   "masked input", added, keep=False)
    asked = list(server.u3)
    if server.roster is not None:  # stage 3a: the consistency check
        asked = consistency_stage(grid, stage, server, config)
    request = server.unmask_request()

    # stage 3: unmask
    r = ConfigRecord(request.to_record())
    payloads = {sid: (RecordDict({CONFIG_KEY: config, SECAGG_KEY: r}), record_size(r)) for sid in sorted(asked)}

    def answers_the_request(sid: int, got: UnmaskShares) -> str | None:
        held = server.holds(sid)  # complete graph: every share dealer
        if got.site_id != sid or set(got.self_shares) != set(request.survivors) & held \
                or set(got.key_shares) != set(request.dropped) & held:
            return "unmask shares from the wrong site or not answering the request"
        return None

    shares = list(stage.exchange(grid, message_type(QUERY, SECAGG_UNMASK), payloads, t,
                                 lambda msg: UnmaskShares.from_record(msg.content[SECAGG_KEY]), "unmask shares",
                                 answers_the_request).values())
    answered = {s.site_id for s in shares}
    try:
        total = server.finish(shares)
    except SharesRefuted as refuted:
        total = exclusion_stage(grid, stage, server, refuted, config)
    return total, request, answered


def consistency_stage(grid: Grid, stage: Stage, server: SecAggServer, config: ConfigRecord) -> list[int]:
    """Stage 3a (authenticated sums): the survivor list to every survivor, its signature back (checked against the
    roster; a bad or missing one leaves that site out of the unmask request, its input stays in the sum). Returns
    the signers; SecAggError (from the unmask request) when fewer than t signed."""
    lst = server.survivor_list()
    r = ConfigRecord(lst.to_record())
    payloads = {sid: (RecordDict({CONFIG_KEY: config, SECAGG_KEY: r}), record_size(r)) for sid in lst.survivors}

    def signed(sid: int, item: SurvivorSignature) -> str | None:
        if item.site_id != sid:
            return f"survivor-list signature claims secagg site {item.site_id}, was told {sid}"
        try:
            server.add_survivor_signature(item)
        except SecAggError as exc:
            return str(exc)
        return None

    stage.exchange(grid, message_type(QUERY, SECAGG_CONSISTENCY), payloads, server.setup.threshold,
                   lambda msg: SurvivorSignature.from_record(msg.content[SECAGG_KEY]), "survivor-list signature",
                   signed, keep=False)
    return server.list_signers


def exclusion_stage(grid: Grid, stage: Stage, server: SecAggServer, refuted: SharesRefuted, config: ConfigRecord
                    ) -> np.ndarray:
    """Stage 4b: the evidence against the dealers of bad shares to every honest survivor, their pairwise seeds
    with those dealers back; the sum over ``server.included``. The dealers are rejected by name (their evidence
    in the reason). SecAggError when an honest survivor does not answer (the others' sum cannot be recovered)."""
    for sid, why in server.excluded.items():
        stage.reject(sid, f"left out of the secure sum: {why}")
    r = ConfigRecord(refuted.request.to_record())
    honest = server.included
    payloads = {sid: (RecordDict({CONFIG_KEY: config, SECAGG_KEY: r}), record_size(r)) for sid in honest}

    def for_the_request(sid: int, seeds: PairwiseSeeds) -> str | None:
        return None if seeds.site_id == sid else f"pairwise seeds claim secagg site {seeds.site_id}, was told {sid}"

    seeds = stage.exchange(grid, message_type(QUERY, SECAGG_EXCLUDE), payloads, len(honest),
                           lambda msg: PairwiseSeeds.from_record(msg.content[SECAGG_KEY]), "pairwise seeds",
                           for_the_request)
    return server.finish_excluding(list(seeds.values()))
