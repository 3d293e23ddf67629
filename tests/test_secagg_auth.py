"""Authenticated secure aggregation against a malicious coordinator and dishonest sites, on the real state machines
(SecAggSite / SecAggServer / run_local, which both apps drive): substituted keys, fake sites and different models
are refused by name; bad shares name their dealer and the sum of the others is still recovered; a site that skips
clipping is caught on the decoded sum."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_core.federation import secagg
from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    ExclusionRequest,
    KeyAdvert,
    KeyBook,
    MaskedInput,
    PairwiseSeeds,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    SecAggSite,
    ShareBundle,
    ShareInbox,
    SharesRefuted,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    UpdateLayout,
    _pairwise_seed,
    _raw_private,
    _raw_public,
    _self_seed,
    consistency_round,
    decode_fixed,
    prg,
    run_local,
    shamir_combine,
)
from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity, context_digest
from magnet_core.federation.secagg_bounds import clip_bound_problems
from magnet_core.model.config import ModelConfig
from magnet_core.model.network import build_model
from magnet_core.protocol.secagg import ShareProof
from server.pki import make_site_key

FP = 2.0 ** -(DEFAULT_FRAC_BITS + 1)
NAMES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """Five sites with keys made as the consortium PKI makes them (`magnet-fl pki site-key`: EC P-384, OpenSSH),
    the roster as registered_sites.csv, and every site's own SiteAuth (its key file + its copy of the roster)."""
    root = tmp_path_factory.mktemp("pki")
    rows = ["site,public_key"]
    for name in NAMES:
        _, pub = make_site_key(root / name, comment=name)
        rows.append(f"{name},{pub.read_text().strip()}")
    (root / "registered_sites.csv").write_text("\n".join(rows) + "\n")
    roster = Roster.from_file(root / "registered_sites.csv")
    idents = {name: SiteIdentity.from_key_file(name, root / name / "node_auth_key") for name in NAMES}
    return roster, idents


def _auth(consortium, n):
    roster, idents = consortium
    return {i: SiteAuth(idents[NAMES[i - 1]], roster) for i in range(1, n + 1)}


def _vectors(n, length=24, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.normal(0, 1, length) for i in range(1, n + 1)}


# ----------------------------------------------------------------------------------------------- honest rounds


@pytest.mark.parametrize("n,before,after", [(3, (), ()), (3, (3,), ()), (3, (), (2,)), (5, (2,), (4,))])
def test_authenticated_sum_equals_the_plain_sum_with_dropouts(consortium, n, before, after):
    vectors = _vectors(n)
    setup = SecAggSetup.for_sites("r1", list(vectors), 24, max_dropouts=(n - 1) // 2)
    total, server = run_local(setup, vectors, before, after, auth=_auth(consortium, n), roster=consortium[0],
                              context=b"model-hash")
    expected = sum(v for i, v in vectors.items() if i not in before)
    assert np.max(np.abs(total - expected)) <= n * FP
    assert server.included == [i for i in vectors if i not in before] and not server.excluded
    assert not server._masked  # the kept masked vectors are dropped once the sum is done


def test_stage_by_stage_through_records_and_serialised_state(consortium):
    """What a Flower round carries: every message through its record, each site's state through to_state (the
    identity key and roster are not in the state: the site passes them again)."""
    auth = _auth(consortium, 3)
    vectors = _vectors(3, 16, seed=4)
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 16, 1)
    state = {i: SecAggSite(setup, i, auth[i], b"ctx").to_state() for i in vectors}
    assert all("PRIVATE" not in s and "roster" not in s for s in state.values())
    server = SecAggServer(setup, consortium[0])

    def step(i, fn):
        site = SecAggSite.from_state(state[i], auth[i])
        out = fn(site)
        state[i] = site.to_state()
        return out

    adverts = [KeyAdvert.from_record(step(i, lambda s: s.advertise()).to_record()) for i in vectors]
    book = KeyBook.from_record(server.collect_keys(adverts).to_record())
    bundles = [ShareBundle.from_record(step(i, lambda s: s.share(book)).to_record()) for i in vectors]
    inboxes = {v: ShareInbox.from_record(x.to_record()) for v, x in server.route_shares(bundles).items()}
    for i in vectors:
        m = step(i, lambda s: s.mask(inboxes[i], vectors[i]))
        server.add_masked(MaskedInput.from_record(m.to_record(), m.masked))
    lst = SurvivorList.from_record(server.survivor_list().to_record())  # stage 3a: the consistency check
    for i in vectors:
        server.add_survivor_signature(SurvivorSignature.from_record(step(i, lambda s: s.sign_survivors(lst))
                                                                    .to_record()))
    req = UnmaskRequest.from_record(server.unmask_request().to_record())
    replies = [UnmaskShares.from_record(step(i, lambda s: s.unmask(req)).to_record()) for i in vectors]
    assert np.allclose(server.finish(replies), sum(vectors.values()), atol=3 * FP)
    with pytest.raises(SecAggError, match="started with authentication"):
        SecAggSite.from_state(state[1])  # a state cannot be continued without authentication


def test_the_coordinator_refuses_unsigned_or_foreign_adverts(consortium):
    roster, idents = consortium
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 8, 1)
    server = SecAggServer(setup, roster)
    assert "carry no signature" in server.check_advert(SecAggSite(setup, 1).advertise())
    ok = SecAggSite(setup, 2, SiteAuth(idents["hospital-b"], roster)).advertise()
    assert server.check_advert(ok) == ""
    renamed = KeyAdvert(ok.site_id, ok.enc_pk, ok.mask_pk, "hospital-c", ok.b_commit, ok.signature)
    assert "not signed by 'hospital-c'" in server.check_advert(renamed)


# ----------------------------------------------------------------------------------------------- malicious coordinator


def _substitute(book: KeyBook, target: int, fake_keys: dict[int, tuple[bytes, bytes]]) -> KeyBook:
    """The coordinator's key book for ``target``: every other site's keys replaced by keys it holds itself."""
    keys = {i: (fake_keys[i] if i != target else k) for i, k in book.keys.items()}
    return KeyBook(keys, book.round_id, dict(book.names), dict(book.commits), dict(book.signatures))


def _key_substitution_attack(setup, sites, server, target, x):
    """Play the coordinator that substitutes the other sites' keys in ``target``'s key book: it then reads the
    target's shares (encrypted to its own keys), reconstructs the target's self-mask seed and knows every pairwise
    mask of the target, so it recovers the target's input from the masked vector alone."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    book = server.collect_keys([s.advertise() for s in sites.values()])
    fake_sk = {i: (_raw_private(X25519PrivateKey.generate()), _raw_private(X25519PrivateKey.generate()))
               for i in book.keys if i != target}
    fake_pk = {i: tuple(_raw_public(X25519PrivateKey.from_private_bytes(k)) for k in pair)
               for i, pair in fake_sk.items()}
    bundle = sites[target].share(_substitute(book, target, fake_pk))  # refused here when authenticated
    rid, t = setup.round_id, setup.threshold
    b_shares = {}
    for v, ct in bundle.ciphertexts.items():
        shared = X25519PrivateKey.from_private_bytes(fake_sk[v][0]).exchange(
            X25519PrivateKey.from_private_bytes(sites[target]._enc_sk).public_key())
        aead = ChaCha20Poly1305(secagg._kdf(shared, "enc", rid, target, v))
        plain = aead.decrypt(ct[:12], ct[12:], f"magnet-fl/secagg/share/{rid}/{target}->{v}".encode())
        b_shares[v] = plain[:secagg.SHARE_BYTES]
    b = shamir_combine(dict(list(b_shares.items())[:t]))
    # an inbox "from" the fake sites so the target masks against them
    inbox = {}
    for v in fake_sk:
        shared = X25519PrivateKey.from_private_bytes(fake_sk[v][0]).exchange(
            X25519PrivateKey.from_private_bytes(sites[target]._enc_sk).public_key())
        aead = ChaCha20Poly1305(secagg._kdf(shared, "enc", rid, v, target))
        inbox[v] = b"\0" * 12 + aead.encrypt(b"\0" * 12, bytes(2 * secagg.SHARE_BYTES),
                                             f"magnet-fl/secagg/share/{rid}/{v}->{target}".encode())
    y = sites[target].mask(ShareInbox(target, inbox, rid), x).masked.copy()
    y -= prg(_self_seed(b, rid, target), setup.vector_length)
    target_mask_pk = _raw_public(X25519PrivateKey.from_private_bytes(sites[target]._mask_sk))
    for v in fake_sk:
        p = prg(_pairwise_seed(fake_sk[v][1], target_mask_pk, rid, v, target), setup.vector_length)
        y = y - p if v > target else y + p
    return decode_fixed(y)


def test_without_authentication_substituted_keys_reveal_a_site_input():
    """The attack of issue 21 on the protocol without identities (what main runs): the input comes back exactly."""
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 16, 1)
    sites = {i: SecAggSite(setup, i) for i in (1, 2, 3)}
    x = np.random.default_rng(1).normal(0, 1, 16)
    recovered = _key_substitution_attack(setup, sites, SecAggServer(setup), 2, x)
    assert np.max(np.abs(recovered - x)) <= FP


def test_substituted_keys_are_refused_naming_the_site(consortium):
    auth = _auth(consortium, 3)
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 16, 1)
    sites = {i: SecAggSite(setup, i, auth[i], b"ctx") for i in (1, 2, 3)}
    server = SecAggServer(setup, consortium[0])
    with pytest.raises(SecAggError, match=r"secagg site 1 \('hospital-a'\): its public keys are not signed .*"
                                          r"substituted keys.*secagg site 3 \('hospital-c'\)"):
        _key_substitution_attack(setup, sites, server, 2, np.ones(16))
    assert sites[2]._keys == {} and 1 not in sites[2]._shares  # nothing derived from the substituted book


def test_a_fake_site_not_in_the_roster_is_refused(consortium):
    """The coordinator plans a sum with a site it plays itself (its own identity key, a name not enrolled, or an
    enrolled name): every real site refuses the key book, naming it."""
    roster, idents = consortium
    auth = _auth(consortium, 2)
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 8, 1)
    sites = {i: SecAggSite(setup, i, auth[i], b"ctx") for i in (1, 2)}
    from cryptography.hazmat.primitives.asymmetric import ec

    fake_key = ec.generate_private_key(ec.SECP384R1())
    for fake_name in ("hospital-x", "hospital-c"):
        fake_roster = Roster(sites={**roster.sites, fake_name: SiteIdentity(fake_name, fake_key).public_text()}
                             ) if fake_name not in roster.sites else None
        fake = SecAggSite(setup, 3, SiteAuth(SiteIdentity(fake_name, fake_key), fake_roster)) if fake_roster \
            else SecAggSite(setup, 3)
        adverts = [s.advertise() for s in sites.values()]
        a = fake.advertise()
        if fake_roster is None:  # an enrolled name with the coordinator's own key and signature
            from magnet_core.federation.secagg_auth import advert_payload, seed_commitment

            commit = seed_commitment("r", 3, b"\0" * 32)
            sig = SiteIdentity(fake_name, fake_key).sign(advert_payload("r", 3, fake_name, a.enc_pk, a.mask_pk,
                                                                        commit))
            a = KeyAdvert(3, a.enc_pk, a.mask_pk, fake_name, commit, sig)
        book = SecAggServer(setup).collect_keys(adverts + [a])  # a coordinator without the roster check
        book = KeyBook(book.keys, "r", {**{i: x.site_name for i, x in enumerate(adverts, 1)}, 3: a.site_name},
                       {**{i: x.b_commit for i, x in enumerate(adverts, 1)}, 3: a.b_commit},
                       {**{i: x.signature for i, x in enumerate(adverts, 1)}, 3: a.signature})
        why = "not a site of the roster" if fake_name == "hospital-x" else "not signed by 'hospital-c'"
        for s in sites.values():
            with pytest.raises(SecAggError, match=rf"secagg site 3 \('{fake_name}'\): .*{why}"):
                s.share(book)
        with pytest.raises(SecAggError, match="secagg site 3"):
            SecAggServer(setup, roster).collect_keys(adverts + [a])  # and an honest coordinator refuses it


def _to_unmask(consortium, n, contexts, vectors):
    auth = _auth(consortium, n)
    setup = SecAggSetup.for_sites("r", list(range(1, n + 1)), len(vectors[1]), (n - 1) // 2)
    sites = {i: SecAggSite(setup, i, auth[i], contexts[i]) for i in range(1, n + 1)}
    server = SecAggServer(setup, consortium[0])
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    for i, s in sites.items():
        server.add_masked(s.mask(inboxes[i], vectors[i]))
    consistency_round(server, sites)
    return setup, sites, server


def test_different_models_sent_to_two_sites_are_refused_before_unmasking(consortium):
    """Site 1 got another global model (and round config) than sites 2 and 3: every site refuses to unmask."""
    glob = {"w": np.zeros(4, np.float32)}
    other = {"w": np.full(4, 1e-3, np.float32)}
    contexts = {1: context_digest(other, {"lr": 0.1}), 2: context_digest(glob, {"lr": 0.1}),
                3: context_digest(glob, {"lr": 0.1})}
    assert contexts[1] != contexts[2] and context_digest(glob, {"lr": 0.2}) != contexts[2]
    _, sites, server = _to_unmask(consortium, 3, contexts, _vectors(3, 8))
    req = server.unmask_request()
    with pytest.raises(SecAggError, match=r"secagg site 2 \('hospital-b'\), secagg site 3 \('hospital-c'\) did "
                                          "not sign the transcript"):
        sites[1].unmask(req)
    for i in (2, 3):
        with pytest.raises(SecAggError, match=r"secagg site 1 \('hospital-a'\) did not sign the transcript"):
            sites[i].unmask(req)


def test_different_key_books_or_participant_lists_are_refused_before_unmasking(consortium):
    """The coordinator tells site 3 that site 1 dropped before sharing (a smaller U2) while 1 and 2 see all three:
    the transcripts differ and nobody unmasks. A missing or forged transcript signature is refused too."""
    n = 3
    auth = _auth(consortium, n)
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 8, 1)
    sites = {i: SecAggSite(setup, i, auth[i], b"ctx") for i in (1, 2, 3)}
    server = SecAggServer(setup, consortium[0])
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    inboxes[3] = ShareInbox(3, {2: inboxes[3].ciphertexts[2]}, "r")
    vectors = _vectors(3, 8)
    for i, s in sites.items():
        server.add_masked(s.mask(inboxes[i], vectors[i]))
    lst = server.survivor_list()  # site 3 cannot sign a list naming site 1, which it never got shares from
    with pytest.raises(SecAggError, match="do not match the sites that shared secrets"):
        sites[3].sign_survivors(lst)
    for i in (1, 2):
        server.add_survivor_signature(sites[i].sign_survivors(lst))
    req = server.unmask_request()
    with pytest.raises(SecAggError, match="secagg site 3 .* did not sign the transcript"):
        sites[1].unmask(req)
    _, sites, server = _to_unmask(consortium, 3, dict.fromkeys((1, 2, 3), b"ctx"), vectors)
    req = server.unmask_request()
    forged = UnmaskRequest(req.survivors, req.dropped, req.round_id, {**req.transcript_signatures,
                                                                      3: req.transcript_signatures[2]},
                           req.survivor_signatures)
    with pytest.raises(SecAggError, match="secagg site 3 .* did not sign"):
        sites[1].unmask(forged)
    with pytest.raises(SecAggError, match="secagg site 2 .* did not sign"):
        sites[1].unmask(UnmaskRequest(req.survivors, req.dropped, req.round_id, {}, req.survivor_signatures))


# ----------------------------------------------------------------------------------------------- dishonest sites


class CorruptSharesSite(SecAggSite):
    """A site running modified code: it deals Shamir shares off its polynomial (every share + 1), signed as its
    own, and otherwise follows the protocol."""

    def share(self, book):
        real = secagg.shamir_split

        def bad(secret, threshold, xs):
            return {x: (int.from_bytes(v, "big") + 1).to_bytes(secagg.SHARE_BYTES, "big")
                    for x, v in real(secret, threshold, xs).items()}

        secagg.shamir_split = bad
        try:
            return super().share(book)
        finally:
            secagg.shamir_split = real


def _cheater_at(i):
    return lambda setup, site_id, *a: (CorruptSharesSite if site_id == i else SecAggSite)(setup, site_id, *a)


def _clipped_updates(n, length, seed=0, clip=1.0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(1, n + 1):
        u = rng.normal(0, 1, length)
        out[i] = u * min(1.0, clip / np.linalg.norm(u))
    return out


def test_without_authentication_corrupted_shares_break_the_sum_and_name_nobody():
    """What main does: the round's sum is garbage (or the round fails) and nothing names the dealer."""
    vectors = _clipped_updates(3, 32)
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 32, 1)
    try:
        total, server = run_local(setup, vectors, site_class=_cheater_at(2))
    except SecAggError as exc:
        assert "site 2" not in str(exc)
    else:
        assert np.max(np.abs(total - sum(vectors.values()))) > 1.0
        assert not getattr(server, "excluded", {})


@pytest.mark.parametrize("n,cheater,before", [(3, 2, ()), (5, 4, ()), (5, 1, (3,)), (5, 3, (3,))],
                         ids=["3-sites", "5-sites", "5-sites-one-dropped", "5-sites-cheater-dropped"])
def test_corrupted_shares_name_their_dealer_and_the_round_recovers_without_it(consortium, n, cheater, before):
    vectors = _clipped_updates(n, 48, seed=n)
    setup = SecAggSetup.for_sites("r", list(vectors), 48, (n - 1) // 2)
    auth = _auth(consortium, n)
    with pytest.raises(SharesRefuted, match=rf"bad shares from secagg site {cheater} \('{NAMES[cheater - 1]}'\)"):
        sites = {i: _cheater_at(cheater)(setup, i, auth[i], b"ctx") for i in vectors}
        server = SecAggServer(setup, consortium[0])
        book = server.collect_keys([s.advertise() for s in sites.values()])
        inboxes = server.route_shares([s.share(book) for s in sites.values()])
        for i, s in sites.items():
            if i not in before:
                server.add_masked(s.mask(inboxes[i], vectors[i]))
        consistency_round(server, sites)
        req = server.unmask_request()
        server.finish([sites[i].unmask(req) for i in req.survivors])
    request = ExclusionRequest.from_record(server.exclusion_request().to_record())
    assert request.senders == (cheater,)
    seeds = [PairwiseSeeds.from_record(sites[i].exclude(request).to_record()) for i in server.included]
    with pytest.raises(SecAggError, match="a second one"):
        sites[server.included[0]].exclude(request)
    total = server.finish_excluding(seeds)
    honest = [i for i in vectors if i != cheater and i not in before]
    assert server.included == honest and set(server.excluded) == {cheater}
    assert np.max(np.abs(total - sum(vectors[i] for i in honest))) <= n * FP
    # the same through run_local
    total2, server2 = run_local(setup, vectors, before, auth=auth, roster=consortium[0], context=b"ctx",
                                site_class=_cheater_at(cheater))
    assert server2.included == honest and np.max(np.abs(total2 - total)) <= 2 * n * FP


def test_the_coordinator_cannot_frame_an_honest_site(consortium):
    """An exclusion request is answered only with valid evidence: shares its dealer signed that contradict its
    commitment. Honest shares, forged signatures, too few shares, or a second request are refused."""
    vectors = _vectors(3, 8)
    setup, sites, server = _to_unmask(consortium, 3, dict.fromkeys((1, 2, 3), b"ctx"), vectors)
    req = server.unmask_request()
    replies = {i: sites[i].unmask(req) for i in (1, 2, 3)}
    honest = ShareProof(3, "self", {1: replies[1].self_shares[3], 2: replies[2].self_shares[3]},
                        {1: replies[1].self_signatures[3], 2: replies[2].self_signatures[3]})
    with pytest.raises(SecAggError, match="interpolate to the committed secret"):
        sites[1].exclude(ExclusionRequest((honest,), "r"))
    altered = (int.from_bytes(honest.shares[2], "big") + 1).to_bytes(secagg.SHARE_BYTES, "big")
    forged = ShareProof(3, "self", {**honest.shares, 2: altered}, honest.signatures)
    with pytest.raises(SecAggError, match="revealed by secagg site 2 is not signed by the sender"):
        sites[1].exclude(ExclusionRequest((forged,), "r"))
    with pytest.raises(SecAggError, match="need 2"):
        sites[1].exclude(ExclusionRequest((ShareProof(3, "self", {1: honest.shares[1]}, honest.signatures),), "r"))
    # a reply whose share was altered by its sender is discarded and the sender named; the sum still comes out
    setup5, sites5, server5 = _to_unmask(consortium, 5, dict.fromkeys(range(1, 6), b"ctx"), _vectors(5, 8))
    req5 = server5.unmask_request()
    rep5 = {i: sites5[i].unmask(req5) for i in range(1, 6)}
    r = rep5[2]
    rep5[2] = UnmaskShares(2, {**r.self_shares, 4: bytes(secagg.SHARE_BYTES)}, {}, r.self_signatures, {})
    total = server5.finish(list(rep5.values()))
    assert 2 in server5.blamed and "did not sign" in server5.blamed[2]
    assert np.max(np.abs(total - sum(_vectors(5, 8).values()))) <= 5 * FP


# ----------------------------------------------------------------------------------------------- clipping in the sum


def _small_model(seed=0):
    model = build_model({"mRNA": 30, "miRNA": 12}, 2, ModelConfig(hidden=16, heads=2, dropout=0.0), seed)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _site_params(glob, step_norm, rng, scale=1.0):
    flat = {k: rng.normal(0, 1, g.shape) for k, g in glob.items()}
    norm = np.sqrt(sum(float(np.sum(v * v)) for v in flat.values()))
    return {k: (g + scale * step_norm * flat[k] / norm).astype(g.dtype) for k, g in glob.items()}


def _move(a, b):
    return float(np.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)))


def test_a_site_that_skips_clipping_and_inflates_its_weights_is_caught_on_the_sum():
    """Issue 22: a site encodes its unclipped step with weights far above the count in its weight slot; the
    summed counts still pass. The decoded sum's block norms give it away; honest rounds (even every site exactly
    at the clip norm, all in the same direction) pass."""
    glob = _small_model()
    layout = UpdateLayout.from_params(glob)
    rng = np.random.default_rng(0)
    counts = [(40, {"mRNA": 25, "miRNA": 40}), (31, {"mRNA": 31, "miRNA": 31}), (57, {"mRNA": 57, "miRNA": 50})]
    clip = 1.0
    honest = [layout.encode_update(_site_params(glob, 0.25, rng), n, mc) for n, mc in counts]
    total = sum(honest)
    assert clip_bound_problems(layout, total, glob, clip, 3) == []
    honest_move = _move(layout.decode_mean(total, glob), glob)
    # every site exactly at the clip norm in the same direction: the tightest honest case
    same = {k: rng.normal(0, 1, g.shape) for k, g in glob.items()}
    norm = np.sqrt(sum(float(np.sum(v * v)) for v in same.values()))
    at_clip = {k: (g + clip * same[k] / norm).astype(g.dtype) for k, g in glob.items()}
    assert clip_bound_problems(layout, sum(layout.encode_update(at_clip, n, mc) for n, mc in counts), glob,
                               clip, 3) == []
    # the attacker: unclipped step of norm 30, parameters weighted x 1000 its slot's count
    n, mc = counts[0]
    attack = layout.encode_blocks(_site_params(glob, 30.0, rng), {None: 1000.0 * n, **{m: 1000.0 * c
                                                                                        for m, c in mc.items()}})
    attack[layout.param_size:] = layout.encode_update(glob, n, mc)[layout.param_size:]  # honest weight slots
    bad_total = attack + sum(honest[1:])
    _, wsum = layout.split(bad_total)
    assert wsum == layout.split(total)[1]  # the counts the coordinator checks today are unchanged
    attacked_move = _move(layout.decode_mean(bad_total, glob), glob)
    assert attacked_move > 1000 * honest_move
    problems = clip_bound_problems(layout, bad_total, glob, clip, 3)
    assert problems and "did not clip" in problems[0]
    print(f"\nhonest move {honest_move:.3g}, attacker without the check {attacked_move:.3g}")


def test_the_worst_a_site_can_do_within_the_bound_is_one_clipped_step_per_block():
    """Measured worst case left by the check: the attacker picks its contribution so that every block's summed
    step reaches exactly clip x summed weight, in a direction of its choice (here: opposite to the honest mean)."""
    glob = _small_model(1)
    layout = UpdateLayout.from_params(glob)
    rng = np.random.default_rng(1)
    counts = [(40, {"mRNA": 25, "miRNA": 40}), (31, {"mRNA": 31, "miRNA": 31}), (57, {"mRNA": 57, "miRNA": 50})]
    clip = 1.0
    honest = [layout.encode_update(_site_params(glob, 0.25, rng), n, mc) for n, mc in counts[1:]]
    n, mc = counts[0]
    slots = layout.encode_update(glob, n, mc)
    partial = sum(honest) + slots  # the attacker's weight slots are honest; its parameters are chosen below
    arrays, wsum = layout.split(partial)
    d_honest = {k: arrays[k] - wsum[layout.block(k)] * glob[k] for k in layout.names}
    target = {}
    for blk in (*layout.modalities, None):
        names = [k for k in layout.names if layout.block(k) == blk]
        hn = np.sqrt(sum(float(np.sum(d_honest[k] ** 2)) for k in names))
        for k in names:  # summed step of the block: -clip * W_b * (honest direction) * (1 - 1e-6)
            target[k] = -clip * wsum[blk] * (1 - 1e-6) * d_honest[k] / hn - d_honest[k]
    attack = slots.copy()
    pos = 0
    for k, shape in zip(layout.names, layout.shapes):
        size = int(np.prod(shape))
        attack[pos:pos + size] += target[k].ravel()
        pos += size
    worst = attack + sum(honest)
    assert clip_bound_problems(layout, worst, glob, clip, 3) == []
    moved = _move(layout.decode_mean(worst, glob), glob)
    honest_only = _move(layout.decode_mean(sum(honest) + layout.encode_update(glob, n, mc), glob), glob)
    assert moved <= np.sqrt(len(layout.modalities) + 1) * clip * (1 + 1e-5)
    assert clip_bound_problems(layout, worst + 0.01 * (attack - slots), glob, clip, 3)  # 1 % more is caught
    print(f"\nworst case within the bound: the model moves {moved:.3g} (honest round {honest_only:.3g}, clip {clip})")


def test_dp_sums_pass_with_their_noise_and_fail_without_clipping():
    glob = _small_model(2)
    layout = UpdateLayout.from_params(glob)
    rng = np.random.default_rng(2)
    clip, sigma = 0.5, 0.5
    ones = {None: 1.0, "mRNA": 1.0, "miRNA": 1.0}
    upd = [layout.encode_blocks({k: v - glob[k] for k, v in _site_params(glob, clip, rng).items()}, ones)
           for _ in range(3)]
    total = sum(upd)
    total[:layout.param_size] += rng.normal(0, sigma * clip, layout.param_size)
    assert clip_bound_problems(layout, total, glob, clip, 3, encoded="updates", noise_std=sigma * clip) == []
    big = layout.encode_blocks({k: v - glob[k] for k, v in _site_params(glob, 50 * clip, rng).items()}, ones)
    assert clip_bound_problems(layout, total + big - upd[0], glob, clip, 3, encoded="updates",
                               noise_std=sigma * clip)


def test_through_the_round_loop_a_site_that_skips_clipping_fails_the_round_instead_of_moving_the_model(
        tmp_path, monkeypatch):
    """The same attack against the real coordinator (server_main, in-process grid, generated cohort): one site
    encodes its unclipped update weighted x1000 (weight slots honest). On main the round is aggregated; now it
    fails with the reason and the model is kept."""
    from flwr.app import Context, RecordDict

    import client.secure as site_side
    from client.app import app as client_app
    from server.app import server_main
    from server.config import FederatedConfig
    from simulations.engine import InProcessGrid

    original = site_side.site_vector
    calls = []

    def attacker_first(global_params, new_params, num_train, counts, loss, clip_norm, modality_aware):
        calls.append(num_train)
        if len(calls) % 3 != 1:
            return original(global_params, new_params, num_train, counts, loss, clip_norm, modality_aware)
        vec, clipped, norm = original(global_params, new_params, num_train, counts, loss, 1e9, modality_aware)
        layout = UpdateLayout.from_params(global_params)
        vec[:layout.param_size] *= 1000.0
        return vec, clipped, norm

    monkeypatch.setattr(site_side, "site_vector", attacker_first)
    cfg = FederatedConfig(data_path="generated:160", scenario="iid-3", local_epochs=1, num_server_rounds=1,
                          secagg=True, secagg_clip_norm=0.1, out_dir=str(tmp_path / "clip"), report=False,
                          server_eval=False, round_timeout=60.0, straggler_grace=0.0)
    grid = InProcessGrid(client_app, 3, cfg.to_run_config())
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    _, history = server_main(grid, ctx)
    sa = history[0]["screening"]["secure_aggregation"]
    assert sa["status"] == "failed", sa
    assert "did not clip" in sa["error"] and history[0]["accepted"] == []
