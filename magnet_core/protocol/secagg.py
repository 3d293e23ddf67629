"""The secure-aggregation messages (SecAgg, Bonawitz et al. 2017), as they cross a site boundary.

Each is a frozen dataclass with ``to_record`` / ``from_record`` so it travels in a Flower ConfigRecord (the SECAGG_KEY
record); a masked vector travels as a uint64 array (the MASKED_KEY record). Every record carries the protocol
version; ``from_record`` refuses another (ProtocolVersionError) before it reads anything else. The stages, the
crypto and both sides' state machines are in magnet_core.federation.secagg.

  stage 0  server -> each site   SecAggStart (SecAggSetup + the site's id; training: + SecureTrainTerms)
           site -> server        KeyAdvert
  stage 1  server -> sites       KeyBook            site -> server  ShareBundle
  stage 2  server -> one site    ShareInbox         site -> server  MaskedInput
  stage 3a server -> survivors   SurvivorList       site -> server  SurvivorSignature   (authenticated only:
                                 the consistency check, Bonawitz et al. 2017 round 3; each survivor signs U3 once)
  stage 3  server -> survivors   UnmaskRequest      site -> server  UnmaskShares         (authenticated: with >= t
                                 survivors' signatures over exactly that U3, checked by every site before it reveals)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.version import check_version, stamped

DEFAULT_FRAC_BITS = 32
MAX_SITE_ID = 2**63 - 1

ROUND_ID = "round-id"  # the secure sum a stage message belongs to
SITE_ID = "site-id"  # a site's id in the secure sum (1..n, not its node id)
CLIP_NORM = "clip-norm"
MODALITY_AWARE = "modality-aware"
DP = "dp"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_NOISE_SEED = "dp-noise-seed"


class SecAggError(RuntimeError):
    """A secure sum that cannot (or must not) go on: too many dropouts, a malformed or inconsistent message."""


def _ids(values: Iterable[int]) -> list[int]:
    return sorted(int(v) for v in values)


@dataclasses.dataclass(frozen=True)
class SecAggSetup:
    """Stage 0 (server -> every site): the parameters every party must agree on."""

    round_id: str
    site_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    frac_bits: int = DEFAULT_FRAC_BITS
    graph_degree: int = 0  # 0: complete graph (SecAgg); k > 0: neighbourhoods of k sites (SecAgg+), t per neighbourhood

    def __post_init__(self) -> None:
        ids = tuple(sorted(int(i) for i in self.site_ids))
        object.__setattr__(self, "site_ids", ids)
        n = len(ids)
        if len(set(ids)) != n or any(not 1 <= i <= MAX_SITE_ID for i in ids):
            raise SecAggError(f"site ids must be distinct integers in 1..2^63-1, got {list(ids)}")
        if n < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites, got {n}")
        k = self.graph_degree
        if k:
            if k < 2 or k % 2 or k > n - 1:
                raise SecAggError(f"graph degree {k} for {n} sites: it must be even and in 2..{n - 1} (0 for the "
                                  "complete graph)")
            if not ((k + 1) // 2 < self.threshold <= k + 1 and self.threshold >= 2):
                raise SecAggError(f"threshold {self.threshold} for neighbourhoods of {k + 1} sites (a site and its "
                                  f"{k} neighbours): it must be > {(k + 1) // 2} (a majority, so the coordinator "
                                  f"cannot learn both secrets of a site) and <= {k + 1}")
        elif not (n // 2 < self.threshold <= n and self.threshold >= 2):
            raise SecAggError(f"threshold {self.threshold} for {n} sites: it must be > {n // 2} (a majority, so the "
                              f"coordinator cannot learn both secrets of a site) and <= {n}")
        if self.vector_length < 1 or not 1 <= self.frac_bits <= 52:
            raise SecAggError(f"vector_length {self.vector_length} / frac_bits {self.frac_bits} out of range")

    @classmethod
    def for_sites(cls, round_id: str, site_ids: Sequence[int], vector_length: int, max_dropouts: int = 0,
                  frac_bits: int = DEFAULT_FRAC_BITS) -> "SecAggSetup":
        """Threshold t = n - max_dropouts (refused unless it stays a majority and >= 2)."""
        return cls(str(round_id), tuple(site_ids), len(site_ids) - max_dropouts, vector_length, frac_bits)

    @classmethod
    def for_neighbourhoods(cls, round_id: str, site_ids: Sequence[int], vector_length: int, degree: int,
                           threshold: int | None = None, frac_bits: int = DEFAULT_FRAC_BITS) -> "SecAggSetup":
        """Sparse graph of ``degree`` neighbours per site (magnet_core.federation.secagg_graph); threshold per
        closed neighbourhood (default: its smallest majority, floor((degree + 1) / 2) + 1)."""
        t = (degree + 1) // 2 + 1 if threshold is None else threshold
        return cls(str(round_id), tuple(site_ids), t, vector_length, frac_bits, int(degree))

    @property
    def max_dropouts(self) -> int:
        """Complete graph: how many sites may drop; neighbourhoods: how many of one closed neighbourhood may."""
        return (self.graph_degree + 1 if self.graph_degree else len(self.site_ids)) - self.threshold

    def to_record(self) -> dict:
        out = {ROUND_ID: self.round_id, "site-ids": list(self.site_ids), "threshold": self.threshold,
               "vector-length": self.vector_length, "frac-bits": self.frac_bits}
        if self.graph_degree:
            out["graph-degree"] = self.graph_degree
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping) -> "SecAggSetup":
        check_version(r, "secure-aggregation setup")
        return cls(str(r[ROUND_ID]), tuple(r["site-ids"]), int(r["threshold"]), int(r["vector-length"]),
                   int(r["frac-bits"]), int(r.get("graph-degree", 0)))


@dataclasses.dataclass(frozen=True)
class SecureTrainTerms:
    """What a secure training round asks of a site besides the setup: the clip norm of its update, whether it
    weights encoders by modality counts, and (distributed DP) the noise multiplier z and the simulation's noise
    seed (-1: the site draws from its OS)."""

    clip_norm: float
    modality_aware: bool
    dp: bool = False
    dp_noise_multiplier: float = 0.0
    dp_noise_seed: int = -1

    def to_record(self) -> dict:
        out: dict[str, Any] = {CLIP_NORM: self.clip_norm, MODALITY_AWARE: self.modality_aware, DP: self.dp}
        if self.dp:
            out.update({DP_NOISE_MULTIPLIER: self.dp_noise_multiplier, DP_NOISE_SEED: self.dp_noise_seed})
        return out

    @classmethod
    def from_record(cls, r: Mapping) -> "SecureTrainTerms":
        clip_norm, modality_aware = float(r[CLIP_NORM]), bool(r[MODALITY_AWARE])
        if not clip_norm > 0:
            raise ContractError(f"clip-norm must be > 0, got {clip_norm}")
        dp = bool(r.get(DP, False))
        z = float(r[DP_NOISE_MULTIPLIER]) if dp else 0.0
        if dp and not z >= 0:
            raise ContractError(f"dp-noise-multiplier must be >= 0, got {z}")
        return cls(clip_norm, modality_aware, dp, z, int(r[DP_NOISE_SEED]) if dp else -1)


@dataclasses.dataclass(frozen=True)
class SecAggStart:
    """Stage 0 (server -> one site): the setup, this site's id in it and, in a training round, its terms."""

    setup: SecAggSetup
    site_id: int
    train: SecureTrainTerms | None = None

    def to_record(self) -> dict:
        return {**self.setup.to_record(), SITE_ID: self.site_id,
                **(self.train.to_record() if self.train is not None else {})}

    @classmethod
    def from_record(cls, r: Mapping, training: bool = False) -> "SecAggStart":
        """``training``: the record must hold the SecureTrainTerms too."""
        setup = SecAggSetup.from_record(r)
        return cls(setup, int(r[SITE_ID]), SecureTrainTerms.from_record(r) if training else None)


@dataclasses.dataclass(frozen=True)
class KeyAdvert:
    """Stage 0 reply (site -> server): public keys for share encryption and for pairwise masks. Authenticated
    (magnet_core.federation.secagg_auth): also the site's enrolled name, a commitment to its self-mask seed and its
    identity key's signature over (round id, secagg id, name, both keys, commitment)."""

    site_id: int
    enc_pk: bytes
    mask_pk: bytes
    site_name: str = ""
    b_commit: bytes = b""
    signature: bytes = b""

    def to_record(self) -> dict:
        out = {SITE_ID: self.site_id, "enc-pk": self.enc_pk, "mask-pk": self.mask_pk}
        if self.signature:
            out.update({"site-name": self.site_name, "b-commit": self.b_commit, "signature": self.signature})
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping) -> "KeyAdvert":
        check_version(r, "key advert")
        return cls(int(r[SITE_ID]), bytes(r["enc-pk"]), bytes(r["mask-pk"]), str(r.get("site-name", "")),
                   bytes(r.get("b-commit", b"")), bytes(r.get("signature", b"")))


@dataclasses.dataclass(frozen=True)
class KeyBook:
    """Stage 1 (server -> sites): the advertised keys of U1 (authenticated: with each site's name, commitment and
    signature, which every site checks against its own roster)."""

    keys: dict[int, tuple[bytes, bytes]]  # site id -> (enc_pk, mask_pk)
    round_id: str = dataclasses.field(default="", compare=False)
    names: dict[int, str] = dataclasses.field(default_factory=dict, compare=False)
    commits: dict[int, bytes] = dataclasses.field(default_factory=dict, compare=False)
    signatures: dict[int, bytes] = dataclasses.field(default_factory=dict, compare=False)

    def advert(self, site_id: int) -> KeyAdvert:
        """The advert of one site as the book relays it."""
        e, m = self.keys[site_id]
        return KeyAdvert(site_id, e, m, self.names.get(site_id, ""), self.commits.get(site_id, b""),
                         self.signatures.get(site_id, b""))

    def to_record(self) -> dict:
        ids = _ids(self.keys)
        out: dict[str, Any] = {"site-ids": ids, "enc-pk": [self.keys[i][0] for i in ids],
                               "mask-pk": [self.keys[i][1] for i in ids], ROUND_ID: self.round_id}
        if self.signatures:
            out.update({"site-names": [self.names.get(i, "") for i in ids],
                        "b-commits": [self.commits.get(i, b"") for i in ids],
                        "signatures": [self.signatures.get(i, b"") for i in ids]})
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping) -> "KeyBook":
        check_version(r, "key book")
        ids = [int(i) for i in r["site-ids"]]
        signed = "signatures" in r
        return cls({i: (bytes(e), bytes(m)) for i, e, m in zip(ids, r["enc-pk"], r["mask-pk"])}, str(r[ROUND_ID]),
                   {i: str(n) for i, n in zip(ids, r["site-names"])} if signed else {},
                   {i: bytes(c) for i, c in zip(ids, r["b-commits"])} if signed else {},
                   {i: bytes(g) for i, g in zip(ids, r["signatures"])} if signed else {})


@dataclasses.dataclass(frozen=True)
class ShareBundle:
    """Stage 1 reply (site -> server): one ciphertext per other site of U1, readable only by that site."""

    site_id: int
    ciphertexts: dict[int, bytes]  # recipient -> AEAD ciphertext

    def to_record(self) -> dict:
        ids = _ids(self.ciphertexts)
        return stamped({SITE_ID: self.site_id, "to": ids, "ciphertexts": [self.ciphertexts[i] for i in ids]})

    @classmethod
    def from_record(cls, r: Mapping) -> "ShareBundle":
        check_version(r, "share bundle")
        return cls(int(r[SITE_ID]), {int(i): bytes(c) for i, c in zip(r["to"], r["ciphertexts"])})


@dataclasses.dataclass(frozen=True)
class ShareInbox:
    """Stage 2 (server -> one site): the ciphertexts addressed to it; their senders are U2."""

    recipient: int
    ciphertexts: dict[int, bytes]  # sender -> ciphertext
    round_id: str = dataclasses.field(default="", compare=False)
    # neighbourhood graph only: every site that dealt shares (global U2) -> its enrolled name ("" unauthenticated);
    # it goes into the transcript each site signs, so all survivors must have been told the same list
    participants: dict[int, str] = dataclasses.field(default_factory=dict, compare=False)

    def to_record(self) -> dict:
        ids = _ids(self.ciphertexts)
        out = {"recipient": self.recipient, "from": ids, "ciphertexts": [self.ciphertexts[i] for i in ids],
               ROUND_ID: self.round_id}
        if self.participants:
            p = _ids(self.participants)
            out.update({"participant-ids": p, "participant-names": [self.participants[i] for i in p]})
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping) -> "ShareInbox":
        check_version(r, "share inbox")
        return cls(int(r["recipient"]), {int(i): bytes(c) for i, c in zip(r["from"], r["ciphertexts"])},
                   str(r[ROUND_ID]),
                   {int(i): str(n) for i, n in zip(r.get("participant-ids", []), r.get("participant-names", []))})


@dataclasses.dataclass(frozen=True)
class MaskedInput:
    """Stage 2 reply (site -> server): the masked vector (an array of the MASKED_KEY record; ``to_record`` is the
    SECAGG_KEY record beside it). Authenticated: with the site's signature over its transcript (round id, the
    context it was sent, the key book and the senders of its shares)."""

    site_id: int
    masked: np.ndarray  # uint64, (vector_length,)
    transcript_signature: bytes = b""

    def to_record(self) -> dict:
        out: dict[str, Any] = {SITE_ID: self.site_id}
        if self.transcript_signature:
            out["transcript-signature"] = self.transcript_signature
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping, masked: np.ndarray) -> "MaskedInput":
        check_version(r, "masked input")
        return cls(int(r[SITE_ID]), masked, bytes(r.get("transcript-signature", b"")))


@dataclasses.dataclass(frozen=True)
class SurvivorList:
    """Stage 3a (server -> every survivor; authenticated sums only): the consistency check of Bonawitz et al. 2017
    (round 3 of the malicious-model protocol). Whose input is in the sum (U3) and who dropped before masking; each
    survivor signs it with its enrolled identity key, once per sum (a second, different list is refused)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    round_id: str = ""

    def to_record(self) -> dict:
        return stamped({"survivors": list(self.survivors), "dropped": list(self.dropped), ROUND_ID: self.round_id})

    @classmethod
    def from_record(cls, r: Mapping) -> "SurvivorList":
        check_version(r, "survivor list")
        return cls(tuple(int(i) for i in r["survivors"]), tuple(int(i) for i in r["dropped"]), str(r[ROUND_ID]))


@dataclasses.dataclass(frozen=True)
class SurvivorSignature:
    """Stage 3a reply (site -> server): the site's identity-key signature over the survivor list it was sent
    (secagg_auth.survivors_payload: round id, its secagg id, its transcript digest, U3, the dropped sites)."""

    site_id: int
    signature: bytes

    def to_record(self) -> dict:
        return stamped({SITE_ID: self.site_id, "signature": self.signature})

    @classmethod
    def from_record(cls, r: Mapping) -> "SurvivorSignature":
        check_version(r, "survivor signature")
        return cls(int(r[SITE_ID]), bytes(r["signature"]))


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3 (server -> surviving sites): whose input is in the sum (U3) and who dropped before masking.
    Authenticated: every survivor's transcript signature (stage 2) and the survivor-list signatures of stage 3a."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    round_id: str = dataclasses.field(default="", compare=False)
    transcript_signatures: dict[int, bytes] = dataclasses.field(default_factory=dict, compare=False)
    survivor_signatures: dict[int, bytes] = dataclasses.field(default_factory=dict, compare=False)

    def to_record(self) -> dict:
        out: dict[str, Any] = {"survivors": list(self.survivors), "dropped": list(self.dropped),
                               ROUND_ID: self.round_id}
        if self.transcript_signatures:
            ids = _ids(self.transcript_signatures)
            out.update({"signed-by": ids, "transcript-signatures": [self.transcript_signatures[i] for i in ids]})
        if self.survivor_signatures:
            ids = _ids(self.survivor_signatures)
            out.update({"list-signed-by": ids, "survivor-signatures": [self.survivor_signatures[i] for i in ids]})
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping) -> "UnmaskRequest":
        check_version(r, "unmask request")
        sigs = {int(i): bytes(g) for i, g in zip(r.get("signed-by", []), r.get("transcript-signatures", []))}
        lists = {int(i): bytes(g) for i, g in zip(r.get("list-signed-by", []), r.get("survivor-signatures", []))}
        return cls(tuple(int(i) for i in r["survivors"]), tuple(int(i) for i in r["dropped"]), str(r[ROUND_ID]),
                   sigs, lists)


@dataclasses.dataclass(frozen=True)
class UnmaskShares:
    """Stage 3 reply (site -> server): shares of survivors' self-mask seeds and of dropped sites' mask keys."""

    site_id: int
    self_shares: dict[int, bytes]  # survivor -> share of its b
    key_shares: dict[int, bytes]  # dropped site -> share of its mask private key
    self_signatures: dict[int, bytes] = dataclasses.field(default_factory=dict)  # the sender's signature per share
    key_signatures: dict[int, bytes] = dataclasses.field(default_factory=dict)

    def to_record(self) -> dict:
        s, k = _ids(self.self_shares), _ids(self.key_shares)
        out: dict[str, Any] = {SITE_ID: self.site_id, "self-ids": s, "self-shares": [self.self_shares[i] for i in s],
                               "key-ids": k, "key-shares": [self.key_shares[i] for i in k]}
        if self.self_signatures or self.key_signatures:
            out.update({"self-signatures": [self.self_signatures.get(i, b"") for i in s],
                        "key-signatures": [self.key_signatures.get(i, b"") for i in k]})
        return stamped(out)

    @classmethod
    def from_record(cls, r: Mapping) -> "UnmaskShares":
        check_version(r, "unmask shares")
        s, k = [int(i) for i in r["self-ids"]], [int(i) for i in r["key-ids"]]
        return cls(int(r[SITE_ID]), {i: bytes(v) for i, v in zip(s, r["self-shares"])},
                   {i: bytes(v) for i, v in zip(k, r["key-shares"])},
                   {i: bytes(v) for i, v in zip(s, r.get("self-signatures", []))},
                   {i: bytes(v) for i, v in zip(k, r.get("key-signatures", []))})


SECRET_KINDS = ("self", "mask")  # a site's self-mask seed b, its mask private key s


@dataclasses.dataclass(frozen=True)
class ShareProof:
    """Evidence that ``sender`` dealt bad shares of one of its secrets: ``threshold`` shares, each signed by the
    sender for the site that revealed it, that do not interpolate to the secret the sender committed to in its
    signed key advert (its seed commitment, or its mask public key). An honest sender's shares always do, so the
    coordinator cannot make this evidence against an honest site."""

    sender: int
    kind: str  # "self" | "mask"
    shares: dict[int, bytes]  # share point (the revealing site's id) -> share
    signatures: dict[int, bytes]  # share point -> the sender's signature over that share


@dataclasses.dataclass(frozen=True)
class ExclusionRequest:
    """Stage 4 (server -> the honest survivors), only when shares were refuted: the senders to leave out of the
    sum with the evidence against each. Every honest survivor checks the evidence and answers with its pairwise
    mask seed with each of them (PairwiseSeeds), which removes their masks from the sum of the others."""

    proofs: tuple[ShareProof, ...]
    round_id: str = ""

    @property
    def senders(self) -> tuple[int, ...]:
        return tuple(sorted({p.sender for p in self.proofs}))

    def to_record(self) -> dict:
        xs, shares, sigs, counts = [], [], [], []
        for p in self.proofs:
            ids = _ids(p.shares)
            counts.append(len(ids))
            xs += ids
            shares += [p.shares[i] for i in ids]
            sigs += [p.signatures.get(i, b"") for i in ids]
        return stamped({ROUND_ID: self.round_id, "senders": [p.sender for p in self.proofs],
                        "kinds": [p.kind for p in self.proofs], "counts": counts, "points": xs, "shares": shares,
                        "signatures": sigs})

    @classmethod
    def from_record(cls, r: Mapping) -> "ExclusionRequest":
        check_version(r, "exclusion request")
        proofs, pos = [], 0
        for sender, kind, c in zip(r["senders"], r["kinds"], r["counts"]):
            c = int(c)
            if kind not in SECRET_KINDS or c < 0:
                raise ContractError(f"exclusion request: share proof of kind {kind!r} with {c} shares")
            xs = [int(x) for x in r["points"][pos:pos + c]]
            shares = dict(zip(xs, (bytes(v) for v in r["shares"][pos:pos + c])))
            proofs.append(ShareProof(int(sender), str(kind), shares,
                                     dict(zip(xs, (bytes(v) for v in r["signatures"][pos:pos + c])))))
            pos += c
        return cls(tuple(proofs), str(r[ROUND_ID]))


@dataclasses.dataclass(frozen=True)
class PairwiseSeeds:
    """Stage 4 reply (site -> server): this site's pairwise mask seed with each excluded sender."""

    site_id: int
    seeds: dict[int, bytes]  # excluded sender -> 32-byte seed

    def to_record(self) -> dict:
        ids = _ids(self.seeds)
        return stamped({SITE_ID: self.site_id, "senders": ids, "seeds": [self.seeds[i] for i in ids]})

    @classmethod
    def from_record(cls, r: Mapping) -> "PairwiseSeeds":
        check_version(r, "pairwise seeds")
        return cls(int(r[SITE_ID]), {int(i): bytes(v) for i, v in zip(r["senders"], r["seeds"])})
