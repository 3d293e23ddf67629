"""Dishonest sites that stay inside the screens (issue 22, items 2, 3, 5), played against the real strategy and round
loop: an in-band model replacement, sign-flipped colluders, DP's neighbouring consortia, an inflated evaluation.
The pure rules (magnet_core/federation/screening.py, eval_screen.py) are checked by hand first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from test_adversarial import Attack, AttackGrid, _arrays, _forge, _record

from magnet_core.federation.eval_screen import at_least, screen_evaluations
from magnet_core.federation.screening import ScreenMemory, screen_updates
from server.app import server_main
from server.config import FederatedConfig

# ------------------------------------------------------------------------------------------- the pure rules


def _steps(rng: np.random.Generator, n: int, dim: int = 400, spread: float = 0.6) -> list[np.ndarray]:
    """n honest-like steps: a shared direction plus site noise (pairwise cosines about 0.3-0.5)."""
    common = rng.normal(size=dim)
    return [common + spread * 1.4 * rng.normal(size=dim) for _ in range(n)]


GLOBAL = {"w": np.full(400, 40.0)}  # norm 800: steps of norm 0.08-400 lie in the band


def test_two_sign_flipped_colluders_of_four_get_nobody_rejected_and_only_an_opposed_large_step_is():
    rng = np.random.default_rng(0)
    h = _steps(rng, 4)
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: -h[2], 4: -h[3]}, ScreenMemory())
    assert all(d.accepted for d in decisions.values()), decisions
    # one of three flipped at its honest size: kept, clipped (bounded influence; rejecting it on direction alone
    # is the rule that rejected honest label-skew steps, issue 22); ten times longer as well: rejected
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: -h[2]}, ScreenMemory())
    assert all(d.accepted for d in decisions.values()), decisions
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: -12 * h[2]}, ScreenMemory())
    assert [n for n, d in decisions.items() if not d.accepted] == [3]
    assert "opposed and large" in decisions[3].reason and "majority" in decisions[3].reason


def test_an_orthogonal_in_band_step_is_clipped_and_every_step_is_clipped_to_the_lower_median_norm():
    rng = np.random.default_rng(1)
    h = _steps(rng, 3)
    other = rng.normal(size=400)
    basis = np.stack(h[:2], axis=1)
    other -= basis @ np.linalg.lstsq(basis, other, rcond=None)[0]  # orthogonal to both honest steps
    own = h[2] / np.linalg.norm(h[2])  # cosine 0.05 with its own honest step, the rest orthogonal to the others'
    attacker = 9.5 * np.linalg.norm(h[2]) * (0.05 * own + np.sqrt(1 - 0.05**2) * other / np.linalg.norm(other))
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: attacker}, ScreenMemory())
    assert all(d.accepted for d in decisions.values()), decisions
    bound = float(max(np.linalg.norm(h[0]), np.linalg.norm(h[1])))  # the lower median of the three norms
    assert all(d.bound == pytest.approx(bound) for d in decisions.values())
    assert decisions[3].norm * decisions[3].scale == pytest.approx(bound)  # moved no further than an honest site
    assert min(decisions[1].scale, decisions[2].scale) == 1.0
    # a long step along the honest direction is kept but clipped: it moves the model no further than the others
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: 5 * h[2]}, ScreenMemory())
    assert decisions[3].accepted and decisions[3].norm * decisions[3].scale == pytest.approx(decisions[3].bound)
    assert decisions[3].bound < 2 * bound


def test_under_dp_no_decision_depends_on_another_site_or_on_past_per_site_norms():
    """The neighbouring-consortium check on the pure screen: consortia differing in one site's step (any step)
    and in that site's past norms give every other site the same decision."""
    rng = np.random.default_rng(2)
    for trial in range(20):
        steps = dict(enumerate(_steps(rng, 4), start=1))
        base = screen_updates(GLOBAL, steps, ScreenMemory(norms=[[1.0, 1.1, 0.9, 1.0]]), dp_clip=3.0)
        changed = {**steps, 4: rng.choice([-1.0, 0.01, 8.0, 100.0]) * rng.normal(size=400)}
        other = screen_updates(GLOBAL, changed, ScreenMemory(norms=[[1.0, 1.1, 0.9, 50.0]],
                                                           direction=rng.normal(size=400)), dp_clip=3.0)
        for node in (1, 2, 3):
            assert base[node] == other[node], (trial, node)
            assert base[node].bound == 3.0 and base[node].trust == 1.0


def test_inflated_evaluation_flagged_by_hand():
    # the tail probability is exact: two classes, 3 + 2 patients, recalls 0.5 and 0.8
    from itertools import product

    brute = sum(0.5 ** 3 * np.prod([0.8 if b else 0.2 for b in bits[3:]])
                for bits in product([0, 1], repeat=5) if sum(bits) >= 4)
    assert at_least(4, np.array([3, 2]), np.array([0.5, 0.8])) == pytest.approx(brute)
    honest = {"a": np.array([[8, 3], [3, 7]]), "b": np.array([[7, 4], [4, 6]]), "c": np.array([[9, 2], [4, 6]])}
    checks = screen_evaluations(honest)
    assert not any(c.flagged for c in checks.values())
    perfect = {**honest, "c": np.diag(honest["c"].sum(axis=1))}
    checks = screen_evaluations(perfect)
    assert [s for s, c in checks.items() if c.flagged] == ["c"]
    from magnet_core.model.metrics import metrics_from_confusion

    assert checks["c"].mcc_without == pytest.approx(metrics_from_confusion(honest["a"] + honest["b"])["mcc"])
    assert checks["c"].shift > 0
    assert not screen_evaluations(perfect, alpha=0)["c"].flagged
    assert not screen_evaluations({"c": perfect["c"]})["c"].flagged  # alone: nothing to compare with
    assert not screen_evaluations({**honest, "c": np.array([[10, 1], [2, 8]])})["c"].flagged  # good, not absurd


# ------------------------------------------------------------------------------------- against the real loop


def _ov_run(tmp_path: Path, name: str, ov_path: Path, num_sites: int, attacks: dict[int, Attack], rounds: int,
            **overrides):
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    scenario = tmp_path / f"iid-{num_sites}.toml"
    scenario.write_text(f'name = "iid-{num_sites}"\nnum_sites = {num_sites}\npartition = "iid"\n')
    settings = dict(num_server_rounds=rounds, data_path=str(ov_path), scenario=str(scenario), min_sites=1,
                    server_eval=True, seed=10, out_dir=str(tmp_path / name))
    cfg = FederatedConfig(**{**settings, **overrides})
    grid = AttackGrid(num_sites, cfg.to_run_config(), attacks)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    _, history = server_main(grid, ctx)
    return grid, history


def _steer_to_one_class(instruction: Message, honest: Message, rnd: int) -> Message:
    """The in-band model replacement of issue 22: a step 9.5x the site's honest norm, cosine 0.05 with its honest
    step, the rest toward a model predicting one class (last layer zero, its bias favouring class 0)."""
    if instruction.metadata.message_type != "train":
        return honest
    sent, mine = _arrays(instruction), _arrays(honest, instruction)
    names = sorted(sent)
    honest_step = np.concatenate([(mine[k].astype(np.float64) - sent[k]).ravel() for k in names])
    target = {k: v.astype(np.float64) for k, v in sent.items()}
    last_w, last_b = [k for k in names if k.endswith("weight")][-1], [k for k in names if k.endswith("bias")][-1]
    target[last_w] = np.zeros_like(target[last_w])
    target[last_b] = np.where(np.arange(target[last_b].size) == 0, 5.0, -5.0)
    toward = np.concatenate([(target[k] - sent[k]).ravel() for k in names])
    unit = honest_step / np.linalg.norm(honest_step)
    toward -= (toward @ unit) * unit
    step = 9.5 * np.linalg.norm(honest_step) * (0.05 * unit + np.sqrt(1 - 0.05**2) * toward / np.linalg.norm(toward))
    forged, i = {}, 0
    for k in names:
        forged[k] = (sent[k] + step[i:i + sent[k].size].reshape(sent[k].shape)).astype(sent[k].dtype)
        i += sent[k].size
    return _forge(instruction, honest, arrays=_record(forged, instruction))


def _absent_from_training(instruction: Message, honest: Message, rnd: int) -> Message:
    if instruction.metadata.message_type != "train":
        return honest
    return Message(Error(code=0, reason="not taking part"), reply_to=instruction)


# The seed of the real-loop bar, fixed before any result of the default rule was seen: OV split 10 (the run).
BAR_SEEDS = (10,)
BAR_ROUNDS = 5


@pytest.mark.parametrize("seed", BAR_SEEDS)
def test_one_in_band_model_replacer_of_three_cannot_pull_the_held_out_mcc_below_the_honest_run(ov_path, tmp_path, seed):
    """Issue 22's in-band replacer on the real loop with robust='auto' (the coordinate-wise median with 3 sites, Yin
    et al. 2018; opt-in: the default stays 'mean' until auto's honest cost is measured at 5 seeds). By design,
    every coordinate of each new global model lies between the two honest sites' clipped values (whatever the
    replacer sends), and the replacer is kept (in band, not large) and clipped.
    Measured against the run whose three sites are all honest (same seed, same rule): the held-out MCC is never more
    than 0.05 below it in a round after the first. One-sided on purpose: the two-sided bar of the issue ("within
    0.05") is NOT met; the attacked run is often *above* the honest one (seed 10: +0.19, -0.01, +0.01, +0.12 in
    rounds 2-5), because the per-round MCC on 63 patients moves by 0.1 between rounds of one honest run
    (benchmarks/results/inband_attacker_ov.json). Before (the weighted mean of the clipped steps) the replacer moved
    the model by its share of a step toward one class each round: held-out MCC 0.0, 0.0, -0.13, 0.20, 0.30 in
    rounds 1-5."""
    grid, attacked = _ov_run(tmp_path, "attacked", ov_path, 3, {1: _steer_to_one_class}, BAR_ROUNDS, seed=seed,
                              robust="auto")
    _, honest = _ov_run(tmp_path, "honest", ov_path, 3, {}, BAR_ROUNDS, seed=seed, robust="auto")
    mccs = [(a["server"]["mcc"], h["server"]["mcc"]) for a, h in zip(attacked, honest)]
    honest_max = 0.0  # the longest honest step so far: the bound comes from this and past rounds' honest norms
    for a in attacked:
        rnd, screen = a["round"], a["screening"]
        honest_max = max(honest_max, screen["step_norms"]["site1"], screen["step_norms"]["site2"])
        assert sorted(a["accepted"]) == ["site0", "site1", "site2"], a["rejected"]
        assert screen["aggregator"]["rule"] == "auto" and screen["aggregator"]["applied"] == "median"
        assert screen["step_norms"]["site0"] > 5 * screen["step_norms"]["site1"]  # in band, long
        assert screen["step_norms"]["site0"] * screen["clip"]["scale"]["site0"] == pytest.approx(
            screen["clip"]["bound"])
        assert screen["clip"]["bound"] <= honest_max * 1.0001
        if rnd + 1 not in grid.sent:
            continue
        sent, new = grid.sent[rnd], grid.sent[rnd + 1]  # the model of this round and the one it produced
        for k in new:  # between the honest sites' clipped values, coordinate by coordinate (Yin et al. 2018)
            clipped = np.stack([sent[k] + screen["clip"]["scale"][f"site{n - 1}"] * (grid.trained[(rnd, n)][k]
                                                                                      - sent[k]) for n in (2, 3)])
            tol = 1e-6 * (1 + np.abs(clipped).max())
            assert np.all(new[k] >= clipped.min(axis=0) - tol) and np.all(new[k] <= clipped.max(axis=0) + tol), k
    assert all(not h["rejected"] for h in honest), [h["rejected"] for h in honest]
    assert all(a >= h - 0.05 for a, h in mccs[1:]), mccs


def _sign_flip(instruction: Message, honest: Message, rnd: int) -> Message:
    if instruction.metadata.message_type != "train":
        return honest
    sent, mine = _arrays(instruction), _arrays(honest, instruction)
    return _forge(instruction, honest, arrays=_record({k: (2 * sent[k] - mine[k]).astype(mine[k].dtype)
                                                      for k in mine}, instruction))


def test_two_sign_flipped_colluders_of_four_never_stop_the_other_two(ov_path, tmp_path):
    """Before the change every site was rejected in every round (issue 22: MCC 0.184 against 0.626)."""
    _, history = _ov_run(tmp_path, "collude", ov_path, 4, {1: _sign_flip, 2: _sign_flip}, 3)
    for record in history:
        assert {"site2", "site3"} <= set(record["accepted"]), record["rejected"]


def _long_step(factor_of_global: float) -> Attack:
    """A step along the site's own honest direction, ``factor_of_global`` x the global model's norm (in band)."""
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if instruction.metadata.message_type != "train":
            return honest
        sent, mine = _arrays(instruction), _arrays(honest, instruction)
        gnorm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in sent.values()))
        step = {k: mine[k].astype(np.float64) - sent[k] for k in sent}
        norm = np.sqrt(sum(float((v ** 2).sum()) for v in step.values()))
        scale = factor_of_global * gnorm / norm
        return _forge(instruction, honest, arrays=_record({k: (sent[k] + scale * step[k]).astype(sent[k].dtype)
                                                          for k in sent}, instruction))

    return attack


def test_dp_neighbouring_consortia_give_every_other_site_the_same_decisions(tmp_path):
    """Consortia differing only in node 1's update (honest, sign-flipped, a long in-band step, a tiny step):
    under DP every other site's accept / clip decision is identical. Before the change the long step got both
    other sites rejected (their norms fell under 1/10 of a median that node 1's norm had moved)."""
    from test_adversarial import _run

    variants = {"honest": None, "flipped": _sign_flip, "long": _long_step(0.45), "tiny": _long_step(2e-4)}
    decisions = {}
    for name, attack in variants.items():
        (tmp_path / name).mkdir()
        _, _, history = _run(tmp_path / name, 3, {1: attack} if attack else {}, rounds=1, dp_clip_norm=0.5,
                             dp_noise_multiplier=1.0, dp_noise_seed=1)
        record = history[0]
        decisions[name] = {site: (site in record["accepted"], site in record["rejected"],
                                  record["screening"].get("clip", {}).get("scale", {}).get(site),
                                  record["screening"].get("clip", {}).get("bound"))
                           for site in ("site1", "site2")}
    for name in variants:
        assert decisions[name] == decisions["honest"], (name, decisions)
    assert all(accepted for accepted, *_ in decisions["honest"].values())


def _perfect_evaluation(instruction: Message, honest: Message, rnd: int) -> Message:
    """Every test patient reported as correctly classified: each confusion matrix replaced by the diagonal of its
    true-class totals (sizes, groups and score histograms unchanged, so every contract check passes)."""
    if instruction.metadata.message_type != "evaluate":
        return honest
    metrics = dict(honest.content["metrics"])
    for key in [k for k in metrics if k.startswith("cm-")]:
        cm = np.asarray(metrics[key]).reshape(int(np.sqrt(len(metrics[key]))), -1)
        metrics[key] = [int(v) for v in np.diag(cm.sum(axis=1)).ravel()]
    return _forge(instruction, honest, metrics=metrics)


def test_a_perfect_confusion_matrix_is_flagged_shown_and_excludable(ov_path, tmp_path):
    """Every round whose perfect matrix is implausible at alpha is flagged, and with eval-exclude-flagged left out
    of the pooled metric. With 21 test patients a site one round cannot always tell: measured p = 1.5e-6, 0.0034,
    0.0011 in rounds 1-3 at alpha 0.001, so 1 of 3 rounds is flagged (2 of 3, round 3 at p = 0.00064, with the
    screen before bounded influence: trust weights and the plain median bound trained a slightly different
    model)."""
    rounds = 3
    _, kept = _ov_run(tmp_path, "kept", ov_path, 3, {1: _perfect_evaluation}, rounds)
    _, dropped = _ov_run(tmp_path, "dropped", ov_path, 3, {1: _perfect_evaluation}, rounds,
                         eval_exclude_flagged=True)
    flagged_rounds = 0
    for k, d in zip(kept, dropped):
        ev = k["screening"]["evaluation"]
        check = ev["checks"]["site0"]
        assert check["correct"] == check["num"] == k["sites"]["site0"]["num"] and ev["excluded"] == []
        assert ev["flagged"] == (["site0"] if check["p_value"] < ev["alpha"] else []), ev
        assert sorted(k["pooled_over"]["sites"]) == ["site0", "site1", "site2"]
        if not ev["flagged"]:
            assert d["global"]["mcc"] == k["global"]["mcc"]
            continue
        flagged_rounds += 1
        assert d["screening"]["evaluation"]["excluded"] == ["site0"]
        assert sorted(d["pooled_over"]["sites"]) == ["site1", "site2"]
        assert d["pooled_over"]["patients"] == k["pooled_over"]["patients"] - k["sites"]["site0"]["num"]
        assert d["global"]["mcc"] == pytest.approx(check["mcc_without"])
        assert d["global"]["mcc"] < k["global"]["mcc"]  # the reply inflated the global metric
    assert flagged_rounds >= 1, [k["screening"]["evaluation"]["checks"]["site0"]["p_value"] for k in kept]
    html = (tmp_path / "kept" / "report.html").read_text()
    assert "evaluations out of line" in html and "site0: 21 of 21 correct" in html
