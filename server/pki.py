"""Consortium PKI with `cryptography`: a CA, the SuperLink's TLS certificate and sites' node-auth key pairs."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.pem"
REGISTRY = "registered_sites.csv"  # site name, OpenSSH public key: what `flwr supernode register` is given per site

_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?$")


def parse_host(host: str) -> x509.GeneralName:
    """A SAN entry for a DNS name or an IP address; a clear error for anything else (a port, a URL, a blank)."""
    text = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _DNS_NAME.match(text) or len(text) > 253:
        hint = " (give the host without a port or scheme)" if (":" in text or "/" in text) else ""
        raise ValueError(f"--host {host!r} is neither a DNS name nor an IP address{hint}")
    return x509.DNSName(text.rstrip(".").lower())


class SiteBundle(BaseModel):
    """Connection settings handed to a site with its keys (written as site.toml in the bundle)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="site name; also the bundle's folder name")
    superlink: str = Field(description="HOST:PORT of the SuperLink's Fleet API (default port 9092)")
    ca_certificate: str = CA_CERT
    auth_private_key: str = "node_auth_key"
    auth_public_key: str = "node_auth_key.pub"

    @field_validator("site")
    @classmethod
    def _site_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(f"site name {value!r} must start with a letter or digit and contain only letters, "
                             f"digits, '.', '_' and '-' (at most 64 characters; it names a folder)")
        return value

    @field_validator("superlink")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.strip().rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"superlink address {value!r} must be HOST:PORT, e.g. fl.example.org:9092")
        parse_host(host)  # raises with a clear message for a malformed host
        return value.strip()


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes with 0600 permissions from the first byte on (an existing file is replaced, not reused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an old file may have looser permissions: never write a secret into it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case the umask removed bits we want (it cannot add any)


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
    """Create the consortium CA (EC P-384 key + self-signed certificate); refuses to replace one unless ``force``."""
    pki = Path(pki)
    if ((pki / CA_KEY).exists() or (pki / CA_CERT).exists()) and not force:
        raise FileExistsError(f"{pki / CA_KEY} exists; refusing to overwrite the consortium CA (use --force; "
                              f"every certificate and bundle it issued would have to be reissued)")
    pki.mkdir(parents=True, exist_ok=True)
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
    for f in (CA_KEY, CA_CERT):
        if not (pki / f).exists():
            raise FileNotFoundError(f"{pki / f} not found: run `magnet-fl pki init --dir {pki}` first")
    key = serialization.load_pem_private_key((pki / CA_KEY).read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((pki / CA_CERT).read_bytes())
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{pki / CA_KEY} does not belong to {pki / CA_CERT}")
    return key, cert  # type: ignore[return-value]


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """DNS / IP SANs for the given hosts plus localhost, 127.0.0.1 and ::1 (the SuperLink connects back to itself)."""
    out: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1", "::1"]:
        entry = parse_host(host)
        if entry not in out:
            out.append(entry)
    return out


def issue_server_cert(pki: Path, hosts: list[str], days: int = 825) -> Path:
    """The SuperLink's TLS certificate, signed by the consortium CA, with SANs for every host."""
    pki = Path(pki)
    sans = san_entries(hosts)  # validate the hosts before touching any file
    ca_key, ca_cert = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name("magnet-fl SuperLink"), ca_cert.subject, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_private(pki / SERVER_KEY, _pem_key(key))
    (pki / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki / SERVER_CERT


def ssh_fingerprint(public_openssh: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` shows it: lets the coordinator check a key received out of band."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def registered_sites(pki: Path) -> dict[str, str]:
    """The coordinator's list of site public keys (OpenSSH), by site name."""
    path = Path(pki) / REGISTRY
    if not path.exists():
        return {}
    rows = list(csv.reader(io.StringIO(path.read_text())))
    return {r[0]: r[1] for r in rows[1:] if len(r) >= 2}


def _write_registry(pki: Path, sites: dict[str, str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["site", "public_key"])
    writer.writerows(sorted(sites.items()))
    (pki / REGISTRY).write_text(buf.getvalue())


def make_site(pki: Path, site: str, superlink: str, force: bool = False) -> Path:
    """A site's node-authentication key pair (EC P-384, OpenSSH format as flower-supernode reads it) and a bundle
    directory with the CA certificate and connection settings. Returns the bundle directory."""
    import tomli_w

    pki = Path(pki)
    settings = SiteBundle(site=site, superlink=superlink)  # validates the name before it becomes a path
    _load_ca(pki)
    bundle_dir = pki / "sites" / site
    if (bundle_dir / settings.auth_private_key).exists() and not force:
        raise FileExistsError(f"{bundle_dir}: site {site!r} already has keys (use --force to replace them)")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bundle_dir, 0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(bundle_dir / settings.auth_private_key,
                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (bundle_dir / settings.auth_public_key).write_bytes(public + f" {site}\n".encode())
    (bundle_dir / CA_CERT).write_bytes((pki / CA_CERT).read_bytes())
    (bundle_dir / "site.toml").write_text(tomli_w.dumps(settings.model_dump()))
    sites = registered_sites(pki)
    sites[site] = public.decode()
    _write_registry(pki, sites)
    return bundle_dir
