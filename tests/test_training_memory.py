"""Training epochs reuse the memory the previous epoch freed (no fresh pages, no kernel zeroing per epoch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAULTS = """
import json, resource, torch
torch.set_num_threads(1)
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.config import ModelConfig, TrainConfig
from magnet_core.model.network import build_model
from magnet_core.model.train import PatientSet, train_epochs
c = make_generated_cohort(n=250, dims={"a": 1000, "b": 448}, seed=0)
data = PatientSet.from_cohort(c, 0.8, "dense")
model = build_model({"a": 1000, "b": 448}, c.num_classes, ModelConfig(hidden=256, heads=8), 0)
torch.manual_seed(0)
opt = torch.optim.Adam(model.parameters())
train_epochs(model, data, TrainConfig(), 3, optimizer=opt)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_epochs(model, data, TrainConfig(), 1, optimizer=opt)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults_per_epoch": sorted(faults)[3], "edges": data.graph.num_edges}))  # median of 7
"""


def test_epochs_after_the_first_do_not_page_fault_their_activations_again():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # one (edges x 256) float32 activation is edges / 4 pages of 4 KiB; an epoch allocates about ten of them, and
    # before the allocator setting every one was faulted in again (measured 21,658 faults per epoch here). Now the
    # median epoch faults fewer pages than half of one such activation (small leftovers: heap growth, Python).
    assert out["edges"] > 5000
    assert out["faults_per_epoch"] < out["edges"] / 8, out
