"""AUROC and average precision without scikit-learn: the same numbers as scikit-learn, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from magnet_core.model.metrics import binary_auroc, binary_average_precision, classification_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", range(40))
def test_auroc_and_average_precision_equal_sklearn_exactly(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    y = rng.integers(0, 2, n)
    y[0], y[-1] = 0, 1  # both classes
    if seed % 3 == 0:  # many ties (coarse scores), as a saturated model gives
        score = (rng.integers(0, 5, n) / 4).astype(np.float32)
    elif seed % 3 == 1:
        score = rng.random(n).astype(np.float32)
    else:
        score = rng.random(n)
    assert binary_auroc(y, score) == roc_auc_score(y, score)
    assert binary_average_precision(y, score) == average_precision_score(y, score)


def test_classification_metrics_do_not_import_sklearn():
    code = ("import json, sys\nimport numpy as np\nfrom magnet_core.model.metrics import metrics_with_groups\n"
            "m = metrics_with_groups(np.array([0, 1, 1, 0]), np.array([[.8, .2], [.3, .7], [.6, .4], [.5, .5]]), "
            "np.array([True, False, True, False]), 2)\n"
            "print(json.dumps({'sklearn': 'sklearn' in sys.modules, 'auroc': m['auroc']}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"sklearn": False, "auroc": 0.75}
    full = classification_metrics(np.array([0, 1, 1, 0]), np.array([[.8, .2], [.3, .7], [.6, .4], [.5, .5]]), 2)
    assert full["auroc"] == roc_auc_score([0, 1, 1, 0], [.2, .7, .4, .5])
