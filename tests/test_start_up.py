"""Start-up imports only what a command needs (issue 24 item 2): checked on sys.modules in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_does_not_import_torch():
    loaded = _modules_after(
        "import contextlib, io, json, sys\n"
        "from simulations.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): code = main(['--help'])\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, 'numpy': 'numpy' in sys.modules,"
        " 'wait': __import__('os').environ.get('OMP_WAIT_POLICY')}))")
    assert loaded["code"] == 0
    assert not loaded["torch"] and not loaded["numpy"]
    assert loaded["wait"] is not None  # the wait policy is in the environment before torch could load


def test_training_does_not_import_the_compiler_stack():
    loaded = _modules_after(
        "import json, sys, torch\n"
        "from magnet_core.model.config import get_preset\n"
        "from magnet_core.model.train import make_optimizer, build_model\n"
        "p = get_preset('ov'); m = build_model({'a': 4}, 2, p.model, 0)\n"
        "opt, sched = make_optimizer(m, p.train); opt.zero_grad(); sd = opt.state_dict(); opt.load_state_dict(sd)\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules}))")
    assert not loaded["dynamo"]


def test_the_per_message_client_app_does_not_import_torch():
    """A deployed SuperNode starts a ClientApp per message that only forwards it to the site's worker
    (client/worker_link.py): importing the app must not import torch (seconds per message, on every stage of every
    round)."""
    loaded = _modules_after("import json, sys\nimport client.app\n"
                            "print(json.dumps({'torch': 'torch' in sys.modules}))")
    assert not loaded["torch"]
