"""Thread policy: each check runs in a fresh interpreter, because OpenMP reads its wait policy when torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magnet_core.model import threads

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                               threads.THREADS_ENV)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


REPORT = ("import json, os, torch; print(json.dumps({'policy': p.model_dump(), 'torch': torch.get_num_threads(), "
          "'interop': torch.get_num_interop_threads(), 'wait': os.environ.get('OMP_WAIT_POLICY')}))")


def test_policy_before_torch_sets_threads_from_cores_and_workers_and_passive_wait():
    out = _run("import sys\nfrom magnet_core.model.threads import apply_thread_policy\nassert 'torch' not in sys.modules\n"  # noqa: E501 (one assertion string)
               "p = apply_thread_policy(workers=2, cores=4)\n" + REPORT)
    assert out["policy"]["threads"] == 2 == out["torch"]  # 4 cores / 2 workers
    assert out["interop"] == 1 and out["policy"]["interop_threads"] == 1
    assert out["wait"] == "PASSIVE" and out["policy"]["wait_policy_effective"] is True
    assert out["policy"]["source"] == "cores/workers"


def test_env_override_and_launcher_budget():
    forced = _run("from magnet_core.model.threads import apply_thread_policy\np = apply_thread_policy(workers=4)\n" + REPORT,  # noqa: E501 (one assertion string)
                  MAGNET_FL_THREADS="3")
    assert forced["torch"] == 3 and forced["policy"]["source"] == "MAGNET_FL_THREADS"
    # a launcher's OMP_NUM_THREADS (Ray sets it per actor from num_cpus) caps the cores
    ray_like = _run("from magnet_core.model.threads import apply_thread_policy\np = apply_thread_policy()\n" + REPORT,
                    OMP_NUM_THREADS="1")
    assert ray_like["policy"]["cores"] == 1 and ray_like["torch"] == 1


def test_late_call_after_openmp_started_falls_back_to_one_thread():
    out = _run("import torch\ntorch.set_num_threads(2)\ntorch.ones(300, 300) @ torch.ones(300, 300)\n"
               "from magnet_core.model.threads import apply_thread_policy\np = apply_thread_policy(cores=2)\n" + REPORT)
    assert out["policy"]["wait_policy_effective"] is False
    assert out["torch"] == 1 and "one thread" in out["policy"]["note"]


def test_cli_applies_the_policy_before_the_command():
    # a command that runs (and fails at once on a missing file): the policy is applied before its module loads
    out = _run("import json, os, sys\nfrom simulations import cli\n"
               "assert cli.main(['site', 'policy', 'check', '/nonexistent/policy.toml']) != 0\n"
               "import torch\nprint(json.dumps({'torch': torch.get_num_threads(), "
               "'wait': os.environ.get('OMP_WAIT_POLICY')}))", MAGNET_FL_THREADS="1")
    assert out == {"torch": 1, "wait": "PASSIVE"}


def test_bad_override_and_bad_workers_are_clear_errors(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="MAGNET_FL_THREADS must be a positive integer"):
        threads.apply_thread_policy()
    monkeypatch.delenv(threads.THREADS_ENV)
    with pytest.raises(ValueError, match="workers"):
        threads.apply_thread_policy(workers=0)


def test_available_cores_reads_affinity_quota_and_launcher(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.available_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.available_cores() == 1
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads._cgroup_cpu_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert threads._cgroup_cpu_quota(quota) is None
