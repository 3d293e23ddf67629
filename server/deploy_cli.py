"""``magnet-fl deploy``: start the coordinator's SuperLink or a site's SuperNode with TLS, node auth and no
telemetry or runtime dependency installation; write the flwr connection settings; register sites."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

from .pki import CA_CERT, SERVER_CERT, SERVER_KEY, SiteBundle

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def superlink_command(pki: Path, state: Path, host: str = "0.0.0.0", port: int = 9091) -> list[str]:
    """flower-superlink with TLS from the consortium PKI, SuperNode authentication and a persistent state DB."""
    for f in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (pki / f).exists():
            raise FileNotFoundError(f"{pki / f} missing: run `magnet-fl pki init` and `magnet-fl pki server` first")
    return ["flower-superlink", "--ssl-ca-certfile", str(pki / CA_CERT), "--ssl-certfile", str(pki / SERVER_CERT),
            "--ssl-keyfile", str(pki / SERVER_KEY), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port),
            "--database", str(state / "superlink.db")]


def load_bundle(bundle: Path) -> SiteBundle:
    path = bundle / "site.toml"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: is {bundle} a bundle made by `magnet-fl pki site`?")
    return SiteBundle.model_validate(tomllib.loads(path.read_text()))


def supernode_command(bundle: Path, data: Path, manifest: Path, port: int = 9094,
                      extra_node_config: str = "") -> list[str]:
    """flower-supernode for one site: TLS against the consortium CA, its node-auth key, its local data."""
    site = load_bundle(bundle)
    node_config = f"data-dir='{data}' manifest='{manifest}' site-name='{site.site}'"
    if extra_node_config:
        node_config += f" {extra_node_config}"
    return ["flower-supernode", "--root-certificates", str(bundle / site.ca_certificate),
            "--superlink", site.superlink, "--auth-supernode-private-key", str(bundle / site.auth_private_key),
            "--port", str(port), "--node-config", node_config]


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    a = sub.add_parser("superlink", help="coordinator: run the SuperLink (TLS + SuperNode auth)")
    a.add_argument("--pki", type=Path, required=True)
    a.add_argument("--state", type=Path, required=True, help="directory for the SuperLink's state database")
    a.add_argument("--host", default="0.0.0.0")
    a.add_argument("--port", type=int, default=9091)
    a.add_argument("--print", action="store_true", help="print the command instead of running it")
    b = sub.add_parser("connection", help="coordinator: write the flwr CLI connection to the SuperLink")
    b.add_argument("--pki", type=Path, required=True)
    b.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    b.add_argument("--name", default="consortium")
    b.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    c = sub.add_parser("register", help="coordinator: register a site's public key with the SuperLink")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--connection", default="consortium")
    d = sub.add_parser("supernode", help="site: run this site's SuperNode on its local data")
    d.add_argument("--bundle", type=Path, required=True, help="the folder made by `magnet-fl pki site`")
    d.add_argument("--data", type=Path, required=True, help="the site's prepared data folder")
    d.add_argument("--manifest", type=Path, required=True)
    d.add_argument("--port", type=int, default=9094, help="local ClientApp API port")
    d.add_argument("--skip-validation", action="store_true")
    d.add_argument("--print", action="store_true")


def run(args: argparse.Namespace) -> int:
    env = {**os.environ, **FLOWER_ENV}
    if args.deploy_command == "connection":
        path = write_connection(args.flwr_home, args.name, args.address, args.pki / CA_CERT)
        print(f"wrote connection {args.name!r} -> {args.address} to {path}")
        return 0
    if args.deploy_command == "register":
        site = load_bundle(args.bundle)
        cmd = ["flwr", "supernode", "register", str(args.bundle / site.auth_public_key), args.connection,
               "--name", site.site]
        return subprocess.run(cmd, env=env, check=False).returncode
    if args.deploy_command == "superlink":
        args.state.mkdir(parents=True, exist_ok=True)
        cmd = superlink_command(args.pki, args.state, args.host, args.port)
    else:
        if not args.skip_validation:
            from magnet_core.site_validation import validate_site
            from magnet_core.manifest import ConsortiumManifest

            report, _ = validate_site(args.data, ConsortiumManifest.load(args.manifest))
            if not report.ok:
                print("site data failed validation (run `magnet-fl validate-site` for the summary):", file=sys.stderr)
                for e in report.errors:
                    print(f"- {e}", file=sys.stderr)
                return 1
        cmd = supernode_command(args.bundle, args.data.resolve(), args.manifest.resolve(), args.port)
    if args.print:
        print(" ".join(cmd))
        return 0
    os.execvpe(cmd[0], cmd, env)  # replace this process: its pid is the Flower process's pid
    return 0  # pragma: no cover
