"""A site runs only code it approved, and no other local user can take its tasks: attacks on a loopback deployment.

One SuperLink (`magnet-fl deploy superlink`, TLS, node authentication) and one site SuperNode started with `magnet-fl
deploy supernode` exactly as a hospital would, the site having approved one app bundle (its sha256 in
`approved-apps.toml` of its folder). Then:

* the coordinator runs its own, unreviewed app: its ClientApp would list the data folder, read `labels.csv`, the node
  config and the SuperNode's command line. The site refuses the bundle before storing it; the coordinator's
  ServerApp gets only an error reply that names the check; nothing of the site's data reaches it;
* another local user (uid `nobody` when the test runs as root) polls the SuperNode's Runtime API on 127.0.0.1 during a
  run of the approved app, as Flower's SuperExec does, to claim the site's task and read its context: every call is
  refused (no SuperExec secret), the approved app's reply arrives untouched.

Every process is bounded by `timeout` and stopped by its pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import tomli_w
from deployment_attacks import BENIGN_CLIENT_APP, EVIL_CLIENT_APP, LOCAL_ATTACKER, write_app
from test_deployment import BIN, Processes, _free_port, _run, _wait

MARK = "PATIENT-7f3c-0042"  # in the site's labels.csv: must never reach the coordinator


def _bundle_sha256(app: Path) -> str:
    """What `flwr run APP` sends, hashed (Flower's own builder, as the site computes it from reviewed source)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def _start_run(dep, app: Path, name: str, sleep: float = 0.0) -> Path:
    out = dep.tmp / f"{name}.json"
    started = _run(["flwr", "run", str(app), "consortium", "--run-config",
                    f"out='{out}' sleep={sleep} timeout=120.0"], dep.env)
    assert started.returncode == 0, started.stdout + started.stderr
    return out


def _result(dep, out: Path, what: str) -> dict:
    try:
        _wait(out.exists, 300, what)
    except BaseException:
        for path in sorted(dep.procs.logdir.glob("*.log")):
            print(f"----- last 40 lines of {path.name} -----", *path.read_text(errors="replace").splitlines()[-40:],
                  sep="\n")
        raise
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if shutil.which("timeout") is None:
        pytest.fail("coreutils `timeout` is required to bound the processes this test starts")
    from server.pki import init_ca, issue_server_cert, make_site, make_site_key

    tmp = tmp_path_factory.mktemp("attacks")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_HOME": str(tmp / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cli = [sys.executable, "-m", "simulations.cli"]
    pki, site = tmp / "pki", tmp / "at-site"
    fleet, control, runtime = _free_port(), _free_port(), _free_port()
    init_ca(pki)
    issue_server_cert(pki, ["localhost"])
    make_site_key(site, comment="site-a")
    for f in make_site(pki, "site-a", site / "node_auth_key.pub", f"127.0.0.1:{fleet}").iterdir():
        shutil.copy(f, site / f.name)
    data = tmp / "site-data"
    data.mkdir()
    (data / "labels.csv").write_text(f"sampleID,Class\n{MARK},LumA\n")
    (data / "mRNA.csv.gz").write_bytes(b"not read")
    manifest = tmp / "manifest.toml"
    manifest.write_text("")
    evil = write_app(tmp / "apps", "curious", EVIL_CLIENT_APP)
    benign = write_app(tmp / "apps", "reviewed", BENIGN_CLIENT_APP)
    # the site reviewed `reviewed` and listed its bundle's hash (what `magnet-fl deploy approve-app` writes)
    (site / "approved-apps.toml").write_text(tomli_w.dumps({"app": [{"sha256": _bundle_sha256(benign),
                                                                     "note": "reviewed release"}]}))
    procs = Processes(tmp, env)
    try:
        procs.start("superlink", [*cli, "deploy", "superlink", "--pki", str(pki / "superlink"), "--state",
                                  str(tmp / "state"), "--fleet-address", f"127.0.0.1:{fleet}", "--control-port",
                                  str(control)])

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", fleet)) == 0
        _wait(listening, 120, "the SuperLink to listen")
        assert _run([*cli, "deploy", "connection", "--pki", str(pki / "superlink"), "--address",
                     f"127.0.0.1:{control}", "--flwr-home", env["FLWR_HOME"]], env).returncode == 0
        registered = _run([*cli, "deploy", "register", "--bundle", str(site)], env)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        procs.start("supernode", [*cli, "deploy", "supernode", "--bundle", str(site), "--data", str(data),
                                  "--manifest", str(manifest), "--skip-validation", "--port", str(runtime)])
        _wait(lambda: "SuperNode ID:" in procs.log("supernode"), 180, "the SuperNode to join")
        yield types.SimpleNamespace(tmp=tmp, env=env, procs=procs, site=site, data=data, evil=evil, benign=benign,
                                    runtime=runtime)
    finally:
        procs.stop_all()


def test_a_bundle_the_site_did_not_approve_gets_nothing(deployment):
    dep = deployment
    evil_hash = _bundle_sha256(dep.evil)
    got = _result(dep, _start_run(dep, dep.evil, "curious"), "the coordinator's own app to finish")
    text = json.dumps(got)
    print(f"CURIOUS COORDINATOR got back: {text[:600]}")
    assert MARK not in text and "labels.csv" not in text and "node_auth_key" not in text, "the site's data leaked"
    assert len(got["replies"]) == 1 and "content" not in got["replies"][0]
    refusal = got["replies"][0]
    assert refusal["code"] == 7  # Flower's INVALID_FAB
    assert f"app bundle sha256 {evil_hash} is not approved by this site" in refusal["error"]
    assert "not approved by this site" in dep.procs.log("supernode")
    # the same deployment runs the bundle the site approved
    ok = _result(dep, _start_run(dep, dep.benign, "reviewed"), "the approved app to finish")
    assert ok["replies"] == [{"content": {"hello": "from the approved app"}}], ok


def _cmdlines() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


def test_a_local_process_without_the_secret_cannot_claim_the_sites_task(deployment):
    dep = deployment
    as_other_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 and shutil.which("setpriv") else []
    attacker = subprocess.Popen(
        ["timeout", "400", *as_other_user, sys.executable, "-c", LOCAL_ATTACKER, f"127.0.0.1:{dep.runtime}", "300"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", "FLWR_TELEMETRY_ENABLED": "0"}, cwd="/")
    try:
        out = _start_run(dep, dep.benign, "reviewed-under-attack", sleep=4.0)
        tokens = []
        deadline = time.monotonic() + 300
        while not out.exists() and time.monotonic() < deadline:  # while the ClientApp works: who shows a token?
            tokens += [c for c in _cmdlines() if "--token" in c and "flwr-clientapp" in c]
            time.sleep(0.2)
        got = _result(dep, out, "the approved app to finish under attack")
    finally:
        try:
            said, err = attacker.communicate("stop\n", timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(attacker.pid, 9)
            said, err = attacker.communicate()
    seen = json.loads(said.strip().splitlines()[-1]) if said.strip() else pytest.fail(f"attacker said nothing: {err}")
    print(f"LOCAL ATTACKER (uid {seen['uid']}): {seen['calls']} AcquireTask calls, {seen['answered']} answered, "
          f"{len(seen['claimed'])} task(s) claimed; refusals: {seen['reasons'][:2]}")
    assert seen["calls"] > 20 and seen["answered"] == 0 and seen["claimed"] == [], seen
    assert all("401 Unauthorized" in r and "Authentication failed" in r for r in seen["reasons"]), seen
    assert got["replies"] == [{"content": {"hello": "from the approved app"}}], got  # the site's own reply
    assert tokens == []  # ClientApps are forked: the task token is on no command line
    secret = next((dep.site / "supernode").glob("superexec-*.secret"))
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.parent.stat().st_mode & 0o777 == 0o700
