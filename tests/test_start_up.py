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
    """torch.optim's step wrapper imports torch._dynamo (~1.2 s per process); make_optimizer's Adam steps without it."""
    loaded = _modules_after(
        "import json, sys, torch\n"
        "from magnet_core.model.config import get_preset\n"
        "from magnet_core.model.train import make_optimizer, build_model\n"
        "p = get_preset('ov'); m = build_model({'a': 4}, 2, p.model, 0)\n"
        "opt, sched = make_optimizer(m, p.train); opt.zero_grad(); sd = opt.state_dict(); opt.load_state_dict(sd)\n"
        "x = torch.rand(5, 4); m([x], torch.ones(5, 1, dtype=torch.bool), torch.tensor([[0, 1], [1, 0]]),\n"
        "  torch.ones(2))[0].sum().backward(); opt.step(); sched.step()  # a whole training step\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules}))")
    assert not loaded["dynamo"]


# Modules no site process needs at start: the compiler stack, PyG, scikit-learn, SciPy, Ray, plotting.
NOT_AT_SITE_START = ("torch._dynamo", "torch_geometric", "sklearn", "scipy", "ray", "matplotlib", "umap")


def _loaded(names: tuple[str, ...]) -> str:
    return "json.dumps({m: m in sys.modules for m in " + repr(list(names)) + "})"


def test_client_app_module_imports_no_torch():
    """The ClientApp is loaded per message; in deployment it only forwards the message to the site's worker, so its
    module must not load torch (nor anything heavier): a top-level torch import anywhere on its path fails here."""
    loaded = _modules_after(
        "import json, sys\n"
        "from flwr.clientapp import ClientApp\n"
        "import client.app\n"
        "assert isinstance(client.app.app, ClientApp)\n"
        f"print({_loaded(('torch',) + NOT_AT_SITE_START)})")
    assert not any(loaded.values()), {m for m, v in loaded.items() if v}


def test_site_worker_help_and_module_import_no_torch():
    """``magnet-fl site-worker --help`` and the worker's module load no torch (the worker loads it when it starts)."""
    loaded = _modules_after(
        "import contextlib, io, json, sys\n"
        "from simulations.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): assert main(['site-worker', '--help']) == 0\n"
        "import client.worker\n"
        f"print({_loaded(('torch',) + NOT_AT_SITE_START)})")
    assert not any(loaded.values()), {m for m, v in loaded.items() if v}


def test_site_worker_start_loads_only_what_it_serves():
    """What the worker loads when it starts (client/worker.py ``run``: torch, the site validation, the round handlers)
    pulls in none of the modules no site needs: a top-level import of one of them on that path fails here."""
    loaded = _modules_after(
        "import json, sys\n"
        "import client.worker\n"
        "import torch\n"
        "from magnet_core.cohort.manifest import ConsortiumManifest\n"
        "from magnet_core.cohort.validation import validate_site\n"
        "from client import handlers\n"
        "from magnet_core.model.site import *\n"
        f"print({_loaded(NOT_AT_SITE_START)})")
    assert not any(loaded.values()), {m for m, v in loaded.items() if v}
