"""``magnet-fl pki``: consortium CA, SuperLink TLS certificate, model-signing key, site keys and site bundles."""

from __future__ import annotations

import argparse
from pathlib import Path

from .pki import (
    CA_DIR,
    CA_KEY,
    REGISTRY,
    SERVER_CERT,
    SERVER_KEY,
    init_ca,
    issue_server_cert,
    issue_signing_key,
    make_site,
    make_site_key,
    registered_sites,
    ssh_fingerprint,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    a = sub.add_parser("init", help="coordinator: create the consortium CA in DIR/ca")
    a.add_argument("--dir", type=Path, default=Path("pki"), help="PKI directory (default ./pki)")
    a.add_argument("--force", action="store_true", help="replace an existing CA (invalidates issued certificates)")
    b = sub.add_parser("server", help="coordinator: issue the SuperLink's TLS certificate into DIR/superlink")
    b.add_argument("--dir", type=Path, default=Path("pki"))
    b.add_argument("--host", action="append", required=True,
                   help="DNS name or IP address the sites use to reach the SuperLink; repeatable "
                        "(localhost, 127.0.0.1 and ::1 are always added)")
    b.add_argument("--force", action="store_true", help="replace the SuperLink's existing key and certificate")
    s = sub.add_parser("signing-key", help="coordinator: model-package signing key + CA-signed certificate "
                                           "into DIR/signing")
    s.add_argument("--dir", type=Path, default=Path("pki"))
    s.add_argument("--force", action="store_true", help="replace the existing signing key")
    k = sub.add_parser("site-key", help="site: make this site's key pair (the private key never leaves the site)")
    k.add_argument("--out", type=Path, required=True, help="folder for node_auth_key (0600) and node_auth_key.pub")
    k.add_argument("--name", default="magnet-fl-site", help="comment written into the public key (the site name)")
    k.add_argument("--force", action="store_true", help="replace this site's existing key pair")
    c = sub.add_parser("site", help="coordinator: register a site's public key and write its bundle (no private key)")
    c.add_argument("--name", required=True, help="site name (letters, digits, . _ -)")
    c.add_argument("--public-key", type=Path, required=True, help="the node_auth_key.pub the site sent")
    c.add_argument("--dir", type=Path, default=Path("pki"))
    c.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink Fleet API, e.g. fl.example.org:9092")
    c.add_argument("--force", action="store_true", help="replace this site's registered public key")


def run(args: argparse.Namespace) -> int:
    # Only paths and public material are printed: never the content of a private key.
    cmd = args.pki_command
    if cmd == "init":
        path = init_ca(args.dir, force=args.force)
        print(f"consortium CA certificate: {path}")
        print(f"CA private key: {args.dir / CA_DIR / CA_KEY} (mode 0600; keep it offline: it is needed only to "
              f"issue certificates, never by a running SuperLink)")
    elif cmd == "server":
        out = issue_server_cert(args.dir, args.host, force=args.force)
        print(f"SuperLink certificate: {out / SERVER_CERT} for {', '.join(args.host)} + localhost, 127.0.0.1, ::1")
        print(f"SuperLink private key: {out / SERVER_KEY} (mode 0600)")
        print(f"start the SuperLink with: magnet-fl deploy superlink --pki {out} --state STATE_DIR")
    elif cmd == "signing-key":
        key, cert = issue_signing_key(args.dir, force=args.force)
        print(f"model-signing private key: {key} (Ed25519, PKCS#8 PEM, mode 0600)")
        print(f"model-signing certificate: {cert} (signed by {args.dir / CA_DIR / 'ca.crt'}; code signing)")
    elif cmd == "site-key":
        key, pub = make_site_key(args.out, comment=args.name, force=args.force)
        print(f"private key: {key} (mode 0600; it stays at this site, never send it)")
        print(f"public key: {pub}  fingerprint {ssh_fingerprint(pub.read_bytes())}")
        print("send only the public key to the coordinator and confirm the fingerprint with them by phone")
    else:
        bundle = make_site(args.dir, args.name, args.public_key, args.superlink, force=args.force)
        public = registered_sites(args.dir)[args.name]
        print(f"registered public key of site {args.name!r}: fingerprint {ssh_fingerprint(public.encode())} "
              f"(check it with the site; listed in {args.dir / REGISTRY})")
        print(f"bundle for site {args.name!r}: {bundle} (ca.crt, site.toml, node_auth_key.pub; no private key): "
              f"the site copies these files into the folder made by `magnet-fl pki site-key`")
        print(f"register it on the SuperLink: magnet-fl deploy register --bundle {bundle}")
    return 0
