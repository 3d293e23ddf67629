"""``magnet-fl deploy superlink|connection|register``, the coordinator's side: run the SuperLink with a closed control
plane (TLS, SuperNode authentication, no telemetry, no runtime dependency installation), write the flwr CLI's
connection, register sites. (A site's SuperNode: ``client/deploy_site.py``; ``simulations/deploy_cli.py`` offers both
under ``magnet-fl deploy``.)

Flower 1.41 serves its Fleet, Control and Runtime (ServerAppIo) APIs on one HTTP port. ``deploy superlink`` runs
that same SuperLink application on two sockets: the control address (loopback only) serves every API to the
coordinator's own flwr CLI and ServerApp; the Fleet address, the only one facing the sites, answers
``POST /v1/fleet/<call>`` and refuses every other request before Flower sees it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import tomli_w
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flower_compat import FLOWER_ENV
from magnet_core.artefacts.site_bundle import load_bundle

from .pki import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, split_host_port

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")  # every Fleet route: POST /v1/fleet/<name>
DEFAULT_FLEET, DEFAULT_CONTROL_PORT = "0.0.0.0:9092", 9093
CONTROL_HOST = "127.0.0.1"  # Control + Runtime APIs: loopback only, not configurable
ISOLATION = "subprocess"  # the SuperLink starts the ServerApp in a child process
ACTIONS = ("superlink", "connection", "register")


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
    import uvicorn  # heavy (and Flower's SuperLink below): only when the SuperLink really starts

    from flower_compat.superlink import superlink_app, uvicorn_log_config

    fleet_host, fleet_port = split_host_port(fleet, "--fleet-address")
    if fleet_port == control_port:
        raise ValueError(f"--fleet-address port {fleet_port} equals --control-port; give two different ports")
    control = _bind(CONTROL_HOST, control_port, "the control address")
    try:
        sockets = [control, _bind(fleet_host, fleet_port, "the Fleet address")]
    except PermissionError:
        control.close()
        raise
    app, config = superlink_app(flower_superlink_args(pki, state, control_port))
    print(f"SuperLink: Fleet API (sites) on {fleet_host}:{fleet_port}; Control and Runtime APIs on "
          f"{CONTROL_HOST}:{control_port} only", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        FleetOnlyGate(app, control_port), ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
        access_log=True, log_config=uvicorn_log_config(), workers=1, lifespan="on"))
    server.run(sockets=sockets)
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


def add_actions(sub) -> None:
    """The coordinator's actions (ACTIONS) as sub-parsers of ``magnet-fl deploy``."""
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
