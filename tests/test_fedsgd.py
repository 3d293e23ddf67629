"""fedsgd: each site's update is one full-batch gradient step, the coordinator runs centralized training's optimiser
(torch's Adam with the preset's learning rate and StepLR schedule) on their mean. The pieces are checked against
torch itself; the coordinator's side against recomputation in tests/test_adversarial.py, the site's policy in
tests/test_malicious_coordinator.py."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from magnet_core.federation.aggregate import (
    TORCH_ADAM_BETAS,
    TORCH_ADAM_EPS,
    ServerOptState,
    server_opt_step,
    step_lr,
)
from magnet_core.model.optim import GradientStep
from server.config import FederatedConfig


def test_the_coordinators_torch_adam_is_torch_adam():
    """Five steps along given gradients (spanning six decades, as a model's do): the same weights as
    torch.optim.Adam with the same learning rate, to float64 rounding."""
    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=5)}
    params = [torch.tensor(w[k], requires_grad=True) for k in "ab"]
    opt = torch.optim.Adam(params, lr=1e-3)
    state, current = ServerOptState(), {k: v.copy() for k, v in w.items()}
    for _ in range(5):
        grads = {k: rng.normal(size=v.shape) * 10.0 ** rng.integers(-6, 0) for k, v in w.items()}
        for p, k in zip(params, "ab"):
            p.grad = torch.tensor(grads[k])
        opt.step()
        aggregated = {k: current[k] - grads[k] for k in current}  # the sites' mean update: minus the gradient
        current, state = server_opt_step(current, aggregated, state, "torch-adam", 1e-3, *TORCH_ADAM_BETAS,
                                         TORCH_ADAM_EPS)
    for p, k in zip(params, "ab"):
        np.testing.assert_allclose(current[k], p.detach().numpy(), rtol=0, atol=1e-15)
    # the other rule places its constant elsewhere: not the same numbers (so the test above can fail)
    other, _ = server_opt_step(w, {k: w[k] - 1e-7 for k in w}, ServerOptState(), "adam", 1e-3, 0.9, 0.999, 1e-8)
    mine, _ = server_opt_step(w, {k: w[k] - 1e-7 for k in w}, ServerOptState(), "torch-adam", 1e-3, 0.9, 0.999, 1e-8)
    assert not np.allclose(other["a"], mine["a"], rtol=0, atol=1e-6)


def test_the_coordinators_schedule_is_centralized_trainings_steplr():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.8)
    for epoch in range(65):
        assert step_lr(0.5, 20, 0.8, epoch + 1) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        sched.step()


def test_a_gradient_step_is_sgd_of_size_one_with_weight_decay():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 5)
    mine, ref = GradientStep(a.parameters(), 1e-3), torch.optim.SGD(b.parameters(), lr=1.0, weight_decay=1e-3)
    for model, opt in ((a, mine), (b, ref)):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


GRADIENT = dict(local_update="gradient", local_epochs=1, server_optimizer="preset-adam", aggregation="fedavg")


def test_a_gradient_round_is_one_epoch_and_shares_no_prototypes():
    with pytest.raises(ValueError, match="local-epochs=1"):
        FederatedConfig(local_update="gradient", local_epochs=2)
    with pytest.raises(ValueError, match="local-epochs=1"):
        FederatedConfig(local_update="gradient", local_epochs=1, prototype_weight=1.0)
    with pytest.raises(ValueError, match="preset-adam"):  # gradients averaged as the model: a step of size 1
        FederatedConfig(local_update="gradient", local_epochs=1, aggregation="fedavg")
    FederatedConfig(local_update="gradient", local_epochs=1, server_optimizer="preset-adam", aggregation="fedavg")


@pytest.mark.parametrize("other", [{"aggregation": "modality-aware"}, {"robust": "median"},
                                   {"robust": "auto"}, {"robust": "trimmed-mean"}])
def test_gradients_are_averaged_by_training_patients_only(other):
    """Per-modality weights would give a site that alone holds a modality that encoder's whole step; a median or
    trimmed mean drops the honest gradients of sites with a different label mix."""
    with pytest.raises(ValueError, match="aggregation='fedavg'"):
        FederatedConfig(**{**GRADIENT, **other})




def test_gradients_get_the_gradient_screen_unless_the_config_says_step():
    assert FederatedConfig(**GRADIENT).screen == "gradient"
    assert FederatedConfig(**GRADIENT, update_screen="step").screen == "step"
    assert FederatedConfig().screen == "step"
    with pytest.raises(ValueError, match="update-screen='step'"):  # local-Adam steps keep the band against the model
        FederatedConfig(update_screen="gradient")
    with pytest.raises(ValueError, match="update-screen='step'"):  # agreement weighting would drop skewed sites
        FederatedConfig(**GRADIENT, trust_weighting=True)
    FederatedConfig(**GRADIENT, trust_weighting=True, update_screen="step")


def _gradients(norms: list[float], seed: int = 0) -> dict[int, np.ndarray]:
    """One gradient per site with the given norms, directions drawn at random (opposed pairs included)."""
    rng = np.random.default_rng(seed)
    out = {}
    for node, n in enumerate(norms):
        d = rng.normal(size=50)
        out[node] = n * d / np.linalg.norm(d) * (-1 if node % 2 else 1)
    return out


def test_the_gradient_screen_keeps_honest_gradients_of_any_direction_and_length():
    """Under label skew honest full-batch gradients differ in length and point apart (tcga-ov-magnet, 5 sites,
    Dirichlet 0.1: at times longer than the model's norm; benchmarks/results/screening_label_skew_fedsgd.json). The
    step screen rejects them; the gradient screen keeps every one, shortening those beyond the bound (the lower
    median norm x gradient-clip-factor)."""
    from magnet_core.federation.screening import ScreenMemory, ScreenRules, screen_gradients, screen_updates

    model = {"w": np.full(50, 0.1)}  # norm ~0.71: some gradients are longer than the model
    deltas = _gradients([0.05, 0.2, 0.4, 1.5, 3.0])
    gradient = screen_gradients(model, deltas)
    assert all(d.accepted for d in gradient.values())
    assert gradient[4].bound == pytest.approx(0.4)  # the lower median
    assert [d.scale for d in gradient.values()] == pytest.approx([1.0, 1.0, 1.0, 0.4 / 1.5, 0.4 / 3.0])
    step = screen_updates(model, deltas, ScreenMemory())
    assert not step[3].accepted and not step[4].accepted  # longer than half the model's norm
    wide = screen_gradients(model, deltas, ScreenRules(gradient_clip_factor=10.0))
    assert [d.scale for d in wide.values()] == [1.0] * 5


@pytest.mark.parametrize("forged", [1e6, 1e-3])
def test_two_of_five_sites_cannot_move_the_gradient_screens_bound_outside_the_honest_norms(forged):
    """Two sites sending gradients 1e6 long (to lift the bound) or barely above the band (to pull it down): the
    bound stays within the honest sites' norms, so a forged gradient moves the mean by at most its share x the
    longest honest norm, and no honest gradient is shortened below the shortest honest one."""
    from magnet_core.federation.screening import screen_gradients

    honest = [0.3, 0.5, 0.8]
    decisions = screen_gradients({"w": np.ones(50)}, _gradients([*honest, forged, forged], seed=1))
    bound = decisions[0].bound
    assert min(honest) <= bound <= max(honest)
    assert all(decisions[i].norm * decisions[i].scale >= min(honest) - 1e-12 for i in range(3))
    if forged > bound:
        assert decisions[3].norm * decisions[3].scale == pytest.approx(bound)


def test_half_of_an_even_number_of_sites_can_shorten_the_honest_gradients_but_not_turn_them():
    """As screen_gradients says: two of four sites sending short gradients set the lower median, so the honest
    gradients are shortened to it (the run slows); every honest gradient is still accepted and keeps its direction.
    One of three cannot."""
    from magnet_core.federation.screening import screen_gradients

    honest = [0.5, 0.8]
    even = screen_gradients({"w": np.ones(50)}, _gradients([*honest, 1e-3, 1e-3], seed=2))
    assert even[0].bound == pytest.approx(1e-3)
    assert all(even[i].accepted and 0 < even[i].scale < 1 for i in range(2))
    odd = screen_gradients({"w": np.ones(50)}, _gradients([*honest, 1e-3], seed=2))
    assert odd[0].bound == pytest.approx(0.5)


def test_the_gradient_screen_rejects_no_gradient_and_clips_to_the_dp_norm_under_dp():
    """A zero gradient is rejected even with update-min-ratio = 0 (else it could set a zero bound and stop the run);
    under DP every gradient is clipped to the public clip norm, whatever the others sent."""
    from magnet_core.federation.screening import ScreenRules, screen_gradients

    deltas = {**_gradients([0.5, 2.0]), 2: np.zeros(50)}
    decisions = screen_gradients({"w": np.ones(50)}, deltas, dp_clip=1.0)
    assert "barely differs from zero" in decisions[2].reason
    assert decisions[0].scale == 1.0 and decisions[1].scale == pytest.approx(0.5)
    no_band = screen_gradients({"w": np.ones(50)}, deltas, ScreenRules(min_to_global=0.0))
    assert not no_band[2].accepted and no_band[0].bound == pytest.approx(0.5)


def test_fedsgd_has_nothing_to_tune():
    from simulations.tune import tunables

    assert tunables("fedsgd") == []
    assert "server-lr" in tunables("fedadam")


def test_simulate_fedsgd_runs_rounds_times_epochs_rounds_of_one_step(tmp_path):
    """`simulate --methods fedsgd --rounds 2 --local-epochs 3`: 6 rounds of one epoch, the settings recorded, the
    coordinator's learning rate the preset's, every round's model moved."""
    from magnet_core.model.config import get_preset
    from simulations.cli import main

    out = tmp_path / "sim"
    assert main(["simulate", "--scenario", "iid-3", "--rounds", "2", "--local-epochs", "3", "--seeds", "10",
                 "--engine", "inprocess", "--methods", "fedsgd,federated", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    settings = res["method_settings"]["fedsgd"]
    assert (settings["local-update"], settings["server-optimizer"], settings["aggregation"]) == \
        ("gradient", "preset-adam", "fedavg")
    assert "server-lr" not in settings  # preset-adam's step size is the preset's, recorded per round below
    history = json.loads((out / "runs" / "fedsgd-seed10" / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5, 6]
    lr = get_preset("ov").train.lr
    assert all(r["screening"]["server_optimizer"]["lr"] == pytest.approx(lr) for r in history)
    assert all(r["screening"]["server_optimizer"]["step_norm"] > 0 for r in history)
    assert res["results"]["fedsgd"]["mcc"]["per_seed"][0] is not None
    # rounds.csv puts both on one axis, local epochs per site: fedsgd's 6 rounds of 1, FedAvg's 2 rounds of 3
    with (out / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    done = {m: [int(r["local_epochs_done"]) for r in rows if r["method"] == m] for m in ("fedsgd", "federated")}
    assert done == {"fedsgd": [1, 2, 3, 4, 5, 6], "federated": [3, 6]}
