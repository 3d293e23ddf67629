"""Consortium PKI with `cryptography`: CA, SuperLink TLS, model-signing key, site public keys and site bundles."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from magnet_core.artefacts.site_bundle import (  # noqa: F401  (re-exported: the coordinator writes bundles)
    CA_CERT,
    SETTINGS,
    SITE_KEY,
    SITE_PUB,
    SiteBundle,
    check_site_name,
    parse_host,
    split_host_port,
)

# Coordinator layout under one PKI root (e.g. ./pki). Each folder is read by one party only:
#   ca/        ca.key + ca.crt       the consortium CA; keep offline, nothing running reads it
#   superlink/ ca.crt, server.pem, server.key   the only folder `magnet-fl deploy superlink --pki` reads
#   signing/   model_signing.key + model_signing.crt   the coordinator's model-package signing key
#   sites/<name>/  ca.crt, site.toml, node_auth_key.pub   a site's bundle (public material only)
#   registered_sites.csv   site name -> OpenSSH public key, what `flwr supernode register` is given
CA_DIR, SUPERLINK_DIR, SIGNING_DIR, SITES_DIR = "ca", "superlink", "signing", "sites"
CA_KEY = "ca.key"
SERVER_KEY, SERVER_CERT = "server.key", "server.pem"
SIGNING_KEY, SIGNING_CERT = "model_signing.key", "model_signing.crt"
REGISTRY = "registered_sites.csv"

_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower's node authentication accepts


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes with 0600 permissions from the first byte on (an existing file is replaced, not reused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an old file may have looser permissions: never write a secret into it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case the umask removed bits we want (it cannot add any)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _refuse_existing(paths: list[Path], force: bool, what: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; refusing to overwrite {what} (use --force)")


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


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca(pki: Path, name: str = "magnet-fl consortium CA", days: int = 3650, force: bool = False) -> Path:
    """Create the consortium CA (EC P-384 key + self-signed certificate) in ``pki/ca``; refuses to replace one
    unless ``force``. Returns the CA certificate's path."""
    ca_dir = Path(pki) / CA_DIR
    _refuse_existing([ca_dir / CA_KEY, ca_dir / CA_CERT], force,
                     "the consortium CA (every certificate and bundle it issued would have to be reissued)")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(name), _name(name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    write_private(_private_dir(ca_dir) / CA_KEY, _pem_key(key))
    (ca_dir / CA_CERT).write_bytes(_pem(cert))
    return ca_dir / CA_CERT


def ca_certificate(pki: Path) -> Path:
    path = Path(pki) / CA_DIR / CA_CERT
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `magnet-fl pki init --dir {pki}` first")
    return path


def _load_ca(pki: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_dir = Path(pki) / CA_DIR
    for f in (CA_KEY, CA_CERT):
        if not (ca_dir / f).exists():
            raise FileNotFoundError(f"{ca_dir / f} not found: run `magnet-fl pki init --dir {pki}` first")
    key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{ca_dir / CA_KEY} does not belong to {ca_dir / CA_CERT}")
    return key, cert  # type: ignore[return-value]


def _issued(ca_key, ca_cert: x509.Certificate, cn: str, public_key, days: int) -> x509.CertificateBuilder:
    return (_builder(_name(cn), ca_cert.subject, public_key, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """DNS / IP SANs for the given hosts plus localhost, 127.0.0.1 and ::1 (the SuperLink connects back to itself)."""
    out: list[x509.GeneralName] = []
    for host in [*hosts, "localhost", "127.0.0.1", "::1"]:
        entry = parse_host(host)
        if entry not in out:
            out.append(entry)
    return out


def issue_server_cert(pki: Path, hosts: list[str], days: int = 825, force: bool = False) -> Path:
    """The SuperLink's TLS certificate, signed by the consortium CA, with SANs for every host, written with a copy
    of the CA certificate to ``pki/superlink`` (the only folder the SuperLink reads). Returns that folder."""
    pki = Path(pki)
    sans = san_entries(hosts)  # validate the hosts before touching any file
    out = pki / SUPERLINK_DIR
    _refuse_existing([out / SERVER_KEY, out / SERVER_CERT], force, "the SuperLink's TLS key and certificate")
    ca_key, ca_cert = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_issued(ca_key, ca_cert, "magnet-fl SuperLink", key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .sign(ca_key, hashes.SHA384()))
    write_private(_private_dir(out) / SERVER_KEY, _pem_key(key))
    (out / SERVER_CERT).write_bytes(_pem(cert))
    (out / CA_CERT).write_bytes(_pem(ca_cert))
    return out


def issue_signing_key(pki: Path, days: int = 825, force: bool = False) -> tuple[Path, Path]:
    """The coordinator's model-package signing key (Ed25519, PKCS#8 PEM, 0600) and its certificate, signed by the
    consortium CA for code / content signing, in ``pki/signing``. Returns (private key path, certificate path)."""
    out = Path(pki) / SIGNING_DIR
    _refuse_existing([out / SIGNING_KEY, out / SIGNING_CERT], force, "the model-signing key and certificate")
    ca_key, ca_cert = _load_ca(pki)
    key = ed25519.Ed25519PrivateKey.generate()
    cert = (_issued(ca_key, ca_cert, "magnet-fl model signing", key.public_key(), days)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(_key_usage(digital_signature=True, content_commitment=True), critical=True)
            .sign(ca_key, hashes.SHA384()))
    write_private(_private_dir(out) / SIGNING_KEY, _pem_key(key))
    (out / SIGNING_CERT).write_bytes(_pem(cert))
    return out / SIGNING_KEY, out / SIGNING_CERT


def ssh_fingerprint(public_openssh: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` shows it: lets the coordinator check a key received out of band."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_site_key(out: Path, comment: str = "magnet-fl site", force: bool = False) -> tuple[Path, Path]:
    """At the site: its node-authentication key pair (EC P-384, OpenSSH format as flower-supernode reads it).
    The private key (0600, folder 0700) never leaves the site; only the ``.pub`` file is sent to the coordinator."""
    out = Path(out)
    _refuse_existing([out / SITE_KEY, out / SITE_PUB], force,
                     "this site's key pair (its registration at the SuperLink would no longer match)")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(_private_dir(out) / SITE_KEY,
                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    comment = re.sub(r"\s+", "-", comment.strip()) or "magnet-fl-site"
    (out / SITE_PUB).write_bytes(public + f" {comment}\n".encode())
    return out / SITE_KEY, out / SITE_PUB


def load_site_public_key(path: Path) -> str:
    """A site's OpenSSH public key (``ecdsa-sha2-nistp384 AAAA...``) read and checked; a private key is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such public key file")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path} holds a PRIVATE key: the site must keep it and send only its .pub file; "
                         f"treat this key as exposed and ask the site to make a new one (`magnet-fl pki site-key`)")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an OpenSSH public key ({exc}); send the node_auth_key.pub made by "
                         f"`magnet-fl pki site-key`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise ValueError(f"{path}: Flower's node authentication needs an EC key on a NIST curve (P-256/384/521), "
                         f"got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


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


def make_site(pki: Path, site: str, public_key: Path, superlink: str, force: bool = False) -> Path:
    """At the coordinator: record a site's public key and write its bundle (CA certificate, connection settings and
    the registered public key; no private key). Returns the bundle directory."""
    import tomli_w

    pki = Path(pki)
    settings = SiteBundle(site=site, superlink=superlink)  # validates the name before it becomes a path
    public = load_site_public_key(public_key)
    ca_cert = ca_certificate(pki)
    sites = registered_sites(pki)
    if site in sites and not force:
        raise FileExistsError(f"site {site!r} is already registered in {pki / REGISTRY} "
                              f"(use --force to replace its public key)")
    other = [name for name, key in sites.items() if key == public and name != site]
    if other:
        raise ValueError(f"{public_key}: this public key is already registered for site {other[0]!r}; "
                         f"every site needs its own key pair")
    bundle_dir = pki / SITES_DIR / site
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / settings.auth_public_key).write_text(f"{public} {site}\n")
    (bundle_dir / CA_CERT).write_bytes(ca_cert.read_bytes())
    (bundle_dir / SETTINGS).write_text(tomli_w.dumps(settings.model_dump()))
    sites[site] = public
    _write_registry(pki, sites)
    return bundle_dir
