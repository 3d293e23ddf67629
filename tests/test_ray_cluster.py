"""A 50-site consortium through Flower's simulation engine on an existing Ray cluster (head started here)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from server.config import FederatedConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    """`ray start --head --block` on loopback, bounded in time and stopped by its pid."""
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    log = open(tmp_path / "ray-head.log", "w")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's unix socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray head exited early: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
        try:
            probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}')"],
                                   capture_output=True, env=env, timeout=30)
            if probe.returncode == 0:
                break
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray head did not come up within 90 s")
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_fifty_sites_on_an_existing_ray_cluster(ray_head, tmp_path):
    """One round: its 50 trainings and evaluations already run on the cluster's actors, each actor serving many
    sites in turn; a second round would repeat the same calls."""
    import ray

    from simulations.engine import run_flower

    scenario = tmp_path / "fifty.toml"
    scenario.write_text('name = "iid-50"\nnum_sites = 50\npartition = "iid"\n')
    cfg = FederatedConfig(num_server_rounds=1, local_epochs=1, data_path="generated:1500", scenario=str(scenario),
                          seed=3, min_sites=50, out_dir=str(tmp_path / "run"))
    try:
        params, history = run_flower(cfg, 50, ray_address=ray_head)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert [r["round"] for r in history] == [1]
    assert len(history[0]["accepted"]) == 50
    assert sum(s["num"] for s in history[0]["sites"].values()) > 0
