"""The speed work of issue 24 keeps the model's numbers: per-epoch losses and per-seed test predictions on real OV
data equal those recorded with the code before it (tests/data/training_trace_before*.json, one per CPU platform,
written by benchmarks/training_trace.py at commit 914b358, 1 torch thread).

What this pins: seed 10's first 20 epochs (losses) and seed 30's whole 200-epoch run (every epoch's losses, every test
patient's predicted class and probability, the test MCC). The other seeds of the record (20, 40, 50) are compared by
``python benchmarks/training_trace.py --compare tests/data/training_trace_before_avx2.json`` (or the record of
the platform at hand; too slow for CI).

Each record holds float32 results of one platform (torch build and CPU kernels: AVX512 and AVX2 are recorded); on
another platform the low bits of a matmul may differ and 200 epochs amplify them, so those two tests skip (saying why)
where no record matches. The third test needs no record: it trains with the layer as the code before ran it (PyG's
propagate, tests/pyg_reference.py) and with the current one, in this process, and asserts the same losses and weights
bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pyg_reference import use_pyg_reference_convs

from magnet_core.cohort.data import load_for_seed
from magnet_core.model.config import get_preset
from magnet_core.model.train import build_model, in_dims_of, split_sets, train_epochs

ROOT = Path(__file__).resolve().parents[1]
# One record per platform the suite runs on (AVX512 and AVX2 machines), each made with the code before issue 24.
BEFORE = sorted((ROOT / "tests" / "data").glob("training_trace_before*.json"))
LOSS_RTOL = 1e-5  # float32 tolerance on each epoch's loss, CE and KL


def _trace(ov_path: Path, seed: int, epochs: int) -> dict:
    """benchmarks/training_trace.py in a fresh interpreter at 1 thread (as the record was made)."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks')\n"
            "from magnet_core.model.threads import apply_thread_policy; apply_thread_policy()\n"
            "from training_trace import trace\n"
            f"print(json.dumps(trace(__import__('pathlib').Path({str(ov_path)!r}), {seed}, {epochs})))")
    env = {**os.environ, "MAGNET_FL_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def platform() -> dict:
    """What decides float32 results' low bits: torch build and the CPU kernels it picks."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available()}


def _before(seed: int) -> dict:
    records = [json.loads(p.read_text()) for p in BEFORE]
    record = next((r for r in records if r.get("platform") == platform()), None)
    if record is None:
        pytest.skip(f"records made on {[r.get('platform') for r in records]}, this is {platform()}: low-bit float "
                    "differences are expected; test_training_equals_the_pre_issue_24_layer_bit_for_bit still compares")
    return next(r for r in record["runs"] if r["seed"] == seed)


def _assert_same_losses(new: list[dict], old: list[dict]) -> None:
    assert len(new) <= len(old)
    for epoch, (a, b) in enumerate(zip(new, old)):
        for key in ("loss", "ce", "kl"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL, abs=1e-7), (epoch, key, a[key], b[key])


def test_first_epochs_have_the_losses_of_the_code_before(ov_path):
    new = _trace(ov_path, 10, 20)
    _assert_same_losses(new["losses"], _before(10)["losses"][:20])


def test_a_whole_seed_has_the_losses_predictions_and_mcc_of_the_code_before(ov_path):
    new, old = _trace(ov_path, 30, 200), _before(30)
    _assert_same_losses(new["losses"], old["losses"])
    assert new["pred"] == old["pred"]
    np.testing.assert_allclose(new["probs"], old["probs"], rtol=0, atol=1e-4)
    assert new["mcc"] == old["mcc"]


def test_training_equals_the_pre_issue_24_layer_bit_for_bit(ov_path):
    p = get_preset("ov")
    cohort = load_for_seed(ov_path, 20, log=lambda *a, **k: None)
    train, _ = split_sets(cohort, p.graph.sparsity, p.graph.rule, p.graph.k)

    def run(reference: bool) -> tuple[list[dict], list[torch.Tensor]]:
        model = build_model(in_dims_of(cohort), cohort.num_classes, p.model, 20)
        if reference:
            use_pyg_reference_convs(model)
        torch.manual_seed(20)
        losses: list[dict] = []
        train_epochs(model, train, p.train, 12, on_epoch=lambda e, s: losses.append(s))
        return losses, [q.detach().clone() for q in model.parameters()]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (ours, w_ours), (ref, w_ref) = run(False), run(True)
    finally:
        torch.set_num_threads(threads)
    assert ours == ref
    assert all(torch.equal(a, b) for a, b in zip(w_ours, w_ref))
