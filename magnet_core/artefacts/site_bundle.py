"""A site's bundle: what the coordinator hands a site to connect (``site.toml`` next to ``ca.crt`` and the site's
registered public key). Written by the coordinator (``server/pki.py``), read by the site (``client/deploy_site.py``)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import tomllib
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator

CA_CERT = "ca.crt"
SITE_KEY, SITE_PUB = "node_auth_key", "node_auth_key.pub"  # made at the site by `magnet-fl pki site-key`
SETTINGS = "site.toml"

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


def check_site_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError(f"site name {value!r} must start with a letter or digit and contain only letters, "
                         f"digits, '.', '_' and '-' (at most 64 characters; it names a folder)")
    return value


def split_host_port(value: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port), with a clear error."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {value!r} must be HOST:PORT, e.g. fl.example.org:9092")
    parse_host(host)  # raises with a clear message for a malformed host
    return host.strip("[]"), int(port)


class SiteBundle(BaseModel):
    """Connection settings handed to a site (written as site.toml in its bundle, next to ca.crt)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(description="site name; also the bundle's folder name")
    superlink: str = Field(description="HOST:PORT of the SuperLink's Fleet API (default port 9092)")
    ca_certificate: str = CA_CERT
    auth_public_key: str = Field(SITE_PUB, description="the public key the coordinator registered for this site")
    auth_private_key: str = Field(SITE_KEY, description="file name of the site's own private key (made at the "
                                                        "site by `magnet-fl pki site-key`; never in the bundle)")

    @field_validator("site")
    @classmethod
    def _site_name(cls, value: str) -> str:
        return check_site_name(value)

    @field_validator("superlink")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value, "superlink address")
        return value.strip()


def load_bundle(bundle: Path) -> SiteBundle:
    """``bundle/site.toml``, checked; a clear error when the folder is not a bundle."""
    path = Path(bundle) / SETTINGS
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: is {bundle} a bundle made by `magnet-fl pki site`?")
    try:
        return SiteBundle.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not a TOML file ({exc})") from None
