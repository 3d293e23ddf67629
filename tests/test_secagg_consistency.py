"""The consistency check of authenticated secure aggregation (Bonawitz et al. 2017, round 3 of the malicious-model
protocol; issue 21 item 3: "all sites check that they received the same participant lists before unmasking").

After the masked inputs, every survivor signs the survivor list U3 (and the sites dropped before masking) with its
enrolled identity key, once per sum; a site reveals shares only for a list it signed itself that at least t distinct
roster sites of U3 signed (stage 3a, SecAggSite.sign_survivors / SecAggServer.survivor_list; through Flower:
query.secagg_consistency, the one stage path of every secure sum: training, evaluation, preparation). Played on the
real state machines, and once through the real site handlers (audit log). What remains (2t <= n + c, a coordinator
splitting the honest sites already at stage 3a) is played in tests/test_secagg_survivor_lists.py."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from test_malicious_coordinator import PREP, Site, answered, raw_site
from test_preparation_sum_names import enrolled
from test_secagg_auth import _auth, consortium  # noqa: F401  (the fixture: five enrolled sites)

from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    KeyAdvert,
    MaskedInput,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    SecAggSite,
    ShareBundle,
    StatsLayout,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    consistency_round,
    run_local,
)
from magnet_core.federation.secagg_auth import Roster, SiteIdentity, survivors_payload
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import SecAggStart

FP = 2.0 ** -(DEFAULT_FRAC_BITS + 1)
CHECK = "consistency check"


def _masked(consortium, n, max_dropouts, before=(), round_id="c"):  # noqa: F811
    """An authenticated sum over n sites up to the masked inputs (``before``: dropped before masking)."""
    auth = _auth(consortium, n)
    setup = SecAggSetup.for_sites(round_id, range(1, n + 1), 8, max_dropouts)
    sites = {i: SecAggSite(setup, i, auth[i], b"ctx") for i in range(1, n + 1)}
    server = SecAggServer(setup, consortium[0])
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    vectors = {i: np.random.default_rng(i).normal(0, 1, 8) for i in sites}
    masked = {}
    for i, s in sites.items():
        if i not in before:
            masked[i] = s.mask(inboxes[i], vectors[i])
            server.add_masked(masked[i])
    return setup, sites, server, vectors, masked


def _request(server: SecAggServer, lst: SurvivorList, signatures: dict[int, bytes]) -> UnmaskRequest:
    """An unmask request for ``lst`` as the coordinator can make it: the masking transcripts it holds and whatever
    survivor-list signatures it chooses to attach."""
    return UnmaskRequest(lst.survivors, lst.dropped, lst.round_id,
                         {u: g for u, g in server._transcripts.items() if u in lst.survivors}, signatures)


def test_the_two_survivor_lists_attack_is_refused_naming_the_consistency_check(consortium):  # noqa: F811
    """tests/test_secagg_survivor_lists.py's attack (3 sites, t = 2, site 3 colluding, site 1 the target), now with
    authentication: (a) as it was played, without any survivor-list signature, no honest site reveals anything;
    (b) after every survivor signed "all survived", site 2 refuses both to sign "site 1 dropped" and to unmask it
    with the colluder's signature on it. The coordinator gets no share of site 1's mask key from an honest site."""
    setup, sites, server, _, _ = _masked(consortium, 3, 1)
    full = server.survivor_list()
    without = SurvivorList((2, 3), (1,), setup.round_id)
    for i, lst in ((1, full), (2, full), (2, without)):  # (a) the old attack: no survivor-list signature
        with pytest.raises(SecAggError, match=f"site {i}: {CHECK}: this site has not signed a survivor list"):
            sites[i].unmask(_request(server, lst, {}))
    consistency_round(server, sites)  # (b) every survivor signs the full list
    with pytest.raises(SecAggError, match=rf"site 2: {CHECK}: this site already signed the survivor list \[1, 2, 3\]"
                                          r".*refusing to sign a second, different list \[2, 3\]"):
        sites[2].sign_survivors(without)
    colluder = sites[3]
    colluder._signed_list = None  # modified code: the colluder signs any list
    sig3 = colluder.sign_survivors(without).signature
    with pytest.raises(SecAggError, match=rf"site 2: {CHECK}: the unmask request names survivors \[2, 3\] "
                                          r"\(dropped \[1\]\), this site signed \[1, 2, 3\]"):
        sites[2].unmask(_request(server, without, {3: sig3}))
    # the honest sites still unmask the list they signed, and only that: no key share of site 1 leaves them
    req = server.unmask_request()
    replies = [sites[i].unmask(req) for i in (1, 2)]
    assert all(not r.key_shares for r in replies)


def test_an_unmask_request_with_too_few_signatures_is_refused_and_t_signers_unmask_exactly(consortium):  # noqa: F811
    """5 sites, t = 3, all masked. Only sites 1 and 2 sign (3, 4 and 5 drop after masking): the coordinator cannot
    make the request, and one it makes anyway is refused by the signers. Once site 3 signs too, the three signers
    unmask and the sum of all five inputs comes back exactly (4 and 5 dropped after masking: still in the sum)."""
    setup, sites, server, vectors, _ = _masked(consortium, 5, 2)
    lst = server.survivor_list()
    got = {i: sites[i].sign_survivors(lst) for i in (1, 2)}
    for s in got.values():
        server.add_survivor_signature(s)
    with pytest.raises(SecAggError, match="only 2 of 5 sites signed the survivor list"):
        server.unmask_request()
    with pytest.raises(SecAggError, match="survivor-list signature is not valid under its enrolled key"):
        server.add_survivor_signature(SurvivorSignature(3, got[1].signature))  # the coordinator checks them too
    for i in (1, 2):
        with pytest.raises(SecAggError, match=rf"site {i}: {CHECK}: only 2 valid signatures .* threshold 3"):
            sites[i].unmask(_request(server, lst, {j: g.signature for j, g in got.items()}))
    server.add_survivor_signature(SurvivorSignature.from_record(sites[3].sign_survivors(
        SurvivorList.from_record(lst.to_record())).to_record()))
    req = UnmaskRequest.from_record(server.unmask_request().to_record())
    assert server.list_signers == [1, 2, 3] and sorted(req.survivor_signatures) == [1, 2, 3]
    total = server.finish([sites[i].unmask(req) for i in server.list_signers])
    assert np.max(np.abs(total - sum(vectors.values()))) <= 5 * FP


def test_forged_non_roster_wrong_list_replayed_and_non_survivor_signatures_do_not_count(consortium, tmp_path):  # noqa: F811
    """5 sites, t = 3, site 5 dropped before masking (U3 = 1..4). Site 1 needs two more valid signatures on its
    list. Not counted: random bytes, another survivor's signature relabelled, the right payload signed by a key
    outside the roster, the survivors' signatures over another list, their signatures from an earlier sum with the
    same round id and lists, and the dropped site's signature."""
    from server.pki import make_site_key

    roster, idents = consortium
    setup, sites, server, vectors, _ = _masked(consortium, 5, 2, before=(5,), round_id="c5")
    lst = consistency_round(server, sites, absent=(5,))
    real = server.unmask_request().survivor_signatures
    commits = server.book.commits
    assert lst.survivors == (1, 2, 3, 4) and lst.dropped == (5,)

    def signed(who: SiteIdentity, as_id: int, survivors, dropped, commit=None) -> bytes:
        return who.sign(survivors_payload(setup.round_id, as_id, commits[as_id] if commit is None else commit,
                                          survivors, dropped))

    key, _ = make_site_key(tmp_path / "outsider", comment="outsider")
    outsider = SiteIdentity.from_key_file("hospital-b", key)  # claims a roster name, holds another key
    _, old_sites, old_server, _, _ = _masked(consortium, 5, 2, before=(5,), round_id="c5")  # same round id
    old = consistency_round(old_server, old_sites, absent=(5,)) and old_server.unmask_request().survivor_signatures
    dropped_site = idents["hospital-e"]
    cases = {
        "random bytes": {2: b"\x30" * 102, 3: b"\x01" * 96},
        "relabelled": {2: real[2], 3: real[2]},
        "not in the roster": {2: signed(outsider, 2, lst.survivors, lst.dropped),
                              3: signed(outsider, 3, lst.survivors, lst.dropped)},
        "another list": {2: signed(idents["hospital-b"], 2, (1, 2, 3, 4, 5), ()),
                         3: signed(idents["hospital-c"], 3, (1, 2, 3), (4, 5))},
        "an earlier sum": {2: old[2], 3: old[3]},
        "a dropped site": {2: real[2], 5: signed(dropped_site, 5, lst.survivors, lst.dropped)},
    }
    for what, sigs in cases.items():
        with pytest.raises(SecAggError, match=rf"site 1: {CHECK}: only [12] valid signatures"):
            sites[1].unmask(_request(server, lst, sigs))
    req = server.unmask_request()  # the real ones: unmasked, and the sum is exact
    total = server.finish([sites[i].unmask(req) for i in (1, 2, 3, 4)])
    assert np.max(np.abs(total - sum(vectors[i] for i in (1, 2, 3, 4)))) <= 4 * FP


def test_a_site_signs_one_survivor_list_per_sum_and_remembers_it_across_its_state(consortium):  # noqa: F811
    """The same list again gets a valid signature; a different one is refused naming the check, also after the site
    was saved and restored (its context.state between messages); an unauthenticated site has nothing to sign with."""
    setup, sites, server, _, _ = _masked(consortium, 3, 1)
    lst = server.survivor_list()
    first = sites[2].sign_survivors(lst)
    site = SecAggSite.from_state(sites[2].to_state(), _auth(consortium, 3)[2])
    again = site.sign_survivors(lst)
    roster = consortium[0]
    payload = survivors_payload(setup.round_id, 2, server.book.commits[2], lst.survivors, lst.dropped)
    assert roster.verifies("hospital-b", payload, first.signature) and roster.verifies("hospital-b", payload,
                                                                                      again.signature)
    for other in (SurvivorList((2, 3), (1,), setup.round_id), SurvivorList((1, 2), (3,), setup.round_id)):
        with pytest.raises(SecAggError, match=f"site 2: {CHECK}: this site already signed"):
            site.sign_survivors(other)
    plain = SecAggSetup.for_sites("plain", [1, 2, 3], 8, 1)
    with pytest.raises(SecAggError, match="needs authenticated secure aggregation"):
        SecAggSite(plain, 1).sign_survivors(SurvivorList((1, 2, 3), (), "plain"))
    with pytest.raises(SecAggError, match="needs authenticated secure aggregation"):
        SecAggServer(plain).survivor_list()


@pytest.mark.parametrize("n,before,after", [(3, (), (3,)), (5, (2,), (4,)), (5, (), (4, 5))])
def test_honest_authenticated_sums_with_dropouts_after_masking_stay_exact(consortium, n, before, after):  # noqa: F811
    """run_local plays stage 3a (a site dropping after masking signs nothing): the sum over U3 is exact."""
    vectors = {i: np.random.default_rng(10 + i).normal(0, 1, 16) for i in range(1, n + 1)}
    setup = SecAggSetup.for_sites(f"e{n}", list(vectors), 16, (n - 1) // 2)
    total, server = run_local(setup, vectors, before, after, auth=_auth(consortium, n), roster=consortium[0],
                              context=b"ctx")
    assert server.list_signers == [i for i in range(1, n + 1) if i not in before and i not in after]
    assert np.max(np.abs(total - sum(v for i, v in vectors.items() if i not in before))) <= n * FP


# ------------------------------------------------------------------------------------ through the site handlers

LAYOUT = StatsLayout.from_feature_lists([{"mRNA": [f"g{j}" for j in range(12)]}], 2)
HOSPITALS = ["hosp-a", "hosp-b", "hosp-c"]


@pytest.fixture
def hospitals(tmp_path):
    """Three hospitals with raw data, identity keys, a roster and authenticated-only policies (as
    tests/test_preparation_sum_names.py builds them)."""
    keys, roster = enrolled(tmp_path, HOSPITALS)
    sites = {}
    for name in HOSPITALS:
        site = Site(tmp_path / name, {"raw-dir": str(raw_site(tmp_path / "raw" / name)), "site-name": name,
                                      "prepared-dir": str(tmp_path / "prepared" / name),
                                      "secagg-roster": str(roster), "secagg-identity-key": str(keys[name])})
        site.policy.write_text(site.policy.read_text().replace("[secure_aggregation]\n",
                                                               "[secure_aggregation]\nauthenticated = true\n"))
        sites[name] = site
    return sites, Roster.from_file(roster)


def test_a_second_survivor_list_is_refused_by_the_site_handler_and_logged(hospitals):
    """A secure preparation sum through the real site ClientApps: after hosp-b signed the survivor list
    (query.secagg_consistency), a second, different list is refused naming the check, the refusal is the last entry
    of its audit log, and hosp-b then helps unmask nothing (its part of the sum was abandoned)."""
    sites, roster = hospitals
    ids = dict(enumerate(HOSPITALS, 1))
    setup = SecAggSetup.for_sites("prepare/consistency", sorted(ids), LAYOUT.length, max_dropouts=1)
    server = SecAggServer(setup, roster)
    config = ConfigRecord(PrepareRequest(prepare=PrepareConfig(**PREP), secagg=True, num_classes=2).encode())

    def send(sid: int, kind: str, record: dict, **extra):
        return sites[ids[sid]].send(kind, {"config": config, "secagg": ConfigRecord(record), **extra})

    adverts = []
    for sid in ids:
        reply = send(sid, "query.prepare_secagg", SecAggStart(setup, sid).to_record(),
                     layout=ConfigRecord(LAYOUT.to_record()))
        answered(reply)
        adverts.append(KeyAdvert.from_record(reply.content["secagg"]))
    book = server.collect_keys(adverts)
    inboxes = server.route_shares([ShareBundle.from_record(send(sid, "query.secagg_share", book.to_record())
                                                           .content["secagg"]) for sid in ids])
    for sid, inbox in inboxes.items():
        reply = send(sid, "query.secagg_mask", inbox.to_record())
        server.add_masked(MaskedInput.from_record(reply.content["secagg"], reply.content["masked"]["masked"].numpy()))
    lst = server.survivor_list()
    for sid in ids:
        reply = send(sid, "query.secagg_consistency", lst.to_record())
        answered(reply)
        server.add_survivor_signature(SurvivorSignature.from_record(reply.content["secagg"]))
    reply = send(2, "query.secagg_consistency", SurvivorList((2, 3), (1,), setup.round_id).to_record())
    assert reply.has_error() and f"{CHECK}: this site already signed the survivor list [1, 2, 3]" in \
        reply.error.reason, reply.error
    last = sites["hosp-b"].audit()[-1]
    assert (last["kind"], last["decision"], last["release"]) == ("query.secagg_consistency", "failed", None), last
    assert CHECK in last["error"]
    request = server.unmask_request()
    assert send(2, "query.secagg_unmask", request.to_record()).has_error()
    for sid in (1, 3):  # the others unmask the list they signed; two of three suffice (t = 2)
        answered(send(sid, "query.secagg_unmask", request.to_record()))


def test_in_a_neighbourhood_sum_a_site_counts_the_signatures_of_its_own_neighbourhood():
    """SecAgg+ graph (10 sites, degree 4: neighbourhoods of 5, t = 3): signatures of the right list from sites that
    do not hold site 1's shares do not count for site 1, however many; its own neighbours' do."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from magnet_core.federation.secagg_auth import SiteAuth
    from magnet_core.federation.secagg_graph import neighbourhood_graph

    idents = {i: SiteIdentity(f"hospital-{i:03d}", ed25519.Ed25519PrivateKey.generate()) for i in range(1, 11)}
    roster = Roster(sites={x.name: x.public_text() for x in idents.values()})
    setup = SecAggSetup.for_neighbourhoods("hood", range(1, 11), 8, 4)
    sites = {i: SecAggSite(setup, i, SiteAuth(idents[i], roster), b"ctx") for i in range(1, 11)}
    server = SecAggServer(setup, roster)
    server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(server.book_for(i)) for i, s in sites.items()])
    vectors = {i: np.random.default_rng(i).normal(0, 1, 8) for i in sites}
    for i, s in sites.items():
        server.add_masked(s.mask(inboxes[i], vectors[i]))
    consistency_round(server, sites)
    req = server.unmask_request()
    hood = neighbourhood_graph(setup.round_id, setup.site_ids, 4)[1]
    far = {u: g for u, g in req.survivor_signatures.items() if u not in hood and u != 1}
    assert len(far) >= setup.threshold
    with pytest.raises(SecAggError, match=rf"site 1: {CHECK}: only 1 valid signatures .* of its neighbourhood"):
        sites[1].unmask(UnmaskRequest(req.survivors, req.dropped, req.round_id, req.transcript_signatures, far))
    total = server.finish([sites[i].unmask(req) for i in req.survivors])
    assert np.max(np.abs(total - sum(vectors.values()))) <= 10 * FP
