"""Real deployment on loopback: PKI, a TLS SuperLink with SuperNode authentication, three SuperNodes on real data.

Checks that an unregistered SuperNode is refused, a SuperNode killed during a round does not stop the run and
rejoins later with the same key, a restarted run resumes from the checkpoint at the next round, malformed site data fail validation, and a poisoned
update is rejected and named in the log. Every process is bounded by `timeout` and stopped by its pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Started processes, each in its own session under `timeout`, stopped by pid at the end."""

    def __init__(self, logdir: Path, env: dict):
        self.logdir, self.env, self.procs = logdir, env, {}

    def start(self, name: str, cmd: list[str], limit: int = 1200) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        proc = subprocess.Popen(["timeout", str(limit), *cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, cwd=REPO)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def _run(cmd: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _rounds_done(out: Path) -> int:
    ckpt = out / "checkpoint.pt"
    if not ckpt.exists():
        return 0
    try:
        return int(torch.load(ckpt, weights_only=False)["round"])
    except Exception:  # being written
        return 0


def _rejoin(procs: Processes, name: str, cmd: list[str], timeout: float) -> None:
    """Restart a killed SuperNode until the SuperLink accepts it again, as a service manager would."""
    deadline = time.monotonic() + timeout
    for attempt in range(1, 1000):
        proc = procs.start(f"{name}-rejoin{attempt}", cmd)
        attempt_ends = min(deadline, time.monotonic() + 45)  # refused: it exits, or keeps retrying on its own
        while proc.poll() is None and time.monotonic() < attempt_ends:
            if "SuperNode ID:" in procs.log(f"{name}-rejoin{attempt}"):
                return
            time.sleep(1)
        procs.kill(f"{name}-rejoin{attempt}")
        if time.monotonic() >= deadline:
            break
        time.sleep(5)
    pytest.fail(f"{name} did not rejoin within {timeout:.0f} s")


def _dump_logs(procs: Processes, env: dict, scope: dict) -> None:
    """On failure, print what the processes logged so that a failure in CI can be diagnosed from its output."""
    for path in sorted(procs.logdir.glob("super*.log")):
        lines = path.read_text(errors="replace").splitlines()
        print(f"----- last 60 lines of {path.name} -----", *lines[-60:], sep="\n")
    for var in ("run_id", "run2"):
        if var in scope:
            try:
                shown = _run(["flwr", "log", scope[var], "consortium", "--show"], env, timeout=60)
            except subprocess.TimeoutExpired:
                continue
            print(f"----- flwr log {var} -----", *shown.stdout.splitlines()[-80:], sep="\n")


def _prepare_sites(data_root: Path, work: Path) -> tuple[list[Path], Path]:
    """Three site folders from the (already normalised) mixOmics cohort, and a manifest of its features."""
    from magnet_core.manifest import ConsortiumManifest, ModalitySpec

    root = data_root / "tcga-brca-mixomics"
    labels = pd.read_csv(root / "labels.csv", index_col=0)
    mods = {m: pd.read_csv(root / f"{m}.csv.gz", index_col=0) for m in ("mRNA", "miRNA", "protein")}
    sites = []
    for s, part in zip("abc", np.array_split(np.random.default_rng(0).permutation(labels.index), 3)):
        d = work / "sites" / f"site-{s}"
        d.mkdir(parents=True)
        labels.loc[sorted(part)].to_csv(d / "labels.csv")
        for m, df in mods.items():
            df.loc[df.index.intersection(part)].to_csv(d / f"{m}.csv.gz")
        sites.append(d)
    manifest = ConsortiumManifest(name="brca", classes=["Basal", "Her2", "LumA"],
                                  modalities=[ModalitySpec(name=m, features=list(df.columns)) for m, df in mods.items()])
    return sites, manifest.save(work / "manifest.toml")


def test_deployment_on_loopback(data_root, tmp_path):
    if shutil.which("timeout") is None:
        pytest.fail("coreutils `timeout` is required to bound the processes this test starts")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cli = [sys.executable, "-m", "simulations.cli"]
    sites, manifest = _prepare_sites(data_root, tmp_path)

    # malformed data at a site: validation fails with a clear message, and its SuperNode refuses to start
    bad = tmp_path / "bad-site"
    shutil.copytree(sites[0], bad)
    frame = pd.read_csv(bad / "mRNA.csv.gz", index_col=0).astype(object)
    frame.iat[3, 2] = "not-a-number"
    frame.to_csv(bad / "mRNA.csv.gz")
    checked = _run([*cli, "validate-site", str(bad), "--manifest", str(manifest)], env)
    assert checked.returncode == 1 and "non-numeric value 'not-a-number'" in checked.stdout

    pki = tmp_path / "pki"
    port = _free_port()
    for args in (["init"], ["server", "--host", "localhost"]):
        assert _run([*cli, "pki", *args, "--dir", str(pki)], env).returncode == 0
    for s in "abcd":
        assert _run([*cli, "pki", "site", f"site-{s}", "--dir", str(pki), "--superlink", f"127.0.0.1:{port}"],
                    env).returncode == 0
    bundles = {s: pki / "sites" / f"site-{s}" for s in "abcd"}

    procs = Processes(tmp_path, env)
    try:
        procs.start("superlink", [*cli, "deploy", "superlink", "--pki", str(pki), "--state", str(tmp_path / "state"),
                                  "--host", "127.0.0.1", "--port", str(port)])

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        _wait(listening, 60, "the SuperLink to listen")
        assert _run([*cli, "deploy", "connection", "--pki", str(pki), "--address", f"127.0.0.1:{port}",
                     "--flwr-home", env["FLWR_HOME"]], env).returncode == 0
        for s in "abc":  # site-d is never registered
            reg = _run([*cli, "deploy", "register", "--bundle", str(bundles[s])], env)
            assert reg.returncode == 0, reg.stdout + reg.stderr

        from server.deploy_cli import supernode_command

        for i, s in enumerate("abc"):
            extra = "test-poison='scale'" if s == "c" else ""  # a huge-norm update every round
            procs.start(f"supernode-{s}", supernode_command(bundles[s], sites[i], manifest, _free_port(), extra))
        refused = _run(["timeout", "90", *supernode_command(bundles["d"], sites[0], manifest, _free_port()),
                        "--max-retries", "1"], env, timeout=120)
        assert refused.returncode != 0
        assert "No SuperNode found with the given public key" in procs.log("superlink")
        assert "Failed to activate SuperNode" in refused.stdout + refused.stderr

        invalid = _run([*cli, "deploy", "supernode", "--bundle", str(bundles["a"]), "--data", str(bad),
                        "--manifest", str(manifest)], env)
        assert invalid.returncode == 1 and "failed validation" in invalid.stderr

        out = tmp_path / "run"
        run_config = (f"num-server-rounds=3 local-epochs=3 min-sites=2 preset='brca' straggler-grace=10.0 "
                      f"round-timeout=100.0 manifest='{manifest}' out-dir='{out}'")
        started = _run(["flwr", "run", str(REPO), "consortium", "--run-config", run_config], env)
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = re.search(r"run (\d+)", started.stdout).group(1)
        _wait(lambda: _rounds_done(out) >= 1, 360, "round 1")
        procs.kill("supernode-b")  # a site drops out during round 2
        _wait(lambda: _rounds_done(out) >= 2, 420, "round 2 without site-b")
        stopped = _run(["flwr", "stop", run_id, "consortium"], env)  # the coordinator's run goes down
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        log1 = _run(["flwr", "log", run_id, "consortium", "--show"], env).stdout

        # the killed site rejoins with the same key once the SuperLink has marked it offline (<= ~60 s)
        _rejoin(procs, "supernode-b", supernode_command(bundles["b"], sites[1], manifest, _free_port()), 240)

        # all three sites are up again: the resumed run waits for all of them (no straggler cut-off for site-b)
        resumed_config = run_config.replace("min-sites=2", "min-sites=3") + " resume=true"
        resumed = _run(["flwr", "run", str(REPO), "consortium", "--run-config", resumed_config], env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        run2 = re.search(r"run (\d+)", resumed.stdout).group(1)
        _wait(lambda: (out / "history.json").exists(), 480, "the resumed run to finish")
        log2 = _run(["flwr", "log", run2, "consortium", "--show"], env).stdout
    except BaseException:
        _dump_logs(procs, env, locals())
        raise
    finally:
        procs.stop_all()

    import json

    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[0]["accepted"] == ["site-a", "site-b"]
    assert history[1]["accepted"] == ["site-a"]  # site-b was killed; the round completed without it
    for r in history[:2]:  # the poisoned site, named in every round of the first run
        assert "update norm" in r["rejected"]["site-c"], r
    assert history[2]["accepted"] == ["site-a", "site-b"]  # site-b rejoined; the resumed run used it
    assert "REJECTED update from node" in log1 and "(site-c)" in log1
    assert "resuming from" in log2 and "after round 2" in log2
    seconds = [round(r["seconds"], 1) for r in history]
    print(f"seconds per round: {seconds}; training part: {[round(r['train_seconds'], 1) for r in history]}")
