"""Real deployment on loopback: PKI with site-held keys, a TLS SuperLink (closed control plane, SuperNode
authentication) started by `magnet-fl deploy superlink`, three SuperNodes on real data.

Checks that bundles carry no private key, that an outsider holding ca.crt and its own key cannot register a node,
list runs, start a run or join, a SuperNode killed during a round does not stop the run and rejoins later with the
same key, a restarted run resumes from the checkpoint at the next round, malformed site data fail validation, a
poisoned update is rejected and named in the log, and a 2-round run over the same processes under authenticated secure
aggregation (every site's keys signed with its node_auth_key and checked against the roster) with distributed DP noise
sums all three sites' masked updates and records a growing epsilon. Every site's worker enforces the site's own policy
(`magnet-fl site policy init`): open for the plain runs (which train in the clear and, on resume, train again from
the checkpointed model: both refused by the default policy), then, before the secure run, tightened by the site to the
default (authenticated secure sums with the site's own DP noise only), which the running worker reads on change; each
site's audit log and privacy accounts show the secure rounds it answered. Every process is bounded by `timeout` and
stopped by its pid.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
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

    def spawn(self, name: str, cmd: list[str], env: dict | None = None, limit: int = 120) -> None:
        """A short command started now and read later with :meth:`result` (its stdout and stderr apart), so that
        independent steps overlap: every process start here costs seconds (imports) on a loaded machine."""
        out, err = open(self.logdir / f"{name}.out", "w"), open(self.logdir / f"{name}.err", "w")
        self.procs[name] = subprocess.Popen(["timeout", str(limit), *cmd], stdout=out, stderr=err,
                                            env=env or self.env, start_new_session=True, cwd=REPO)

    def result(self, name: str, timeout: float = 150) -> subprocess.CompletedProcess:
        t = time.monotonic()
        proc = self.procs.pop(name)
        code = proc.wait(timeout=timeout)  # `timeout` ends it first
        _stamp(f"{name} done", t)
        return subprocess.CompletedProcess(proc.args, code, (self.logdir / f"{name}.out").read_text(errors="replace"),
                                           (self.logdir / f"{name}.err").read_text(errors="replace"))

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


_T0 = [time.monotonic()]


def _stamp(what: str, since: float) -> None:
    now = time.monotonic()
    print(f"TIMING {now - _T0[0]:7.1f} s  (+{now - since:6.1f} s) {what}", flush=True)


def _run(cmd: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    t = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    _stamp("run " + " ".join(str(c) for c in cmd[:5])[:100], t)
    return done


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    t = time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            _stamp("wait " + what, t)
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


def _finished(out: Path, rounds: int) -> bool:
    """The run wrote its final model and a history of ``rounds`` rounds (history.json is rewritten every round)."""
    import json

    try:
        return (out / "model.pt").exists() and len(json.loads((out / "history.json").read_text())) == rounds
    except (OSError, ValueError):
        return False


def _rejoin(procs: Processes, name: str, cmd: list[str], timeout: float) -> None:
    """Restart a killed SuperNode until the SuperLink accepts it again, as a service manager would."""
    deadline = time.monotonic() + timeout
    for attempt in range(1, 1000):
        proc = procs.start(f"{name}-rejoin{attempt}", cmd)
        attempt_ends = min(deadline, time.monotonic() + 45)  # refused: it exits, or keeps retrying on its own
        while proc.poll() is None and time.monotonic() < attempt_ends:
            if "SuperNode ID:" in procs.log(f"{name}-rejoin{attempt}"):
                return
            time.sleep(0.2)
        procs.kill(f"{name}-rejoin{attempt}")
        if time.monotonic() >= deadline:
            break
        time.sleep(2)
    pytest.fail(f"{name} did not rejoin within {timeout:.0f} s")


def _dump_logs(procs: Processes, env: dict, scope: dict) -> None:
    """On failure, print what the processes logged so that a failure in CI can be diagnosed from its output."""
    for path in sorted([*procs.logdir.glob("super*.log"), *procs.logdir.glob("worker-*.log")]):
        lines = path.read_text(errors="replace").splitlines()
        print(f"----- last 60 lines of {path.name} -----", *lines[-60:], sep="\n")
    for var in ("run_id", "run2", "run3"):
        if var in scope:
            try:
                shown = _run(["flwr", "log", scope[var], "consortium", "--show"], env, timeout=60)
            except subprocess.TimeoutExpired:
                continue
            print(f"----- flwr log {var} -----", *shown.stdout.splitlines()[-80:], sep="\n")


# `flwr stop RUN consortium` the moment a run's history holds ROUNDS rounds: Flower's own CLI, imported beforehand, so
# the stop lands within a poll of the round's end (a `flwr stop` process started then needs seconds to import, and
# the run's next round, with one site offline, may finish first). argv: history.json, ROUNDS, then flwr's arguments.
STOP_AFTER = """
import json, sys, time
from pathlib import Path
from flwr.cli.app import app
history, rounds = Path(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        if len(json.loads(history.read_text())) >= rounds:
            break
    except (OSError, ValueError):
        pass
    time.sleep(0.05)
sys.argv = ["flwr", *sys.argv[3:]]
app()
"""


def _pem_blocks(path: Path) -> list[str]:
    """Every private-key block (PEM or OpenSSH) in a file."""
    return re.findall(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", path.read_text(errors="replace"))


def _assert_no_site_private_key(pki: Path, site_dirs: dict[str, Path]) -> None:
    """Bundles hold no private key; the coordinator's folder holds only its own keys (CA, SuperLink TLS) and no
    byte of any site's private key."""
    coordinator = [p for p in pki.rglob("*") if p.is_file()]
    assert sorted(p.name for p in coordinator if _pem_blocks(p)) == ["ca.key", "server.key"]
    assert not [p for p in (pki / "sites").rglob("*") if p.is_file() and _pem_blocks(p)]
    for d in site_dirs.values():
        assert [p.name for p in d.iterdir() if _pem_blocks(p)] == ["node_auth_key"]  # the one the site made
        body = "".join((d / "node_auth_key").read_text().splitlines()[1:-1])
        for p in coordinator:
            text = p.read_text(errors="replace").replace("\n", "")
            assert body[20:80] not in text, p


def _listen_addresses(pid: int, port: int) -> set[str]:
    """Local addresses a process tree listens on at ``port``."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def _one_line(text: str) -> str:
    """Rich panels and colour codes removed, whitespace collapsed: an error as one quotable line."""
    return " ".join(re.sub(r"[\u2500-\u257f]|\x1b\[[0-9;]*m", " ", text).split())


def _outsider_is_refused(procs: Processes, outsider: Path, env: dict, data: Path, manifest: Path, app: Path) -> None:
    """An outsider with ca.crt and its own fresh key, reaching the Fleet address, cannot register a node, list runs,
    start a run, or join with a SuperNode. Each refusal is printed for the record."""
    from client.deploy_site import supernode_command

    forbidden = "Forbidden: this address serves only the Fleet API"
    attempts = {"register a node": ["flwr", "supernode", "register", str(outsider / "node_auth_key.pub"), "outsider"],
                "list runs": ["flwr", "ls", "outsider"],
                "start a run": ["flwr", "run", str(app), "outsider"]}
    for what, cmd in attempts.items():
        tried = _run(cmd, env)
        said = _one_line(tried.stdout + tried.stderr)
        print(f"OUTSIDER {what}: `{' '.join(cmd[:3])} ...` exit {tried.returncode}: {said}")
        assert tried.returncode != 0 and forbidden in said, said
    node = _run(["timeout", "90", *supernode_command(outsider, data, manifest, _free_port()), "--max-retries", "1"],
                env, timeout=120)
    said = _one_line(node.stdout + node.stderr)
    print(f"OUTSIDER join as a SuperNode: exit {node.returncode}: "
          f"{said[said.find('Failed to activate'):][:120] if 'Failed to activate' in said else said[-300:]}")
    assert node.returncode != 0 and "Failed to activate SuperNode" in said
    logged = [line for line in procs.log("superlink").splitlines() if "No SuperNode found with the given" in line]
    assert logged
    line = _one_line(logged[0])
    print(f"OUTSIDER join, SuperLink log: {line[:line.find('public key:') + 11]} ... "
          f"{line[line.find('exception:'):]}")


# what a site relaxes in its default policy for the plain runs: training in the clear (no secure sum, no DP noise,
# no authenticated sum), and training twice from one model (the resumed run trains again from the checkpoint)
OPEN_POLICY = {"train = true": "train = false", "authenticated = true": "authenticated = false",
               "min_noise_multiplier = 1.0": "min_noise_multiplier = 0.0",
               "epsilon_budget = 10.0": "epsilon_budget = inf",
               "train_once_per_model = true": "train_once_per_model = false"}


def _site_policies(site_dirs: dict[str, Path]) -> dict[str, str]:
    """Each site writes its policy with `magnet-fl site policy init` (in-process: a process per call costs seconds;
    the defaults, authenticated secure sums only) and opens it for the plain runs; returns the default texts."""
    import argparse

    from client import site_cli

    parser = argparse.ArgumentParser()
    site_cli.add_arguments(parser)
    default = {}
    for s, d in site_dirs.items():
        path = d / "policy.toml"
        assert site_cli.run(parser.parse_args(["policy", "init", str(path), "--consortium", "brca"])) == 0
        default[s] = text = path.read_text()
        for old, new in OPEN_POLICY.items():
            text, n = re.subn(rf"^{re.escape(old)}(?=\s)", new, text, flags=re.M)
            assert n == 1, old
        _write_policy(path, text)
    return default


def _write_policy(path: Path, text: str) -> None:
    """Replace a policy file in one step (a worker reading it meanwhile sees the old or the new file)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, path)


def _prepare_sites(data_root: Path, work: Path) -> tuple[list[Path], Path]:
    """Three site folders from the (already normalised) mixOmics cohort, and a manifest of its features."""
    from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec

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
                                  modalities=[ModalitySpec(name=m, features=list(df.columns))
                                              for m, df in mods.items()])
    # each site enrols with its patient counts (what `validate-site --enrol` prints); the server bounds replies by them
    from magnet_core.cohort.validation import load_site_cohort
    from magnet_core.consortium.simulated import enrolled_site

    enrolment = {f"site-{s}": enrolled_site(load_site_cohort(d, manifest, 0), any_seed=True)
                 for s, d in zip("abc", sites)}
    manifest = manifest.model_copy(update={"sites": enrolment})
    return sites, manifest.save(work / "manifest.toml")


def _app_source(dst: Path) -> Path:
    """The app source tree `flwr run` is given: this checkout's files without its git-ignored folders (.venv*, caches,
    runs). Flower's bundle builder walks and pattern-matches every file under the app folder before filtering, which
    takes 10-45 s per bundle with a virtualenv inside the checkout (as in CI); the bundle built from this copy is
    byte-identical (same files, sorted, fixed date), so its sha256 is this checkout's release hash."""
    import pathspec

    ignored = pathspec.GitIgnoreSpec.from_lines((REPO / ".gitignore").read_text().splitlines())
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel = Path(dirpath).relative_to(REPO)
        dirnames[:] = [d for d in dirnames if d != ".git" and not ignored.match_file(f"{(rel / d).as_posix()}/")]
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if not (Path(dirpath) / name).is_symlink():
                shutil.copy2(Path(dirpath) / name, dst / rel / name)
    return dst


def test_deployment_on_loopback(data_root, tmp_path):
    if shutil.which("timeout") is None:
        pytest.fail("coreutils `timeout` is required to bound the processes this test starts")
    t0 = time.monotonic()
    _T0[0] = t0
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cli = [sys.executable, "-m", "simulations.cli"]
    sites, manifest = _prepare_sites(data_root, tmp_path)
    _stamp("sites prepared", t0)

    # malformed data at a site: validation fails with a clear message, and its SuperNode refuses to start (both
    # checked below, their processes run beside the start-up)
    bad = tmp_path / "bad-site"
    shutil.copytree(sites[0], bad)
    frame = pd.read_csv(bad / "mRNA.csv.gz", index_col=0).astype(object)
    frame.iat[3, 2] = "not-a-number"
    frame.to_csv(bad / "mRNA.csv.gz")

    # PKI in-process (its CLI is tested in tests/test_pki.py; a process per call costs seconds here): each site
    # makes its own key pair and sends only the public key; the coordinator registers it and issues the bundle
    # (ca.crt, site.toml, the registered public key), which the site copies next to its private key
    from server.pki import init_ca, issue_server_cert, make_site, make_site_key

    pki = tmp_path / "pki"
    fleet, control = _free_port(), _free_port()
    init_ca(pki)
    issue_server_cert(pki, ["localhost"])
    site_dirs = {s: tmp_path / "at-site" / f"site-{s}" for s in "abc"}
    for s, d in site_dirs.items():
        make_site_key(d, comment=f"site-{s}")
        for f in make_site(pki, f"site-{s}", d / "node_auth_key.pub", f"127.0.0.1:{fleet}").iterdir():
            shutil.copy(f, d / f.name)
    _assert_no_site_private_key(pki, site_dirs)
    default_policy = _site_policies(site_dirs)
    roster = pki / "registered_sites.csv"  # the consortium roster: each site's worker checks the others' keys by it
    app = _app_source(tmp_path / "app")  # the release the sites reviewed: this checkout's app files
    _stamp("sites, pki, policies, app", t0)

    procs = Processes(tmp_path, env)
    try:
        # everything that needs no SuperLink starts now, side by side: the SuperLink itself, the site workers of
        # sites b and c (they load torch and the site's data), site-a's approval of the app bundle, and the two
        # checks of the malformed site
        procs.start("superlink", [*cli, "deploy", "superlink", "--pki", str(pki / "superlink"),
                                  "--state", str(tmp_path / "state"), "--fleet-address", f"127.0.0.1:{fleet}",
                                  "--control-port", str(control)])
        sockets = {"a": site_dirs["a"] / "worker" / "worker.sock"}
        for i, s in enumerate("bc", start=1):  # sites b and c run their worker as a service of its own
            sockets[s] = tmp_path / f"worker-{s}" / "worker.sock"
            # site-c sends a huge-norm update every round: its worker is the real one with its training wrapped
            # from the test side (tests/poisoned_worker.py; the site's code has no poisoning hook)
            worker = [sys.executable, str(REPO / "tests" / "poisoned_worker.py"), "--poison", "site-c=scale"] \
                if s == "c" else [*cli, "site-worker"]
            # site-c keeps its own log of what crossed its boundary (its worker's own --site-log-dir)
            log_c = ["--site-log-dir", str(tmp_path / "log-c")] if s == "c" else []
            procs.start(f"worker-{s}", [*worker, "--socket", str(sockets[s]), "--data", str(sites[i]),
                                        "--manifest", str(manifest), "--site-name", f"site-{s}", *log_c,
                                        "--policy", str(site_dirs[s] / "policy.toml"), "--secagg-roster", str(roster),
                                        "--identity-key", str(site_dirs[s] / "node_auth_key")])
        # each site approves the app bundle of the release it reviewed: the only code its SuperNode runs
        procs.spawn("approve-a", [*cli, "deploy", "approve-app", "--bundle", str(site_dirs["a"]), str(app)])
        procs.spawn("validate-bad", [*cli, "validate-site", str(bad), "--manifest", str(manifest)])
        procs.spawn("connection", [*cli, "deploy", "connection", "--pki", str(pki / "superlink"), "--address",
                                   f"127.0.0.1:{control}", "--flwr-home", env["FLWR_HOME"]])
        from client import approved_apps
        from flower_compat.app_bundle import app_bundle_sha256

        release = app_bundle_sha256(app)
        for d in (site_dirs["b"], site_dirs["c"], tmp_path / "outsider"):
            approved_apps.approve(d / approved_apps.FILE, release, "this checkout")

        # the outsider: on the sites' network (reaches only the Fleet address), holds ca.crt and its own fresh key
        from server.deploy_cli import write_connection

        outsider = tmp_path / "outsider"
        make_site_key(outsider, comment="outsider")
        shutil.copy(site_dirs["a"] / "ca.crt", outsider / "ca.crt")
        (outsider / "site.toml").write_text(f'site = "outsider"\nsuperlink = "127.0.0.1:{fleet}"\n')
        outsider_env = {**env, "FLWR_HOME": str(outsider / "flwr-home")}
        write_connection(outsider / "flwr-home", "outsider", f"127.0.0.1:{fleet}", outsider / "ca.crt")

        approval = procs.result("approve-a")
        assert approval.returncode == 0, approval.stderr
        assert approved_apps.load(site_dirs["a"] / approved_apps.FILE).hashes() == {release}
        # site-a is started from the line `deploy supernode --print` prints, pasted into a shell
        # (with --worker: a persistent site worker holds the data, graphs and torch; the per-message ClientApp only
        # forwards the message to it over a private Unix socket)
        procs.spawn("print-a", [*cli, "deploy", "supernode", "--bundle", str(site_dirs["a"]), "--data",
                                str(sites[0]), "--manifest", str(manifest), "--port", str(_free_port()),
                                "--skip-validation", "--worker", "--policy", str(site_dirs["a"] / "policy.toml"),
                                "--secagg-roster", str(roster), "--print"])
        procs.spawn("supernode-bad", [*cli, "deploy", "supernode", "--bundle", str(site_dirs["a"]), "--data",
                                      str(bad), "--manifest", str(manifest)])

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", fleet)) == 0
        _wait(listening, 60, "the SuperLink to listen")
        t_up = time.monotonic() - t0
        assert _listen_addresses(procs.procs["superlink"].pid, control) == {"127.0.0.1"}  # Control: loopback only
        assert procs.result("connection").returncode == 0
        for s in "abc":
            procs.spawn(f"register-{s}", [*cli, "deploy", "register", "--bundle", str(site_dirs[s])])
        for s in "abc":
            registered = procs.result(f"register-{s}")
            assert registered.returncode == 0, registered.stdout + registered.stderr

        from client.deploy_site import supernode_command

        printed = procs.result("print-a")
        assert printed.returncode == 0, printed.stderr
        words = shlex.split(printed.stdout)  # the worker's own command line holds the policy, roster and site key
        for flag, path in (("--policy", "policy.toml"), ("--identity-key", "node_auth_key")):
            assert words[words.index(flag) + 1] == str((site_dirs["a"] / path).resolve())
        procs.start("supernode-a", ["bash", "-c", printed.stdout.strip()])
        for i, s in enumerate("bc", start=1):
            extra = {"worker-socket": str(sockets[s])}
            procs.start(f"supernode-{s}", supernode_command(site_dirs[s], sites[i], manifest, _free_port(), extra))

        checked = procs.result("validate-bad")
        assert checked.returncode == 1 and "non-numeric value 'not-a-number'" in checked.stdout
        invalid = procs.result("supernode-bad")
        assert invalid.returncode == 1 and "failed validation" in invalid.stderr
        _wait(lambda: all(p.exists() for p in sockets.values()), 300, "the site workers to listen")

        out = tmp_path / "run"
        run_config = (f"num-server-rounds=3 local-epochs=2 min-sites=2 preset='brca' straggler-grace=10.0 "
                      f"round-timeout=100.0 manifest='{manifest}' out-dir='{out}' "
                      f"site-keys='{pki}/registered_sites.csv'")
        started = _run(["flwr", "run", str(app), "consortium", "--run-config", run_config], env)
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = re.search(r"run (\d+)", started.stdout).group(1)
        # the coordinator's run goes down after round 2 (see STOP_AFTER)
        procs.spawn("stop1", [sys.executable, "-c", STOP_AFTER, str(out / "history.json"), "2", "stop", run_id,
                              "consortium"], limit=900)
        # a site drops out during round 2: a watcher kills it as soon as round 1's checkpoint appears (a round takes
        # seconds, less than the outsider's attempts below, so the watcher runs beside them)
        dropped = threading.Event()

        def drop_site_b() -> None:
            _wait(lambda: _rounds_done(out) >= 1, 360, "round 1", interval=0.05)
            _stamp("round 1 done", t0)
            procs.kill("supernode-b")
            dropped.set()

        watcher = threading.Thread(target=drop_site_b, daemon=True)
        watcher.start()
        _outsider_is_refused(procs, outsider, outsider_env, sites[0], manifest, app)  # while the rounds run
        _stamp("outsider refused", t0)
        watcher.join(timeout=400)
        _stamp("site-b dropped", t0)
        assert dropped.is_set(), "round 1 did not finish"
        _wait(lambda: _rounds_done(out) >= 2, 420, "round 2 without site-b")
        stopped = procs.result("stop1", timeout=900)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        procs.spawn("log1", ["flwr", "log", run_id, "consortium", "--show"])  # read beside the rejoin

        # the killed site rejoins with the same key once the SuperLink has marked it offline (<= ~60 s)
        _rejoin(procs, "supernode-b", supernode_command(site_dirs["b"], sites[1], manifest, _free_port(),
                                                        {"worker-socket": str(sockets["b"])}), 240)
        _stamp("site-b rejoined", t0)
        log1 = procs.result("log1").stdout

        # all three sites are up again: the resumed run waits for all of them (no straggler cut-off for site-b)
        resumed_config = run_config.replace("min-sites=2", "min-sites=3") + " resume=true"
        resumed = _run(["flwr", "run", str(app), "consortium", "--run-config", resumed_config], env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        run2 = re.search(r"run (\d+)", resumed.stdout).group(1)
        _wait(lambda: _finished(out, 3), 480, "the resumed run to finish")
        procs.spawn("log2", ["flwr", "log", run2, "consortium", "--show"])  # read beside the secure run

        # the same three sites, a short run under authenticated secure aggregation with distributed DP noise: each
        # site clips its update to dp-clip-norm and adds its own noise piece before masking, signs its keys with its
        # node_auth_key and checks every other site's against the roster; the coordinator sees masked vectors only.
        # First each site tightens its policy back to the default (its worker reads the file again on change);
        # a new model (seed 11): the default policy never trains twice from one model, and seed 10's initial
        # model was trained from in the clear above
        for s, d in site_dirs.items():
            _write_policy(d / "policy.toml", default_policy[s])
        secure_out = tmp_path / "run-secure"
        secure_config = (f"num-server-rounds=2 local-epochs=1 min-sites=3 preset='brca' straggler-grace=10.0 "
                         f"round-timeout=100.0 manifest='{manifest}' out-dir='{secure_out}' secagg=true "
                         f"site-keys='{roster}' secagg-roster='{roster}' seed=11 "
                         f"dp-clip-norm={DP_CLIP} dp-noise-multiplier={DP_Z}")
        t_secure = time.monotonic()
        secured = _run(["flwr", "run", str(app), "consortium", "--run-config", secure_config], env)
        assert secured.returncode == 0, secured.stdout + secured.stderr
        run3 = re.search(r"run (\d+)", secured.stdout).group(1)
        _wait(lambda: _finished(secure_out, 2), 720, "the secure run to finish")
        t_secure = time.monotonic() - t_secure
        log3 = _run(["flwr", "log", run3, "consortium", "--show"], env).stdout
        log2 = procs.result("log2").stdout
    except BaseException:
        _dump_logs(procs, env, locals())
        raise
    finally:
        procs.stop_all()

    import json

    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    assert sorted(history[0]["accepted"]) == ["site-a", "site-b"]  # in the order the replies arrived
    assert history[1]["accepted"] == ["site-a"]  # site-b was killed; the round completed without it
    for r in history[:2]:  # the poisoned site, named in every round of the first run
        assert "update norm" in r["rejected"]["site-c"], r
    assert sorted(history[2]["accepted"]) == ["site-a", "site-b"]  # site-b rejoined; the resumed run used it
    assert "REJECTED update from node" in log1 and "(site-c)" in log1
    assert "resuming from" in log2 and "after round 2" in log2
    from magnet_core.artefacts.report import write_report

    report = (out / "report.html").read_text()  # the coordinator's report, refreshed by the ServerApp every round
    assert "site-c" in report and "update norm" in report and "http://" not in report and "https://" not in report
    site_view = write_report(tmp_path / "log-c").read_text()  # site-c's own view: what it sent and received
    assert "site-c" in site_view and "arrays/" in site_view
    _assert_secure_dp_rounds(json.loads((secure_out / "history.json").read_text()), log3)
    _assert_site_policies_enforced(site_dirs, int(run3))
    seconds = [round(r["seconds"], 1) for r in history]
    print(f"seconds per round: {seconds}; training part: {[round(r['train_seconds'], 1) for r in history]}; "
          f"SuperLink up after {t_up:.0f} s; secure + DP run (2 rounds) {t_secure:.0f} s; "
          f"whole test {time.monotonic() - t0:.0f} s")


DP_CLIP, DP_Z = 1.0, 1.0  # the secure run's DP settings (run config dp-clip-norm, dp-noise-multiplier)


def _assert_secure_dp_rounds(history: list[dict], log: str) -> None:
    """Every round of the secure run was securely aggregated over the three sites (the coordinator's own summary,
    screening["secure_aggregation"]), with distributed noise, and the spent epsilon is recorded and grows."""
    from magnet_core.federation.dp import exact_epsilon

    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        secure = r["screening"]["secure_aggregation"]
        assert secure["status"] == "aggregated", secure
        # authenticated: every site's key advert was signed by the enrolled key the roster lists; none left out
        assert secure["authenticated"] is True and secure["left_out"] == secure["blamed"] == {}, secure
        assert secure["excluded"] == []
        assert sorted(secure["sites"]) == ["site-a", "site-b", "site-c"] == sorted(r["accepted"])
        assert secure["threshold"] == 2 and secure["dropped_before_masking"] == secure["dropped_after_masking"] == []
        assert secure["clip_norm"] == DP_CLIP and secure["dp_noise"] == "distributed"
        assert set(secure["bytes_per_site"]) == {"site-a", "site-b", "site-c"}
        assert all(b["up"] > 0 for b in secure["bytes_per_site"].values())
        assert "step_norms" not in r["screening"]  # no per-site update reached the coordinator's checks
        dp = r["dp"]
        assert dp["noise"] == "distributed" and dp["noise_pieces"] == 3 and dp["threshold"] == 2
        assert dp["rounds"] == r["round"] and dp["delta"] == 1e-5
        z_eff = DP_Z * (3 / 2) ** 0.5  # three pieces of std z C / sqrt(t) in the sum, t = 2
        assert abs(dp["effective_noise_multiplier"] - z_eff) < 1e-9
        assert abs(dp["epsilon"] - exact_epsilon([z_eff] * r["round"], 1e-5)) < 1e-6 * dp["epsilon"]
    assert 0 < history[0]["dp"]["epsilon"] < history[1]["dp"]["epsilon"]
    assert "secure aggregation over 3 site(s)" in log and "DP (distributed)" in log
    up = sorted({b["up"] for r in history for b in r["screening"]["secure_aggregation"]["bytes_per_site"].values()})
    print(f"secure + DP run: epsilon after each round {[round(r['dp']['epsilon'], 3) for r in history]} "
          f"(delta 1e-5, z {DP_Z}, effective {DP_Z * 1.5 ** 0.5:.3f}); upload bytes per site and round {up}")


def _assert_site_policies_enforced(site_dirs: dict[str, Path], secure_run: int) -> None:
    """Each site's own record of the secure run: its policy (the default, authenticated secure sums with DP only) is
    the file its worker read; its audit log verifies and shows every message of the secure run answered under it,
    both secure training rounds among them; its own accountant charged both rounds against its budget."""
    from client.accountant import epsilon, round_multiplier
    from client.policy import load_policy
    from client.site_state import SiteState
    from magnet_core.artefacts.audit_chain import AUDIT_FILE, read_entries, verify_chain
    from magnet_core.protocol.keys import QUERY, SECAGG_ACTION, SECAGG_MASK, SECAGG_SHARE, SECAGG_UNMASK, TRAIN
    from magnet_core.protocol.keys import message_type as kind

    spent = {}
    for s, d in site_dirs.items():
        policy = load_policy(d / "policy.toml")
        line = next(n for n, text in enumerate((d / "policy.toml").read_text().splitlines(), 1)
                    if text.startswith("authenticated = true"))
        assert policy.where("secure_aggregation.authenticated").endswith(
            f"line {line}: secure_aggregation.authenticated = True")
        assert policy.secure_aggregation.train and policy.privacy.min_noise_multiplier == DP_Z
        folder = policy.state_path()
        assert folder.resolve() == (d / "site-state").resolve()
        chain = verify_chain(folder / AUDIT_FILE)
        assert chain.ok, chain.problems
        entries = [e for e in read_entries(folder / AUDIT_FILE)[0] if e["run"] == secure_run]
        assert entries and all(e["decision"] == "answered" and e["site"] == f"site-{s}" for e in entries), \
            [(e["kind"], e["decision"], e["where"], e["error"]) for e in entries if e["decision"] != "answered"]
        trained = [e for e in entries if e["kind"] == kind(TRAIN, SECAGG_ACTION)]
        assert sorted(e["round"] for e in trained) == [1, 2] and all(e["release"]["bytes"] > 0 for e in trained)
        stages = {e["kind"] for e in entries}
        assert {kind(QUERY, a) for a in (SECAGG_SHARE, SECAGG_MASK, SECAGG_UNMASK)} <= stages, stages
        with SiteState(folder) as state:
            charged = state.accountant.rounds(policy.consortium)
            spent[s] = state.accountant.spent(policy.consortium, policy.privacy.delta, policy.privacy.accounting)
        z_site = round_multiplier(DP_Z, 2, 0)  # the site counts only the threshold's pieces (t = 2) as its noise
        assert [(r.run, r.round, r.noise_multiplier) for r in charged] == [(secure_run, 1, z_site),
                                                                             (secure_run, 2, z_site)]
        assert spent[s] == epsilon([z_site] * 2, 1e-5, "rdp") <= policy.privacy.epsilon_budget
    print(f"site policies: every site answered the secure run under its default policy (authenticated, z >= {DP_Z}); "
          f"epsilon each site counts spent of its budget 10: {spent}")
