"""``magnet-fl deploy supernode|approve-app``, the site's side: start this site's SuperNode (TLS against the
consortium CA, the site's own key, its local data, optionally its persistent worker), running only the app bundles
the site approved. The SuperNode process itself is ``client/supernode_launcher.py``; the coordinator's side is
``server/deploy_cli.py``."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import tomli_w
from cryptography.hazmat.primitives import serialization

from flower_compat import FLOWER_ENV, FLOWER_IDLE_PULL
from magnet_core.artefacts.site_bundle import load_bundle
from magnet_core.protocol.keys import (
    NODE_DATA_DIR,
    NODE_MANIFEST,
    NODE_SITE_LOG_DIR,
    NODE_SITE_NAME,
    NODE_WORKER_SOCKET,
    NODE_WORKER_TIMEOUT,
)

from . import approved_apps
from .private_files import write_private

ACTIONS = ("supernode", "approve-app")
LAUNCHER = "client.supernode_launcher"
RUNTIME_HOST = "127.0.0.1"  # the SuperNode's Runtime API (its ClientApps' and SuperExec's): loopback only
SUPERNODE_DIR = "supernode"  # BUNDLE/supernode/ (0700): node config (0600), SuperExec secret (new at every start)
# Flower 1.41's SuperNode sleeps a fixed 3 s after every empty pull; ``deploy supernode`` polls every PULL_INTERVAL
# seconds while a run is active (a message seen in the last ACTIVE_WINDOW seconds) and at Flower's 3 s otherwise.
DEFAULT_PULL_INTERVAL, ACTIVE_WINDOW = 0.25, 120.0
# With CLIENTAPP_START "fork" the SuperExec imports Flower, numpy, pandas and pydantic once and forks a child per
# message that runs Flower's own `flwr-clientapp` entry point; "spawn" is Flower's new interpreter per message.
CLIENTAPP_STARTS = ("fork", "spawn")


def site_private_key(bundle: Path, key: Path | None) -> Path:
    """The site's own private key (default: next to the bundle files), checked against the registered public key."""
    site = load_bundle(bundle)
    path = key if key is not None else bundle / site.auth_private_key
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: give --key, the node_auth_key made at this site by "
                                f"`magnet-fl pki site-key` (or copy the bundle's files into that folder)")
    try:
        private = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an OpenSSH private key ({exc})") from None
    registered = serialization.load_ssh_public_key((bundle / site.auth_public_key).read_bytes())
    if private.public_key().public_numbers() != registered.public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{path} does not belong to the public key registered for site {site.site!r} "
                         f"({bundle / site.auth_public_key})")
    return path


NODE_CONFIG_KEY = re.compile(r"[a-z][a-z0-9-]*")


def node_config_file(bundle: Path, port: int, config: Mapping[str, str | int | float | bool]) -> Path:
    """The SuperNode's node config as a TOML file (BUNDLE/supernode/node-config-PORT.toml, 0600), which Flower reads
    as typed values: a path or a name holding quotes or spaces stays one value (on a command line,
    ``data-dir='...'`` with a quote in the path would end the value and let the rest set other keys)."""
    bad = [k for k in config if not NODE_CONFIG_KEY.fullmatch(str(k))]
    if bad:
        raise ValueError(f"node-config key {bad[0]!r}: use lower-case letters, digits and '-'")
    wrong = {k: type(v).__name__ for k, v in config.items() if not isinstance(v, (str, int, float, bool))}
    if wrong:
        raise ValueError(f"node-config values must be text, numbers or true/false; got {wrong}")
    path = bundle / SUPERNODE_DIR / f"node-config-{port}.toml"
    write_private(path, tomli_w.dumps(dict(config)).encode())
    return path


def supernode_command(bundle: Path, data: Path, manifest: Path, port: int = 9094,
                      extra_node_config: Mapping[str, str | int | float | bool] | None = None,
                      key: Path | None = None, pull_interval: float = DEFAULT_PULL_INTERVAL,
                      clientapp_start: str = "fork", approved: Path | None = None,
                      approved_sha256: tuple[str, ...] = ()) -> list[str]:
    """The site's SuperNode: the launcher's own ``--name=value`` options (``client/supernode_launcher.py``: the
    approved app bundles, the Runtime API port and its secret, polling, ClientApp start), then flower-supernode's
    arguments: TLS against the consortium CA, the site's own key, its local data (node config written to a TOML
    file, ``node_config_file``). ``approved``: the site's list of approved bundles (default
    BUNDLE/approved-apps.toml); ``approved_sha256``: more, for this start only."""
    site = load_bundle(bundle)
    private = site_private_key(bundle, key)
    own = {NODE_DATA_DIR: str(data), NODE_MANIFEST: str(manifest), NODE_SITE_NAME: site.site}
    clash = sorted(set(own) & set(extra_node_config or {}))
    if clash:
        raise ValueError(f"node-config key {clash[0]!r} is set by deploy supernode itself")
    if clientapp_start not in CLIENTAPP_STARTS:
        raise ValueError(f"clientapp_start must be one of {CLIENTAPP_STARTS}, got {clientapp_start!r}")
    given = [approved_apps.sha256_text(h, "--approved-fab-sha256") for h in approved_sha256]
    node_config = node_config_file(bundle, port, {**own, **dict(extra_node_config or {})})
    launcher = [sys.executable, "-m", LAUNCHER, f"--approved-apps={approved or bundle / approved_apps.FILE}",
                *([f"--approved-fab-sha256={','.join(given)}"] if given else []),
                f"--secret-file={bundle / SUPERNODE_DIR / f'superexec-{port}.secret'}", f"--runtime-port={port}",
                f"--pull-interval={pull_interval:g}", f"--clientapp-start={clientapp_start}"]
    return [*launcher, "--root-certificates", str(bundle / site.ca_certificate), "--superlink", site.superlink,
            "--auth-supernode-private-key", str(private), "--node-config", str(node_config)]


def require_an_approved_app(listed: Path, given: tuple[str, ...]) -> None:
    """ValueError (what to do) when neither the site's list nor ``given`` approves any app bundle."""
    if not approved_apps.load(listed).hashes() and not given:
        raise ValueError(f"no app bundle is approved for this site ({listed} lists none): its SuperNode would refuse "
                         f"every run. Review the release the coordinator will run, then `magnet-fl deploy "
                         f"approve-app --bundle SITE_DIR APP_DIR` (or --fab FILE, --sha256 HEX)")


def approved_hash(app: Path | None, fab: Path | None, sha256: str | None) -> tuple[str, str]:
    """(sha256, what it is) of an app source tree (the bundle `flwr run APP` builds), a .fab file or a given hash."""
    if sum(x is not None for x in (app, fab, sha256)) != 1:
        raise ValueError("give exactly one of APP_DIR, --fab FILE or --sha256 HEX")
    if sha256 is not None:
        return approved_apps.sha256_text(sha256, "--sha256"), "given as a hash"
    if fab is not None:
        if not fab.is_file():
            raise FileNotFoundError(f"{fab}: no such app bundle file")
        return hashlib.sha256(fab.read_bytes()).hexdigest(), f"bundle file {fab.resolve()}"
    if not (app / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app}: not an app source tree (no pyproject.toml)")
    from flower_compat.app_bundle import app_bundle_sha256  # Flower's builder (its CLI): only for this action

    return app_bundle_sha256(app), f"source tree {app.resolve()}"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def add_actions(sub) -> None:
    """The site's actions (ACTIONS) as sub-parsers of ``magnet-fl deploy``."""
    a = sub.add_parser("approve-app", help="site: approve an app bundle (the only code its SuperNode runs)")
    a.add_argument("app", type=Path, nargs="?", help="the app's source tree you reviewed (the folder `flwr run` is "
                                                      "given): the bundle Flower builds from it is approved")
    a.add_argument("--fab", type=Path, help="an app bundle file (.fab, e.g. from `flwr build`) instead")
    a.add_argument("--sha256", help="a bundle's sha256 (64 hex digits) instead")
    a.add_argument("--bundle", type=Path, help=f"the site's folder: the list is BUNDLE/{approved_apps.FILE}")
    a.add_argument("--file", type=Path, help="the list of approved bundles (instead of --bundle)")
    a.add_argument("--note", default="", help="what was reviewed (release, reviewer), kept in the list")
    d = sub.add_parser("supernode", help="site: run this site's SuperNode on its local data")
    d.add_argument("--bundle", type=Path, required=True, help="the site's folder: bundle files from the coordinator "
                                                              "+ the key pair made by `magnet-fl pki site-key`")
    d.add_argument("--key", type=Path, default=None, help="the site's private key (default BUNDLE/node_auth_key)")
    d.add_argument("--data", type=Path, required=True, help="the site's prepared data folder")
    d.add_argument("--manifest", type=Path, required=True)
    d.add_argument("--port", type=_port, default=9094, help="local ClientApp API port")
    d.add_argument("--log-dir", type=Path, default=None,
                   help="keep the site's own record of what it sent and received (site_log.jsonl; "
                        "`magnet-fl report LOG_DIR` shows it)")
    d.add_argument("--dp-min-noise-multiplier", type=float, default=None, metavar="Z",
                   help="with --worker: the site's DP floor, held by its worker (train only under secure aggregation "
                        "with distributed DP of at least this noise multiplier)")
    d.add_argument("--skip-validation", action="store_true")
    d.add_argument("--worker", action="store_true",
                   help="start a persistent site worker beside the SuperNode: it keeps the data, graphs and torch "
                        "loaded, and each message is handed to it over a private Unix socket")
    d.add_argument("--worker-socket", type=Path, default=None,
                   help="the worker's socket (default BUNDLE/worker/worker.sock); without --worker, the SuperNode "
                        "uses a worker you run yourself (`magnet-fl site-worker`, e.g. as a service)")
    d.add_argument("--worker-timeout", type=float, default=600.0,
                   help="seconds one message may take at the worker before the site replies an error (default 600)")
    d.add_argument("--policy", type=Path, default=None,
                   help="the site's policy (`magnet-fl site policy init`), enforced by the site worker (--worker) "
                        "on every message; the coordinator's bundle never reads or names it")
    d.add_argument("--secagg-roster", type=Path, default=None,
                   help="authenticated secure aggregation: the consortium roster (registered_sites.csv from the "
                        "coordinator's PKI); given to the site worker (--worker) with the site's own key")
    d.add_argument("--identity-key", type=Path, default=None,
                   help="the key the site signs its secure-aggregation keys with (default: --key, the site's "
                        "node_auth_key, the one the roster lists); only with --secagg-roster")
    d.add_argument("--raw-dir", type=Path, default=None,
                   help="with --worker: the site's raw data folder; its worker answers the federated preparation "
                        "from it under the site's policy and writes the prepared cohort to --data (which may be "
                        "empty until then: its validation waits for the preparation)")
    d.add_argument("--prepare-require-secagg", action="store_true",
                   help="with --worker: the site sends preparation statistics only through a secure sum (held by "
                        "its worker; a forwarded node config cannot lift it)")
    d.add_argument("--pull-interval", type=float, default=DEFAULT_PULL_INTERVAL,
                   help=f"seconds between the SuperNode's polls of the SuperLink while a run is active (default "
                        f"{DEFAULT_PULL_INTERVAL:g}; after {ACTIVE_WINDOW:g} s without a message, and always with "
                        f"{FLOWER_IDLE_PULL:g} or more, Flower's own {FLOWER_IDLE_PULL:g} s)")
    d.add_argument("--clientapp-start", choices=CLIENTAPP_STARTS, default="fork",
                   help="how the per-message ClientApp process starts: forked from a SuperExec that has imported "
                        "Flower, numpy, pandas and pydantic once (default), or Flower's own new interpreter (spawn)")
    d.add_argument("--approved-apps", type=Path, default=None,
                   help=f"the site's list of approved app bundles (default BUNDLE/{approved_apps.FILE}, made by "
                        f"`magnet-fl deploy approve-app`); any other bundle is refused before it is stored")
    d.add_argument("--approved-fab-sha256", action="append", default=[], metavar="HEX",
                   help="also approve this bundle sha256 for this start (repeatable)")
    d.add_argument("--print", action="store_true",
                   help="print the SuperNode's command instead of running it (it reads the node config written to "
                        f"BUNDLE/{SUPERNODE_DIR}/node-config-PORT.toml)")


def start_worker(worker: list[str], sock: Path, env: dict, timeout: float = 300.0) -> subprocess.Popen:
    """Start the site worker, which exits with this process (whose pid becomes the SuperNode's after exec), and
    wait until it listens on ``sock`` (a new socket, not the stale file of a worker that died)."""
    def identity():
        try:
            st = os.stat(sock)
            return st.st_ino, st.st_ctime_ns
        except OSError:
            return None

    stale = identity()
    proc = subprocess.Popen([*worker, "--exit-with", str(os.getpid())], env=env)
    deadline = time.monotonic() + timeout
    while identity() in (None, stale):
        if proc.poll() is not None:
            raise RuntimeError(f"the site worker exited with code {proc.returncode} before listening on {sock} "
                               f"(its log is above)")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the site worker did not listen on {sock} within {timeout:.0f} s")
        time.sleep(0.2)
    print(f"site worker (pid {proc.pid}) listens on {sock}", flush=True)
    return proc


def _magnet_fl() -> list[str]:
    exe = shutil.which("magnet-fl")
    return [exe] if exe else [sys.executable, "-m", "simulations.cli"]


def run(args: argparse.Namespace) -> int:
    if args.deploy_command == "approve-app":
        if (args.bundle is None) == (args.file is None):
            raise ValueError("give the site's folder (--bundle) or the list itself (--file)")
        listed = args.file or args.bundle / approved_apps.FILE
        digest, what = approved_hash(args.app, args.fab, args.sha256)
        apps = approved_apps.approve(listed, digest, args.note or what)
        print(f"approved app bundle sha256 {digest} ({what}) in {listed}; {len(apps.app)} approved")
        return 0
    env = {**os.environ, **FLOWER_ENV}
    # the bundle, the site's key and its approved apps first (cheap, clear errors), then the data
    bundle, data, manifest = args.bundle.resolve(), args.data.resolve(), args.manifest.resolve()
    listed = (args.approved_apps or bundle / approved_apps.FILE).resolve()
    given = tuple(args.approved_fab_sha256)
    sock = (args.worker_socket or bundle / "worker" / "worker.sock").absolute() \
        if args.worker or args.worker_socket else None
    # the site's message log: kept by its worker when it has one (its own command line; a node config value would
    # be forwarded by the coordinator's bundle, which the worker ignores), else by the in-process ClientApp
    extra = {**({NODE_SITE_LOG_DIR: str(args.log_dir.resolve())} if args.log_dir and not args.worker else {}),
             **({NODE_WORKER_SOCKET: str(sock), NODE_WORKER_TIMEOUT: float(args.worker_timeout)} if sock else {})}
    if not 0 < args.pull_interval <= 60:
        print(f"error: --pull-interval must be in (0, 60] seconds, got {args.pull_interval:g}", file=sys.stderr)
        return 2
    cmd = supernode_command(bundle, data, manifest, args.port, extra,
                            key=args.key.resolve() if args.key else None, pull_interval=args.pull_interval,
                            clientapp_start=args.clientapp_start, approved=listed, approved_sha256=given)
    require_an_approved_app(listed, given)
    worker = [*_magnet_fl(), "site-worker", "--socket", str(sock), "--data", str(data), "--manifest", str(manifest),
              "--site-name", load_bundle(bundle).site] if args.worker else []
    if args.worker and args.log_dir:
        worker += ["--site-log-dir", str(args.log_dir.resolve())]
    if args.dp_min_noise_multiplier is not None:
        if not args.worker:
            print("error: --dp-min-noise-multiplier is held by the site worker: add --worker (or give it to your own "
                  "`magnet-fl site-worker`)", file=sys.stderr)
            return 2
        worker += ["--dp-min-noise-multiplier", repr(float(args.dp_min_noise_multiplier))]
    if args.policy is not None:
        if not args.worker:
            print("error: --policy is enforced by the site worker: add --worker (or give --policy to your own "
                  "`magnet-fl site-worker`)", file=sys.stderr)
            return 2
        worker += ["--policy", str(args.policy.resolve())]
    if args.secagg_roster is not None or args.identity_key is not None:
        if args.secagg_roster is None:
            print("error: --identity-key is for authenticated secure aggregation: give --secagg-roster too",
                  file=sys.stderr)
            return 2
        if not args.worker:
            print("error: --secagg-roster: the site's identity key is held by its own worker, never by the "
                  "coordinator's app bundle: add --worker (or give --secagg-roster / --identity-key to your own "
                  "`magnet-fl site-worker`)", file=sys.stderr)
            return 2
        identity = (args.identity_key or site_private_key(bundle, args.key.resolve() if args.key else None)).resolve()
        worker += ["--secagg-roster", str(args.secagg_roster.resolve()), "--identity-key", str(identity)]
    if args.raw_dir is not None or args.prepare_require_secagg:
        flag = "--raw-dir" if args.raw_dir is not None else "--prepare-require-secagg"
        if not args.worker:
            print(f"error: {flag}: the site's preparation is answered by its own worker, never by the coordinator's "
                  f"app bundle: add --worker (or give {flag} to your own `magnet-fl site-worker`)", file=sys.stderr)
            return 2
        if args.raw_dir is not None:
            if not args.raw_dir.is_dir():
                print(f"error: --raw-dir {args.raw_dir}: no such folder", file=sys.stderr)
                return 2
            worker += ["--raw-dir", str(args.raw_dir.resolve())]
        if args.prepare_require_secagg:
            worker += ["--prepare-require-secagg"]
    # a site that prepares its cohort first: --data is validated by its worker once the preparation wrote it
    unprepared = args.raw_dir is not None and not (data / "labels.csv").exists()
    if unprepared:
        print(f"{data} holds no prepared cohort yet: the site worker answers the preparation from "
              f"{args.raw_dir.resolve()} and refuses rounds until the cohort is written", file=sys.stderr)
    if not args.skip_validation and not unprepared:
        from magnet_core.cohort.manifest import ConsortiumManifest  # pandas: only when the data are validated
        from magnet_core.cohort.validation import validate_site

        report, _ = validate_site(args.data, ConsortiumManifest.load(args.manifest))
        if not report.ok:
            print("site data failed validation (run `magnet-fl validate-site` for the summary):", file=sys.stderr)
            for e in report.errors:
                print(f"- {e}", file=sys.stderr)
            return 1
    if args.print:  # one line that pastes and runs, with the same environment
        line = shlex.join(["env", *(f"{k}={v}" for k, v in FLOWER_ENV.items()), *cmd])
        if worker:  # in that shell $$ is the shell's pid, which `exec` hands to the SuperNode
            line = f"{shlex.join(worker)} --exit-with $$ & exec {line}"
        print(line)
        return 0
    if worker:
        try:
            start_worker(worker, sock, env)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    os.execvpe(cmd[0], cmd, env)  # replace this process: its pid is the SuperNode's pid
    return 0  # pragma: no cover
