"""Authenticated secure aggregation: the consortium roster, a site's identity key, and what each signature covers."""

# Against an actively malicious coordinator (Bonawitz et al. 2017, the active-security variant, adapted):
#   * every key advert is signed by the site's enrolled identity key over (round id, secagg id, site name, both
#     X25519 public keys, a commitment to its self-mask seed); every site checks every advert of the key book
#     against its OWN roster (site name -> identity public key, from its own configuration), so a substituted key
#     or a fake site is refused by name before any share or mask is derived from it;
#   * every Shamir share is signed by its dealer for its recipient, so a revealed share is attributable: a share
#     altered by the revealing site fails the signature (the revealer is named), and shares that do not
#     interpolate to the dealer's committed secret are evidence against the dealer (ShareProof);
#   * before it helps unmask, every site checks that every site whose input is in the sum signed the same
#     transcript (round id, the context the coordinator sent it: the global model and round config, the setup, the
#     key book with names and commitments, the senders of shares), so different models, key books or participant
#     lists sent to different sites are refused;
#   * consistency check (Bonawitz et al. 2017, round 3): after masking, every survivor signs the survivor list U3
#     (once per sum: a second, different list is refused) and a site reveals shares only for a U3 that it signed
#     itself and that at least t distinct roster sites of U3 signed (neighbourhoods: t of its own neighbourhood), so
#     the coordinator's word on who survived is checked by the sites rather than trusted.
# Signatures use the key the consortium PKI enrolled for the site (server/pki.py: its node-authentication key,
# EC P-384, ECDSA with SHA-384; Ed25519 keys are accepted too). Every signed payload starts with its own
# "magnet-fl/secagg-auth/v1/<kind>" prefix so a signature made here is never valid for another purpose.

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tomllib
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from magnet_core.protocol.secagg import KeyBook, SecAggError, SecAggSetup

PREFIX = b"magnet-fl/secagg-auth/v1/"
_CURVE_HASH = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}


def load_public_key(text: str, what: str):
    """An identity public key from OpenSSH (``ecdsa-sha2-nistp384 AAAA...``, ``ssh-ed25519 ...``) or PEM text; EC
    on a NIST curve or Ed25519, else a clear error naming ``what``."""
    data = text.strip().encode()
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(b" ".join(data.split()[:2])))
    except (ValueError, UnsupportedAlgorithm, IndexError) as exc:
        raise ValueError(f"{what}: not an OpenSSH or PEM public key ({exc})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVE_HASH:
        return key
    raise ValueError(f"{what}: identity keys must be EC P-256/384/521 or Ed25519, got {type(key).__name__}")


def sign(private_key, data: bytes) -> bytes:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    return private_key.sign(data, ec.ECDSA(_CURVE_HASH[private_key.curve.name]()))


def verify(public_key, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            public_key.verify(signature, data, ec.ECDSA(_CURVE_HASH[public_key.curve.name]()))
    except (InvalidSignature, ValueError):
        return False
    return True


class Roster(BaseModel):
    """The consortium's sites and their enrolled identity public keys, as a site (or the coordinator) holds them in
    its OWN configuration: the one source of truth for whose signature a key advert must carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: dict[str, str]  # site name -> identity public key (OpenSSH or PEM text)

    @field_validator("sites")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) < 2:
            raise ValueError(f"a roster needs at least 2 sites, got {len(value)}")
        seen: dict[bytes, str] = {}
        for name, text in value.items():
            key = load_public_key(text, f"roster site {name!r}")
            raw = _public_bytes(key)
            if raw in seen:
                raise ValueError(f"roster sites {seen[raw]!r} and {name!r} have the same identity key")
            seen[raw] = name
        return value

    @classmethod
    def from_file(cls, path: Path) -> "Roster":
        """``registered_sites.csv`` (columns site, public_key, as server/pki.py writes it) or a TOML file with a
        ``[sites]`` table name = key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such roster file")
        try:
            text = path.read_text()
            if path.suffix == ".toml":
                return cls(sites=dict(tomllib.loads(text).get("sites", {})))
            rows = list(csv.reader(io.StringIO(text)))
            if not rows or [c.strip() for c in rows[0][:2]] != ["site", "public_key"]:
                raise ValueError("the first row must be 'site,public_key'")
            bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) < 2]
            if bad:
                raise ValueError(f"row {bad[0]} has no public_key column")
            names = [r[0].strip() for r in rows[1:]]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:  # a dict would keep only the last key of a site listed twice
                raise ValueError(f"site {twice[0]!r} is listed twice")
            return cls(sites={r[0].strip(): r[1] for r in rows[1:]})
        except ValidationError as exc:  # one line: what is wrong, without pydantic's framing
            raise ValueError(f"{path}: " + "; ".join(str(e["msg"]).removeprefix("Value error, ")
                                                     for e in exc.errors())) from None
        except (ValueError, csv.Error) as exc:  # incl. TOML syntax and a file that is not text
            raise ValueError(f"{path}: {exc}") from None

    def public_key(self, name: str):
        if name not in self.sites:
            raise SecAggError(f"site {name!r} is not in this site's roster ({sorted(self.sites)})")
        return load_public_key(self.sites[name], f"roster site {name!r}")

    def verifies(self, name: str, data: bytes, signature: bytes) -> bool:
        return name in self.sites and bool(signature) and verify(self.public_key(name), data, signature)


def _public_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclasses.dataclass(frozen=True)
class SiteIdentity:
    """A site's enrolled name and its identity private key (kept by the site; never in a message or a state)."""

    name: str
    private_key: Any

    @classmethod
    def from_key_file(cls, name: str, path: Path) -> "SiteIdentity":
        """The site's private key file (OpenSSH, as `magnet-fl pki site-key` writes it, or PKCS#8 PEM)."""
        data = Path(path).read_bytes()
        try:
            key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH" in data
                   else serialization.load_pem_private_key(data, password=None))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{path}: not an unencrypted OpenSSH or PEM private key ({exc})") from None
        if not (isinstance(key, ed25519.Ed25519PrivateKey)
                or (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVE_HASH)):
            raise ValueError(f"{path}: identity keys must be EC P-256/384/521 or Ed25519")
        return cls(name, key)

    def sign(self, data: bytes) -> bytes:
        return sign(self.private_key, data)

    def public_text(self) -> str:
        return self.private_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH).decode()


@dataclasses.dataclass(frozen=True)
class SiteAuth:
    """What makes a site's part of a secure sum authenticated: its identity and its own roster."""

    identity: SiteIdentity
    roster: Roster

    def __post_init__(self) -> None:
        mine = self.roster.public_key(self.identity.name)
        if _public_bytes(mine) != _public_bytes(self.identity.private_key.public_key()):
            raise SecAggError(f"the roster's key for {self.identity.name!r} is not this site's identity key")


# ----------------------------------------------------------------------------------------------- payloads


def _frame(kind: str, *parts: bytes | str | int) -> bytes:
    """Unambiguous encoding: prefix + kind, then every part length-prefixed."""
    out = [PREFIX + kind.encode()]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(len(b).to_bytes(8, "big") + b)
    return b"".join(out)


def seed_commitment(round_id: str, site_id: int, b: bytes) -> bytes:
    """A site's commitment to its self-mask seed (a hash: b is 32 random bytes)."""
    return hashlib.sha256(_frame("seed-commitment", round_id, site_id, b)).digest()


def advert_payload(round_id: str, site_id: int, name: str, enc_pk: bytes, mask_pk: bytes, b_commit: bytes) -> bytes:
    return _frame("advert", round_id, site_id, name, enc_pk, mask_pk, b_commit)


def share_payload(round_id: str, sender: int, recipient: int, kind: str, share: bytes) -> bytes:
    return _frame("share", round_id, sender, recipient, kind, share)


def transcript_digest(setup: SecAggSetup, context: bytes, book: KeyBook, u2: Sequence[int]) -> bytes:
    """What every site in the sum must have seen alike: the setup, the context (global model and round config),
    the key book with names and commitments, and the senders of shares."""
    h = hashlib.sha256(_frame("transcript", json.dumps(setup.to_record(), sort_keys=True), context))
    for i in sorted(book.keys):
        e, m = book.keys[i]
        h.update(_frame("book-entry", i, book.names.get(i, ""), e, m, book.commits.get(i, b"")))
    h.update(_frame("u2", ",".join(str(i) for i in sorted(u2))))
    return h.digest()


def neighbourhood_transcript_digest(setup: SecAggSetup, context: bytes, participants: Mapping[int, str]) -> bytes:
    """The transcript of a sum on a neighbourhood graph, alike at every site: the setup (with its degree, so the
    graph), the context and every site that dealt shares with its enrolled name. Each site checked the signed
    adverts of its own neighbours against its roster; no site sees the other neighbourhoods' key books."""
    h = hashlib.sha256(_frame("neighbourhood-transcript", json.dumps(setup.to_record(), sort_keys=True), context))
    for i in sorted(participants):
        h.update(_frame("participant", i, participants[i]))
    return h.digest()


def transcript_payload(round_id: str, site_id: int, digest: bytes) -> bytes:
    return _frame("transcript-signature", round_id, site_id, digest)


def survivors_payload(round_id: str, site_id: int, b_commit: bytes, survivors: Sequence[int],
                      dropped: Sequence[int]) -> bytes:
    """What a survivor signs in the consistency check (stage 3a): the sum (its round id, and the signer's seed
    commitment from its signed key advert of this sum: fresh in every sum, so a signature never counts in another
    sum with the same round id; every holder of the signer's shares and the coordinator have it), the signer's
    secagg id, the sorted survivors U3 and the sorted sites that dropped before masking."""
    return _frame("survivor-list", round_id, site_id, b_commit, ",".join(str(i) for i in sorted(survivors)),
                  ",".join(str(i) for i in sorted(dropped)))


def context_digest(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None) -> bytes:
    """A digest of what the coordinator sent a site at stage 0 (the global model's arrays by name, dtype, shape
    and bytes, and the round config): every site of one sum must have received the same."""
    h = hashlib.sha256(PREFIX + b"context")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(_frame("array", name, str(a.dtype), json.dumps(list(a.shape)), a.tobytes()))
    h.update(_frame("config", json.dumps(dict(config or {}), sort_keys=True, default=repr)))
    return h.digest()


def check_book(book: KeyBook, roster: Roster, setup: SecAggSetup) -> list[str]:
    """Every problem of a key book against ``roster``, each naming the secagg site and the name it claims."""
    problems = []
    names: dict[str, int] = {}
    for i in sorted(book.keys):
        a = book.advert(i)
        label = f"secagg site {i} ({a.site_name!r})" if a.site_name else f"secagg site {i}"
        if not a.signature:
            problems.append(f"{label}: its keys carry no signature")
            continue
        if a.site_name not in roster.sites:
            problems.append(f"{label}: not a site of the roster ({sorted(roster.sites)}): a fake site")
            continue
        if a.site_name in names:
            problems.append(f"{label}: the name is already used by secagg site {names[a.site_name]}")
            continue
        names[a.site_name] = i
        payload = advert_payload(setup.round_id, i, a.site_name, a.enc_pk, a.mask_pk, a.b_commit)
        if not roster.verifies(a.site_name, payload, a.signature):
            problems.append(f"{label}: its public keys are not signed by {a.site_name!r}'s enrolled identity key "
                            "(substituted keys)")
    return problems
