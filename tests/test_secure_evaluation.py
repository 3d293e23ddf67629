"""Secure evaluation (issue 25 item 1): the sites' evaluation counts summed by secure aggregation before the minimum
count k, which then applies to the consortium's sums. Exactness, many small sites, a 1-patient site's label hidden
from everything the coordinator holds, dropouts, and the site's refusal of per-site metrics."""

from __future__ import annotations

import numpy as np
import pytest
from test_secure_round_auth import pki  # noqa: F401, F811  (the consortium PKI fixture)

from magnet_core.federation.privacy import pool_releases, release_eval
from magnet_core.federation.secagg import SecAggError, SecAggServer, SecAggSetup, SecAggSite, prg
from magnet_core.federation.secagg import _self_seed as self_seed
from magnet_core.federation.secure_eval import (
    EVAL_FRAC_BITS,
    EvalLayout,
    pool_sum,
    refuse_clear_release,
    secure_pool_local,
)
from magnet_core.model.metrics import (
    EvalCounts,
    binary_auroc,
    confusion_counts,
    metrics_from_confusion,
    score_histogram,
)

K = 5
GROUPS = ("all", "paired", "unpaired")


def counts_of(name: str, y: np.ndarray, score: np.ndarray, paired: np.ndarray) -> EvalCounts:
    """A site's evaluation counts exactly as SiteRuntime.evaluate_counts builds them (binary, log-odds bins)."""
    pred = (score > 0.5).astype(np.int64)
    groups = {"all": np.ones_like(paired), "paired": paired, "unpaired": ~paired}
    return EvalCounts(name, {g: confusion_counts(y[s], pred[s], 2) for g, s in groups.items()},
                      {g: score_histogram(y[s], score[s], scale="logit") for g, s in groups.items()})


def random_sites(rng: np.random.Generator, sizes: list[int]) -> tuple[list[EvalCounts], tuple]:
    sites, ys, scores, paireds = [], [], [], []
    for i, n in enumerate(sizes):
        y = rng.integers(0, 2, n)
        score = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.3, n), 1e-6, 1 - 1e-6)
        paired = rng.random(n) < 0.6
        sites.append(counts_of(f"site{i}", y, score, paired))
        ys.append(y), scores.append(score), paireds.append(paired)
    return sites, tuple(np.concatenate(a) for a in (ys, scores, paireds))


def test_secure_pooled_metrics_equal_the_pooled_predictions_exactly():
    rng = np.random.default_rng(0)
    sites, (y, score, paired) = random_sites(rng, [40, 25, 33, 18])
    out, _ = secure_pool_local(sites, K)
    pred = (score > 0.5).astype(np.int64)
    for g, s in {"all": np.ones_like(paired), "paired": paired, "unpaired": ~paired}.items():
        prefix = "" if g == "all" else f"{g}_"
        plain = metrics_from_confusion(confusion_counts(y[s], pred[s], 2))
        for m in ("acc", "f1", "mcc"):
            assert out["metrics"][f"{prefix}{m}"] == plain[m]  # exactly: integer counts, no quantization
    # the same as the plain rule's pooled metrics when every site is large enough to release
    plain_pool = pool_releases([release_eval(c, K) for c in sites])["metrics"]
    for m in ("acc", "f1", "mcc"):
        assert out["metrics"][m] == plain_pool[m]
    # the AUROC interval of the summed histogram holds the exact AUROC of the raw pooled scores
    exact = binary_auroc(y, score)
    assert out["metrics"]["auroc_low"] <= exact <= out["metrics"]["auroc_high"]
    assert out["patients"]["all"] == len(y)


def test_twenty_small_sites_give_a_global_metric_where_the_plain_rule_gives_none():
    rng = np.random.default_rng(1)
    sites, (y, score, _) = random_sites(rng, [3] * 20)
    plain = pool_releases([release_eval(c, K) for c in sites])["metrics"]
    assert plain["mcc"] is None and plain["acc"] is None  # every site holds 3 < k: all withheld
    out, server = secure_pool_local(sites, K)
    assert len(server.u3) == 20
    expected = metrics_from_confusion(confusion_counts(y, (score > 0.5).astype(np.int64), 2))
    assert out["metrics"]["mcc"] == expected["mcc"] and out["metrics"]["acc"] == expected["acc"]
    assert out["metrics"]["auroc"] is not None
    assert out["patients"]["all"] == 60


def test_k_applies_to_the_sums():
    rng = np.random.default_rng(2)
    sites, _ = random_sites(rng, [1, 1, 2])  # 4 < k in the sum: nothing pooled
    out, _ = secure_pool_local(sites, K)
    assert out["metrics"]["mcc"] is None and "all" in out["withheld"]
    # every released group and every released histogram bin of the sum holds >= k patients
    sites, _ = random_sites(rng, [1, 2, 3, 2])
    out, _ = secure_pool_local(sites, K)
    assert out["metrics"]["mcc"] is not None
    assert all(n >= K for n in out["patients"].values())
    for g in out["withheld"]:
        assert g in GROUPS


def _run_views(label: int, runs: int, seed: int) -> tuple[list[np.ndarray], list[dict]]:
    """The coordinator's view of a secure evaluation where site 1 holds ONE test patient of ``label`` (score the
    same) and sites 2-5 fixed: site 1's masked vector minus the self mask the coordinator reconstructs (all the
    coordinator can remove from it), and the published result."""
    rng = np.random.default_rng(seed)
    others, _ = random_sites(rng, [3, 2, 4, 3])
    one = counts_of("one", np.array([label]), np.array([0.7]), np.array([True]))
    layout = EvalLayout.for_task(2)
    per_site = [one, *others]
    residues, results = [], []
    for r in range(runs):
        setup = SecAggSetup.for_sites(f"eval-{r}", [1, 2, 3, 4, 5], layout.length, 1, EVAL_FRAC_BITS)
        sites = {i: SecAggSite(setup, i) for i in setup.site_ids}
        server = SecAggServer(setup)
        book = server.collect_keys([s.advertise() for s in sites.values()])
        inboxes = server.route_shares([s.share(book) for s in sites.values()])
        seen = {}
        for i, s in sites.items():
            m = s.mask(inboxes[i], layout.encode(per_site[i - 1]))
            seen[i] = m.masked.copy()  # on the wire: the coordinator sees it
            server.add_masked(m)
        req = server.unmask_request()
        total = server.finish([sites[i].unmask(req) for i in req.survivors])
        # everything the coordinator now holds about site 1: its masked vector and its reconstructed self seed
        b1 = server._secrets[("self", 1)]
        residues.append(seen[1] - prg(self_seed(b1, setup.round_id, 1), layout.length))
        assert ("mask", 1) not in server._secrets  # a survivor's pairwise key is never reconstructed
        results.append(pool_sum(total, layout, K, [s.site for s in per_site]))
    return residues, results


def test_a_one_patient_site_contributes_and_its_label_is_not_recoverable():
    layout = EvalLayout.for_task(2)
    clear = {lab: layout.encode(counts_of("one", np.array([lab]), np.array([0.7]), np.array([True])))
             for lab in (0, 1)}
    differ = np.flatnonzero(clear[0] != clear[1])  # the cells that carry the label
    assert differ.size > 0
    views = {lab: _run_views(lab, 48, seed=7) for lab in (0, 1)}
    for lab, (residues, results) in views.items():
        # the one patient is in the sum: 12 others + 1
        assert all(r["patients"]["all"] == 13 for r in results)
        # the masked vector, even after removing the self mask, is padded by pairwise masks: at the label's cells
        # every bit is a fair coin whatever the label (the clear encoding has bit 1 fixed by the label)
        bits = np.array([[(int(v[j]) >> b) & 1 for j in differ for b in (1, 2, 40, 63)] for v in residues])
        frac = bits.mean(axis=0)
        assert np.all((frac > 0.15) & (frac < 0.85)), (lab, frac)
        # no two runs give the same residue: nothing about the label repeats across views
        assert len({v[differ].tobytes() for v in residues}) == len(residues)
    # the published results of label 0 and label 1 differ only through the sum, pooled with >= k other patients
    r0, r1 = views[0][1][0], views[1][1][0]
    assert r0["sites"] == r1["sites"] and r0["patients"] == r1["patients"]
    assert r0["patients"]["all"] - 1 >= K
    assert "one" in r0["sites"]  # it contributed; no per-site entry exists for it
    assert set(r0) == {"metrics", "withheld", "patients", "sites", "k"}


def test_dropout_before_masking_recovers_the_sum_of_the_others():
    rng = np.random.default_rng(3)
    sites, _ = random_sites(rng, [6, 5, 7, 4, 8])
    out, server = secure_pool_local(sites, K, max_dropouts=1, drop_before_mask=[3])
    rest = [s for i, s in enumerate(sites, 1) if i != 3]
    cm = sum(s.confusion["all"] for s in rest)
    assert out["metrics"]["mcc"] == metrics_from_confusion(cm)["mcc"]
    assert out["patients"]["all"] == int(cm.sum())
    assert "site2" not in out["sites"] and len(out["sites"]) == 4
    # a site dropping after masking (no unmask reply) stays in the sum
    out2, _ = secure_pool_local(sites, K, max_dropouts=1, drop_after_mask=[3])
    assert out2["patients"]["all"] == sum(int(s.confusion["all"].sum()) for s in sites)
    with pytest.raises(SecAggError):  # beyond the threshold nothing is recovered
        secure_pool_local(sites, K, max_dropouts=1, drop_before_mask=[2, 3])


def test_a_site_refuses_per_site_metrics_in_a_secure_evaluation_round():
    with pytest.raises(SecAggError, match="secure-evaluation round"):
        refuse_clear_release(True)
    refuse_clear_release(False)


def test_decode_refuses_sums_that_are_not_counts():
    layout = EvalLayout.for_task(2)
    good = layout.encode(counts_of("a", np.array([0, 1, 1]), np.array([0.2, 0.8, 0.4]), np.array([True, False,
                                                                                                   True])))
    assert layout.decode(good).num == 3
    bad = good.copy()
    bad[0] += 0.5
    with pytest.raises(SecAggError, match="position 0"):
        layout.decode(bad)
    bad = good.copy()
    bad[0] += 1  # all no longer equals paired + unpaired
    with pytest.raises(SecAggError, match="paired"):
        layout.decode(bad)


def test_multiclass_layout_has_no_histograms():
    layout = EvalLayout.for_task(4)
    assert layout.bins == 0 and layout.length == 3 * 16
    rng = np.random.default_rng(4)
    per_site = []
    for i in range(4):
        y, p = rng.integers(0, 4, 4), rng.integers(0, 4, 4)
        per_site.append(EvalCounts(f"s{i}", {g: confusion_counts(y, p, 4) if g != "unpaired" else
                                             np.zeros((4, 4), np.int64) for g in GROUPS}, {}))
    out, _ = secure_pool_local(per_site, K)
    assert out["metrics"]["mcc"] == metrics_from_confusion(sum(s.confusion["all"] for s in per_site))["mcc"]


# ------------------------------------------------------------------------------------------ the site's policy


def _policy(evaluate: bool):
    from client.policy import parse_policy

    return parse_policy(f'consortium = "ov"\n[secure_aggregation]\nevaluate = {str(evaluate).lower()}\n', "p.toml")


def test_the_site_policy_evaluates_only_inside_a_secure_sum():
    from client.policy import ConsortiumMemory, PolicyRefusal, SiteRequest, check_request, remember

    policy = _policy(True)
    memory = ConsortiumMemory()
    train = SiteRequest(kind="train.secagg", run=1, round=1, secure=True, secure_round_id="t1", model_sha256="a",
                        dp_noise_multiplier=1.0, secagg_threshold=2)
    check_request(policy, train, memory, None)
    remember(memory, train)
    with pytest.raises(PolicyRefusal, match="secure_aggregation.evaluate"):
        check_request(policy, SiteRequest(kind="evaluate", run=1, round=1, model_sha256="b"), memory, None)
    secure = SiteRequest(kind="evaluate.secagg", run=1, round=1, secure=True, secure_round_id="e1",
                         model_sha256="b", min_count=5)
    check_request(policy, secure, memory, None)  # admitted: its counts go only masked into the sum
    remember(memory, secure)
    # after a secure evaluation of a model, a clear evaluation of the same model (which could be subtracted from
    # the sum) is refused even by a site whose policy allows clear evaluations
    open_policy = _policy(False)
    with pytest.raises(PolicyRefusal, match="evaluation"):
        check_request(open_policy, SiteRequest(kind="evaluate", run=1, round=1, model_sha256="b", min_count=5),
                      memory, None)


# ------------------------------------------------------------------------------------------ end to end


def test_federation_of_small_sites_gets_an_exact_global_metric_under_secure_evaluation(ov_path, tmp_path):
    """The in-process engine (the real ClientApp and ServerApp message paths): 5 OV sites of ~12 test patients each,
    k = 15 (so every site alone is below k, as 20 sites of ~3 are below k = 5). Under secure evaluation the
    coordinator's global MCC / accuracy / F1 are exactly those of the pooled predictions of the final model, where
    the plain rule withholds every site's evaluation; no per-site metric exists."""
    from magnet_core.consortium.simulated import load_consortium
    from magnet_core.model.config import get_preset
    from server.config import FederatedConfig
    from simulations.engine import run_inprocess
    from simulations.simulate import fresh_runtime

    k = 15
    cfg = FederatedConfig(num_server_rounds=1, local_epochs=1, data_path=str(ov_path), scenario="iid-5",
                          seed=10, min_sites=5, out_dir=str(tmp_path / "run"), report=False, min_count=k,
                          secure_evaluation=True)
    params, hist = run_inprocess(cfg, 5)
    last = hist[-1]
    preset = get_preset(cfg.preset)
    _, sites = load_consortium(str(ov_path), "iid-5", cfg.seed, "")
    counts = [fresh_runtime(s.name, s, preset, cfg.seed).evaluate_counts(params, test_graph=cfg.test_graph)
              for s in sites]
    assert max(c.num for c in counts) < k <= sum(c.num for c in counts)  # every site alone is below k
    plain = pool_releases([release_eval(c, k) for c in counts])["metrics"]
    assert plain["mcc"] is None
    exact = metrics_from_confusion(sum(c.confusion["all"] for c in counts))
    for m in ("mcc", "acc", "f1"):
        assert last["global"][m] == exact[m]
    assert last["global"]["auroc_low"] <= last["global"]["auroc"] <= last["global"]["auroc_high"]
    assert last["pooled_over"]["patients"] == sum(c.num for c in counts)
    assert len(last["pooled_over"]["sites"]) == 5
    assert last["sites"] == {}  # no per-site metric exists
    summary = last["screening"]["secure_evaluation"]
    assert summary["status"] == "pooled" and summary["k"] == k


def _flower_run(tmp_path, name: str, drop=frozenset(), node_configs=None, **kw):
    from test_secure_round import _cfg
    from test_secure_round import _run as run_secure

    cfg = _cfg(tmp_path, name, num_server_rounds=1, secure_evaluation=True, min_count=K, **kw)
    params, history, grid = run_secure(cfg, drop=set(drop), node_configs=node_configs)
    return cfg, params, history


def _site_counts(cfg, params):
    from magnet_core.consortium.simulated import load_consortium
    from magnet_core.model.config import get_preset
    from simulations.simulate import fresh_runtime

    _, sites = load_consortium(cfg.data_path, cfg.scenario, cfg.seed, cfg.modalities)
    preset = get_preset(cfg.preset)
    return [fresh_runtime(s.name, s, preset, cfg.seed).evaluate_counts(params, test_graph=cfg.test_graph)
            for s in sites]


def test_a_site_dropping_before_masking_leaves_the_exact_sum_of_the_others(tmp_path):
    """Through the real message paths (3 generated sites, secure training and secure evaluation): node 2 goes away
    before sending its masked evaluation counts; the coordinator's metric is exactly that of the other two sites'
    pooled predictions, and the dropped site is named."""
    cfg, params, history = _flower_run(tmp_path, "drop", drop={(1, "query.secagg_mask", 2)})
    last = history[-1]
    summary = last["screening"]["secure_evaluation"]
    assert summary["status"] == "pooled" and summary["dropped_before_masking"] == ["site1"]
    counts = _site_counts(cfg, params)
    others = [c for c in counts if c.site != "site1"]
    exact = metrics_from_confusion(sum(c.confusion["all"] for c in others))
    for m in ("mcc", "acc", "f1"):
        assert last["global"][m] == exact[m]
    assert last["pooled_over"] == {"sites": ["site0", "site2"], "patients": sum(c.num for c in others)}
    assert last["sites"] == {}


def test_authenticated_secure_evaluation_pools_exactly(tmp_path, pki):  # noqa: F811
    """With the consortium roster (signed keys, shares and transcript), as a site holding a roster requires."""
    roster, node_configs = pki
    cfg, params, history = _flower_run(tmp_path, "auth", node_configs=node_configs, secagg_roster=str(roster))
    last = history[-1]
    assert last["screening"]["secure_evaluation"]["status"] == "pooled"
    counts = _site_counts(cfg, params)
    exact = metrics_from_confusion(sum(c.confusion["all"] for c in counts))
    assert last["global"]["mcc"] == exact["mcc"] and last["global"]["acc"] == exact["acc"]
    assert last["pooled_over"]["patients"] == sum(c.num for c in counts)
