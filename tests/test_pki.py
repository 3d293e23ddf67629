"""Consortium PKI: CA kept apart, SuperLink certificate (SANs, usages, a real TLS handshake), model-signing key,
site-held key pairs and bundles without private keys, in flwr's formats; nothing overwritten without --force."""

from __future__ import annotations

import argparse
import ipaddress
import re
import stat
import subprocess

import grpc
import pytest
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

# The exact functions Flower 1.41 uses to read these files:
from flwr.cli.supernode.register import try_load_public_key  # `flwr supernode register PUBLIC_KEY`
from flwr.common.args import try_obtain_server_certificates  # flower-superlink --ssl-{ca-certfile,certfile,keyfile}
from flwr.supercore.grpc import create_channel, generic_create_grpc_server
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication  # --auth-supernode-private-key
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.pki import (
    CA_CERT,
    CA_DIR,
    CA_KEY,
    REGISTRY,
    SERVER_CERT,
    SERVER_KEY,
    SIGNING_CERT,
    SIGNING_DIR,
    SIGNING_KEY,
    SITE_KEY,
    SITE_PUB,
    SUPERLINK_DIR,
    SiteBundle,
    init_ca,
    issue_server_cert,
    issue_signing_key,
    make_site,
    make_site_key,
    registered_sites,
    ssh_fingerprint,
)

PRIVATE_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@pytest.fixture()
def pki_cli(capsys):
    """``magnet-fl pki ARGS`` run in this process (the same entry point as the console script; a subprocess per
    call would cost ~2 s of imports each)."""
    from simulations.cli import main

    def call(*args):
        capsys.readouterr()
        try:
            code = main(["pki", *map(str, args)])
        except SystemExit as exc:  # argparse
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def consortium(tmp_path):
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_server_cert(pki, ["fl.example.org", "10.1.2.3"])
    make_site_key(tmp_path / "at-hospital-a", comment="hospital-a")
    make_site(pki, "hospital-a", tmp_path / "at-hospital-a" / SITE_PUB, "fl.example.org:9092")
    return pki


def test_server_certificate_is_signed_by_the_ca_with_the_sans_and_usages_flower_needs(consortium):
    link = consortium / SUPERLINK_DIR
    ca = x509.load_pem_x509_certificate((consortium / CA_DIR / CA_CERT).read_bytes())
    assert (link / CA_CERT).read_bytes() == (consortium / CA_DIR / CA_CERT).read_bytes()
    cert = x509.load_pem_x509_certificate((link / SERVER_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in
                                                            ("10.1.2.3", "127.0.0.1", "::1")}
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    # flower-superlink reads the three files as-is (bytes); the SuperLink's folder holds no CA key
    ns = argparse.Namespace(ssl_ca_certfile=str(link / CA_CERT), ssl_certfile=str(link / SERVER_CERT),
                            ssl_keyfile=str(link / SERVER_KEY))
    ca_b, cert_b, key_b = try_obtain_server_certificates(ns)
    assert b"PRIVATE KEY" in key_b and cert_b.startswith(b"-----BEGIN CERTIFICATE")
    assert sorted(p.name for p in link.iterdir()) == [CA_CERT, SERVER_KEY, SERVER_CERT]


def _serve(pki):
    """A gRPC server built by Flower's own server factory with the SuperLink's TLS files (health service only)."""
    link = pki / SUPERLINK_DIR
    ns = argparse.Namespace(ssl_ca_certfile=str(link / CA_CERT), ssl_certfile=str(link / SERVER_CERT),
                            ssl_keyfile=str(link / SERVER_KEY))
    server = generic_create_grpc_server((health.HealthServicer(), health_pb2_grpc.add_HealthServicer_to_server),
                                        "127.0.0.1:0", max_concurrent_workers=2,
                                        certificates=try_obtain_server_certificates(ns))
    server.start()
    return server, int(server.bound_address.rpartition(":")[2])


def _check(channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def test_tls_handshake_on_loopback_as_a_supernode_makes_it(consortium, tmp_path):
    server, port = _serve(consortium)
    try:
        root = (consortium / "sites" / "hospital-a" / CA_CERT).read_bytes()  # what a site holds
        for host in ("127.0.0.1", "localhost"):
            assert _check(create_channel(f"{host}:{port}", insecure=False, root_certificates=root)), host
        # the name sites use (fl.example.org) is in the certificate; a name that is not must be refused
        creds = grpc.ssl_channel_credentials(root)
        assert _check(grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                          options=[("grpc.ssl_target_name_override", "fl.example.org")]))
        assert not _check(grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                              options=[("grpc.ssl_target_name_override", "other.example.org")]))
        # another consortium's CA does not trust this SuperLink
        other = (init_ca(tmp_path / "other")).read_bytes()
        assert not _check(create_channel(f"127.0.0.1:{port}", insecure=False, root_certificates=other))
    finally:
        server.stop(None)


def test_site_keys_load_with_flowers_own_loaders(consortium, tmp_path):
    bundle = consortium / "sites" / "hospital-a"
    settings = SiteBundle.model_validate(tomllib.loads((bundle / "site.toml").read_text()))
    assert settings.superlink == "fl.example.org:9092"
    assert (bundle / settings.ca_certificate).read_bytes() == (consortium / CA_DIR / CA_CERT).read_bytes()
    at_site = tmp_path / "at-hospital-a"
    ns = argparse.Namespace(auth_supernode_private_key=str(at_site / SITE_KEY), auth_supernode_public_key=None)
    private, public = _try_setup_client_authentication(ns)  # flower-supernode exits if it cannot parse the key
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    registered = bytes_to_public_key(try_load_public_key(bundle / settings.auth_public_key))
    assert registered.public_numbers() == public.public_numbers()
    listed = registered_sites(consortium)["hospital-a"]
    assert listed.startswith("ecdsa-sha2-nistp384 ")
    assert (bundle / settings.auth_public_key).read_text().startswith(listed)
    assert ssh_fingerprint(listed.encode()) == ssh_fingerprint((at_site / SITE_PUB).read_bytes())


def _private_blocks(root) -> dict[str, int]:
    return {str(p.relative_to(root)): len(PRIVATE_BLOCK.findall(p.read_text(errors="replace")))
            for p in sorted(root.rglob("*")) if p.is_file() and PRIVATE_BLOCK.search(p.read_text(errors="replace"))}


def test_bundles_hold_no_private_key_and_the_coordinator_no_site_key(tmp_path, pki_cli):
    """The full hand-over through the CLI: keys made at the sites, only public keys sent, bundles issued."""
    pki, sites = tmp_path / "coordinator" / "pki", tmp_path / "sites"
    outs = [pki_cli("init", "--dir", str(pki)), pki_cli("server", "--dir", str(pki), "--host", "fl.example.org"),
            pki_cli("signing-key", "--dir", str(pki))]
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        outs.append(pki_cli("site-key", "--out", str(sites / name), "--name", name))  # at the site
        outs.append(pki_cli("site", "--name", name, "--public-key", str(sites / name / SITE_PUB), "--dir", str(pki),
                         "--superlink", "fl.example.org:9092"))  # at the coordinator: only the .pub travelled
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    # the coordinator's folder: exactly its own three private keys (CA, SuperLink TLS, model signing)
    assert _private_blocks(tmp_path / "coordinator") == {
        f"pki/{CA_DIR}/{CA_KEY}": 1, f"pki/{SUPERLINK_DIR}/{SERVER_KEY}": 1, f"pki/{SIGNING_DIR}/{SIGNING_KEY}": 1}
    coordinator_text = "".join(p.read_text(errors="replace") for p in (tmp_path / "coordinator").rglob("*")
                               if p.is_file()).replace("\n", "")
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        bundle = pki / "sites" / name
        assert sorted(p.name for p in bundle.iterdir()) == [CA_CERT, SITE_PUB, "site.toml"]
        assert not _private_blocks(bundle)
        # the site's folder holds one private key: the one it generated, whose public half was registered
        assert _private_blocks(sites / name) == {SITE_KEY: 1}
        own = serialization.load_ssh_private_key((sites / name / SITE_KEY).read_bytes(), None)
        registered = serialization.load_ssh_public_key(registered_sites(pki)[name].encode())
        assert own.public_key().public_numbers() == registered.public_numbers()
        body = "".join((sites / name / SITE_KEY).read_text().splitlines()[1:-1])
        assert body[30:90] not in coordinator_text
        assert _mode(sites / name / SITE_KEY) == 0o600 and _mode(sites / name) == 0o700


def test_signing_key_is_ed25519_with_a_code_signing_certificate_from_the_ca(consortium):
    key_path, cert_path = issue_signing_key(consortium)
    assert key_path == consortium / SIGNING_DIR / SIGNING_KEY and cert_path == consortium / SIGNING_DIR / SIGNING_CERT
    assert _mode(key_path) == 0o600 and _mode(key_path.parent) == 0o700
    assert not (key_path.parent / CA_KEY).exists() and not (consortium / SUPERLINK_DIR / SIGNING_KEY).exists()
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((consortium / CA_DIR / CA_CERT).read_bytes()))
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CODE_SIGNING]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.public_key().verify(key.sign(b"model package"), b"model package")  # the pair signs and verifies
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        issue_signing_key(consortium)


def test_private_keys_are_0600_and_never_printed(tmp_path, pki_cli):
    pki = tmp_path / "pki"
    outs = [pki_cli("init", "--dir", str(pki)),
            pki_cli("server", "--dir", str(pki), "--host", "fl.example.org"),
            pki_cli("signing-key", "--dir", str(pki)),
            pki_cli("site-key", "--out", str(tmp_path / "b"), "--name", "hospital-b"),
            pki_cli("site", "--name", "hospital-b", "--public-key", str(tmp_path / "b" / SITE_PUB), "--dir", str(pki),
                 "--superlink", "fl.example.org:9092")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    secrets = [pki / CA_DIR / CA_KEY, pki / SUPERLINK_DIR / SERVER_KEY, pki / SIGNING_DIR / SIGNING_KEY,
               tmp_path / "b" / SITE_KEY]
    for path in secrets:
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700, path
    printed = "".join(o.stdout + o.stderr for o in outs)
    assert "BEGIN" not in printed and "-----" not in printed
    for path in secrets:
        body = b"".join(path.read_bytes().splitlines()[1:-1]).decode()  # base64 body of the PEM
        assert body[:40] not in printed
    assert set(registered_sites(pki)) == {"hospital-b"}
    assert str(pki / REGISTRY) in printed and printed.count(ssh_fingerprint((tmp_path / "b" / SITE_PUB).read_bytes())) == 2  # noqa: E501 (one assertion string)


def test_a_key_file_with_loose_permissions_is_replaced_not_reused(consortium):
    key = consortium / SUPERLINK_DIR / SERVER_KEY
    key.chmod(0o644)
    issue_server_cert(consortium, ["fl.example.org"], force=True)
    assert _mode(key) == 0o600


def test_nothing_is_overwritten_without_force_and_refusals_are_clear(tmp_path, pki_cli):
    pki, at_site = tmp_path / "pki", tmp_path / "at-site"
    assert pki_cli("init", "--dir", str(pki)).returncode == 0
    assert pki_cli("server", "--dir", str(pki), "--host", "fl.example.org").returncode == 0
    assert pki_cli("site-key", "--out", str(at_site), "--name", "hospital-d").returncode == 0
    before = {p: p.read_bytes() for p in [pki / CA_DIR / CA_KEY, pki / CA_DIR / CA_CERT,
                                          pki / SUPERLINK_DIR / SERVER_KEY, pki / SUPERLINK_DIR / SERVER_CERT,
                                          at_site / SITE_KEY, at_site / SITE_PUB]}
    pub = str(at_site / SITE_PUB)
    cases = [
        (("init", "--dir", str(pki)), "refusing to overwrite the consortium CA"),
        (("server", "--dir", str(pki), "--host", "fl.example.org"), "refusing to overwrite the SuperLink's TLS"),
        (("site-key", "--out", str(at_site)), "refusing to overwrite this site's key pair"),
        (("server", "--dir", str(tmp_path / "none"), "--host", "a.example.org"), "pki init"),
        (("server", "--dir", str(pki), "--host", "fl.example.org:9092", "--force"), "without a port"),
        (("site", "--name", "../escape", "--public-key", pub, "--dir", str(pki), "--superlink", "fl.example.org:9092"),
         "contain only letters"),
        (("site", "--name", "hospital-d", "--public-key", pub, "--dir", str(pki), "--superlink", "fl.example.org"),
         "HOST:PORT"),
        (("site", "--name", "hospital-d", "--public-key", str(at_site / SITE_KEY), "--dir", str(pki),
          "--superlink", "fl.example.org:9092"), "holds a PRIVATE key"),
        (("site", "--name", "hospital-d", "--public-key", str(pki / CA_DIR / CA_CERT), "--dir", str(pki),
          "--superlink", "fl.example.org:9092"), "is not an OpenSSH public key"),
        (("site", "--name", "hospital-d", "--public-key", str(tmp_path / "missing.pub"), "--dir", str(pki),
          "--superlink", "fl.example.org:9092"), "no such public key file"),
    ]
    for args, expected in cases:
        out = pki_cli(*args)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing was touched
    assert not (tmp_path / "escape").exists() and not (pki / "sites").exists()
    # a key received by mistake is not stored anywhere at the coordinator
    assert not [p for p in pki.rglob("*") if p.is_file() and PRIVATE_BLOCK.search(p.read_text(errors="replace"))
                and p.name not in (CA_KEY, SERVER_KEY)]

    site = ("site", "--name", "hospital-d", "--public-key", pub, "--dir", str(pki), "--superlink", "[::1]:9092")
    assert pki_cli(*site).returncode == 0
    dup = pki_cli(*site)
    assert dup.returncode == 2 and "already registered" in dup.stderr
    twin = pki_cli("site", "--name", "hospital-e", "--public-key", pub, "--dir", str(pki), "--superlink", "[::1]:9092")
    assert twin.returncode == 2 and "already registered for site 'hospital-d'" in twin.stderr
    # --force replaces: a new CA, a new server key, a new site key registered in place of the old one
    assert pki_cli("site-key", "--out", str(at_site), "--force").returncode == 0
    assert pki_cli(*site, "--force").returncode == 0
    assert registered_sites(pki)["hospital-d"].split()[1] in (at_site / SITE_PUB).read_text()
    assert len(registered_sites(pki)) == 1
    assert pki_cli("server", "--dir", str(pki), "--host", "fl.example.org", "--force").returncode == 0
    assert (pki / SUPERLINK_DIR / SERVER_KEY).read_bytes() != before[pki / SUPERLINK_DIR / SERVER_KEY]
    assert pki_cli("init", "--dir", str(pki), "--force").returncode == 0
    assert (pki / CA_DIR / CA_CERT).read_bytes() != before[pki / CA_DIR / CA_CERT]
