"""make_optimizer's Adam (magnet_core/model/optim.py) is torch.optim.Adam in every number, state and setting."""

from __future__ import annotations

import copy

import torch

from magnet_core.model.config import get_preset
from magnet_core.model.optim import adam
from magnet_core.model.train import build_model, make_optimizer


def _steps(model, opt, sched, grads):
    for i, step_grads in enumerate(grads):
        for j, (p, g) in enumerate(zip(model.parameters(), step_grads)):
            p.grad = None if (i == 2 and j % 3 == 0) else g.clone()  # some parameters without a gradient sometimes
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adam_equals_torch_adam_bit_for_bit():
    cfg = get_preset("ov").train
    base = build_model({"a": 40, "b": 24}, 3, get_preset("brca").model, 1)
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in base.parameters()] for _ in range(25)]
    ours_model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    ours, ours_sched = make_optimizer(ours_model, cfg)
    ref = torch.optim.Adam(ref_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    assert isinstance(ours, torch.optim.Adam) and type(ours) is not torch.optim.Adam
    a, b = _steps(ours_model, ours, ours_sched, grads), _steps(ref_model, ref, ref_sched, grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    assert all(torch.equal(sa["state"][k][n], sb["state"][k][n]) for k in sa["state"] for n in sa["state"][k])
    # a state saved by one loads into the other and they go on equal
    ref.load_state_dict(copy.deepcopy(sa))
    more = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in base.parameters()] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(_steps(ours_model, ours, ours_sched, more),
                                                   _steps(ref_model, ref, ref_sched, more)))


def test_settings_it_does_not_cover_run_torch_adam():
    model = torch.nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    opt = adam(model.parameters(), lr=0.1)
    opt.param_groups[0]["amsgrad"] = True
    ref = torch.optim.Adam(twin.parameters(), lr=0.1, amsgrad=True)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()
        ref.step()
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), twin.parameters()))
    assert "max_exp_avg_sq" in opt.state[next(iter(model.parameters()))]
