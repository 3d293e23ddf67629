"""Attacks on the trust boundary: a malicious site or a curious coordinator against secure sums, DP and prepare."""

# Each test plays an attack and asserts the safe outcome (the four attacks found by the first review succeeded
# before their fixes: noise floor bypassed by a plain round, minima/maxima on request, differencing two secure sums,
# an unchecked secure sum).

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from magnet_core.cohort.data import DataError
from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.federation import secagg as sa
from magnet_core.federation.dp import DPConfig, noise_piece_std
from magnet_core.federation.secagg import MaskedInput, SecAggError, SecAggServer, SecAggSetup, SecAggSite, UnmaskRequest
from simulations.engine import InProcessGrid
from simulations.prepare_federated import make_run, run_inprocess, site_specs

RANGES = {"mRNA": (0.0, 12.0)}  # encloses the synthetic values below (5 +- a few, +1 for class 1)


# ----------------------------------------------------------------------------------------------- helpers


def _through_masking(n: int, t: int, length: int = 6, round_id: str = "r"):
    """Sites and server after stage 3 (every site sent its masked input)."""
    setup = SecAggSetup(round_id, tuple(range(1, n + 1)), t, length)
    sites = {i: SecAggSite(setup, i) for i in setup.site_ids}
    server = SecAggServer(setup)
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    return setup, sites, server, inboxes


def _raw_sites(root: Path, n: int = 3, per: int = 40, d: int = 12) -> list[Path]:
    """Tiny raw site folders (labels.csv + mRNA.csv, two balanced classes), seeded."""
    rng = np.random.default_rng(0)
    out = []
    for s in range(n):
        p = root / f"site{s}"
        p.mkdir(parents=True, exist_ok=True)
        ids = pd.Index([f"S{s}_{i:03d}" for i in range(per)], name="sampleID")
        y = np.arange(per) % 2
        pd.DataFrame({"Class": y}, index=ids).to_csv(p / "labels.csv")
        pd.DataFrame(rng.normal(5, 1, (per, d)) + y[:, None], index=ids,
                     columns=[f"g{j}" for j in range(d)]).to_csv(p / "mRNA.csv")
        out.append(p)
    return out


@pytest.fixture
def recorded(monkeypatch):
    """Every reply the in-process grid delivers to the coordinator."""
    replies = []
    push = InProcessGrid.push_messages

    def recording(self, messages):
        ids = push(self, messages)
        replies.extend(self._replies[i] for i in ids)
        return ids

    monkeypatch.setattr(InProcessGrid, "push_messages", recording)
    return replies


def _deployed(dirs: list[Path], out: Path, **extra) -> dict[int, dict]:
    return {i: {"raw-dir": str(d), "prepared-dir": str(out / f"h{i}"), "site-name": f"h{i}", **extra}
            for i, d in enumerate(dirs)}


# ----------------------------------------------------------------------------------------------- (a) secure sums


def test_server_refuses_masked_vectors_of_wrong_type_length_or_with_nan():
    """A site cannot smuggle NaN / inf (only uint64 ring elements are summed) or a vector of the wrong length."""
    setup, sites, server, inboxes = _through_masking(3, 2)
    for bad in (np.full(6, np.nan), np.full(6, np.inf), np.zeros(5, np.uint64), np.zeros((6, 1), np.uint64),
                np.zeros(6, np.int64)):
        with pytest.raises(SecAggError, match="expected uint64 of shape"):
            server.add_masked(MaskedInput(1, bad))
    assert server.u3 == [] and not server._acc.any()  # nothing entered the running sum
    server.add_masked(sites[1].mask(inboxes[1], np.ones(6)))
    assert server.u3 == [1]


def test_a_site_refuses_non_finite_values_before_masking():
    _, sites, _, inboxes = _through_masking(3, 2)
    with pytest.raises(SecAggError, match="outside the fixed-point range"):
        sites[1].mask(inboxes[1], np.array([0, 0, np.nan, 0, 0, 0.0]))


def test_shares_replayed_from_another_round_fail_authentication():
    """Ciphertexts of round A delivered in round B (same site ids) are refused: fresh keys and the round id in the
    associated data."""
    _, _, _, inboxes_a = _through_masking(3, 2, round_id="round-A")
    _, sites_b, _, _ = _through_masking(3, 2, round_id="round-B")
    with pytest.raises(SecAggError, match="fail authentication"):
        sites_b[1].mask(inboxes_a[1], np.ones(6))


# ---------------------------------------------------------------------------------------- (b) curious coordinator


@pytest.mark.parametrize("n,t", [(2, 1), (3, 1), (4, 2), (5, 2), (1, 1), (3, 4)])
def test_coordinator_cannot_plan_a_one_site_or_minority_threshold_sum(n, t):
    with pytest.raises(SecAggError):
        SecAggSetup("r", tuple(range(1, n + 1)), t, 6)


@pytest.mark.parametrize("n,t", [(3, 2), (4, 3), (5, 3)])
def test_no_mix_of_unmask_views_gives_the_coordinator_both_secrets_of_a_site(n, t):
    """The coordinator may send every site a different unmask request (inconsistent views), e.g. call site v
    'dropped' towards some sites to collect shares of v's mask key while the others give shares of v's self seed.
    Each site answers one request only, never names a site both ways, and t > n / 2: for no site v can the
    coordinator collect t shares of both secrets."""
    setup, sites, server, inboxes = _through_masking(n, t)
    for i, s in sites.items():
        server.add_masked(s.mask(inboxes[i], np.full(6, float(i))))
    states = {i: s.to_state() for i, s in sites.items()}
    gives = {i: {"self": set(), "key": set()} for i in sites}  # what each site reveals in SOME valid request
    ids = set(setup.site_ids)
    for i in sites:
        others = sorted(ids - {i})
        for k in range(len(others) + 1):
            for extra in itertools.combinations(others, k):
                surv = {i, *extra}
                req = UnmaskRequest(tuple(sorted(surv)), tuple(sorted(ids - surv)))
                site = SecAggSite.from_state(states[i])
                if len(surv) < t:
                    with pytest.raises(SecAggError, match="refusing to help unmask"):
                        site.unmask(req)
                    continue
                shares = site.unmask(req)
                assert not set(shares.self_shares) & set(shares.key_shares)
                gives[i]["self"] |= set(shares.self_shares)
                gives[i]["key"] |= set(shares.key_shares)
                with pytest.raises(SecAggError, match="before sending its masked input"):
                    site.unmask(req)  # a second answer from the same site (replay / second view) is refused
        site = SecAggSite.from_state(states[i])
        with pytest.raises(SecAggError, match="both survivors and dropped"):
            site.unmask(UnmaskRequest(tuple(sorted(ids)), tuple(sorted(ids - {i}))))
    for v in sites:
        # each site answers once: choose per site which of v's secrets it contributes
        best = 0
        for choice in itertools.product(("self", "key"), repeat=n):
            got = {"self": 0, "key": 0}
            for i, c in zip(sorted(sites), choice):
                got[c] += v in gives[i][c]
            best = max(best, min(got.values()))
        assert best < t, f"the coordinator can collect {best} >= t={t} shares of both secrets of site {v}"
    # the attack's yardstick is real: t self-seed shares of a site do rebuild its seed
    req = UnmaskRequest(tuple(sorted(ids)), ())
    answers = [SecAggSite.from_state(states[i]).unmask(req) for i in sorted(ids)[:t]]
    assert sa.shamir_combine({a.site_id: a.self_shares[1] for a in answers}) == sites[1]._b


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_any_sum_the_coordinator_can_unmask_carries_the_full_dp_noise(n):
    """Whatever threshold the coordinator plans, a sum is only recoverable from >= t pieces of variance
    (z C)^2 / t each: never less than the target noise; with fewer than t masked inputs no unmask request exists."""
    dp = DPConfig(clip_norm=0.5, noise_multiplier=1.0, noise="distributed")
    for t in range(n // 2 + 1, n + 1):
        if t < 2:
            continue
        assert t * noise_piece_std(dp, t) ** 2 == pytest.approx(dp.sigma ** 2)
        _, sites, server, inboxes = _through_masking(n, t)
        for i in list(sites)[:t - 1]:
            server.add_masked(sites[i].mask(inboxes[i], np.zeros(6)))
        with pytest.raises(SecAggError, match="sent their masked input"):
            server.unmask_request()


# ----------------------------------------------------------------------------------------------- (c) site policies


def _train_once(tmp_path: Path, name: str, node0: dict, **kw):
    from client.app import app as client_app
    from server.app import server_main
    from server.config import FederatedConfig

    cfg = FederatedConfig(data_path="generated:160", scenario="iid-3", local_epochs=1, num_server_rounds=1,
                          out_dir=str(tmp_path / name), report=False, server_eval=False, round_timeout=60.0,
                          straggler_grace=0.0, **kw)
    grid = InProcessGrid(client_app, 3, cfg.to_run_config(), node_configs={0: node0})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    return server_main(grid, ctx)[1][0]


@pytest.mark.parametrize("round_kw", [{}, {"dp_clip_norm": 0.1, "dp_noise_multiplier": 0.1, "dp_noise_seed": 1}],
                         ids=["plain", "central-dp-below-floor"])
def test_a_site_with_a_noise_floor_refuses_rounds_that_send_its_update_without_its_noise(tmp_path, round_kw):
    h = _train_once(tmp_path, "floor", {"dp-min-noise-multiplier": 1.0}, **round_kw)
    assert "site0" not in h["accepted"]
    assert "noise multiplier >= 1.0" in str(h["failed"])


def test_a_site_requiring_secagg_refuses_clear_statistics_and_sends_none_in_a_secure_preparation(tmp_path,
                                                                                                recorded):
    dirs = _raw_sites(tmp_path / "raw")
    strict = _deployed(dirs, tmp_path / "out", **{"prepare-require-secagg": True})
    cfg = PrepareConfig(n_features=5, value_ranges=RANGES)
    with pytest.raises(DataError, match="h0: this site sends its statistics only through secure aggregation"):
        run_inprocess(make_run([], tmp_path / "clear", cfg, min_sites=3), node_configs=strict)
    assert not [r for r in recorded if "stats" in r.content]
    recorded.clear()
    assert run_inprocess(make_run([], tmp_path / "secure", cfg, min_sites=3, secagg=True),
                         node_configs=strict)["status"] == "ok"
    assert not [r for r in recorded if "stats" in r.content]  # only masked vectors carried statistics
    masked = [r for r in recorded if "masked" in r.content]
    assert len(masked) == 3 and all(r.content["masked"]["masked"].numpy().dtype == np.uint64 for r in masked)


def test_a_deployed_site_never_sends_minima_or_maxima(tmp_path, recorded):
    dirs = _raw_sites(tmp_path / "raw")
    run = make_run([], tmp_path / "o", PrepareConfig(n_features=5), min_sites=3, observed_ranges=True)
    try:
        run_inprocess(run, node_configs=_deployed(dirs, tmp_path / "out"))
    except DataError:
        pass  # refusing is the safe outcome
    sent = [k for r in recorded if "stats" in r.content for k in r.content["stats"].keys()]
    assert not [k for k in sent if k.endswith(("/minimum", "/maximum"))]


def _malicious_mask(monkeypatch, kind: str) -> None:
    """Site 1 (modified code) of every secure sum sends a bad masked vector."""
    original = SecAggSite.mask

    def mask(self, inbox, vector):
        v = np.asarray(vector, dtype=np.float64)
        if self.site_id == 1 and kind == "inflate":
            v = v * 1000.0  # counts and sums of 1000x its patients: a consistent-looking lie
        out = original(self, inbox, v)
        if self.site_id == 1 and kind == "random":
            return MaskedInput(1, np.random.default_rng(0).integers(0, 2**63, v.shape[0], dtype=np.uint64))
        return out

    monkeypatch.setattr(SecAggSite, "mask", mask)


@pytest.mark.parametrize("kind", ["inflate", "random"])
def test_secure_preparation_refuses_an_impossible_sum(tmp_path, monkeypatch, kind):
    dirs = _raw_sites(tmp_path / "raw")
    _malicious_mask(monkeypatch, kind)
    cfg = PrepareConfig(n_features=5, value_ranges=RANGES)
    with pytest.raises(DataError, match="secure sum"):
        run_inprocess(make_run(site_specs(dirs, tmp_path / "o"), tmp_path / "o", cfg, secagg=True))
    assert not (tmp_path / "o" / "manifest.toml").exists()


def test_a_second_secure_sum_of_the_same_statistics_is_refused(tmp_path, monkeypatch):
    """Differencing: a curious coordinator runs the secure sum twice, over all sites and over all but one."""
    import server.prepare_app as coordinator

    dirs = _raw_sites(tmp_path / "raw")
    original = coordinator.secure_statistics
    seen: dict = {}

    def curious(grid, replies, num_classes, run, base):
        full, report = original(grid, replies, num_classes, run, base)
        try:
            part, _ = original(grid, replies[1:], num_classes, run, base)
            seen["h0"] = full["mRNA"].n_per_class - part["mRNA"].n_per_class
        except DataError as exc:
            seen["refused"] = str(exc)
        return full, report

    monkeypatch.setattr(coordinator, "secure_statistics", curious)
    cfg = PrepareConfig(n_features=5, value_ranges=RANGES)
    strict = _deployed(dirs, tmp_path / "out", **{"prepare-require-secagg": True})
    run_inprocess(make_run([], tmp_path / "o", cfg, min_sites=3, secagg=True), node_configs=strict)
    assert "h0" not in seen and "refused" in seen, f"site h0's class counts leaked: {seen.get('h0')}"
