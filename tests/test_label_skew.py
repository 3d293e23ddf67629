"""Label-skew methods: logit adjustment / Balanced Softmax and FedLC at the sites (magnet_core.model.loss)."""

from __future__ import annotations

import json

import pytest
import torch

from magnet_core.model.loss import label_offsets, magnet_loss

EMPTY = torch.zeros((2, 0), dtype=torch.long)


def _manual_ce(logits: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor) -> float:
    z = logits.double() + offsets.double()
    out = 0.0
    for i in range(len(y)):
        finite = torch.isfinite(z[i])
        out += float(torch.logsumexp(z[i][finite], 0) - z[i, y[i]])
    return out / len(y)


@pytest.mark.parametrize("kind", ["logit-adjust", "fedlc"])
def test_adjusted_loss_equals_its_formula_on_a_skewed_site(kind):
    counts = torch.tensor([40, 3, 0, 7])  # a label-skewed site: class 2 absent
    tau = 1.5
    offsets = label_offsets(counts, kind, tau)
    n = counts.double()
    for c in range(4):
        if counts[c] == 0:
            assert offsets[c] == float("-inf")
        elif kind == "logit-adjust":
            assert float(offsets[c]) == pytest.approx(tau * float(torch.log(n[c] / n.sum())), rel=1e-6)
        else:
            assert float(offsets[c]) == pytest.approx(-tau * float(n[c]) ** -0.25, rel=1e-6)
    torch.manual_seed(0)
    logits = torch.randn(12, 4, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 3, 0, 0, 1, 3, 3, 0, 0])
    fused = torch.randn(12, 3)
    loss, stats = magnet_loss(logits, y, EMPTY, torch.zeros(0), fused, kl_weight=0.0, offsets=offsets)
    assert float(loss) == pytest.approx(_manual_ce(logits.detach(), y, offsets), rel=1e-5)
    plain, _ = magnet_loss(logits, y, EMPTY, torch.zeros(0), fused, kl_weight=0.0)
    assert float(loss) != pytest.approx(float(plain), rel=1e-3)  # the adjustment changes the loss
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, 2] == 0)  # absent class not pushed down


def test_tau_zero_or_none_is_plain_and_bad_values_are_refused():
    counts = torch.tensor([5, 1])
    assert label_offsets(counts, "none", 1.0) is None and label_offsets(counts, "fedlc", 0.0) is None
    with pytest.raises(ValueError, match="unknown label adjustment"):
        label_offsets(counts, "focal", 1.0)
    with pytest.raises(ValueError, match="tau"):
        label_offsets(counts, "logit-adjust", -1.0)


def test_logit_adjusted_and_fedlc_run_end_to_end(tmp_path):
    from simulations.cli import main

    out = tmp_path / "sim"
    code = main(["simulate", "--scenario", "label-skew-3", "--rounds", "2", "--local-epochs", "1", "--seeds", "10",
                 "--engine", "inprocess", "--methods", "federated,logit_adjusted,fedlc", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method_settings"]["logit_adjusted"]["label-adjustment"] == "logit-adjust"
    assert res["method_settings"]["fedlc"]["label-adjustment"] == "fedlc"
    assert res["method_settings"]["federated"]["label-adjustment"] == "none"
    models = {m: torch.load(out / "runs" / f"{m}-seed10" / "model.pt", weights_only=True)
              for m in ("federated", "logit_adjusted", "fedlc")}
    for m in ("logit_adjusted", "fedlc"):
        assert res["results"][m]["mcc"]["per_seed"][0] is not None
        assert any(not torch.equal(models[m][k], models["federated"][k]) for k in models[m])
