"""``magnet-fl deploy``: run the coordinator's SuperLink with a closed control plane or a site's SuperNode (TLS,
node authentication, no telemetry, no runtime dependency installation); write the flwr connection; register sites.

Flower 1.41 serves its Fleet, Control and Runtime (ServerAppIo) APIs on one HTTP port. ``deploy superlink`` runs
that same SuperLink application on two sockets: the control address (loopback only) serves every API to the
coordinator's own flwr CLI and ServerApp; the Fleet address, the only one facing the sites, answers
``POST /v1/fleet/<call>`` and refuses every other request before Flower sees it.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
import tomllib
from cryptography.hazmat.primitives import serialization

from .pki import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, SiteBundle, split_host_port

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")  # every Fleet route: POST /v1/fleet/<name>
DEFAULT_FLEET, DEFAULT_CONTROL_PORT = "0.0.0.0:9092", 9093
CONTROL_HOST = "127.0.0.1"  # Control + Runtime APIs: loopback only, not configurable
ISOLATION = "subprocess"  # SuperLink starts the ServerApp, SuperNode the ClientApp, each in a child process
# Flower 1.41's SuperNode sleeps a fixed 3 s after every empty pull, and 0.5 s between checks for its ClientApp's
# reply; its SuperExec asks for a new task every 1 s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL). A message then waits
# 0-3 s before the site sees it, and twice per round. ``deploy supernode`` polls every PULL_INTERVAL seconds while a
# run is active (a message seen in the last ACTIVE_WINDOW seconds) and at Flower's 3 s otherwise.
DEFAULT_PULL_INTERVAL, ACTIVE_WINDOW, FLOWER_IDLE_PULL = 0.25, 120.0, 3.0
REPLY_CHECK_INTERVAL, TASK_POLL_INTERVAL = 0.05, 0.1
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# Flower's SuperExec starts a fresh `flwr-clientapp` process per message, which spends seconds of CPU importing flwr,
# numpy, pandas and pydantic. With CLIENTAPP_START "fork" the SuperExec imports those once and forks a child per
# message that runs Flower's own `flwr-clientapp` entry point: still one new process per message (a crash or an
# out-of-memory kill ends that process only), without the imports. The app's own modules (the FAB) are not preloaded.
CLIENTAPP_STARTS = ("fork", "spawn")
# A ClientApp pulls its message's objects from the SuperNode, which may still be downloading them from the SuperLink;
# Flower retries with a back-off of 1 s doubling to 10 s. Forked ClientApps retry this local call at 0.05-0.5 s
# (more tries, so that Flower's overall limit of 2 hours per pull still decides, not the number of tries).
CLIENTAPP_PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": 20_000}
# Objects (arrays) a SuperNode moves to/from the SuperLink at once (Flower's FLWR_PRIVATE_* variables; default 2);
# an explicit setting wins.
OBJECT_CONCURRENCY = {"FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "4", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "4"}
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp", "flwr.clientapp",
           "flwr.clientapp.mod", "numpy", "pandas", "pydantic")


def check_superlink_dir(pki: Path) -> None:
    """The SuperLink's folder holds its TLS files and the CA certificate, and no CA private key (by name or by
    content: a renamed copy of the CA key is recognised by its public key)."""
    def refuse(path: Path) -> None:
        raise PermissionError(f"{path}: the consortium CA's private key is inside {pki}, the folder the SuperLink "
                              f"reads; keep it apart (PKI_DIR/ca, offline) and give --pki PKI_DIR/superlink")

    for path in sorted(pki.rglob(CA_KEY)) if pki.is_dir() else []:
        refuse(path)
    for f in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (pki / f).exists():
            raise FileNotFoundError(f"{pki / f} missing: give the folder made by `magnet-fl pki server` "
                                    f"(PKI_DIR/superlink)")
    from cryptography import x509

    ca_public = x509.load_pem_x509_certificate((pki / CA_CERT).read_bytes()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for path in sorted(p for p in pki.rglob("*") if p.is_file() and p.stat().st_size < 1_000_000):
        if _holds_private_key_of(path.read_bytes(), ca_public):
            refuse(path)


def _holds_private_key_of(data: bytes, public_der: bytes) -> bool:
    if b"PRIVATE KEY" not in data:
        return False
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return False
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) == public_der


def flower_superlink_args(pki: Path, state: Path, control_port: int) -> list[str]:
    """flower-superlink's own flags: TLS from the consortium PKI, SuperNode authentication, subprocess isolation,
    no runtime dependency installation, a persistent state DB; its HTTP host is the loopback control address."""
    return ["--ssl-ca-certfile", str(pki / CA_CERT), "--ssl-certfile", str(pki / SERVER_CERT),
            "--ssl-keyfile", str(pki / SERVER_KEY), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--isolation", ISOLATION,
            "--host", CONTROL_HOST, "--port", str(control_port), "--database", str(state / "superlink.db")]


class FleetOnlyGate:
    """ASGI wrapper: a request that arrived on any socket other than the control port may reach only the Fleet API
    (``POST /v1/fleet/<name>``); Control, Runtime, docs and every other path or method get 403 (fail closed)."""

    def __init__(self, app, control_port: int):
        self.app, self.control_port = app, control_port

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or (None, None)
            fleet_call = scope["type"] == "http" and scope.get("method") == "POST" and bool(
                FLEET_PATH.fullmatch(scope.get("path", "")))
            if server[1] != self.control_port and not fleet_call:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": "Forbidden: this address serves only the Fleet API (SuperNodes); "
                                             "the Control and Runtime APIs are on the coordinator's loopback "
                                             "interface"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _bind(host: str, port: int, what: str) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise PermissionError(f"cannot listen on {what} {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PermissionError(f"cannot listen on {what} {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve_superlink(pki: Path, state: Path, fleet: str, control_port: int) -> int:
    """Run Flower's SuperLink application (built by Flower from its own flags) on the control and Fleet sockets."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package re-exports a function

    fleet_host, fleet_port = split_host_port(fleet, "--fleet-address")
    if fleet_port == control_port:
        raise ValueError(f"--fleet-address port {fleet_port} equals --control-port; give two different ports")
    control = _bind(CONTROL_HOST, control_port, "the control address")
    try:
        sockets = [control, _bind(fleet_host, fleet_port, "the Fleet address")]
    except PermissionError:
        control.close()
        raise
    argv, sys.argv = sys.argv, ["flower-superlink", *flower_superlink_args(pki, state, control_port)]
    try:
        config = fs._parse_superlink_lifespan_config()  # Flower's own parsing and checks of its flags
    finally:
        sys.argv = argv
    app = create_app(config, fs.SuperLinkLifespan)
    print(f"SuperLink: Fleet API (sites) on {fleet_host}:{fleet_port}; Control and Runtime APIs on "
          f"{CONTROL_HOST}:{control_port} only", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        FleetOnlyGate(app, control_port), ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
        access_log=True, log_config=get_uvicorn_log_config(console_handler.level), workers=1, lifespan="on"))
    server.run(sockets=sockets)
    return 0


def load_bundle(bundle: Path) -> SiteBundle:
    path = bundle / "site.toml"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: is {bundle} a bundle made by `magnet-fl pki site`?")
    return SiteBundle.model_validate(tomllib.loads(path.read_text()))


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


def supernode_command(bundle: Path, data: Path, manifest: Path, port: int = 9094, extra_node_config: str = "",
                      key: Path | None = None, pull_interval: float = DEFAULT_PULL_INTERVAL,
                      clientapp_start: str = "fork") -> list[str]:
    """flower-supernode for one site: TLS against the consortium CA, its own key, its local data. With a
    ``pull_interval`` below Flower's 3 s or ``clientapp_start`` "fork" it runs through this module's launcher
    (``launch_supernode``); every argument after the launcher's own ``--name=value`` options is flower-supernode's."""
    site = load_bundle(bundle)
    private = site_private_key(bundle, key)
    node_config = f"data-dir='{data}' manifest='{manifest}' site-name='{site.site}'"
    if extra_node_config:
        node_config += f" {extra_node_config}"
    if clientapp_start not in CLIENTAPP_STARTS:
        raise ValueError(f"clientapp_start must be one of {CLIENTAPP_STARTS}, got {clientapp_start!r}")
    program = ["flower-supernode"] if pull_interval >= FLOWER_IDLE_PULL and clientapp_start == "spawn" else \
        [sys.executable, "-m", "server.deploy_cli", f"--pull-interval={pull_interval:g}",
         f"--clientapp-start={clientapp_start}"]
    return [*program, "--root-certificates", str(bundle / site.ca_certificate),
            "--superlink", site.superlink, "--auth-supernode-private-key", str(private),
            "--isolation", ISOLATION, "--port", str(port), "--node-config", node_config]


def fast_polling(pull_interval: float, active_window: float = ACTIVE_WINDOW) -> bool:
    """Make Flower 1.41's SuperNode poll the SuperLink every ``pull_interval`` seconds while a run is active (a
    message handled in the last ``active_window`` seconds; Flower's 3 s otherwise), check for its ClientApp's
    reply every REPLY_CHECK_INTERVAL s instead of 0.5 s, and its SuperExec ask for tasks every TASK_POLL_INTERVAL s
    (Flower's own variable; an explicit setting wins). Returns False, changing nothing, if this Flower's SuperNode
    loop is not the one this was written for."""
    import inspect
    import types

    from flwr.supernode import start_client_internal as sci

    try:
        source = inspect.getsource(sci.start_client_internal) + inspect.getsource(sci._push_messages)
    except (AttributeError, OSError, TypeError):
        return False
    if sci.time is not time or "time.sleep(3)" not in source or "time.sleep(0.5)" not in source:
        return False
    last = [float("-inf")]
    push = sci._push_messages

    def push_messages(*args, **kwargs):  # called once per message pulled: the run is active
        last[0] = time.monotonic()
        try:
            return push(*args, **kwargs)
        finally:
            last[0] = time.monotonic()

    def sleep(seconds: float) -> None:
        if seconds == FLOWER_IDLE_PULL:  # the idle poll after an empty pull
            active = time.monotonic() - last[0] < active_window
            time.sleep(pull_interval if active else FLOWER_IDLE_PULL)
        elif seconds == 0.5:  # waiting for the local ClientApp's reply (an in-memory check)
            time.sleep(REPLY_CHECK_INTERVAL)
        else:
            time.sleep(seconds)

    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    clock.sleep = sleep
    sci.time, sci._push_messages = clock, push_messages
    os.environ.setdefault(TASK_POLL_ENV, f"{min(TASK_POLL_INTERVAL, pull_interval):g}")
    return True


def forking_superexec() -> bool:
    """In this (SuperExec) process: preload PRELOAD and make Flower's subprocess executor fork a child per
    ``flwr-clientapp`` launch instead of starting a new interpreter. The child runs Flower's ``flwr_clientapp``
    entry point with the same arguments and exits with its code; children are reaped by the kernel (SIGCHLD
    ignored here, restored in the child). Returns False, changing nothing, if the executor is not the one known."""
    import importlib
    import types

    from flwr.supercore.superexec.executor import subprocess_executor as se

    if getattr(se, "subprocess", None) is not subprocess:
        return False
    for name in PRELOAD:
        importlib.import_module(name)
    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):  # keyword-only defaults (Flower 1.41)
        defaults = getattr(fn, "__kwdefaults__", None) or {}
        defaults.update({k: v for k, v in CLIENTAPP_PULL_BACKOFF.items() if k in defaults})
    from flwr.supernode.cli import flwr_clientapp

    def popen(args, **kwargs):
        if not args or args[0] != "flwr-clientapp":
            return subprocess.Popen(args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return types.SimpleNamespace(pid=pid, args=args)
        code = 1
        try:  # the child: Flower's flwr-clientapp, as if started as a program
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if kwargs.get("stdout") == subprocess.DEVNULL:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            sys.argv = list(args)
            flwr_clientapp()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - report and exit; never return into the SuperExec's loop
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked ClientApps are reaped by the kernel
    se.subprocess = types.SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL)
    return True


def _launcher_options(argv: list[str], names: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``--name=value`` options of the launcher (``names``: name -> default); the rest is Flower's."""
    values = dict(names)
    while argv and argv[0].startswith("--") and argv[0][2:].split("=", 1)[0] in names and "=" in argv[0]:
        name, value = argv[0][2:].split("=", 1)
        values[name], argv = value, argv[1:]
    return values, argv


def launch_supernode(argv: list[str]) -> int:
    """``python -m server.deploy_cli [--pull-interval=S] [--clientapp-start=fork|spawn] FLOWER-SUPERNODE-ARGS``:
    flower-supernode (Flower's own entry point and argument parsing) with ``fast_polling(S)``, and with a
    SuperExec that forks its ClientApps (``forking_superexec``) if asked.
    ``python -m server.deploy_cli --superexec FLOWER-SUPEREXEC-ARGS``: that SuperExec."""
    if argv[:1] == ["--superexec"]:
        if not forking_superexec():
            print("warning: this Flower version's SuperExec is not the one magnet-fl knows; starting ClientApps as "
                  "new processes", file=sys.stderr)
        from flwr.supercore.cli import flower_superexec

        sys.argv = ["flower-superexec", *argv[1:]]
        flower_superexec()
        return 0
    options, argv = _launcher_options(argv, {"pull-interval": str(DEFAULT_PULL_INTERVAL), "clientapp-start": "fork"})
    try:
        interval = float(options["pull-interval"])
    except ValueError:
        print(f"error: --pull-interval={options['pull-interval']}: not a number of seconds", file=sys.stderr)
        return 2
    if options["clientapp-start"] not in CLIENTAPP_STARTS:
        print(f"error: --clientapp-start must be one of {', '.join(CLIENTAPP_STARTS)}", file=sys.stderr)
        return 2
    os.environ.update({k: os.environ.get(k, v) for k, v in {**FLOWER_ENV, **OBJECT_CONCURRENCY}.items()})
    if interval < FLOWER_IDLE_PULL and not fast_polling(interval):
        print("warning: this Flower version's SuperNode loop is not the one magnet-fl knows; polling at Flower's "
              "own interval", file=sys.stderr)
    if options["clientapp-start"] == "fork":
        from flwr.supernode import start_client_internal as sci

        def popen(command, **kwargs):  # the SuperNode starts its SuperExec: ours, which forks the ClientApps
            if command and command[0] == "flower-superexec":
                command = [sys.executable, "-m", "server.deploy_cli", "--superexec", *command[1:]]
            return subprocess.Popen(command, **kwargs)

        if getattr(sci, "subprocess", None) is subprocess:
            import types

            sci.subprocess = types.SimpleNamespace(Popen=popen)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path) -> Path:
    """Add a SuperLink connection (TLS, consortium CA) to the flwr CLI's config.toml in ``flwr_home``."""
    path = flwr_home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links.setdefault("default", name)
    links[name] = {"address": address, "root-certificates": str(ca_cert.resolve())}
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    a = sub.add_parser("superlink", help="coordinator: run the SuperLink (TLS, SuperNode auth, closed control plane)")
    a.add_argument("--pki", type=Path, required=True, help="the SuperLink's folder, PKI_DIR/superlink (no CA key)")
    a.add_argument("--state", type=Path, required=True, help="directory for the SuperLink's state database")
    a.add_argument("--fleet-address", default=DEFAULT_FLEET,
                   help=f"HOST:PORT the sites connect to, the only API facing the network (default {DEFAULT_FLEET})")
    a.add_argument("--control-port", type=_port, default=DEFAULT_CONTROL_PORT,
                   help=f"port of the Control and Runtime APIs, always on 127.0.0.1 (default {DEFAULT_CONTROL_PORT})")
    a.add_argument("--print", action="store_true", help="print the command (for a service unit) instead of running")
    b = sub.add_parser("connection", help="coordinator: write the flwr CLI connection to the local Control API")
    b.add_argument("--pki", type=Path, required=True, help="the SuperLink's folder (its ca.crt is used)")
    b.add_argument("--address", default=f"127.0.0.1:{DEFAULT_CONTROL_PORT}",
                   help=f"HOST:PORT of the Control API (default 127.0.0.1:{DEFAULT_CONTROL_PORT})")
    b.add_argument("--name", default="consortium")
    b.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    c = sub.add_parser("register", help="coordinator: register a site's public key with the SuperLink")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--connection", default="consortium")
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
    d.add_argument("--skip-validation", action="store_true")
    d.add_argument("--worker", action="store_true",
                   help="start a persistent site worker beside the SuperNode: it keeps the data, graphs and torch "
                        "loaded, and each message is handed to it over a private Unix socket")
    d.add_argument("--worker-socket", type=Path, default=None,
                   help="the worker's socket (default BUNDLE/worker/worker.sock); without --worker, the SuperNode "
                        "uses a worker you run yourself (`magnet-fl site-worker`, e.g. as a service)")
    d.add_argument("--worker-timeout", type=float, default=600.0,
                   help="seconds one message may take at the worker before the site replies an error (default 600)")
    d.add_argument("--pull-interval", type=float, default=DEFAULT_PULL_INTERVAL,
                   help=f"seconds between the SuperNode's polls of the SuperLink while a run is active (default "
                        f"{DEFAULT_PULL_INTERVAL:g}; after {ACTIVE_WINDOW:g} s without a message, and always with "
                        f"{FLOWER_IDLE_PULL:g} or more, Flower's own {FLOWER_IDLE_PULL:g} s)")
    d.add_argument("--clientapp-start", choices=CLIENTAPP_STARTS, default="fork",
                   help="how the per-message ClientApp process starts: forked from a SuperExec that has imported "
                        "Flower, numpy, pandas and pydantic once (default), or Flower's own new interpreter (spawn)")
    d.add_argument("--print", action="store_true", help="print the flower-supernode command instead of running it")


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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _magnet_fl() -> list[str]:
    exe = shutil.which("magnet-fl")
    return [exe] if exe else [sys.executable, "-m", "simulations.cli"]


def run(args: argparse.Namespace) -> int:
    env = {**os.environ, **FLOWER_ENV}
    if args.deploy_command == "connection":
        host, _ = split_host_port(args.address, "--address")
        if not _is_loopback(host):
            print(f"warning: {args.address} is not a loopback address; the SuperLink serves its Control API on "
                  f"127.0.0.1 only (use an SSH tunnel from another machine)", file=sys.stderr)
        path = write_connection(args.flwr_home, args.name, args.address, args.pki / CA_CERT)
        print(f"wrote connection {args.name!r} -> {args.address} to {path}")
        return 0
    if args.deploy_command == "register":
        site = load_bundle(args.bundle)
        cmd = ["flwr", "supernode", "register", str(args.bundle / site.auth_public_key), args.connection,
               "--name", site.site]
        return subprocess.run(cmd, env=env, check=False).returncode
    if args.deploy_command == "superlink":
        pki, state = args.pki.resolve(), args.state.resolve()
        check_superlink_dir(pki)
        split_host_port(args.fleet_address, "--fleet-address")
        if args.print:
            print(shlex.join([*_magnet_fl(), "deploy", "superlink", "--pki", str(pki), "--state", str(state),
                              "--fleet-address", args.fleet_address, "--control-port", str(args.control_port)]))
            return 0
        state.mkdir(parents=True, exist_ok=True)
        os.environ.update(FLOWER_ENV)
        return serve_superlink(pki, state, args.fleet_address, args.control_port)
    # the bundle and the site's key first (cheap, clear errors), then the data
    bundle, data, manifest = args.bundle.resolve(), args.data.resolve(), args.manifest.resolve()
    sock = (args.worker_socket or bundle / "worker" / "worker.sock").absolute() \
        if args.worker or args.worker_socket else None
    extra = [f"site-log-dir='{args.log_dir.resolve()}'" if args.log_dir else "",
             f"worker-socket='{sock}' worker-timeout={float(args.worker_timeout)}" if sock else ""]
    if not 0 < args.pull_interval <= 60:
        print(f"error: --pull-interval must be in (0, 60] seconds, got {args.pull_interval:g}", file=sys.stderr)
        return 2
    cmd = supernode_command(bundle, data, manifest, args.port, " ".join(e for e in extra if e),
                            key=args.key.resolve() if args.key else None, pull_interval=args.pull_interval,
                            clientapp_start=args.clientapp_start)
    worker = [*_magnet_fl(), "site-worker", "--socket", str(sock), "--data", str(data), "--manifest", str(manifest),
              "--site-name", load_bundle(bundle).site] if args.worker else []
    if not args.skip_validation:
        from magnet_core.cohort.manifest import ConsortiumManifest
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
    os.execvpe(cmd[0], cmd, env)  # replace this process: its pid is the Flower process's pid
    return 0  # pragma: no cover


if __name__ == "__main__":  # the SuperNode launcher used by supernode_command (see launch_supernode)
    sys.exit(launch_supernode(sys.argv[1:]))
