"""Different survivor lists sent to different sites of one secure sum (issue 21: the bound that remains, and the
site policy's guard against it).

Authenticated sums now have the consistency check of Bonawitz et al. 2017 (stage 3a, tests/test_secagg_consistency.py):
every survivor signs the survivor list U3 once, and a site unmasks only a list it signed that >= t survivors signed.
Honest share holders of site A reveal either a share of A's self-mask seed (told A survived) or of A's mask key (told A
dropped), never both; a site colluding with the coordinator signs both lists and reveals both. So the strongest
coordinator splits the honest sites at stage 3a already (one group signs "A survived", the other "A dropped"); each
list then needs t signatures, honest sites sign one, and with c colluding sites it still gets both secrets of A, and
A's input from that one sum, whenever 2t <= n + c: the same bound as without the check (what the check adds is that
the sites verify the list instead of taking the coordinator's word, and that a second list to a site that signed is
refused). The first test plays that split on the real state machines; the second shows that 2t > n + c stops it; the
third that a site whose policy assumes colluding sites (``privacy.colluding_sites``) refuses, at stage 0, a secure
sum whose threshold is too low for them, naming the line (through the real site handlers)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from test_malicious_coordinator import PREP, Site, answered, raw_site
from test_secagg_auth import _auth, consortium  # noqa: F401  (the fixture: five enrolled sites)

from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    SecAggSite,
    StatsLayout,
    SurvivorList,
    UnmaskRequest,
    _pairwise_seed,
    _self_seed,
    decode_fixed,
    prg,
    shamir_combine,
)
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import SecAggStart

FP = 2.0 ** -(DEFAULT_FRAC_BITS + 1)


def _two_lists_attack(consortium, n: int, threshold: int, colluder: int, target: int = 1):  # noqa: F811
    """One authenticated sum over n sites; at stage 3a the coordinator asks the target and some honest sites to sign
    "everybody survived", the other honest sites "the target dropped"; the colluder signs both and hands over its
    shares of both of the target's secrets. Each group is then asked to unmask its own list with the signatures on
    it. Returns (the target's input, what the coordinator recovered or None)."""
    auth = _auth(consortium, n)
    setup = SecAggSetup(f"r{n}{threshold}", tuple(range(1, n + 1)), threshold, 8)
    sites = {i: SecAggSite(setup, i, auth[i], b"ctx") for i in range(1, n + 1)}
    server = SecAggServer(setup, consortium[0])
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    x = {i: np.random.default_rng(i).normal(0, 1, 8) for i in sites}
    masked = {}
    for i, s in sites.items():
        masked[i] = s.mask(inboxes[i], x[i])
        server.add_masked(masked[i])
    honest = [i for i in sites if i != colluder]
    told_survived = [target] + [i for i in honest if i != target][:max(0, threshold - 2)]
    told_dropped = [i for i in honest if i not in told_survived]
    lists = {"full": server.survivor_list()}
    lists["without"] = SurvivorList(tuple(i for i in lists["full"].survivors if i != target), (target,),
                                    setup.round_id)
    signed: dict[str, dict[int, bytes]] = {"full": {}, "without": {}}
    for which, group in (("full", told_survived + [colluder]), ("without", told_dropped + [colluder])):
        for i in group:
            try:
                signed[which][i] = sites[i].sign_survivors(lists[which]).signature
            except SecAggError:
                pass
        sites[colluder]._signed_list = None  # the colluder runs modified code: it signs every list it is sent
    transcripts = server._transcripts  # every survivor signed its transcript at masking
    full = UnmaskRequest(lists["full"].survivors, (), setup.round_id, dict(transcripts), signed["full"])
    without = UnmaskRequest(lists["without"].survivors, (target,), setup.round_id,
                            {i: g for i, g in transcripts.items() if i != target}, signed["without"])
    b_shares = {colluder: sites[colluder]._shares[target][0]}
    s_shares = {colluder: sites[colluder]._shares[target][1]}
    for i in told_survived:
        try:
            b_shares[i] = sites[i].unmask(full).self_shares[target]
        except SecAggError:
            pass
    for i in told_dropped:
        try:
            s_shares[i] = sites[i].unmask(without).key_shares[target]
        except SecAggError:
            pass
    if len(b_shares) < threshold or len(s_shares) < threshold:
        return x[target], None
    b, s_key = shamir_combine(dict(list(b_shares.items())[:threshold])), shamir_combine(
        dict(list(s_shares.items())[:threshold]))
    y = masked[target].masked.copy() - prg(_self_seed(b, setup.round_id, target), setup.vector_length)
    for v in sites:
        if v != target:
            p = prg(_pairwise_seed(s_key, book.keys[v][1], setup.round_id, target, v), setup.vector_length)
            y = y - p if v > target else y + p
    return x[target], decode_fixed(y)


def test_different_survivor_lists_with_one_colluding_site_unmask_a_sites_input(consortium):  # noqa: F811
    """The bound that remains, played: 3 sites, threshold 2 (the preparation's default of one dropout), site 3
    colluding. Every honest site follows the protocol, checks the transcript signatures and signs one survivor list
    (the consistency check), and site 1's input still comes back to fixed-point resolution: 2t = 4 <= n + c."""
    x, recovered = _two_lists_attack(consortium, 3, 2, colluder=3)
    assert recovered is not None and np.max(np.abs(recovered - x)) <= FP


@pytest.mark.parametrize("n,threshold", [(3, 3), (5, 4)])
def test_a_threshold_above_half_of_holders_and_colluders_stops_it(consortium, n, threshold):  # noqa: F811
    """2t > n + c: the honest sites cannot give enough shares of both secrets (3 sites t = 3; 5 sites t = 4)."""
    assert _two_lists_attack(consortium, n, threshold, colluder=n)[1] is None


def _prepare_stage0(site: Site, n: int, threshold: int, run: int):
    layout = StatsLayout.from_feature_lists([{"mRNA": [f"g{j}" for j in range(12)]}], 2)
    setup = SecAggSetup(f"prepare/{n}-{threshold}-{run}", tuple(range(1, n + 1)), threshold, layout.length)
    request = PrepareRequest(prepare=PrepareConfig(**PREP), secagg=True, num_classes=2)
    return site.send("query.prepare_secagg", {"config": ConfigRecord(request.encode()),
                                              "layout": ConfigRecord(layout.to_record()),
                                              "secagg": ConfigRecord(SecAggStart(setup, 1).to_record())}, run=run)


def test_a_site_assuming_a_colluding_site_refuses_a_sum_whose_threshold_is_too_low(tmp_path):
    """Policy ``colluding_sites = 1``: a secure sum of 3 sites with threshold 2 is refused at stage 0 naming the line
    (nothing computed, recorded in the audit log); with threshold 3 it is answered."""
    site = Site(tmp_path / "site", {"raw-dir": str(raw_site(tmp_path / "raw")), "prepared-dir":
                                    str(tmp_path / "prepared"), "site-name": "h0"})
    site.policy.write_text(site.policy.read_text().replace("delta = 1e-05\n", "delta = 1e-05\ncolluding_sites = 1\n"))
    reply = _prepare_stage0(site, 3, 2, run=1)
    assert reply.has_error(), "a sum that one colluding site could open by two survivor lists was answered"
    line = next(n for n, t in enumerate(site.policy.read_text().splitlines(), 1) if t.startswith("colluding_sites"))
    assert f"line {line}: privacy.colluding_sites = 1" in reply.error.reason, reply.error.reason
    assert "2t <= 3 + 1" in reply.error.reason
    last = site.audit()[-1]
    assert (last["decision"], last["rule"], last["release"]) == ("refused", "privacy.colluding_sites", None), last
    answered(_prepare_stage0(site, 3, 3, run=2))
