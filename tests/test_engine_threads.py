"""Flower's simulation engine: each Ray actor's torch threads equal the CPUs it reserves."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ray
from simulations.engine import start_ray
start_ray(cpus_per_site={cpus})

@ray.remote(num_cpus={cpus})
def threads():  # what a ClientApp does first in its actor
    from magnet_core.model.threads import apply_thread_policy
    return apply_thread_policy().threads

print("THREADS", ray.get(threads.remote()))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to tell 1 thread from the machine's count")
def test_ray_actors_get_as_many_torch_threads_as_the_cpus_they_reserve():
    # without start_ray's OMP_NUM_THREADS the policy would give each actor every CPU of this machine
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MAGNET_FL_THREADS")}
    env.update(FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", PROBE.format(cpus=1)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("THREADS")]
    assert line == ["THREADS 1"], out.stdout[-2000:]
