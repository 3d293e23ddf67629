"""Secure aggregation (SecAgg, Bonawitz et al. 2017) of float vectors in Z_2^64, with dropout recovery, and layouts."""

# Protocol (one instance per secure sum; every message is a frozen dataclass of magnet_core.protocol.secagg with
# to_record / from_record so it can travel in a Flower ConfigRecord; masked vectors travel as uint64 arrays):
#
#   stage 0  server -> sites   SecAggSetup        round id, planned site ids, threshold t, vector length, scale
#   stage 1  site -> server    KeyAdvert          two X25519 public keys (share encryption, pairwise masks)
#            server -> sites   KeyBook            every advertised pair of keys (U1, needs |U1| >= t)
#   stage 2  site -> server    ShareBundle        for every other site v, AEAD(ChaCha20-Poly1305) ciphertext of
#                                                 v's Shamir shares of this site's self-mask seed b_u and of its
#                                                 mask private key s_u (threshold t); the server cannot read them
#            server -> site    ShareInbox         the ciphertexts addressed to this site (senders = U2)
#   stage 3  site -> server    MaskedInput        y_u = enc(x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv)
#                                                 - sum_{v in U2, v < u} PRG(s_uv)   (mod 2^64)
#            server                               adds y_u into one running sum; senders = U3 (needs |U3| >= t)
#   stage 3a server -> sites   SurvivorList       authenticated only (the consistency check, Bonawitz et al. 2017
#                                                 round 3): U3 and U2 \ U3; each survivor signs it with its identity
#            site -> server    SurvivorSignature  key, once per sum (a second, different list is refused)
#            server -> sites   UnmaskRequest      U3 (survivors) and U2 \ U3 (dropped before sending y); authenticated:
#                                                 with >= t survivors' signatures over exactly that list
#   stage 4  site -> server    UnmaskShares       shares of b_v for v in U3 and of s_v for v dropped; a site never
#                                                 reveals both for the same v, and refuses if |U3| < t
#            server                               reconstructs with >= t responses, removes the masks, decodes:
#                                                 sum_{u in U3} x_u  (sites that drop after stage 3 are included)
#
# Threat model: without identities (SecAggSite(setup, id)), an honest-but-curious coordinator that relays
# everything; it may collude with fewer than t sites (t > n / 2 is enforced). Authenticated (SecAggSite(setup, id,
# SiteAuth, context), SecAggServer(setup, roster); magnet_core/federation/secagg_auth.py): adverts signed with the
# enrolled identity key and checked by every site against its own roster, shares signed by their dealer (a bad one
# names its dealer, who is then excluded: stage 4b ExclusionRequest -> PairwiseSeeds), and a transcript signature
# (context = global model + round config, key book, U2) checked before unmasking, and the survivor list U3 signed
# by the survivors (stage 3a): a site reveals shares only for a U3 it signed itself and that >= t distinct roster
# sites of U3 signed (neighbourhoods: >= t of its own closed neighbourhood). Unauthenticated sums have no
# identities to sign with and no stage 3a: there the coordinator's survivor list is trusted. In that mode the
# coordinator keeps the masked vectors one by one until the sum is done (to take an excluded dealer's out again).
# Graph: complete (SecAgg, setup.graph_degree == 0, the default) or sparse (SecAgg+, Bell et al. 2020:
# setup.graph_degree = k > 0). Sparse: the graph is derived by every party from the round id and the sorted site ids
# (magnet_core/federation/secagg_graph.py); a site gets the key book of its own neighbourhood only and refuses one
# naming any other site, deals its shares (threshold t per closed neighbourhood of k + 1 sites) and pairwise masks
# with its neighbours only, signs a transcript holding the global list of share dealers (ShareInbox.participants),
# and before unmasking checks that its neighbourhood keeps >= t survivors and that the survivors are connected in
# the graph (so only the sum over all of them can be unmasked). The coordinator reconstructs each secret from the
# holders in that site's neighbourhood and fails naming the site when fewer than t of them answer.
#
# Fixed point: x -> round(x * 2^frac_bits) as a two's-complement int64 in Z_2^64. Each site's values must satisfy
# |x| < 2^(63 - frac_bits) / n_sites so that the sum cannot wrap (checked, clear error). Per coordinate the decoded
# sum differs from the float64 sum by at most n_sites * 2^-(frac_bits + 1) (rounding), plus float64 rounding of
# the decoded integer (relative 2^-53). Default frac_bits = 32: resolution 2.3e-10, range +-2^31 / n_sites.

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from magnet_core.cohort.preprocess import FeatureStats
from magnet_core.model.network import MAGNET
from magnet_core.protocol.secagg import (
    DEFAULT_FRAC_BITS,
    ExclusionRequest,
    KeyAdvert,
    KeyBook,
    MaskedInput,
    PairwiseSeeds,
    SecAggError,
    SecAggSetup,
    ShareBundle,
    ShareInbox,
    ShareProof,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
)

from .secagg_auth import (
    Roster,
    SiteAuth,
    advert_payload,
    check_book,
    neighbourhood_transcript_digest,
    seed_commitment,
    share_payload,
    survivors_payload,
    transcript_digest,
    transcript_payload,
)
from .secagg_graph import connected, neighbourhood_graph

PRIME = 2**521 - 1  # Mersenne prime: the Shamir field holds a 256-bit secret directly
SHARE_BYTES = 66
# the messages are imported from magnet_core.protocol.secagg (and re-exported for the sums' callers)
__all__ = ["DEFAULT_FRAC_BITS", "ExclusionRequest", "KeyAdvert", "KeyBook", "MaskedInput", "PairwiseSeeds",
           "SecAggError", "SecAggServer", "SecAggSetup", "SecAggSite", "ShareBundle", "ShareInbox", "SharesRefuted",
           "StatsLayout", "SurvivorList", "SurvivorSignature", "UnmaskRequest", "UnmaskShares", "UpdateLayout",
           "consistency_round", "decode_fixed", "encode_fixed", "prg", "run_local", "shamir_combine", "shamir_split"]


class SharesRefuted(SecAggError):
    """Reconstruction found senders whose signed shares contradict their own commitment. Without the exclusion
    stage the round fails naming them; with it (:meth:`SecAggServer.exclusion_request`, :meth:`SecAggSite.exclude`,
    :meth:`SecAggServer.finish_excluding`) the sum of the others is recovered."""

    def __init__(self, message: str, request: ExclusionRequest):
        super().__init__(message)
        self.request = request


# ----------------------------------------------------------------------------------------------- primitives


def encode_fixed(x: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, num_sites: int = 1) -> np.ndarray:
    """Float vector -> uint64 ring elements; refuses values whose sum over ``num_sites`` sites could wrap."""
    x = np.asarray(x, dtype=np.float64).ravel()
    bound = 2.0 ** (63 - frac_bits) / max(num_sites, 1)
    bad = ~np.isfinite(x) | (np.abs(x) >= bound)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SecAggError(f"value {x[i]!r} at position {i} ({int(bad.sum())} such values) is outside the "
                          f"fixed-point range +-{bound:.4g} (frac_bits={frac_bits}, {num_sites} sites); "
                          "clip the update or use fewer fractional bits")
    return np.round(x * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def decode_fixed(v: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """uint64 ring elements (a sum of encodings) -> float64."""
    return np.asarray(v, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 from a 32-byte seed (ChaCha20 keystream, zero nonce: one key per stream)."""
    if len(seed) != 32:
        raise ValueError("PRG seed must be 32 bytes")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * length)), dtype=np.uint64).copy()


def _kdf(secret: bytes, label: str, round_id: str, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    info = f"magnet-fl/secagg/{label}/{round_id}/{lo}/{hi}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _self_seed(b: bytes, round_id: str, site: int) -> bytes:
    return _kdf(b, "self", round_id, site, site)


def shamir_split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of a secret of at most 64 bytes over GF(2^521 - 1): any ``threshold`` of them recover it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} for {len(xs)} shares")
    s = int.from_bytes(secret, "big")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"share point {x} must be positive")
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def shamir_combine(shares: Mapping[int, bytes], length: int = 32) -> bytes:
    """The secret from shares (Lagrange interpolation at 0); needs at least the threshold number of shares."""
    pts = [(int(x), int.from_bytes(y, "big")) for x, y in shares.items()]
    s = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        s = (s + yi * num * pow(den, -1, PRIME)) % PRIME
    if s >= 2 ** (8 * length):
        raise SecAggError("secret shares are inconsistent (reconstruction out of range)")
    return s.to_bytes(length, "big")


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pairwise_seed(private: bytes, peer_public: bytes, round_id: str, a: int, b: int) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _kdf(shared, "mask", round_id, a, b)


# ----------------------------------------------------------------------------------------------- a site


class SecAggSite:
    """One site's side of one secure sum. Keep it between stages with :meth:`to_state` / :meth:`from_state`
    (e.g. in the ClientApp's ``context.state``); the state holds private keys and must stay at the site."""

    def __init__(self, setup: SecAggSetup, site_id: int, auth: SiteAuth | None = None, context: bytes = b""):
        """``auth``: the site's identity and its own roster (authenticated secure aggregation: every advert is
        checked against the roster, every share signed, the transcript signed and checked); ``context``: a digest
        of what the coordinator sent this site for this sum (secagg_auth.context_digest), which every site of the
        sum must have received alike."""
        if site_id not in setup.site_ids:
            raise SecAggError(f"site {site_id} is not one of the planned sites {list(setup.site_ids)}")
        self.setup, self.site_id = setup, int(site_id)
        self.auth, self.context = auth, bytes(context)
        self._enc_sk = _raw_private(X25519PrivateKey.generate())
        self._mask_sk = _raw_private(X25519PrivateKey.generate())
        self._b = os.urandom(32)
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._book: dict = {}  # authenticated: the key book's names / commits / signatures (record form)
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # sender -> (share of its b, share of its mask key)
        self._sigs: dict[int, tuple[bytes, bytes]] = {}  # sender -> its signatures over those two shares
        self._u2: list[int] = []
        self._participants: dict[int, str] = {}  # neighbourhood graph: every share dealer (global U2) -> its name
        self._digest = b""
        self._revealed: str = ""  # "" | "masked" | "unmasked" | "excluded"
        self._signed_list: tuple[list[int], list[int]] | None = None  # stage 3a: the (U3, dropped) it signed

    # -- state ------------------------------------------------------------------------------------------
    def to_state(self) -> str:
        """Everything but the identity key and roster (pass ``auth`` again to :meth:`from_state`)."""
        return json.dumps({
            "setup": self.setup.to_record(), "site_id": self.site_id, "enc_sk": self._enc_sk.hex(),
            "mask_sk": self._mask_sk.hex(), "b": self._b.hex(),
            "keys": {str(k): [e.hex(), m.hex()] for k, (e, m) in self._keys.items()},
            "shares": {str(k): [b.hex(), s.hex()] for k, (b, s) in self._shares.items()},
            "sigs": {str(k): [b.hex(), s.hex()] for k, (b, s) in self._sigs.items()},
            "book": {k: {str(i): (v.hex() if isinstance(v, bytes) else v) for i, v in d.items()}
                     for k, d in self._book.items()},
            "authenticated": self.auth is not None, "context": self.context.hex(), "digest": self._digest.hex(),
            "u2": self._u2, "revealed": self._revealed,
            **({"signed-list": [self._signed_list[0], self._signed_list[1]]} if self._signed_list else {}),
            **({"participants": {str(k): v for k, v in self._participants.items()}} if self._participants else {})})

    @classmethod
    def from_state(cls, text: str, auth: SiteAuth | None = None) -> "SecAggSite":
        d = json.loads(text)
        if bool(d.get("authenticated")) != (auth is not None):
            raise SecAggError("this secure sum was started " + ("with" if d.get("authenticated") else "without")
                              + " authentication; it must go on the same way")
        site = cls.__new__(cls)
        site.setup, site.site_id = SecAggSetup.from_record(d["setup"]), int(d["site_id"])
        site.auth, site.context = auth, bytes.fromhex(d.get("context", ""))
        site._enc_sk, site._mask_sk, site._b = (bytes.fromhex(d[k]) for k in ("enc_sk", "mask_sk", "b"))
        site._keys = {int(k): (bytes.fromhex(e), bytes.fromhex(m)) for k, (e, m) in d["keys"].items()}
        site._shares = {int(k): (bytes.fromhex(b), bytes.fromhex(s)) for k, (b, s) in d["shares"].items()}
        site._sigs = {int(k): (bytes.fromhex(b), bytes.fromhex(s)) for k, (b, s) in d.get("sigs", {}).items()}
        site._book = {k: {int(i): (v if k == "names" else bytes.fromhex(v)) for i, v in x.items()}
                      for k, x in d.get("book", {}).items()}
        site._digest = bytes.fromhex(d.get("digest", ""))
        site._u2, site._revealed = [int(i) for i in d["u2"]], d["revealed"]
        site._participants = {int(k): str(v) for k, v in d.get("participants", {}).items()}
        signed = d.get("signed-list")
        site._signed_list = ([int(i) for i in signed[0]], [int(i) for i in signed[1]]) if signed else None
        return site

    @staticmethod
    def names_in_state(text: str) -> tuple[int, dict[int, str]]:
        """(this site's secagg id, secagg id -> the enrolled name this site holds for it) from a :meth:`to_state`
        text, without the identity key: the names of the key book it checked against its roster (stage 2), and
        for a neighbourhood sum those of the participant list it signed (stage 3); none when unauthenticated."""
        d = json.loads(text)
        names = {int(i): str(n) for i, n in d.get("book", {}).get("names", {}).items() if n}
        for i, n in d.get("participants", {}).items():
            if n:
                names.setdefault(int(i), str(n))
        return int(d["site_id"]), names

    def _graph(self) -> dict[int, frozenset[int]]:
        """The neighbourhood graph of this sum, computed by this site from the setup (sparse sums only)."""
        g = getattr(self, "_graph_cache", None)
        if g is None:
            g = self._graph_cache = neighbourhood_graph(self.setup.round_id, self.setup.site_ids,
                                                        self.setup.graph_degree)
        return g

    def _book_view(self) -> KeyBook:
        return KeyBook(dict(self._keys), self.setup.round_id, dict(self._book.get("names", {})),
                       dict(self._book.get("commits", {})), dict(self._book.get("signatures", {})))

    def _name(self, site: int) -> str:
        name = self._book.get("names", {}).get(site) or self._participants.get(site)
        return f"secagg site {site} ({name!r})" if name else f"secagg site {site}"

    # -- stages -----------------------------------------------------------------------------------------
    def advertise(self) -> KeyAdvert:
        """Stage 1 (authenticated: signed with the identity key, with the seed commitment)."""
        enc_pk = _raw_public(X25519PrivateKey.from_private_bytes(self._enc_sk))
        mask_pk = _raw_public(X25519PrivateKey.from_private_bytes(self._mask_sk))
        if self.auth is None:
            return KeyAdvert(self.site_id, enc_pk, mask_pk)
        rid, name = self.setup.round_id, self.auth.identity.name
        commit = seed_commitment(rid, self.site_id, self._b)
        sig = self.auth.identity.sign(advert_payload(rid, self.site_id, name, enc_pk, mask_pk, commit))
        return KeyAdvert(self.site_id, enc_pk, mask_pk, name, commit, sig)

    def _channel(self, peer: int) -> ChaCha20Poly1305:
        peer_pk = self._keys[peer][0]
        shared = X25519PrivateKey.from_private_bytes(self._enc_sk).exchange(X25519PublicKey.from_public_bytes(peer_pk))
        return ChaCha20Poly1305(_kdf(shared, "enc", self.setup.round_id, self.site_id, peer))

    def _aad(self, sender: int, recipient: int) -> bytes:
        return f"magnet-fl/secagg/share/{self.setup.round_id}/{sender}->{recipient}".encode()

    def share(self, book: KeyBook) -> ShareBundle:
        """Stage 2: Shamir-share b and the mask private key among U1, encrypt each pair for its recipient."""
        keys = dict(book.keys)
        mine = self.advertise()
        if keys.get(self.site_id) != (mine.enc_pk, mine.mask_pk):
            raise SecAggError(f"site {self.site_id}: the key book does not hold this site's own keys")
        unknown = set(keys) - set(self.setup.site_ids)
        if unknown:
            raise SecAggError(f"site {self.site_id}: key book names sites outside the setup: {sorted(unknown)}")
        if self.setup.graph_degree:  # only this site's own neighbourhood, as this site computes it
            hood = self._graph()[self.site_id] | {self.site_id}
            foreign = sorted(set(keys) - hood)
            if foreign:
                raise SecAggError(f"site {self.site_id}: the key book holds sites {foreign} that are not its "
                                  f"neighbours {sorted(hood - {self.site_id})} in the degree-{self.setup.graph_degree}"
                                  f" graph of round {self.setup.round_id!r}; refusing")
        if len(keys) < self.setup.threshold:
            raise SecAggError(f"site {self.site_id}: only {len(keys)} sites advertised keys, threshold is "
                              f"{self.setup.threshold}")
        if len({e for e, _ in keys.values()} | {m for _, m in keys.values()}) != 2 * len(keys):
            raise SecAggError(f"site {self.site_id}: the key book repeats a public key")
        if self.auth is not None:  # before any secret is derived from the book
            got = book.advert(self.site_id)
            if (got.site_name, got.b_commit) != (mine.site_name, mine.b_commit):
                raise SecAggError(f"site {self.site_id}: the key book does not hold this site's own signed advert")
            problems = check_book(book, self.auth.roster, self.setup)
            if problems:
                raise SecAggError(f"site {self.site_id} ({self.auth.identity.name!r}) refuses the key book: "
                                  + "; ".join(problems))
            self._book = {"names": dict(book.names), "commits": dict(book.commits),
                          "signatures": dict(book.signatures)}
        self._keys = keys
        ids = sorted(keys)
        b_sh = shamir_split(self._b, self.setup.threshold, ids)
        s_sh = shamir_split(self._mask_sk, self.setup.threshold, ids)
        out = {}
        for v in ids:
            sigs = (b"", b"")
            if self.auth is not None:
                rid = self.setup.round_id
                sigs = (self.auth.identity.sign(share_payload(rid, self.site_id, v, "self", b_sh[v])),
                        self.auth.identity.sign(share_payload(rid, self.site_id, v, "mask", s_sh[v])))
            if v == self.site_id:
                self._shares[v], self._sigs[v] = (b_sh[v], s_sh[v]), sigs
                continue
            plain = b_sh[v] + s_sh[v] + (len(sigs[0]).to_bytes(2, "big") + sigs[0] + sigs[1] if sigs[0] else b"")
            nonce = os.urandom(12)
            out[v] = nonce + self._channel(v).encrypt(nonce, plain, self._aad(self.site_id, v))
        return ShareBundle(self.site_id, out)

    def mask(self, inbox: ShareInbox, vector: np.ndarray) -> MaskedInput:
        """Stage 3: decrypt and keep the shares received (senders = U2), send the masked fixed-point vector."""
        if self._revealed:
            raise SecAggError(f"site {self.site_id}: this secure sum already has this site's masked input")
        if inbox.recipient != self.site_id:
            raise SecAggError(f"site {self.site_id}: share inbox addressed to site {inbox.recipient}")
        if not self._keys:
            raise SecAggError(f"site {self.site_id}: stage 2 (share) has not run")
        for u, ct in inbox.ciphertexts.items():
            if u not in self._keys or u == self.site_id:
                raise SecAggError(f"site {self.site_id}: shares from unknown site {u}")
            try:
                plain = self._channel(u).decrypt(ct[:12], ct[12:], self._aad(u, self.site_id))
            except InvalidTag:
                raise SecAggError(f"site {self.site_id}: the shares from site {u} fail authentication") from None
            shares = (plain[:SHARE_BYTES], plain[SHARE_BYTES:2 * SHARE_BYTES])
            if self.auth is not None:
                rest = plain[2 * SHARE_BYTES:]
                cut = 2 + int.from_bytes(rest[:2], "big") if len(rest) >= 2 else 0
                sigs = (rest[2:cut], rest[cut:])
                name, rid = self._book["names"][u], self.setup.round_id
                roster = self.auth.roster
                if not (roster.verifies(name, share_payload(rid, u, self.site_id, "self", shares[0]), sigs[0])
                        and roster.verifies(name, share_payload(rid, u, self.site_id, "mask", shares[1]), sigs[1])):
                    raise SecAggError(f"site {self.site_id}: the shares from {self._name(u)} are not signed by "
                                      "its identity key")
                self._sigs[u] = sigs
            elif len(plain) != 2 * SHARE_BYTES:
                raise SecAggError(f"site {self.site_id}: the shares from site {u} have the wrong length")
            self._shares[u] = shares
        u2 = sorted(set(inbox.ciphertexts) | {self.site_id})
        if len(u2) < self.setup.threshold:
            raise SecAggError(f"site {self.site_id}: only {len(u2)} sites shared their secrets, threshold is "
                              f"{self.setup.threshold}")
        parts: dict[int, str] = {}
        if self.setup.graph_degree:
            parts = {int(k): str(v) for k, v in inbox.participants.items()}
            if self.site_id not in parts or set(u2) - set(parts) or set(parts) - set(self.setup.site_ids):
                raise SecAggError(f"site {self.site_id}: the participant list {sorted(parts)} does not hold this "
                                  f"site and every neighbour that dealt it shares {u2}, or names sites outside the "
                                  "setup")
            if self.auth is not None:
                named = [n for n in parts.values() if n]
                wrong = [u for u in u2 if parts[u] != self._book["names"][u]]
                if len(named) != len(parts) or len(set(named)) != len(named) or wrong:
                    raise SecAggError(f"site {self.site_id}: the participant list gives a missing, repeated or wrong "
                                      f"name (neighbours {wrong} differ from their signed adverts)")
        x = np.asarray(vector, dtype=np.float64).ravel()
        if x.shape[0] != self.setup.vector_length:
            raise SecAggError(f"site {self.site_id}: vector of length {x.shape[0]}, the setup says "
                              f"{self.setup.vector_length}")
        y = encode_fixed(x, self.setup.frac_bits, len(self.setup.site_ids))
        n = self.setup.vector_length
        y += prg(_self_seed(self._b, self.setup.round_id, self.site_id), n)
        for v in u2:
            if v == self.site_id:
                continue
            p = prg(_pairwise_seed(self._mask_sk, self._keys[v][1], self.setup.round_id, self.site_id, v), n)
            if v > self.site_id:
                y += p
            else:
                y -= p
        self._u2, self._revealed, self._participants = u2, "masked", parts
        if self.auth is None:
            return MaskedInput(self.site_id, y)
        self._digest = (neighbourhood_transcript_digest(self.setup, self.context, parts) if parts
                        else transcript_digest(self.setup, self.context, self._book_view(), u2))
        sig = self.auth.identity.sign(transcript_payload(self.setup.round_id, self.site_id, self._digest))
        return MaskedInput(self.site_id, y, sig)

    def _check_survivors(self, surv: set[int], drop: set[int], what: str) -> None:
        """The checks of a survivor list this site can make alone (before signing it, stage 3a, or unmasking)."""
        if self._revealed != "masked":
            raise SecAggError(f"site {self.site_id}: asked to {what} before sending its masked input, or again")
        if surv & drop:
            raise SecAggError(f"site {self.site_id}: sites {sorted(surv & drop)} are named both survivors and "
                              "dropped; refusing (it would reveal their input)")
        dealers = sorted(self._participants) if self.setup.graph_degree else self._u2
        if surv | drop != set(dealers) or self.site_id not in surv:
            raise SecAggError(f"site {self.site_id}: survivors + dropped {sorted(surv | drop)} do not match the "
                              f"sites that shared secrets {dealers}")
        if self.setup.graph_degree:
            live = sorted(surv & set(self._u2))
            if len(live) < self.setup.threshold:
                raise SecAggError(f"site {self.site_id}: only {len(live)} of the {len(self._u2)} sites of its "
                                  f"neighbourhood {self._u2} sent masked input, threshold is {self.setup.threshold} "
                                  "per neighbourhood; refusing to help unmask")
            if not connected(self._graph(), surv):
                raise SecAggError(f"site {self.site_id}: the survivors {sorted(surv)} are not connected in the "
                                  "neighbourhood graph (unmasking would reveal the sum of a part of them); refusing "
                                  "to help unmask")
        if len(surv) < self.setup.threshold:
            raise SecAggError(f"site {self.site_id}: only {len(surv)} sites sent masked input, threshold is "
                              f"{self.setup.threshold}; refusing to help unmask")

    def _signer_name(self, u: int) -> str:
        return (self._participants.get(u, "") if self.setup.graph_degree else self._book["names"].get(u, ""))

    def _signer_commit(self, u: int) -> bytes:
        return self._book.get("commits", {}).get(u, b"")

    def sign_survivors(self, request: SurvivorList) -> SurvivorSignature:
        """Stage 3a (authenticated only; Bonawitz et al. 2017 consistency check): sign the survivor list U3 with
        this site's identity key. Once per sum: the same list again gets the same answer, a different one is
        refused (so the coordinator cannot collect signatures on two lists from an honest site)."""
        if self.auth is None:
            raise SecAggError(f"site {self.site_id}: the consistency check (signing the survivor list) needs "
                              "authenticated secure aggregation; this sum has no identities")
        if request.round_id and request.round_id != self.setup.round_id:
            raise SecAggError(f"site {self.site_id}: a survivor list of secure sum {request.round_id!r}, this site "
                              f"is in {self.setup.round_id!r}")
        surv, drop = sorted(set(request.survivors)), sorted(set(request.dropped))
        if self._signed_list is not None and self._signed_list != (surv, drop):
            raise SecAggError(f"site {self.site_id}: consistency check: this site already signed the survivor list "
                              f"{self._signed_list[0]} (dropped {self._signed_list[1]}) of secure sum "
                              f"{self.setup.round_id!r}; refusing to sign a second, different list {surv} (dropped "
                              f"{drop}): two lists could open a site's input")
        self._check_survivors(set(surv), set(drop), "sign the survivor list")
        self._signed_list = (surv, drop)
        payload = survivors_payload(self.setup.round_id, self.site_id, self._signer_commit(self.site_id), surv, drop)
        return SurvivorSignature(self.site_id, self.auth.identity.sign(payload))

    def _check_consistency(self, surv: set[int], drop: set[int], signatures: Mapping[int, bytes]) -> None:
        """Before unmasking (authenticated): the list is the one this site signed at stage 3a, and at least t
        distinct roster sites of U3 (neighbourhoods: of this site's closed neighbourhood) signed exactly it."""
        mine = (sorted(surv), sorted(drop))
        if self._signed_list is None:
            raise SecAggError(f"site {self.site_id}: consistency check: this site has not signed a survivor list of "
                              f"secure sum {self.setup.round_id!r}; refusing to help unmask")
        if self._signed_list != mine:
            raise SecAggError(f"site {self.site_id}: consistency check: the unmask request names survivors "
                              f"{mine[0]} (dropped {mine[1]}), this site signed {self._signed_list[0]} (dropped "
                              f"{self._signed_list[1]}); refusing to help unmask")
        pool = set(surv)
        if self.setup.graph_degree:
            pool &= set(self._u2)  # this site and its neighbours that dealt it shares
        rid, valid, bad = self.setup.round_id, {self.site_id}, []
        for u in sorted(set(signatures) - {self.site_id}):
            payload = survivors_payload(rid, u, self._signer_commit(u), mine[0], mine[1])
            if u in pool and self.auth.roster.verifies(self._signer_name(u), payload, signatures[u]):
                valid.add(u)
            else:
                bad.append(u)
        t = self.setup.threshold
        if len(valid) < t:
            where = "of its neighbourhood " if self.setup.graph_degree else ""
            raise SecAggError(f"site {self.site_id}: consistency check: only {len(valid)} valid signatures of the "
                              f"survivor list {mine[0]} from distinct roster sites {where}in it ({sorted(valid)}; "
                              f"not valid or not counted: {bad}), threshold {t}; refusing to help unmask")

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 4: self-mask shares of survivors, mask-key shares of sites that dropped before masking.
        Authenticated: only for the survivor list this site signed at stage 3a and >= t survivors signed."""
        surv, drop = set(request.survivors), set(request.dropped)
        self._check_survivors(surv, drop, "unmask")
        if self.auth is not None:
            self._check_consistency(surv, drop, request.survivor_signatures)
        if self.auth is not None:  # every input in the sum comes from a site that saw what this site saw
            rid, bad = self.setup.round_id, []
            for u in sorted(surv - {self.site_id}):
                payload = transcript_payload(rid, u, self._digest)
                name = self._participants[u] if self.setup.graph_degree else self._book["names"][u]
                if not self.auth.roster.verifies(name, payload,
                                                 request.transcript_signatures.get(u, b"")):
                    bad.append(self._name(u))
            if bad:
                raise SecAggError(f"site {self.site_id}: {', '.join(bad)} did not sign the transcript this site "
                                  "saw (a different global model, round config, key book or participant list was "
                                  "sent to different sites); refusing to help unmask")
        self._revealed = "unmasked"
        held = set(self._u2)  # complete graph: every dealer; neighbourhoods: this site's neighbours that dealt
        surv, drop = surv & held, drop & held
        return UnmaskShares(self.site_id, {u: self._shares[u][0] for u in sorted(surv)},
                            {v: self._shares[v][1] for v in sorted(drop)},
                            {u: self._sigs[u][0] for u in sorted(surv) if u in self._sigs},
                            {v: self._sigs[v][1] for v in sorted(drop) if v in self._sigs})

    def exclude(self, request: ExclusionRequest) -> PairwiseSeeds:
        """Stage 4b (only when shares were refuted): check the evidence against each named sender and give this
        site's pairwise mask seed with it, so the coordinator can remove the sender from the sum. Authenticated
        sums only; once per sum; never for a sender without valid evidence (the seed would unmask it)."""
        if self.auth is None:
            raise SecAggError(f"site {self.site_id}: excluding a sender needs authenticated secure aggregation")
        if self._revealed != "unmasked":
            raise SecAggError(f"site {self.site_id}: an exclusion request before unmasking, or a second one")
        if not request.proofs:
            raise SecAggError(f"site {self.site_id}: an exclusion request without evidence")
        sparse = bool(self.setup.graph_degree)
        mine = set(self._u2) - {self.site_id}
        for proof in request.proofs:
            if sparse and proof.sender not in mine:
                continue  # not a neighbour: no pairwise mask with it, nothing to give
            holders = (self._graph()[proof.sender] | {proof.sender}) if sparse else None
            problem = refutes(proof, self.setup, self._book_view(), self.auth.roster, holders)
            if problem:
                raise SecAggError(f"site {self.site_id}: the evidence against {self._name(proof.sender)} does not "
                                  f"hold ({problem}); refusing")
        self._revealed = "excluded"
        rid = self.setup.round_id
        senders = [u for u in request.senders if u in mine] if sparse else request.senders
        return PairwiseSeeds(self.site_id, {u: _pairwise_seed(self._mask_sk, self._keys[u][1], rid, self.site_id, u)
                                            for u in senders})


def _committed(kind: str, secret: bytes, round_id: str, sender: int, book: KeyBook) -> bool:
    if kind == "self":
        return seed_commitment(round_id, sender, secret) == book.commits.get(sender)
    try:
        return _raw_public(X25519PrivateKey.from_private_bytes(secret)) == book.keys[sender][1]
    except ValueError:
        return False


def _combine_or_none(shares: Mapping[int, bytes]) -> bytes | None:
    try:
        return shamir_combine(shares)
    except SecAggError:
        return None


def refutes(proof: ShareProof, setup: SecAggSetup, book: KeyBook, roster: Roster,
            holders: Iterable[int] | None = None) -> str:
    """'' if ``proof`` shows that its sender dealt shares contradicting its own commitment, else what is wrong.
    ``holders``: the sender's share holders (neighbourhood graph: its closed neighbourhood; default the key book)."""
    u, rid = proof.sender, setup.round_id
    if u not in book.keys or u not in book.names:
        return f"sender {u} is not in the key book"
    if proof.kind not in ("self", "mask"):
        return f"unknown secret {proof.kind!r}"
    xs = sorted(proof.shares)
    if len(xs) != setup.threshold or set(xs) - set(book.keys if holders is None else holders):
        return f"{len(xs)} shares from {xs}, need {setup.threshold} from the sender's share holders"
    for x in xs:
        if not roster.verifies(book.names[u], share_payload(rid, u, x, proof.kind, proof.shares[x]),
                               proof.signatures.get(x, b"")):
            return f"the share revealed by secagg site {x} is not signed by the sender"
    secret = _combine_or_none(proof.shares)
    if secret is not None and _committed(proof.kind, secret, rid, u, book):
        return "the shares interpolate to the committed secret"
    return ""


# ----------------------------------------------------------------------------------------------- the server


class SecAggServer:
    """The coordinator's side of one secure sum. It only ever holds public keys, ciphertexts it cannot read, the
    running sum of masked vectors (never one site's vector on its own, never unmasked) and, at the end, the sum."""

    def __init__(self, setup: SecAggSetup, roster: Roster | None = None):
        """``roster``: authenticated secure aggregation (the coordinator's copy of the consortium roster): adverts
        must be signed by a roster site, every revealed share is checked against its dealer's signature and
        commitment, and a dealer of bad shares is named and can be excluded (:class:`SharesRefuted`). The masked
        vectors are then kept one by one until the sum is done (to take an excluded sender's out again)."""
        self.setup, self.roster = setup, roster
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.book: KeyBook | None = None
        self.u2: list[int] = []
        self.u3: list[int] = []
        self._acc = np.zeros(setup.vector_length, dtype=np.uint64)
        self._masked: dict[int, np.ndarray] = {}  # authenticated only: masked vectors (never unmasked alone)
        self._transcripts: dict[int, bytes] = {}
        self._list_signatures: dict[int, bytes] = {}  # stage 3a: survivor -> its signature over the survivor list
        self._secrets: dict[tuple[str, int], bytes] = {}  # ("self" | "mask", site) -> reconstructed secret
        self.excluded: dict[int, str] = {}  # secagg id -> why it was left out of the sum (bad shares)
        self.blamed: dict[int, str] = {}  # secagg id -> why its unmask reply was discarded
        self.exclusion: ExclusionRequest | None = None
        self.total: np.ndarray | None = None
        self.graph: dict[int, frozenset[int]] | None = (
            neighbourhood_graph(setup.round_id, setup.site_ids, setup.graph_degree) if setup.graph_degree else None)

    def _adjacent(self, u: int, v: int) -> bool:
        return self.graph is None or v in self.graph[u]

    def holds(self, site: int) -> set[int]:
        """The dealers whose shares ``site`` holds (itself included)."""
        return {u for u in self.u2 if u == site or self._adjacent(site, u)}

    def book_for(self, site: int) -> KeyBook:
        """The key book to send ``site``: complete graph, every advert; neighbourhoods, its neighbours' only."""
        if self.book is None:
            raise SecAggError("stage 1 (collect_keys) has not run")
        if self.graph is None:
            return self.book
        ids = [i for i in self.book.keys if i == site or self._adjacent(site, i)]
        b = self.book
        return KeyBook({i: b.keys[i] for i in ids}, b.round_id, {i: b.names[i] for i in ids if i in b.names},
                       {i: b.commits[i] for i in ids if i in b.commits},
                       {i: b.signatures[i] for i in ids if i in b.signatures})

    @property
    def included(self) -> list[int]:
        """The sites whose inputs are in :attr:`total`."""
        return [u for u in self.u3 if u not in self.excluded]

    def label(self, site: int) -> str:
        name = self.book.names.get(site) if self.book is not None else None
        return f"secagg site {site} ({name!r})" if name else f"secagg site {site}"

    def check_advert(self, advert: KeyAdvert) -> str:
        """'' or why this advert must not enter the key book (authenticated: unsigned, not a roster site, or not
        signed by the roster's key of the name it claims)."""
        if advert.site_id not in self.setup.site_ids:
            return f"keys from site {advert.site_id}, which is not in this secure sum"
        if len(advert.enc_pk) != 32 or len(advert.mask_pk) != 32:
            return f"site {advert.site_id}: public keys must be 32-byte X25519 keys"
        if self.roster is None:
            return ""
        book = KeyBook({advert.site_id: (advert.enc_pk, advert.mask_pk)}, self.setup.round_id,
                       {advert.site_id: advert.site_name}, {advert.site_id: advert.b_commit},
                       {advert.site_id: advert.signature})
        return "; ".join(check_book(book, self.roster, self.setup))

    def _need(self, have: Sequence[int], what: str) -> None:
        t = self.setup.threshold
        if len(have) < t:
            missing = sorted(set(self.setup.site_ids) - set(have))
            raise SecAggError(f"secure aggregation {self.setup.round_id!r}: only {len(have)} of "
                              f"{len(self.setup.site_ids)} sites {what} (threshold {t}, at most "
                              f"{self.setup.max_dropouts} may drop out); missing sites {missing}. The sum cannot be "
                              "recovered: run the round again")

    def collect_keys(self, adverts: Sequence[KeyAdvert]) -> KeyBook:
        """Stage 1: the key book to send to every advertising site."""
        keys: dict[int, tuple[bytes, bytes]] = {}
        signed: dict[int, KeyAdvert] = {}
        for a in adverts:
            problem = self.check_advert(a)
            if problem:
                raise SecAggError(problem)
            if a.site_id in keys:
                raise SecAggError(f"site {a.site_id} advertised keys twice")
            keys[a.site_id] = (a.enc_pk, a.mask_pk)
            signed[a.site_id] = a
        self._need(list(keys), "advertised keys")
        self.keys = keys
        if self.roster is None:
            self.book = KeyBook(dict(keys), self.setup.round_id)
        else:
            self.book = KeyBook(dict(keys), self.setup.round_id, {i: a.site_name for i, a in signed.items()},
                                {i: a.b_commit for i, a in signed.items()}, {i: a.signature for i, a in signed.items()})
            problems = check_book(self.book, self.roster, self.setup)  # e.g. one name under two ids
            if problems:
                raise SecAggError("; ".join(problems))
        return self.book

    def route_shares(self, bundles: Sequence[ShareBundle]) -> dict[int, ShareInbox]:
        """Stage 2: each site of U2 gets the ciphertexts the other U2 sites addressed to it."""
        got: dict[int, dict[int, bytes]] = {}
        for b in bundles:
            if b.site_id not in self.keys or b.site_id in got:
                raise SecAggError(f"shares from site {b.site_id}: unknown or sent twice")
            expected = set(self.book_for(b.site_id).keys) - {b.site_id}
            if set(b.ciphertexts) != expected:
                raise SecAggError(f"site {b.site_id} sent shares for {sorted(b.ciphertexts)}, expected "
                                  f"{sorted(expected)}")
            got[b.site_id] = dict(b.ciphertexts)
        self.u2 = sorted(got)
        self._need(self.u2, "shared their secrets")
        parts = {u: self.book.names.get(u, "") for u in self.u2} if self.graph is not None else {}
        return {v: ShareInbox(v, {u: got[u][v] for u in self.u2 if u != v and v in got[u]}, self.setup.round_id,
                              parts) for v in self.u2}

    def add_masked(self, item: MaskedInput) -> None:
        """Stage 3: add one masked vector into the running sum (the vector itself is not kept)."""
        if item.site_id not in self.u2 or item.site_id in self.u3:
            raise SecAggError(f"masked input from site {item.site_id}: not expected or sent twice")
        y = np.asarray(item.masked)
        if y.dtype != np.uint64 or y.shape != (self.setup.vector_length,):
            raise SecAggError(f"masked input from site {item.site_id}: expected uint64 of shape "
                              f"({self.setup.vector_length},), got {y.dtype} {y.shape}")
        if self.roster is not None:
            if not item.transcript_signature:
                raise SecAggError(f"masked input from site {item.site_id} carries no transcript signature")
            self._masked[item.site_id] = y.copy()
            self._transcripts[item.site_id] = item.transcript_signature
        self._acc += y
        self.u3.append(item.site_id)

    def survivor_list(self) -> SurvivorList:
        """Stage 3a request (authenticated only), sent to every site of U3: U3 and the sites dropped before masking,
        for each survivor to sign (the consistency check)."""
        if self.roster is None:
            raise SecAggError("the consistency check (signed survivor list) needs authenticated secure aggregation")
        self._need(self.u3, "sent their masked input")
        return SurvivorList(tuple(sorted(self.u3)), tuple(sorted(set(self.u2) - set(self.u3))), self.setup.round_id)

    def add_survivor_signature(self, item: SurvivorSignature) -> None:
        """Stage 3a: one survivor's signature over the survivor list, checked against the roster's key of its name
        (a bad one is refused; the site is then not asked to unmask)."""
        lst = self.survivor_list()
        u = item.site_id
        if u not in self.u3 or u in self._list_signatures:
            raise SecAggError(f"survivor-list signature from site {u}: not a survivor or sent twice")
        payload = survivors_payload(self.setup.round_id, u, self.book.commits.get(u, b""), lst.survivors, lst.dropped)
        if not self.roster.verifies(self.book.names.get(u, ""), payload, item.signature):
            raise SecAggError(f"{self.label(u)}: its survivor-list signature is not valid under its enrolled key")
        self._list_signatures[u] = item.signature

    @property
    def list_signers(self) -> list[int]:
        """The survivors whose signature over the survivor list was accepted (stage 3a): those asked to unmask."""
        return sorted(self._list_signatures)

    def unmask_request(self) -> UnmaskRequest:
        """Stage 4 request, sent to every site of U3 (authenticated: to the signers of the survivor list, with every
        survivor's transcript signature and the survivor-list signatures; needs >= t of those)."""
        self._need(self.u3, "sent their masked input")
        if self.roster is not None:
            self._need(self.list_signers, "signed the survivor list")
        return UnmaskRequest(tuple(sorted(self.u3)), tuple(sorted(set(self.u2) - set(self.u3))), self.setup.round_id,
                             {u: self._transcripts[u] for u in self.u3 if u in self._transcripts},
                             dict(self._list_signatures))

    def finish(self, responses: Sequence[UnmaskShares]) -> np.ndarray:
        """Stage 4: reconstruct the secrets from >= t responses, remove every mask, return the float64 sum of the
        inputs of U3 (:attr:`u3`). Authenticated: a reply whose share fails its dealer's signature is discarded
        (its sender is in :attr:`blamed`); shares that contradict their dealer's commitment raise
        :class:`SharesRefuted` naming the dealer, whose exclusion request is then :attr:`exclusion`."""
        req = self.unmask_request()
        got = {}
        for r in responses:
            if r.site_id not in req.survivors or r.site_id in got:
                raise SecAggError(f"unmask shares from site {r.site_id}: not a survivor or sent twice")
            held = self.holds(r.site_id)
            if set(r.self_shares) != set(req.survivors) & held or set(r.key_shares) != set(req.dropped) & held:
                raise SecAggError(f"unmask shares from site {r.site_id} do not answer the request")
            got[r.site_id] = r
        if self.roster is not None:
            got = self._attributable(got)
        self._need(list(got), "answered the unmask request")
        proofs = []
        for kind, whose in (("self", req.survivors), ("mask", req.dropped)):
            for u in whose:
                shares = {s: (r.self_shares if kind == "self" else r.key_shares)[u] for s, r in got.items()
                          if u in (r.self_shares if kind == "self" else r.key_shares)}
                sigs = {s: (r.self_signatures if kind == "self" else r.key_signatures).get(u, b"")
                        for s, r in got.items() if s in shares}
                if len(shares) < self.setup.threshold:  # neighbourhoods only (the complete graph checked above)
                    what = "self-mask seed" if kind == "self" else "mask key"
                    raise SecAggError(f"secure aggregation {self.setup.round_id!r}: only {len(shares)} of the share "
                                      f"holders of {self.label(u)} (its neighbourhood {sorted(self.holds(u))}) "
                                      f"answered, threshold {self.setup.threshold}: its {what} cannot be "
                                      "reconstructed and the sum cannot be recovered; run the round again")
                secret, proof = self._recover(kind, u, shares, sigs)
                if proof is not None:
                    proofs.append(proof)
                else:
                    self._secrets[(kind, u)] = secret
        if proofs:
            self.exclusion = ExclusionRequest(tuple(proofs), self.setup.round_id)
            for p in proofs:
                what = "self-mask seed" if p.kind == "self" else "mask key"
                self.excluded[p.sender] = f"its signed shares of its {what} contradict its own commitment"
            names = ", ".join(f"{self.label(u)}: {why}" for u, why in sorted(self.excluded.items()))
            raise SharesRefuted(f"secure aggregation {self.setup.round_id!r}: bad shares from {names}",
                                self.exclusion)
        self.total = self._assemble({})
        return self.total

    def _attributable(self, got: dict[int, UnmaskShares]) -> dict[int, UnmaskShares]:
        """Drop the replies holding a share its dealer did not sign for that replier (the replier altered it)."""
        rid, ok = self.setup.round_id, {}
        for s, r in got.items():
            bad = [u for kind, shares, sigs in (("self", r.self_shares, r.self_signatures),
                                                ("mask", r.key_shares, r.key_signatures))
                   for u, share in shares.items()
                   if not self.roster.verifies(self.book.names.get(u, ""), share_payload(rid, u, s, kind, share),
                                               sigs.get(u, b""))]
            if bad:
                self.blamed[s] = (f"its unmask reply holds shares of {[self.label(u) for u in bad]} that their dealer "
                                  "did not sign (altered)")
                continue
            ok[s] = r
        return ok

    def _recover(self, kind: str, u: int, shares: Mapping[int, bytes], sigs: Mapping[int, bytes]
                 ) -> tuple[bytes, ShareProof | None]:
        """(secret, None) or, authenticated and contradicting the commitment, (b"", evidence against ``u``)."""
        pick = sorted(shares)[:self.setup.threshold]
        used = {x: shares[x] for x in pick}
        if self.roster is None:
            secret = shamir_combine(used) if kind == "self" else self._mask_key(u, shamir_combine(used))
            return secret, None
        secret = _combine_or_none(used)
        if secret is not None and _committed(kind, secret, self.setup.round_id, u, self.book):
            return secret, None
        return b"", ShareProof(u, kind, used, {x: sigs[x] for x in pick})

    def _mask_key(self, v: int, sk: bytes) -> bytes:
        try:
            X25519PrivateKey.from_private_bytes(sk)
        except ValueError:
            raise SecAggError(f"the mask key of dropped site {v} could not be reconstructed") from None
        if _raw_public(X25519PrivateKey.from_private_bytes(sk)) != self.keys[v][1]:
            raise SecAggError(f"the reconstructed mask key of dropped site {v} does not match its public key")
        return sk

    def exclusion_request(self) -> ExclusionRequest:
        """Stage 4b request (after :class:`SharesRefuted`), sent to every honest survivor."""
        if self.exclusion is None:
            raise SecAggError("no sender to exclude")
        return self.exclusion

    def finish_excluding(self, replies: Sequence[PairwiseSeeds]) -> np.ndarray:
        """Stage 4b: the sum of the honest survivors' inputs, without the excluded senders. Every honest survivor
        must answer (its pairwise masks with the excluded senders are in the sum); else the round fails."""
        req = self.exclusion_request()
        honest = self.included
        got = {}
        owed = {w: {c for c in req.senders if self._adjacent(w, c)} for w in honest}
        honest = [w for w in honest if owed[w]]
        for r in replies:
            if r.site_id in owed and not owed[r.site_id] and not r.seeds:
                continue  # neighbourhoods: a survivor with no excluded neighbour has nothing to give
            if r.site_id not in honest or r.site_id in got or set(r.seeds) != owed[r.site_id] \
                    or any(len(v) != 32 for v in r.seeds.values()):
                raise SecAggError(f"pairwise seeds from site {r.site_id}: not an honest survivor, sent twice or "
                                  "not answering the exclusion request")
            got[r.site_id] = r
        missing = sorted(set(honest) - set(got))
        if missing:
            raise SecAggError(f"secure aggregation {self.setup.round_id!r}: {[self.label(m) for m in missing]} did "
                              f"not give their pairwise seeds with the excluded {[self.label(u) for u in req.senders]};"
                              " the sum of the others cannot be recovered")
        self.total = self._assemble({(w, c): r.seeds[c] for w, r in got.items() for c in req.senders})
        return self.total

    def _assemble(self, pair_seeds: Mapping[tuple[int, int], bytes]) -> np.ndarray:
        """Remove every mask from the running sum: self masks of the included survivors, pairwise masks of the
        non-excluded dropped sites (from their reconstructed keys) and of the excluded senders (from the seeds
        the included survivors gave); an excluded survivor's masked vector is taken out whole."""
        n, rid = self.setup.vector_length, self.setup.round_id
        honest = self.included
        dropped = [v for v in self.u2 if v not in self.u3 and v not in self.excluded]
        acc = self._acc.copy()
        for c in self.excluded:
            if c in self._masked:
                acc -= self._masked[c]
        for u in honest:
            acc -= prg(_self_seed(self._secrets[("self", u)], rid, u), n)
        for v in dropped:
            sk = self._secrets[("mask", v)]
            for u in honest:
                if not self._adjacent(u, v):
                    continue
                p = prg(_pairwise_seed(sk, self.keys[u][1], rid, v, u), n)
                if v > u:  # u added +p for v > u
                    acc -= p
                else:
                    acc += p
        for (w, c), seed in pair_seeds.items():
            p = prg(seed, n)
            if c > w:  # w added +p for c > w
                acc -= p
            else:
                acc += p
        self._masked.clear()
        return decode_fixed(acc, self.setup.frac_bits)


def consistency_round(server: SecAggServer, sites: Mapping[int, "SecAggSite"], absent: Iterable[int] = ()
                      ) -> SurvivorList:
    """Stage 3a in one process (authenticated sums): every survivor not in ``absent`` signs the server's survivor
    list, the server keeps the signatures. Returns the list."""
    lst = server.survivor_list()
    skip = set(absent)
    for i in lst.survivors:
        if i not in skip:
            server.add_survivor_signature(sites[i].sign_survivors(lst))
    return lst


def run_local(setup: SecAggSetup, vectors: Mapping[int, np.ndarray], drop_before_mask: Iterable[int] = (),
              drop_after_mask: Iterable[int] = (), auth: Mapping[int, SiteAuth] | None = None,
              roster: Roster | None = None, context: bytes = b"",
              site_class: Callable[..., "SecAggSite"] | None = None) -> tuple[np.ndarray, SecAggServer]:
    """All stages in one process (tests, benchmarks, in-process simulation): returns the sum and the server.
    ``drop_before_mask`` sites share their secrets but never send a vector; ``drop_after_mask`` sites send their
    vector but do not answer the unmask request. ``auth`` (site id -> its identity and roster) and ``roster``
    (the coordinator's): authenticated, with the exclusion stage when a site dealt bad shares (the sum is then
    over :attr:`SecAggServer.included`). ``site_class`` builds the sites (a subclass plays a deviating site)."""
    before, after = set(drop_before_mask), set(drop_after_mask)
    make = site_class or SecAggSite
    sites = {i: make(setup, i, auth[i], context) if auth else make(setup, i) for i in setup.site_ids}
    server = SecAggServer(setup, roster)
    server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(server.book_for(i)) for i, s in sites.items()])
    for i, s in sites.items():
        if i not in before:
            server.add_masked(s.mask(inboxes[i], vectors[i]))
    if roster is not None:
        consistency_round(server, sites, absent=after)
    req = server.unmask_request()
    try:
        total = server.finish([sites[i].unmask(req) for i in req.survivors if i not in after])
    except SharesRefuted as exc:
        total = server.finish_excluding([sites[i].exclude(exc.request) for i in server.included if i not in after])
    return total, server


# ----------------------------------------------------------------------------------------------- layouts


Params = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class UpdateLayout:
    """What one secure sum of model updates carries, in order: every parameter array (flattened) multiplied by the
    weight of its block, then one weight slot per encoder modality and one for the shared layers. Summed over sites
    this is sum_i n_i,m * w_i,m and sum_i n_i,m, i.e. everything modality-aware FedAvg needs, and nothing else."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    modalities: tuple[str, ...]  # encoder modalities, sorted

    @classmethod
    def from_params(cls, params: Mapping[str, np.ndarray]) -> "UpdateLayout":
        names = tuple(params)
        mods = sorted({m for m in (MAGNET.encoder_modality(n) for n in names) if m is not None})
        return cls(names, tuple(tuple(np.shape(params[n])) for n in names), tuple(mods))

    @property
    def param_size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def length(self) -> int:
        return self.param_size + len(self.modalities) + 1

    def block(self, name: str) -> str | None:
        return MAGNET.encoder_modality(name)

    def _slot(self, block: str | None) -> int:
        return self.param_size + (self.modalities.index(block) if block is not None else len(self.modalities))

    def encode_blocks(self, arrays: Mapping[str, np.ndarray], weights: Mapping[str | None, float]) -> np.ndarray:
        """sum-ready vector: ``weights[block] * arrays[name]`` for every array, then the weights themselves
        (block ``None`` = the shared layers; a missing block weight is 0)."""
        out = np.zeros(self.length, dtype=np.float64)
        pos = 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            a = np.asarray(arrays[name], dtype=np.float64)
            if a.shape != shape:
                raise ValueError(f"array {name!r} has shape {a.shape}, the layout expects {shape}")
            w = float(weights.get(self.block(name), 0.0))
            if w:
                out[pos:pos + size] = w * a.ravel()
            pos += size
        for blk in (*self.modalities, None):
            out[self._slot(blk)] = float(weights.get(blk, 0.0))
        return out

    def encode_update(self, params: Mapping[str, np.ndarray], num_train: int, modality_counts: Mapping[str, int],
                      modality_aware: bool = True) -> np.ndarray:
        """A site's contribution to (modality-aware) FedAvg: encoder m weighted by its training patients holding m
        (all training patients when ``modality_aware`` is False), shared layers by its training patients."""
        weights: dict[str | None, float] = {None: float(num_train)}
        for m in self.modalities:
            weights[m] = float(modality_counts.get(m, 0)) if modality_aware else float(num_train)
        return self.encode_blocks(params, weights)

    def split(self, total: np.ndarray) -> tuple[Params, dict[str | None, float]]:
        """A summed vector -> (summed weighted arrays, summed weight per block)."""
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.length,):
            raise ValueError(f"sum of length {total.shape}, the layout expects {self.length}")
        arrays, pos = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            arrays[name] = total[pos:pos + size].reshape(shape)
            pos += size
        return arrays, {blk: float(total[self._slot(blk)]) for blk in (*self.modalities, None)}

    def decode_mean(self, total: np.ndarray, global_params: Mapping[str, np.ndarray]) -> Params:
        """Weighted mean per block from the sum (equals ``aggregate_updates(..., robust="mean")``); a block no
        contributing site holds keeps its global value."""
        arrays, wsum = self.split(total)
        out: Params = {}
        for name in self.names:
            g = np.asarray(global_params[name])
            w = wsum[self.block(name)]
            # weights are integer counts carried exactly; < 0.5 means no site contributed
            out[name] = (arrays[name] / w).astype(g.dtype) if w > 0.5 else g.copy()
        return out


@dataclasses.dataclass(frozen=True)
class StatsLayout:
    """Preprocessing sufficient statistics on a feature list every site agrees on (the union of the features the
    sites announced, in first-seen order, as ``combine_stats`` orders them): per modality n_per_class (C), then
    count, total, total_sq (C x F each). A site lacking a feature or a modality contributes zeros for it."""

    features: dict[str, tuple[str, ...]]
    num_classes: int

    @classmethod
    def from_feature_lists(cls, per_site: Sequence[Mapping[str, Sequence[str]]], num_classes: int
                           ) -> "StatsLayout":
        mods = list(dict.fromkeys(m for site in per_site for m in site))
        return cls({m: tuple(dict.fromkeys(str(f) for s in per_site if m in s for f in s[m])) for m in mods},
                   int(num_classes))

    def to_record(self) -> dict:
        """ConfigRecord-style form, to send the agreed layout to the sites."""
        return {"num-classes": self.num_classes, "modalities": list(self.features),
                **{f"features/{m}": list(f) for m, f in self.features.items()}}

    @classmethod
    def from_record(cls, r: Mapping) -> "StatsLayout":
        return cls({str(m): tuple(str(f) for f in r[f"features/{m}"]) for m in r["modalities"]},
                   int(r["num-classes"]))

    def _size(self, m: str) -> int:
        c, d = self.num_classes, len(self.features[m])
        return c + 3 * c * d

    @property
    def length(self) -> int:
        return sum(self._size(m) for m in self.features)

    def encode(self, stats: Mapping[str, FeatureStats]) -> np.ndarray:
        out = np.zeros(self.length, dtype=np.float64)
        pos, c = 0, self.num_classes
        for m, feats in self.features.items():
            size, d = self._size(m), len(feats)
            if m in stats:
                s = stats[m]
                where = {f: j for j, f in enumerate(feats)}
                unknown = [f for f in s.features if f not in where]
                if unknown:
                    raise ValueError(f"{m}: features {unknown[:3]} are not in the agreed feature list")
                if s.n_per_class.shape[0] > c:
                    raise ValueError(f"{m}: statistics for {s.n_per_class.shape[0]} classes, layout has {c}")
                idx = np.array([where[f] for f in s.features], dtype=np.int64)
                k = s.n_per_class.shape[0]
                block = out[pos:pos + size]
                block[:k] = s.n_per_class
                for f_i, arr in enumerate((s.count, s.total, s.total_sq)):
                    mat = np.zeros((c, d))
                    mat[:k, idx] = arr
                    block[c + f_i * c * d: c + (f_i + 1) * c * d] = mat.ravel()
            pos += size
        return out

    def decode(self, total: np.ndarray) -> dict[str, FeatureStats]:
        """Summed statistics; minimum / maximum are not part of a secure sum and come back as
        placeholders (+inf / -inf, "never observed"; see ``magnet_core.federation.privacy.protected_ranges``)."""
        total = np.asarray(total, dtype=np.float64)
        out, pos, c = {}, 0, self.num_classes
        for m, feats in self.features.items():
            d = len(feats)
            block = total[pos:pos + self._size(m)]
            part = [block[c + i * c * d: c + (i + 1) * c * d].reshape(c, d).copy() for i in range(3)]
            # counts are integers carried exactly (rounding removes the fixed-point error)
            out[m] = FeatureStats(list(feats), np.round(block[:c]), np.round(part[0]), part[1], part[2],
                                  np.full(d, np.inf), np.full(d, -np.inf))
            pos += self._size(m)
        return out
