"""Closed control plane and site-side commands of `magnet-fl deploy`, without starting Flower (fast).

The live check (an outsider on the Fleet address cannot register, list or run) is in tests/test_deployment.py."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from client import approved_apps
from client.deploy_site import supernode_command
from server.deploy_cli import DEFAULT_CONTROL_PORT, FleetOnlyGate, flower_superlink_args
from server.pki import SITE_KEY, SITE_PUB, init_ca, issue_server_cert, make_site, make_site_key

CONTROL, FLEET = 9093, 9092
APPROVED = "ab" * 32  # an app bundle's sha256


async def _flower(scope, receive, send):  # stands for Flower's app: answers 200
    await send({"type": "http.response.start", "status": 200, "headers": []})


def _call(gate, method: str, path: str, port: int | None, kind: str = "http") -> int:
    """Status the gate answers (200 = passed to Flower's app)."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "method": method, "path": path, "server": ("127.0.0.1", port) if port else None}
    asyncio.run(gate(scope, None, send))
    if kind == "websocket" and sent and sent[0]["type"] == "websocket.close":
        return 403
    return sent[0]["status"]


def test_fleet_socket_serves_only_fleet_calls_and_the_control_socket_everything():
    gate = FleetOnlyGate(_flower, CONTROL)
    for path in ("/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-object"):
        assert _call(gate, "POST", path, FLEET) == 200, path
    refused = [("POST", "/v1/control/register-node"), ("POST", "/v1/control/list-runs"),
               ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/pull-messages"), ("GET", "/docs"),
               ("GET", "/openapi.json"), ("GET", "/health"), ("GET", "/v1/fleet/pull-messages"),
               ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
               ("POST", "/v1/fleet"), ("POST", "//v1/control/list-runs"), ("POST", "/v1/fleet/pull-messages/x")]
    for method, path in refused:
        assert _call(gate, method, path, FLEET) == 403, (method, path)
        assert _call(gate, method, path, None) == 403, (method, path)  # unknown socket: closed
        assert _call(gate, method, path, CONTROL) == 200, (method, path)  # loopback control socket: everything
    assert _call(gate, "GET", "/v1/control/stream-logs", FLEET, kind="websocket") == 403


def test_the_refusal_is_a_json_message_the_flwr_cli_shows():
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/control/list-runs", "server": ("0.0.0.0", FLEET)}
    asyncio.run(FleetOnlyGate(_flower, CONTROL)(scope, None, send))
    assert sent[0]["status"] == 403
    assert "serves only the Fleet API" in json.loads(sent[1]["body"])["detail"]


def test_flower_flags_bind_control_and_runtime_to_loopback(tmp_path):
    args = flower_superlink_args(tmp_path / "superlink", tmp_path / "state", DEFAULT_CONTROL_PORT)
    flags = dict(zip(args[::2], args[1::2]))
    assert args.count("--enable-supernode-auth") == 1 and "--disable-runtime-dependency-installation" in args
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == str(DEFAULT_CONTROL_PORT)
    assert flags["--isolation"] == "subprocess" and "--insecure" not in args


@pytest.fixture()
def deploy(capsys):
    from simulations.cli import main

    def call(*args):
        capsys.readouterr()
        try:
            code = main(["deploy", *map(str, args)])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


@pytest.fixture()
def pki(tmp_path):
    root = tmp_path / "coordinator pki"  # a space in every path: the printed commands must quote it
    init_ca(root)
    issue_server_cert(root, ["localhost"])
    return root


def test_superlink_refuses_a_folder_holding_the_ca_key(pki, tmp_path, deploy):
    state = tmp_path / "state"
    for folder in (pki, pki / "ca"):
        out = deploy("superlink", "--pki", folder, "--state", state, "--print")
        assert out.returncode == 2 and "private key is inside" in out.stderr and "Traceback" not in out.stderr
    # renamed, the CA key is still recognised by its public key
    shutil.copy(pki / "ca" / "ca.key", pki / "superlink" / "backup.pem")
    out = deploy("superlink", "--pki", pki / "superlink", "--state", state, "--print")
    assert out.returncode == 2 and "backup.pem" in out.stderr
    (pki / "superlink" / "backup.pem").unlink()
    out = deploy("superlink", "--pki", pki / "superlink", "--state", state, "--print")
    assert out.returncode == 0, out.stderr
    line = shlex.split(out.stdout)
    assert line[line.index("--pki") + 1] == str((pki / "superlink").resolve())
    assert line[line.index("--fleet-address") + 1] == "0.0.0.0:9092" and "--control-port" in line
    assert not state.exists()  # --print touches nothing
    bad = deploy("superlink", "--pki", pki / "superlink", "--state", state, "--fleet-address", "fl.example.org")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def _site(pki, tmp_path, name="hospital a"):
    """A site folder as the guide describes: its own key pair plus the bundle files the coordinator sent."""
    at_site = tmp_path / f"at {name}"
    make_site_key(at_site, comment=name)
    bundle = make_site(pki, name.replace(" ", "-"), at_site / SITE_PUB, "127.0.0.1:9092")
    for f in bundle.iterdir():
        shutil.copy(f, at_site / f.name)
    approved_apps.approve(at_site / approved_apps.FILE, APPROVED, "the release this site reviewed")
    return at_site


def test_supernode_print_is_a_line_a_shell_runs_unchanged(pki, tmp_path, deploy):
    at_site = _site(pki, tmp_path)
    data, manifest = tmp_path / "site data", tmp_path / "my manifest.toml"
    data.mkdir()
    manifest.write_text("")
    out = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest, "--skip-validation",
                 "--print")
    assert out.returncode == 0, out.stderr
    expected = supernode_command(at_site.resolve(), data.resolve(), manifest.resolve(), 9094)
    # the SuperNode runs through the site's launcher (approved bundles, the Runtime API's secret, polling, forked
    # ClientApps), then Flower's own arguments
    site = at_site.resolve()
    launcher = [sys.executable, "-m", "client.supernode_launcher", f"--approved-apps={site / 'approved-apps.toml'}",
                f"--secret-file={site / 'supernode' / 'superexec-9094.secret'}", "--runtime-port=9094",
                "--pull-interval=0.25", "--clientapp-start=fork"]
    assert expected[:len(launcher)] == launcher and expected[len(launcher)] == "--root-certificates"
    # pasted into bash, with the program replaced by one that prints the argv it receives
    echo = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    line = out.stdout.strip()
    assert line.startswith("env FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 ")
    program = f" {shlex.join(launcher[:3])} "
    assert program in line
    pasted = subprocess.run(["bash", "-c", line.replace(program, f" {echo} ", 1)],
                            capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0, pasted.stderr
    assert json.loads(pasted.stdout) == expected[3:]
    # Flower's polling and its own ClientApp start: still the launcher, which checks every bundle and holds the secret
    plain = supernode_command(at_site.resolve(), data.resolve(), manifest.resolve(), 9094, pull_interval=3.0,
                              clientapp_start="spawn")
    assert plain[:3] == launcher[:3] and "--pull-interval=3" in plain and "--clientapp-start=spawn" in plain
    assert "--isolation" not in expected  # the launcher sets it (process), with the secret
    node_config = tomllib.loads(Path(expected[expected.index("--node-config") + 1]).read_text())
    assert node_config == {"data-dir": str(data.resolve()), "manifest": str(manifest.resolve()),
                           "site-name": "hospital-a"}
    assert expected[expected.index("--auth-supernode-private-key") + 1] == str((at_site / SITE_KEY).resolve())


def test_supernode_refuses_a_missing_or_foreign_private_key(pki, tmp_path, deploy):
    at_site = _site(pki, tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    common = ("--data", data, "--manifest", tmp_path / "m.toml", "--skip-validation", "--print")
    (at_site / SITE_KEY).rename(tmp_path / "elsewhere")
    out = deploy("supernode", "--bundle", at_site, *common)
    assert out.returncode == 2 and "node_auth_key missing: give --key" in out.stderr
    assert deploy("supernode", "--bundle", at_site, "--key", tmp_path / "elsewhere", *common).returncode == 0
    make_site_key(tmp_path / "other", comment="other")
    out = deploy("supernode", "--bundle", at_site, "--key", tmp_path / "other" / SITE_KEY, *common)
    assert out.returncode == 2 and "does not belong to the public key registered for site 'hospital-a'" in out.stderr


def test_connection_to_a_remote_control_address_is_flagged(pki, tmp_path, deploy):
    out = deploy("connection", "--pki", pki / "superlink", "--address", "10.1.2.3:9093", "--flwr-home", tmp_path)
    assert out.returncode == 0 and "not a loopback address" in out.stderr
    out = deploy("connection", "--pki", pki / "superlink", "--flwr-home", tmp_path / "home")
    assert out.returncode == 0 and "127.0.0.1:9093" in (tmp_path / "home" / "config.toml").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_superlink_address_mistakes_are_one_clear_line(pki, tmp_path, deploy):
    link, state = pki / "superlink", tmp_path / "state"
    same = deploy("superlink", "--pki", link, "--state", state, "--fleet-address", "127.0.0.1:9093",
                  "--control-port", "9093")
    assert same.returncode == 2 and "equals --control-port" in same.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = _free_port()
        out = deploy("superlink", "--pki", link, "--state", state, "--fleet-address", f"127.0.0.1:{port}",
                     "--control-port", free)
        assert out.returncode == 2 and f"cannot listen on the Fleet address 127.0.0.1:{port}" in out.stderr
        out = deploy("superlink", "--pki", link, "--state", state, "--fleet-address", f"127.0.0.1:{free}",
                     "--control-port", port)
        assert out.returncode == 2 and f"cannot listen on the control address 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in same.stderr + out.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_fast_polling_shortens_flowers_sleeps_only_while_a_run_is_active():
    """The SuperNode's 3 s idle poll becomes the pull interval within the active window after a message, and
    stays Flower's 3 s otherwise; the 0.5 s wait for the local ClientApp's reply becomes 0.05 s (in a child
    process: the patch changes Flower's module)."""
    out = _python("""
import time
from flwr.supernode import start_client_internal as sci
from flower_compat.supernode import fast_polling
slept = []
real = time.sleep
time.sleep = slept.append  # records what the patched clock asks for
assert fast_polling(0.25, active_window=60)
sci.time.sleep(3)                       # idle, no message yet: Flower's 3 s
try:
    sci._push_messages(None, None, None, None)  # a message was handled (Flower's function fails on None)
except Exception:
    pass
sci.time.sleep(3)                       # active: the pull interval
sci.time.sleep(0.5)                     # waiting for the ClientApp's reply
sci.time.sleep(1.5)                     # anything else unchanged
assert sci.time.monotonic is time.monotonic or callable(sci.time.monotonic)
import os
print(slept, os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL"))
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0.1" and out.stdout.startswith("[3.0, 0.25, 0.05, 1.5]"), out.stdout


def test_forking_superexec_runs_flowers_clientapp_entry_point_in_a_forked_child():
    """A `flwr-clientapp` launch forks a child that runs Flower's own entry point with the launch's arguments
    (here `--help`, which prints Flower's usage and exits) and exits with its code; the SuperExec goes on."""
    out = _python("""
import os, sys, time
from flwr.supercore.superexec.executor import subprocess_executor as se
from flower_compat.supernode import forking_superexec
assert forking_superexec()
assert "pandas" in sys.modules and "flwr.supernode.runtime.run_clientapp" in sys.modules
child = se.subprocess.Popen(["flwr-clientapp", "--help"])
assert child.pid != os.getpid()
for _ in range(600):
    try:
        os.kill(child.pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.05)
else:
    raise SystemExit("the forked ClientApp did not exit")
print("parent goes on", os.getpid())
""")
    assert out.returncode == 0, out.stderr
    assert "usage: flwr-clientapp" in out.stdout and "--runtime-api-address" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("parent goes on")


def test_launcher_options_are_separated_from_flowers_arguments():
    from client.supernode_launcher import launcher_options as _launcher_options

    names = {"pull-interval": "0.25", "clientapp-start": "fork"}
    values, rest = _launcher_options(["--pull-interval=1", "--clientapp-start=spawn", "--superlink", "h:1",
                                      "--pull-interval=9"], names)
    assert values == {"pull-interval": "1", "clientapp-start": "spawn"}
    assert rest == ["--superlink", "h:1", "--pull-interval=9"]  # after Flower's first argument, all Flower's
    assert _launcher_options(["--max-retries", "1"], names) == (names, ["--max-retries", "1"])


def test_supernode_gives_the_identity_key_roster_and_policy_to_the_site_worker_only(pki, tmp_path, deploy):
    """`deploy supernode --secagg-roster --policy`: the worker's own command line holds them (the site's key by
    default), the SuperNode's node config (which the coordinator's bundle reads) names none; without --worker
    they are refused."""
    at_site = _site(pki, tmp_path)
    data, manifest, roster, policy = (tmp_path / "data", tmp_path / "m.toml", tmp_path / "roster.csv",
                                      tmp_path / "policy.toml")
    data.mkdir()
    for f in (manifest, roster, policy):
        f.write_text("")
    out = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest, "--skip-validation",
                 "--worker", "--secagg-roster", roster, "--policy", policy, "--print")
    assert out.returncode == 0, out.stderr
    worker_part, supernode_part = out.stdout.split(" & exec ", 1)
    words = shlex.split(worker_part)
    assert words[words.index("--secagg-roster") + 1] == str(roster.resolve())
    assert words[words.index("--identity-key") + 1] == str((at_site / SITE_KEY).resolve())
    assert words[words.index("--policy") + 1] == str(policy.resolve())
    node_config = Path(shlex.split(supernode_part)[shlex.split(supernode_part).index("--node-config") + 1])
    assert set(tomllib.loads(node_config.read_text())) == {"data-dir", "manifest", "site-name", "worker-socket",
                                                          "worker-timeout"}
    for flags in (("--secagg-roster", roster), ("--policy", policy)):
        refused = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest,
                         "--skip-validation", *flags, "--print")
        assert refused.returncode == 2 and "--worker" in refused.stderr


def test_supernode_gives_the_raw_folder_and_the_secure_preparation_rule_to_the_site_worker_only(pki, tmp_path,
                                                                                                 deploy):
    """`deploy supernode --worker --raw-dir --prepare-require-secagg`: a site deploying with one command has its
    preparation answered by its worker from its raw folder, statistics only through a secure sum; the data folder,
    still empty before the preparation, is not validated yet; the SuperNode's node config (which the coordinator's
    bundle reads and forwards) names neither; without --worker both are refused."""
    import argparse

    from client.worker import SiteWorker
    from client.worker import add_arguments as worker_arguments
    from magnet_core.protocol.keys import NODE_PREPARE_REQUIRE_SECAGG, NODE_PREPARED_DIR, NODE_RAW_DIR

    at_site = _site(pki, tmp_path)
    data, manifest, raw = tmp_path / "prepared here", tmp_path / "m.toml", tmp_path / "raw data"
    raw.mkdir()
    out = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest, "--worker",
                 "--raw-dir", raw, "--prepare-require-secagg", "--print")
    assert out.returncode == 0, out.stderr
    assert "holds no prepared cohort yet" in out.stderr
    worker_part, supernode_part = out.stdout.split(" & exec ", 1)
    words = shlex.split(worker_part)
    assert words[words.index("--raw-dir") + 1] == str(raw.resolve()) and "--prepare-require-secagg" in words
    # the printed line is one the worker's own command line reads: its worker holds the folder and the rule
    parser = argparse.ArgumentParser()
    worker_arguments(parser)
    assert words[-2:] == ["--exit-with", "$$"]  # the shell's pid, which `exec` hands to the SuperNode
    args = parser.parse_args(words[words.index("site-worker") + 1:-2])
    own = SiteWorker(args.data, args.manifest, args.site_name, raw_dir=args.raw_dir,
                     prepare_require_secagg=args.prepare_require_secagg).own()
    assert own[NODE_RAW_DIR] == str(raw.resolve()) and own[NODE_PREPARED_DIR] == str(data.resolve())
    assert own[NODE_PREPARE_REQUIRE_SECAGG] is True
    words = shlex.split(supernode_part)
    assert "--allow-runtime-dependency-installation" not in words and "--insecure" not in words
    node_config = tomllib.loads(Path(words[words.index("--node-config") + 1]).read_text())
    assert not {NODE_RAW_DIR, NODE_PREPARED_DIR, NODE_PREPARE_REQUIRE_SECAGG} & set(node_config), node_config
    for flags in (("--raw-dir", raw), ("--prepare-require-secagg",)):
        refused = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest,
                         "--skip-validation", *flags, "--print")
        assert refused.returncode == 2 and "--worker" in refused.stderr and flags[0] in refused.stderr
    missing = deploy("supernode", "--bundle", at_site, "--data", data, "--manifest", manifest, "--worker",
                     "--raw-dir", tmp_path / "nowhere", "--print")
    assert missing.returncode == 2 and "nowhere: no such folder" in missing.stderr
