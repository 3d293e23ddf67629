"""Consortium PKI: CA, SuperLink certificate (SANs, usages, a real TLS handshake) and site bundles in flwr's formats."""

from __future__ import annotations

import argparse
import ipaddress
import stat
import subprocess
import sys
import tomllib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# The exact functions Flower 1.41 uses to read these files:
from flwr.cli.supernode.register import try_load_public_key  # `flwr supernode register PUBLIC_KEY`
from flwr.common.args import try_obtain_server_certificates  # flower-superlink --ssl-{ca-certfile,certfile,keyfile}
from flwr.supercore.grpc import create_channel, generic_create_grpc_server  # SuperNode channel / SuperLink server
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication  # --auth-supernode-private-key
from server.pki import (
    CA_CERT, CA_KEY, REGISTRY, SERVER_CERT, SERVER_KEY, SiteBundle, init_ca, issue_server_cert, make_site,
    registered_sites, ssh_fingerprint,
)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", "pki", *args], capture_output=True, text=True,
                          timeout=120)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def consortium(tmp_path):
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_server_cert(pki, ["fl.example.org", "10.1.2.3"])
    make_site(pki, "hospital-a", "fl.example.org:9092")
    return pki


def test_server_certificate_is_signed_by_the_ca_with_the_sans_and_usages_flower_needs(consortium):
    ca = x509.load_pem_x509_certificate((consortium / CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((consortium / SERVER_CERT).read_bytes())
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
    # flower-superlink reads the three files as-is (bytes) and hands them to gRPC
    ns = argparse.Namespace(ssl_ca_certfile=str(consortium / CA_CERT), ssl_certfile=str(consortium / SERVER_CERT),
                            ssl_keyfile=str(consortium / SERVER_KEY))
    ca_b, cert_b, key_b = try_obtain_server_certificates(ns)
    assert b"PRIVATE KEY" in key_b and cert_b.startswith(b"-----BEGIN CERTIFICATE")


def _serve(pki):
    """A gRPC server built by Flower's own server factory with the SuperLink's TLS files (health service only)."""
    ns = argparse.Namespace(ssl_ca_certfile=str(pki / CA_CERT), ssl_certfile=str(pki / SERVER_CERT),
                            ssl_keyfile=str(pki / SERVER_KEY))
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
        root = (consortium / CA_CERT).read_bytes()
        # the SuperLink connects back to itself (127.0.0.1 / localhost); a site uses the consortium CA
        for host in ("127.0.0.1", "localhost"):
            assert _check(create_channel(f"{host}:{port}", insecure=False, root_certificates=root)), host
        # the name sites use (fl.example.org) is in the certificate; a name that is not must be refused
        creds = grpc.ssl_channel_credentials(root)
        assert _check(grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                          options=[("grpc.ssl_target_name_override", "fl.example.org")]))
        assert not _check(grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                              options=[("grpc.ssl_target_name_override", "other.example.org")]))
        # another consortium's CA does not trust this SuperLink
        init_ca(tmp_path / "other")
        other = (tmp_path / "other" / CA_CERT).read_bytes()
        assert not _check(create_channel(f"127.0.0.1:{port}", insecure=False, root_certificates=other))
    finally:
        server.stop(None)


def test_site_keys_load_with_flowers_own_loaders(consortium):
    bundle = consortium / "sites" / "hospital-a"
    settings = SiteBundle.model_validate(tomllib.loads((bundle / "site.toml").read_text()))
    assert settings.superlink == "fl.example.org:9092"
    assert (bundle / settings.ca_certificate).read_bytes() == (consortium / CA_CERT).read_bytes()
    ns = argparse.Namespace(auth_supernode_private_key=str(bundle / settings.auth_private_key),
                            auth_supernode_public_key=None)
    private, public = _try_setup_client_authentication(ns)  # flower-supernode exits if it cannot parse the key
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    registered = bytes_to_public_key(try_load_public_key(bundle / settings.auth_public_key))
    assert registered.public_numbers() == public.public_numbers()
    # the coordinator's list holds the same public key, by site name
    listed = registered_sites(consortium)["hospital-a"]
    assert listed.startswith("ecdsa-sha2-nistp384 ")
    assert (bundle / settings.auth_public_key).read_text().startswith(listed)
    assert ssh_fingerprint(listed.encode()).startswith("SHA256:")


def test_private_keys_are_0600_and_never_printed(tmp_path):
    pki = tmp_path / "pki"
    outs = [_cli("init", "--dir", str(pki)),
            _cli("server", "--dir", str(pki), "--host", "fl.example.org"),
            _cli("site", "hospital-b", "--dir", str(pki), "--superlink", "fl.example.org:9092"),
            _cli("site", "hospital-c", "--dir", str(pki), "--superlink", "10.0.0.5:9092")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    secrets = [pki / CA_KEY, pki / SERVER_KEY, pki / "sites/hospital-b/node_auth_key",
               pki / "sites/hospital-c/node_auth_key"]
    for path in secrets:
        assert _mode(path) == 0o600, path
    assert _mode(pki / "sites" / "hospital-b") == 0o700
    printed = "".join(o.stdout + o.stderr for o in outs)
    assert "BEGIN" not in printed and "-----" not in printed
    for path in secrets:
        body = b"".join(path.read_bytes().splitlines()[1:-1]).decode()  # base64 body of the PEM
        assert body[:40] not in printed
    assert set(registered_sites(pki)) == {"hospital-b", "hospital-c"}
    assert str(pki / REGISTRY) in printed and "SHA256:" in printed


def test_a_key_file_with_loose_permissions_is_replaced_not_reused(consortium):
    key = consortium / SERVER_KEY
    key.chmod(0o644)
    issue_server_cert(consortium, ["fl.example.org"])
    assert _mode(key) == 0o600


def test_refusals_are_clear_and_without_traceback(tmp_path):
    pki = tmp_path / "pki"
    assert _cli("init", "--dir", str(pki)).returncode == 0
    ca_before = (pki / CA_CERT).read_bytes()
    again = _cli("init", "--dir", str(pki))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (pki / CA_CERT).read_bytes() == ca_before
    forced = _cli("init", "--dir", str(pki), "--force")
    assert forced.returncode == 0 and (pki / CA_CERT).read_bytes() != ca_before
    cases = [
        (("server", "--dir", str(tmp_path / "none"), "--host", "a.example.org"), "pki init"),
        (("server", "--dir", str(pki), "--host", "fl.example.org:9092"), "without a port"),
        (("site", "../escape", "--dir", str(pki), "--superlink", "fl.example.org:9092"), "contain only letters"),
        (("site", "hospital-d", "--dir", str(pki), "--superlink", "fl.example.org"), "HOST:PORT"),
    ]
    for args, expected in cases:
        out = _cli(*args)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not (tmp_path / "escape").exists() and not (pki / "sites").exists()
    assert _cli("site", "hospital-d", "--dir", str(pki), "--superlink", "[::1]:9092").returncode == 0
    dup = _cli("site", "hospital-d", "--dir", str(pki), "--superlink", "fl.example.org:9092")
    assert dup.returncode == 2 and "already has keys" in dup.stderr
    old = registered_sites(pki)["hospital-d"]
    assert _cli("site", "hospital-d", "--dir", str(pki), "--superlink", "fl.example.org:9092",
                "--force").returncode == 0
    assert registered_sites(pki)["hospital-d"] != old and len(registered_sites(pki)) == 1
