"""Secure aggregation on a neighbourhood graph (SecAgg+, Bell et al. 2020) on the real state machines: the sum equals
the plain sum of the same quantized updates, with dropouts; the graph is derived by every site from public inputs and
a coordinator-chosen neighbour list is refused; too few survivors in a neighbourhood, or survivors split in two,
stop the round with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    KeyBook,
    MaskedInput,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    SecAggSite,
    ShareBundle,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
    consistency_round,
    decode_fixed,
    encode_fixed,
    run_local,
)
from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity, context_digest
from magnet_core.federation.secagg_graph import (
    choose_degree,
    connected,
    failure_bound,
    neighbourhood_graph,
    neighbourhood_threshold,
)

CLIP = 1.0


def _clipped(n, length=64, seed=0):
    """Updates clipped to norm CLIP, as a site clips them before encoding."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(1, n + 1):
        x = rng.normal(0, 1, length) * rng.uniform(0.2, 3.0)
        out[i] = x * min(1.0, CLIP / np.linalg.norm(x))
    return out


def _plain_sum(vectors, ids, n):
    """The plain sum of the same quantized updates (their fixed-point encodings summed in Z_2^64)."""
    acc = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for i in ids:
        acc += encode_fixed(vectors[i], DEFAULT_FRAC_BITS, n)
    return decode_fixed(acc)


def _drop_after(setup, share):
    """``share`` of the sites, evenly spread, that drop after sending their masked input."""
    ids = list(setup.site_ids)
    m = int(round(share * len(ids)))
    return ids[::max(1, len(ids) // max(m, 1))][:m]


@pytest.fixture(scope="module")
def consortium50():
    idents = {i: SiteIdentity(f"hospital-{i:03d}", ed25519.Ed25519PrivateKey.generate()) for i in range(1, 51)}
    roster = Roster(sites={x.name: x.public_text() for x in idents.values()})
    return roster, {i: SiteAuth(x, roster) for i, x in idents.items()}


# ----------------------------------------------------------------------------------------------- correct sums


@pytest.mark.parametrize("n,degree", [(20, 6), (50, 8)])
@pytest.mark.parametrize("dropping", [0.0, 0.1])
def test_neighbourhood_sum_equals_the_plain_sum_of_the_quantized_updates(n, degree, dropping):
    vectors = _clipped(n)
    setup = SecAggSetup.for_neighbourhoods(f"round-{n}", range(1, n + 1), 64, degree)
    after = _drop_after(setup, dropping)
    assert len(after) == int(round(dropping * n))
    total, server = run_local(setup, vectors, drop_after_mask=after)
    assert server.u3 == list(range(1, n + 1))  # dropping after masking: their inputs are in the sum
    np.testing.assert_array_equal(total, _plain_sum(vectors, server.u3, n))


def test_authenticated_neighbourhood_sum_with_dropouts_before_and_after_masking(consortium50):
    roster, auth = consortium50
    n, degree = 50, 8
    vectors = _clipped(n, seed=3)
    setup = SecAggSetup.for_neighbourhoods("auth-round", range(1, n + 1), 64, degree)
    ctx = context_digest({"w": np.arange(4.0)}, {"lr": 0.01})
    after = _drop_after(setup, 0.1)
    before = [7]
    total, server = run_local(setup, vectors, drop_before_mask=before, drop_after_mask=after,
                              auth={i: auth[i] for i in setup.site_ids}, roster=roster, context=ctx)
    assert server.u3 == [i for i in setup.site_ids if i not in before]
    np.testing.assert_array_equal(total, _plain_sum(vectors, server.u3, n))


def test_a_site_that_drops_before_masking_is_left_out_cleanly():
    n, degree = 20, 6
    vectors = _clipped(n, seed=1)
    setup = SecAggSetup.for_neighbourhoods("r-drop", range(1, n + 1), 64, degree)
    total, server = run_local(setup, vectors, drop_before_mask=[4, 13])
    assert server.u3 == [i for i in range(1, n + 1) if i not in (4, 13)]
    assert sorted(v for kind, v in server._secrets if kind == "mask") == [4, 13]  # only their mask keys rebuilt
    np.testing.assert_array_equal(total, _plain_sum(vectors, server.u3, n))


# ----------------------------------------------------------------------------------------------- the graph


def _stage2(setup, sites, server):
    server.collect_keys([s.advertise() for s in sites.values()])
    books = {i: server.book_for(i) for i in sites}
    bundles = {i: s.share(books[i]) for i, s in sites.items()}
    return books, bundles


def test_every_site_computes_the_same_graph_of_the_chosen_degree_and_it_changes_with_the_round():
    n, degree = 50, 8
    setup = SecAggSetup.for_neighbourhoods("round-a", range(1, n + 1), 8, degree)
    sites = {i: SecAggSite(setup, i) for i in setup.site_ids}
    server = SecAggServer(setup)
    graph = neighbourhood_graph("round-a", list(range(n, 0, -1)), degree)  # the order ids are given in is irrelevant
    assert all(s._graph() == graph for s in sites.values()) and server.graph == graph
    assert all(len(nb) == degree and i not in nb for i, nb in graph.items())
    assert all(i in graph[j] for i, nb in graph.items() for j in nb)  # symmetric
    assert connected(graph, graph)
    books, bundles = _stage2(setup, sites, server)
    for i in setup.site_ids:  # keys and shares only with the neighbours
        assert set(books[i].keys) == graph[i] | {i}
        assert set(bundles[i].ciphertexts) == graph[i]
    other = neighbourhood_graph("round-b", list(range(1, n + 1)), degree)
    assert other != graph
    assert neighbourhood_graph("round-a", list(range(1, n + 2)), degree) != graph  # and with the site ids


def test_a_coordinator_supplied_neighbour_list_is_refused():
    n, degree = 20, 4
    setup = SecAggSetup.for_neighbourhoods("r-book", range(1, n + 1), 8, degree)
    sites = {i: SecAggSite(setup, i) for i in setup.site_ids}
    server = SecAggServer(setup)
    server.collect_keys([s.advertise() for s in sites.values()])
    mine = set(server.book_for(1).keys)
    outsider = min(set(setup.site_ids) - mine)
    # the coordinator swaps one of site 1's neighbours for a site of its choosing
    swapped = sorted(mine - {max(mine - {1})}) + [outsider]
    fake = KeyBook({i: server.book.keys[i] for i in swapped}, setup.round_id)
    with pytest.raises(SecAggError, match=r"site 1: the key book holds sites \[\d+\] that are not its neighbours"):
        sites[1].share(fake)
    with pytest.raises(SecAggError, match="not its neighbours"):  # nor the complete book
        sites[1].share(server.book)
    sites[1].share(server.book_for(1))  # its own neighbourhood is accepted


def test_a_coordinator_supplied_neighbour_list_is_refused_with_signed_keys(consortium50):
    roster, auth = consortium50
    n, degree = 20, 4
    setup = SecAggSetup.for_neighbourhoods("r-book-auth", range(1, n + 1), 8, degree)
    sites = {i: SecAggSite(setup, i, auth[i]) for i in setup.site_ids}
    server = SecAggServer(setup, roster)
    server.collect_keys([s.advertise() for s in sites.values()])
    b = server.book
    ids = sorted(set(server.book_for(2).keys) | {min(set(setup.site_ids) - set(server.book_for(2).keys))})
    extended = KeyBook({i: b.keys[i] for i in ids}, b.round_id, {i: b.names[i] for i in ids},
                       {i: b.commits[i] for i in ids}, {i: b.signatures[i] for i in ids})
    with pytest.raises(SecAggError, match="not its neighbours"):  # every advert validly signed, one not a neighbour
        sites[2].share(extended)


# ----------------------------------------------------------------------------------------------- too few survivors


def _masked_round(setup, vectors, before=()):
    sites = {i: SecAggSite(setup, i) for i in setup.site_ids}
    server = SecAggServer(setup)
    books, bundles = _stage2(setup, sites, server)
    inboxes = server.route_shares(list(bundles.values()))
    for i, s in sites.items():
        if i not in before:
            server.add_masked(s.mask(inboxes[i], vectors[i]))
    return sites, server


def test_below_threshold_survivors_in_a_neighbourhood_abort_with_a_clear_error():
    n, degree = 20, 4  # neighbourhoods of 5 sites, threshold 3
    setup = SecAggSetup.for_neighbourhoods("r-thin", range(1, n + 1), 16, degree)
    assert setup.threshold == 3
    graph = neighbourhood_graph(setup.round_id, setup.site_ids, degree)
    target = 1
    gone = sorted(graph[target])[:3]  # 3 of site 1's 4 neighbours drop before masking: 2 of 5 left
    sites, server = _masked_round(setup, _clipped(n, 16), before=gone)
    req = server.unmask_request()
    with pytest.raises(SecAggError, match=r"site 1: only 2 of the 5 sites of its neighbourhood .* threshold is 3 "
                                          "per neighbourhood; refusing to help unmask"):
        sites[target].unmask(req)

    # all masked, but site 1 and 2 of its neighbours do not answer the unmask request: 2 of the 5 holders of site
    # 1's self-mask seed are left, and the coordinator stops naming a site whose secret cannot be rebuilt
    sites, server = _masked_round(setup, _clipped(n, 16))
    req = server.unmask_request()
    silent = {target, *sorted(graph[target])[:2]}
    replies = [sites[i].unmask(req) for i in req.survivors if i not in silent]
    with pytest.raises(SecAggError, match=r"only 2 of the share holders of secagg site \d+ \(its neighbourhood "
                                          r"\[[\d, ]+\]\) answered, threshold 3: its self-mask seed cannot be "
                                          "reconstructed"):
        server.finish(replies)


def test_survivors_split_in_two_by_the_graph_are_refused():
    n, degree = 10, 2  # a ring: two dropped sites far apart cut it in two arcs
    setup = SecAggSetup.for_neighbourhoods("r-ring", range(1, n + 1), 8, degree)
    graph = neighbourhood_graph(setup.round_id, setup.site_ids, degree)
    start = 1
    ring, prev = [start], None
    while len(ring) < n:  # walk the ring
        nxt = min(v for v in graph[ring[-1]] if v != prev and v not in ring)
        prev = ring[-1]
        ring.append(nxt)
    cut = [ring[0], ring[5]]
    survivors = [i for i in setup.site_ids if i not in cut]
    assert not connected(graph, survivors)
    sites, server = _masked_round(setup, _clipped(n, 8), before=cut)
    req = server.unmask_request()
    for i in survivors:
        with pytest.raises(SecAggError, match="not connected in the neighbourhood graph"):
            sites[i].unmask(req)


# ----------------------------------------------------------------------------------------------- records, setup


def test_stage_by_stage_through_records_and_serialised_state():
    n, degree = 12, 4
    vectors = _clipped(n, 16, seed=5)
    setup = SecAggSetup.from_record(SecAggSetup.for_neighbourhoods("r-rec", range(1, n + 1), 16, degree).to_record())
    assert setup.graph_degree == degree
    state = {i: SecAggSite(setup, i).to_state() for i in setup.site_ids}
    server = SecAggServer(setup)
    adverts = []
    for i in setup.site_ids:
        adverts.append(SecAggSite.from_state(state[i]).advertise())
    server.collect_keys(adverts)
    bundles = []
    for i in setup.site_ids:
        s = SecAggSite.from_state(state[i])
        bundles.append(ShareBundle.from_record(s.share(KeyBook.from_record(server.book_for(i).to_record()))
                                               .to_record()))
        state[i] = s.to_state()
    inboxes = server.route_shares(bundles)
    for i in setup.site_ids:
        s = SecAggSite.from_state(state[i])
        m = s.mask(ShareInbox.from_record(inboxes[i].to_record()), vectors[i])
        server.add_masked(MaskedInput.from_record(m.to_record(), m.masked))
        state[i] = s.to_state()
        assert json.loads(state[i])["participants"]
    req = UnmaskRequest.from_record(server.unmask_request().to_record())
    replies = [UnmaskShares.from_record(SecAggSite.from_state(state[i]).unmask(req).to_record())
               for i in setup.site_ids if i != 3]
    np.testing.assert_array_equal(server.finish(replies), _plain_sum(vectors, setup.site_ids, n))


def test_the_complete_graph_record_is_unchanged_and_bad_degrees_are_refused():
    full = SecAggSetup.for_sites("r", range(1, 6), 8, max_dropouts=1)
    assert "graph-degree" not in full.to_record() and full.graph_degree == 0
    # the complete graph's messages carry nothing new: one book for all, inboxes without a participant list
    sites = {i: SecAggSite(full, i) for i in full.site_ids}
    server = SecAggServer(full)
    book = server.collect_keys([s.advertise() for s in sites.values()])
    assert all(server.book_for(i) is book for i in full.site_ids) and server.graph is None
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    assert all(set(x.to_record()) == {"recipient", "from", "ciphertexts", "round-id", "protocol"}
               for x in inboxes.values())
    with pytest.raises(SecAggError, match="must be even"):
        SecAggSetup.for_neighbourhoods("r", range(1, 21), 8, 5)
    with pytest.raises(SecAggError, match="must be even"):
        SecAggSetup.for_neighbourhoods("r", range(1, 6), 8, 6)
    with pytest.raises(SecAggError, match="a majority"):
        SecAggSetup.for_neighbourhoods("r", range(1, 21), 8, 6, threshold=3)


def test_the_chosen_degree_is_the_smallest_meeting_the_failure_bound():
    for n in (50, 100, 1000):
        k = choose_degree(n, 0.1)
        assert k > 0 and k % 2 == 0
        assert failure_bound(n, k, 0.1) <= 2.0**-20 < failure_bound(n, k - 2, 0.1)
    assert choose_degree(20, 0.1) == 0  # too few sites for a sparse graph to pay: the complete graph
    assert choose_degree(1000, 0.1) < 0.05 * 1000
    assert neighbourhood_threshold(8) == 5


# ----------------------------------------------------------------------------------------------- authenticated


def test_a_participant_list_differing_between_sites_is_refused_before_unmasking(consortium50):
    roster, auth = consortium50
    n, degree = 20, 4
    setup = SecAggSetup.for_neighbourhoods("r-parts", range(1, n + 1), 8, degree)
    sites = {i: SecAggSite(setup, i, auth[i], b"ctx") for i in setup.site_ids}
    server = SecAggServer(setup, roster)
    server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(server.book_for(i)) for i, s in sites.items()])
    graph = server.graph
    far = min(set(setup.site_ids) - graph[1] - {1})
    # site 1 is told a participant list without a site that is not its neighbour (it cannot see that directly)
    inboxes[1] = ShareInbox(1, inboxes[1].ciphertexts, setup.round_id,
                            {u: nm for u, nm in inboxes[1].participants.items() if u != far})
    # a list leaving out a neighbour that dealt shares, or renaming one, is refused at once
    nb = min(graph[2])
    with pytest.raises(SecAggError, match="does not hold this site and every neighbour"):
        SecAggSite.from_state(sites[2].to_state(), auth[2]).mask(
            ShareInbox(2, inboxes[2].ciphertexts, setup.round_id,
                       {u: nm for u, nm in inboxes[2].participants.items() if u != nb}), np.zeros(8))
    with pytest.raises(SecAggError, match="wrong name"):
        SecAggSite.from_state(sites[2].to_state(), auth[2]).mask(
            ShareInbox(2, inboxes[2].ciphertexts, setup.round_id,
                       {**inboxes[2].participants, nb: inboxes[2].participants[far]}), np.zeros(8))
    for i, s in sites.items():
        server.add_masked(s.mask(inboxes[i], np.zeros(8)))
    with pytest.raises(SecAggError, match="do not match the sites that shared secrets"):
        sites[1].sign_survivors(server.survivor_list())  # site 1 was told another participant list
    consistency_round(server, sites, absent=(1,))
    req = server.unmask_request()
    for i in (2, far):
        with pytest.raises(SecAggError, match=r"secagg site 1 \('hospital-001'\) did not sign the transcript"):
            sites[i].unmask(req)


def test_a_neighbour_dealing_bad_shares_is_named_and_excluded(consortium50):
    from test_secagg_auth import CorruptSharesSite as CorruptShares  # the same dishonest site, one definition

    roster, auth = consortium50
    n, degree, cheater = 20, 6, 5
    vectors = _clipped(n, 32, seed=9)
    setup = SecAggSetup.for_neighbourhoods("r-cheat", range(1, n + 1), 32, degree)

    def make(setup, i, *a):
        return (CorruptShares if i == cheater else SecAggSite)(setup, i, *a)

    total, server = run_local(setup, vectors, drop_after_mask=[11], auth={i: auth[i] for i in setup.site_ids},
                              roster=roster, context=b"ctx", site_class=make)
    assert set(server.excluded) == {cheater}
    honest = [i for i in setup.site_ids if i != cheater]
    assert server.included == honest
    np.testing.assert_array_equal(total, _plain_sum(vectors, honest, n))
