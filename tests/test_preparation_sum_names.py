"""A secure preparation sum a site helped with is never followed by a second, different one (issue 21,
``preparation.once_per_consortium``, at the masking and unmasking steps).

A site remembers the request of the preparation statistics it released, but a request does not name the sites:
secure-sum ids are the coordinator's to hand out. A coordinator could therefore (a) run the same request over another
set of sites of the same size ({A,B,C}, then D as id 1 with B and C: every site of the second sum sees the very same
request) or (b) retry the same sum and declare site A dropped: the second sum, differenced against the first, gives
A's statistics. Each site now checks the enrolled NAMES of the sum (from the key book it verified against its own
roster) when it masks its statistics and when it helps unmask: its masked statistics go only into a sum over exactly
the sites of the sum it released, and it helps unmask only that sum. Every message below is built as
server/prepare_app.py builds it and answered by the real site ClientApps; each site has its own policy, roster and
identity key (authenticated secure aggregation, as `site policy init` writes it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord
from test_malicious_coordinator import PREP, Site, answered, raw_site

from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    KeyAdvert,
    MaskedInput,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    ShareBundle,
    StatsLayout,
    SurvivorSignature,
    UnmaskShares,
)
from magnet_core.federation.secagg_auth import Roster
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import SecAggStart

RULE = "preparation.once_per_consortium"
LAYOUT = StatsLayout.from_feature_lists([{"mRNA": [f"g{j}" for j in range(12)]}], 2)
NAMES = ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]
FP = 2.0 ** -(DEFAULT_FRAC_BITS + 1)


def enrolled(tmp_path, names):
    """Identity keys (`magnet-fl pki site-key`) of ``names`` and the consortium roster that lists them."""
    from server.pki import make_site_key

    rows, keys = ["site,public_key"], {}
    for name in names:
        keys[name], pub = make_site_key(tmp_path / "keys" / name, comment=name)
        rows.append(f"{name},{pub.read_text().strip()}")
    roster = tmp_path / "registered_sites.csv"
    roster.write_text("\n".join(rows) + "\n")
    return keys, roster


@pytest.fixture
def consortium(tmp_path):
    """Four hospitals, each with its own raw data, identity key (`magnet-fl pki site-key`), copy of the roster and
    policy (authenticated secure sums only; ``once_per_consortium`` left to its default, true)."""
    keys, roster = enrolled(tmp_path, NAMES)
    sites = {}
    for i, name in enumerate(NAMES):
        raw = raw_site(tmp_path / "raw" / name, per=40 + 4 * i)
        site = Site(tmp_path / name, {"raw-dir": str(raw), "prepared-dir": str(tmp_path / "prepared" / name),
                                      "site-name": name, "secagg-roster": str(roster),
                                      "secagg-identity-key": str(keys[name])})
        site.policy.write_text(site.policy.read_text().replace("[secure_aggregation]\n",
                                                               "[secure_aggregation]\nauthenticated = true\n"))
        sites[name] = site
    return sites, Roster.from_file(roster)


def _config() -> ConfigRecord:
    return ConfigRecord(PrepareRequest(prepare=PrepareConfig(**PREP), secagg=True, num_classes=2).encode())


class Coordinator:
    """A coordinator driving one secure preparation sum through the sites' real handlers, as server/prepare_app.py
    does (stage 0 query.prepare_secagg, then share / mask / unmask), free to choose who gets which secure-sum id,
    whom it declares dropped and whom it asks. Every reply is kept; refusals are collected, not raised."""

    def __init__(self, sites: dict[str, Site], roster: Roster, ids: dict[int, str], run: int, round_id: str):
        self.sites, self.ids, self.run = sites, ids, run
        self.setup = SecAggSetup.for_sites(round_id, sorted(ids), LAYOUT.length, max_dropouts=1)
        self.server = SecAggServer(self.setup, roster)
        self.refusals: dict[str, list[str]] = {}

    def _send(self, sid: int, kind: str, secagg: dict, **extra):
        site = self.sites[self.ids[sid]]
        reply = site.send(kind, {"config": _config(), "secagg": ConfigRecord(secagg), **extra}, run=self.run)
        if reply.has_error():
            self.refusals.setdefault(kind, []).append(self.ids[sid])
            return None
        return reply

    def secure_sum(self, drop_before_mask: tuple[int, ...] = (), unmask_from: tuple[int, ...] | None = None,
                   absent: tuple[int, ...] = ()):
        """The sum over the survivors, or None when the sites' refusals stop it (SecAggError). ``absent``: planned
        sites that never answer (down)."""
        adverts = []
        for sid in self.setup.site_ids:
            if sid in absent:
                continue
            reply = self._send(sid, "query.prepare_secagg", SecAggStart(self.setup, sid).to_record(),
                               layout=ConfigRecord(LAYOUT.to_record()))
            if reply is not None:
                adverts.append(KeyAdvert.from_record(reply.content["secagg"]))
        try:
            book = self.server.collect_keys(adverts)
            bundles = [ShareBundle.from_record(r.content["secagg"]) for sid in sorted(book.keys)
                       if (r := self._send(sid, "query.secagg_share", book.to_record())) is not None]
            inboxes = self.server.route_shares(bundles)
            for sid, inbox in sorted(inboxes.items()):
                if sid in drop_before_mask:
                    continue
                reply = self._send(sid, "query.secagg_mask", inbox.to_record())
                if reply is not None:
                    self.server.add_masked(MaskedInput.from_record(reply.content["secagg"],
                                                                   reply.content["masked"]["masked"].numpy()))
            lst = self.server.survivor_list()  # stage 3a, the consistency check: each survivor signs the list
            for sid in lst.survivors:
                reply = self._send(sid, "query.secagg_consistency", lst.to_record())
                if reply is not None:
                    self.server.add_survivor_signature(SurvivorSignature.from_record(reply.content["secagg"]))
            request = self.server.unmask_request()
            asked = self.server.list_signers if unmask_from is None else unmask_from
            shares = [UnmaskShares.from_record(r.content["secagg"]) for sid in asked
                      if (r := self._send(sid, "query.secagg_unmask", request.to_record())) is not None]
            return self.server.finish(shares)
        except SecAggError:
            return None


def statistics(site: Site) -> np.ndarray:
    """The site's own encoded statistics (what it masks), computed here from its raw folder."""
    from client.prepare_app import _site, released_statistics, site_spec
    from magnet_core.protocol.prepare import PrepareRequest

    request = PrepareRequest.decode(_config())
    ctx = type("Ctx", (), {"node_config": site.node})()
    cfg, raw = _site(request, site_spec(request, ctx))
    released, _ = released_statistics(raw, cfg, 2)
    return LAYOUT.encode(released)


def _refused_for_the_names(site: Site, kind: str, *names: str) -> None:
    """The last entry of the site's audit log: ``kind`` refused by the line, the reason naming the sites."""
    last = site.audit()[-1]
    assert (last["kind"], last["decision"], last["rule"], last["release"]) == (kind, "refused", RULE, None), last
    assert f"{site.policy.resolve()} (default): {RULE} = True" in last["error"], last["error"]
    for name in names:
        assert name in last["error"], (name, last["error"])


def _memory(site: Site) -> dict:
    path = site.policy.parent / "state" / "answered.json"
    return json.loads(path.read_text())["consortia"]["ov-test"]["preparations"]["query.prepare_secagg"]


def test_the_line_off_shows_both_attacks_recover_a_sites_statistics_exactly(consortium):
    """The attacks are real on these handlers: with ``once_per_consortium = false`` a retry declaring A dropped,
    differenced against the first sum, gives A's statistics (to fixed-point resolution)."""
    sites, roster = consortium
    for s in sites.values():
        s.policy.write_text(s.policy.read_text() + "once_per_consortium = false\n")
    ids = {1: "hosp-a", 2: "hosp-b", 3: "hosp-c"}
    first = Coordinator(sites, roster, ids, 1, "prepare/one").secure_sum()
    without_a = Coordinator(sites, roster, ids, 2, "prepare/two").secure_sum(drop_before_mask=(1,))
    assert first is not None and without_a is not None
    assert np.max(np.abs((first - without_a) - statistics(sites["hosp-a"]))) <= 3 * FP


def test_a_retry_that_declares_a_site_dropped_is_refused_at_unmasking(consortium):
    """Attack (b): sum {A,B,C} released; the retry (the very same request, so stage 0 is answered) declares A
    dropped before masking. B and C refuse to unmask a sum over {B,C}, naming the line and the sites; the
    coordinator gets no second sum."""
    sites, roster = consortium
    ids = {1: "hosp-a", 2: "hosp-b", 3: "hosp-c"}
    assert Coordinator(sites, roster, ids, 1, "prepare/one").secure_sum() is not None
    retry = Coordinator(sites, roster, ids, 2, "prepare/two")
    assert retry.secure_sum(drop_before_mask=(1,)) is None, "the sum without hosp-a was unmasked"
    assert sorted(retry.refusals.get("query.secagg_unmask", [])) == ["hosp-b", "hosp-c"], retry.refusals
    for name in ("hosp-b", "hosp-c"):
        _refused_for_the_names(sites[name], "query.secagg_unmask", "'hosp-a'")
        assert _memory(sites[name])["survivors"] == ["hosp-a", "hosp-b", "hosp-c"]
    # an identical retry (nobody dropped) is still answered, and gives the very same sum
    again = Coordinator(sites, roster, ids, 3, "prepare/three").secure_sum()
    assert again is not None and not retry.refusals.get("query.prepare_secagg")


def test_the_same_request_over_another_site_set_of_the_same_size_is_refused_at_masking(consortium):
    """Attack (a): sum {A,B,C} (ids 1,2,3); then D takes id 1 beside B and C: the request, layout and setup that B
    and C see are identical (stage 0 is answered), but the key book names hosp-d. B and C refuse to mask their
    statistics into a sum over other sites, naming them; the coordinator gets no second sum (A - D by difference)."""
    sites, roster = consortium
    assert Coordinator(sites, roster, {1: "hosp-a", 2: "hosp-b", 3: "hosp-c"}, 1, "prepare/one").secure_sum() \
        is not None
    other = Coordinator(sites, roster, {1: "hosp-d", 2: "hosp-b", 3: "hosp-c"}, 2, "prepare/two")
    assert other.secure_sum() is None, "a second sum over {D,B,C} was unmasked"
    assert not other.refusals.get("query.prepare_secagg"), other.refusals  # the request itself is the same
    assert sorted(other.refusals.get("query.secagg_mask", [])) == ["hosp-b", "hosp-c"], other.refusals
    for name in ("hosp-b", "hosp-c"):
        _refused_for_the_names(sites[name], "query.secagg_mask", "'hosp-d'", "'hosp-a'")
    assert "masked" not in [k for e in sites["hosp-b"].audit()[-1:] for k in e["sent"]]


def test_a_site_whose_masked_statistics_were_summed_without_it_masks_no_second_time(consortium):
    """The coordinator asks only A and C to unmask sum {A,B,C} (threshold 2): B's statistics are in a released sum
    whose survivor list B never saw. B then masks into no other secure sum of this preparation, not even one over the
    same sites (it cannot tell which sum the coordinator took), and the refusal survives in its state folder."""
    sites, roster = consortium
    ids = {1: "hosp-a", 2: "hosp-b", 3: "hosp-c"}
    assert Coordinator(sites, roster, ids, 1, "prepare/one").secure_sum(unmask_from=(1, 3)) is not None
    retry = Coordinator(sites, roster, ids, 2, "prepare/two")
    assert retry.secure_sum(drop_before_mask=(1,)) is None, "the sum without hosp-a was unmasked"
    assert "hosp-b" in retry.refusals.get("query.secagg_mask", []), retry.refusals
    _refused_for_the_names(sites["hosp-b"], "query.secagg_mask", "never saw")
    assert _memory(sites["hosp-b"])["survivors"] is None
    assert _memory(sites["hosp-b"])["masked_with"] == ["hosp-a", "hosp-b", "hosp-c"]


def test_an_honest_first_sum_with_a_dropout_then_an_identical_retry(consortium):
    """The rule costs an honest consortium nothing it needs: a first sum in which D dropped before masking is
    released over {A,B,C}; a retry of the same request while D is still down is answered (the same sum); a retry in
    which D comes back is refused (its sum minus the first would be D's statistics)."""
    sites, roster = consortium
    ids = {1: "hosp-a", 2: "hosp-b", 3: "hosp-c", 4: "hosp-d"}
    first = Coordinator(sites, roster, ids, 1, "prepare/one").secure_sum(drop_before_mask=(4,))
    assert first is not None
    same = Coordinator(sites, roster, ids, 2, "prepare/two").secure_sum(absent=(4,))
    assert same is not None and np.max(np.abs(same - first)) <= 3 * FP
    back = Coordinator(sites, roster, ids, 3, "prepare/three")
    assert back.secure_sum() is None, "the sum with hosp-d back was unmasked"
    assert sorted(back.refusals.get("query.secagg_mask", [])) == ["hosp-a", "hosp-b", "hosp-c"], back.refusals
    _refused_for_the_names(sites["hosp-a"], "query.secagg_mask", "'hosp-d'")
    for name in ("hosp-a", "hosp-b", "hosp-c"):
        assert _memory(sites[name])["survivors"] == ["hosp-a", "hosp-b", "hosp-c"]


def test_the_memory_of_the_released_sum_survives_a_new_context(consortium):
    """A SuperNode or worker restart (a new Flower context, the same state folder) does not reset it."""
    sites, roster = consortium
    ids = {1: "hosp-a", 2: "hosp-b", 3: "hosp-c"}
    assert Coordinator(sites, roster, ids, 1, "prepare/one").secure_sum() is not None
    for s in sites.values():
        s.contexts.clear()
    assert Coordinator(sites, roster, ids, 1, "prepare/two").secure_sum(drop_before_mask=(1,)) is None
    _refused_for_the_names(sites["hosp-b"], "query.secagg_unmask", "'hosp-a'")


def test_answered_memory_written_before_the_new_fields_still_loads(tmp_path):
    """answered.json files of the code before keep loading (the new fields default to nothing remembered)."""
    from client.policy import ConsortiumMemory

    old = {"preparations": {"query.prepare_secagg": {"request_sha256": "ab" * 32, "participants": [], "run": 1,
                                                     "answered": 1}}}
    release = ConsortiumMemory.model_validate(old).preparations["query.prepare_secagg"]
    assert release.masked_with is None and release.survivors is None and release.sums == []


def test_secure_training_repeated_without_one_site_stays_refused(tmp_path):
    """The training equivalent (issue 21: round 1's secure sum repeated without one site gave that site's update):
    a site trains from a given global model once, in any run, so its update never enters a second sum."""
    from test_malicious_coordinator import SITE, secure_train

    from client.handlers import site_for
    from magnet_core.protocol.messages import RoundConfig

    cfg = RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10,
                      data_path="generated:160", scenario="iid-3")
    params = {k: v.detach().numpy().copy() for k, v in site_for(cfg, {"partition-id": SITE}, SITE).model
              .state_dict().items()}
    site = Site(tmp_path, {"partition-id": SITE})
    answered(secure_train(site, params, 1, "r1"))
    for run, rid in ((1, "r1-again"), (2, "r1-run2")):
        reply = secure_train(site, params, 1, rid, run=run)
        assert reply.has_error() and site.audit()[-1]["decision"] == "refused", run
        assert site.audit()[-1]["rule"] in ("rounds.never_repeat", "rounds.train_once_per_model")
