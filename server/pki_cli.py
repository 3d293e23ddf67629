"""``magnet-fl pki``: provision a consortium (CA, SuperLink TLS certificate, per-site key bundles)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .pki import CA_KEY, REGISTRY, SERVER_KEY, init_ca, issue_server_cert, make_site, registered_sites, ssh_fingerprint


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    a = sub.add_parser("init", help="create the consortium CA")
    a.add_argument("--dir", type=Path, default=Path("pki"), help="PKI directory (default ./pki)")
    a.add_argument("--force", action="store_true", help="replace an existing CA (invalidates issued certificates)")
    b = sub.add_parser("server", help="issue the SuperLink's TLS certificate")
    b.add_argument("--dir", type=Path, default=Path("pki"))
    b.add_argument("--host", action="append", required=True,
                   help="DNS name or IP address the sites use to reach the SuperLink; repeatable "
                        "(localhost, 127.0.0.1 and ::1 are always added)")
    c = sub.add_parser("site", help="make a site's node-auth key pair and hand-over bundle")
    c.add_argument("name", help="site name (letters, digits, . _ -)")
    c.add_argument("--dir", type=Path, default=Path("pki"))
    c.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink Fleet API, e.g. fl.example.org:9092")
    c.add_argument("--force", action="store_true", help="replace this site's keys")


def run(args: argparse.Namespace) -> int:
    # Only paths and public material are printed: never the content of a private key.
    if args.pki_command == "init":
        path = init_ca(args.dir, force=args.force)
        print(f"consortium CA certificate: {path}")
        print(f"CA private key: {args.dir / CA_KEY} (mode 0600; keep it offline, it signs the SuperLink certificate)")
    elif args.pki_command == "server":
        path = issue_server_cert(args.dir, args.host)
        print(f"SuperLink certificate: {path} for {', '.join(args.host)} + localhost, 127.0.0.1, ::1")
        print(f"SuperLink private key: {args.dir / SERVER_KEY} (mode 0600)")
    else:
        bundle = make_site(args.dir, args.name, args.superlink, force=args.force)
        public = registered_sites(args.dir)[args.name]
        print(f"bundle for site {args.name!r}: {bundle} (hand this folder to the site over a secure channel)")
        print(f"site public key fingerprint: {ssh_fingerprint(public.encode())} (listed in {args.dir / REGISTRY})")
        print(f"register it on the SuperLink: magnet-fl deploy register --bundle {bundle}  "
              f"(runs `flwr supernode register {bundle / 'node_auth_key.pub'} <connection>`)")
    return 0
