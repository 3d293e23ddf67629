"""Consortium PKI with `cryptography`: a CA, the SuperLink's TLS certificate and sites' node-auth key pairs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.pem"


class SiteBundle(BaseModel):
    """Connection settings handed to a site with its keys (written as site.toml in the bundle)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    superlink: str = Field(description="HOST:PORT of the SuperLink's Fleet API (default port 9092)")
    ca_certificate: str = CA_CERT
    auth_private_key: str = "node_auth_key"
    auth_public_key: str = "node_auth_key.pub"


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes with 0600 permissions from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "magnet-fl consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _key_usage(**on: bool) -> x509.KeyUsage:
    fields = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
              "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{f: on.get(f, False) for f in fields})


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(pki: Path, name: str = "magnet-fl consortium CA", days: int = 3650, force: bool = False) -> Path:
    """Create the consortium CA (EC P-384 key + self-signed certificate)."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / CA_KEY).exists() and not force:
        raise FileExistsError(f"{pki / CA_KEY} exists; refusing to overwrite the consortium CA (use --force)")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(name), _name(name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    write_private(pki / CA_KEY, _pem_key(key))
    (pki / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki / CA_CERT


def _load_ca(pki: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not (pki / CA_KEY).exists():
        raise FileNotFoundError(f"{pki}: no consortium CA yet; run `magnet-fl pki init --dir {pki}` first")
    key = serialization.load_pem_private_key((pki / CA_KEY).read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate((pki / CA_CERT).read_bytes())  # type: ignore[return-value]


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """DNS / IP SANs for the given hosts plus localhost and 127.0.0.1 (the SuperLink connects back to itself)."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, "localhost", "127.0.0.1", "::1"]:
        if host in seen:
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def issue_server_cert(pki: Path, hosts: list[str], days: int = 825) -> Path:
    """The SuperLink's TLS certificate, signed by the consortium CA, with SANs for every host."""
    ca_key, ca_cert = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(hosts[0] if hosts else "localhost"), ca_cert.subject, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_private(pki / SERVER_KEY, _pem_key(key))
    (pki / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki / SERVER_CERT


def make_site(pki: Path, site: str, superlink: str, force: bool = False) -> Path:
    """A site's node-authentication key pair (EC P-384, OpenSSH format as flower-supernode reads it) and a bundle
    directory with the CA certificate and connection settings. Returns the bundle directory."""
    _load_ca(pki)
    bundle_dir = pki / "sites" / site
    settings = SiteBundle(site=site, superlink=superlink)
    if (bundle_dir / settings.auth_private_key).exists() and not force:
        raise FileExistsError(f"{bundle_dir}: site {site!r} already has keys (use --force to replace them)")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(bundle_dir / settings.auth_private_key,
                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (bundle_dir / settings.auth_public_key).write_bytes(public + f" {site}\n".encode())
    (bundle_dir / CA_CERT).write_bytes((pki / CA_CERT).read_bytes())
    import tomli_w

    (bundle_dir / "site.toml").write_text(tomli_w.dumps(settings.model_dump()))
    registry = pki / "registered_sites.csv"
    lines = [ln for ln in (registry.read_text().splitlines() if registry.exists() else []) if not ln.startswith(f"{site},")]
    lines.append(f"{site},{public.decode()}")
    registry.write_text("\n".join(lines) + "\n")
    return bundle_dir
