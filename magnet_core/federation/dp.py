"""Site-level DP for modality-aware FedAvg: clipping, central or distributed Gaussian noise, (eps, delta) accounting."""

# What is protected: one site's whole contribution to a round (add/remove-one-site neighbouring relation), and
# with it every patient of that site. Under DP the aggregation uses *uniform* weights: each site sends its update
# Delta_i = w_i - w_global clipped to L2 norm C over the arrays it sends (encoders of modalities it lacks are not
# sent); encoder m is updated by the mean over the S_m sites
# that hold m, the shared layers by the mean over all S aggregated sites:
#     w_new[block] = w_global[block] + (sum_i 1[i holds block] clip(Delta_i)[block] + N(0, sigma^2 I)) / S_block
# Removing one site changes the summed vector by at most C (its blocks are disjoint coordinates of one clipped
# vector), so one Gaussian mechanism with sigma = z * C per round gives the guarantee of noise multiplier z. The
# guarantee holds for adding or removing a site; for *replacing* a site's data (e.g. one of its patients) the sum
# can move by 2C, which ``relation="replace"`` accounts as multiplier z / 2. The
# counts S_block are numbers of sites, which the coordinator sees anyway (who replied, which assays a site
# enrolled with); patient counts are not used and not released. Count-weighted FedAvg is *not* offered under DP:
# its weights are data-dependent, so a large site's sensitivity would exceed C / S (the flaw of the earlier setup).
#
# Central: the sites clip, the coordinator adds N(0, sigma^2) to the sum (the coordinator is trusted with the
# noise-free sum, which it sees anyway without secure aggregation).
# Distributed (with secure aggregation): each site adds N(0, sigma^2 / t) to its own clipped vector, t = the
# secure-aggregation threshold, i.e. the fewest sites whose inputs can make up a recoverable sum. With s >= t
# inputs in the sum the total noise variance is s * sigma^2 / t >= sigma^2, and the accountant is given the
# effective multiplier z * sqrt((s - c) / t), where c = sites assumed to collude with the coordinator (each knows
# its own piece). Caveats: sites that drop out before masking remove their piece (covered as long as s >= t);
# the noise is continuous Gaussian rounded to the 2^-frac_bits fixed-point grid, not the discrete Gaussian of
# Kairouz et al. 2021 (the rounding, 1e-10, is ignored by the accounting); and float Gaussian samplers have known
# side channels (Mironov 2012). A deployment must draw the noise from a seed the coordinator does not know.
#
# Accounting: every round is the Gaussian mechanism with its effective multiplier z_t (all sites take part in
# every round: no subsampling amplification is claimed). Two conversions to (epsilon, delta) are reported:
#   * RDP: RDP of order a is a * rho with rho = sum_t 1 / (2 z_t^2) (Mironov 2017), converted with the improved
#     bound of Canonne, Kamath & Steinke 2020 over real orders: what RDP accountants (dp-accounting's
#     RdpAccountant, which Flower's wraps) report, minus the coarseness of their order grid. (The classical
#     conversion has the closed form rho + 2 sqrt(rho log(1/delta)); used in the hand-checked test.)
#   * exact: a composition of Gaussian mechanisms is exactly mu-GDP with mu = sqrt(sum_t 1 / z_t^2) (Dong, Roth &
#     Su 2019), and mu-GDP is (eps, delta)-DP iff delta >= Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
#     (Balle & Wang 2018); solved for eps. Tighter than RDP, never looser.
# Neither needs a dependency beyond scipy (already installed with scikit-learn).

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_ndtr

from magnet_core.federation.secagg import UpdateLayout

Params = dict[str, np.ndarray]


class DPConfig(BaseModel):
    """Differential privacy of one training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_norm: float = Field(gt=0, description="C: L2 bound of each site's update (all arrays together)")
    noise_multiplier: float = Field(ge=0, description="z: noise std on the sum is z * C")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (epsilon, delta)")
    noise: Literal["central", "distributed"] = Field(
        "central", description="coordinator adds the noise, or each site adds a piece (with secure aggregation)")
    colluding_sites: int = Field(0, ge=0, description="sites assumed to share their noise piece with the "
                                                      "coordinator (distributed noise only)")
    relation: Literal["add-remove", "replace"] = Field(
        "add-remove", description="neighbouring datasets: a site added / removed (sensitivity C), or a site's data "
                                  "replaced, e.g. one patient changed (sensitivity 2C)")

    @property
    def sigma(self) -> float:
        return self.noise_multiplier * self.clip_norm


def noise_rng(seed: int | None = None) -> np.random.Generator:
    """A generator for DP noise: seeded for reproducible simulations, else from the OS (what deployment needs)."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


# ----------------------------------------------------------------------------------------------- clipping, noise


def update_of(params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray]) -> Params:
    return {k: np.asarray(params[k], dtype=np.float64) - np.asarray(g, dtype=np.float64)
            for k, g in global_params.items()}


def clip_update(delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Params, float]:
    """Scale the whole update to L2 norm <= clip_norm; returns the clipped update and the norm before clipping."""
    norm = float(math.sqrt(sum(float(np.square(np.asarray(v, dtype=np.float64)).sum()) for v in delta.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}, norm


def clip_to_global(params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray], clip_norm: float
                   ) -> tuple[Params, float]:
    """Parameters whose update from ``global_params`` is clipped to ``clip_norm`` (what a site does under secure
    aggregation without DP, where the coordinator cannot check update norms); also the norm before clipping."""
    clipped, norm = clip_update(update_of(params, global_params), clip_norm)
    return {k: (np.asarray(g, dtype=np.float64) + clipped[k]).astype(np.asarray(g).dtype)
            for k, g in global_params.items()}, norm


def site_blocks(layout: UpdateLayout, modality_counts: Mapping[str, int]) -> dict[str | None, float]:
    """Uniform DP weights: 1 for the shared layers and for every encoder the site trained, else 0."""
    w: dict[str | None, float] = {None: 1.0}
    w.update({m: 1.0 if modality_counts.get(m, 0) > 0 else 0.0 for m in layout.modalities})
    return w


def dp_site_vector(layout: UpdateLayout, params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray],
                   modality_counts: Mapping[str, int], cfg: DPConfig, noise_std: float = 0.0,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
    """A site's DP contribution in the layout of ``layout``: its clipped update (blocks it holds), plus its noise
    piece N(0, noise_std^2) on every parameter coordinate (``noise_std`` = :func:`noise_piece_std` with
    distributed noise, 0 with central noise); the weight slots hold 0/1 (which blocks it holds). Returns the
    vector and the update's norm before clipping (for the site's log, not to be sent)."""
    weights = site_blocks(layout, modality_counts)
    held = {k: v for k, v in update_of(params, global_params).items() if weights.get(layout.block(k), 0.0)}
    clipped, norm = clip_update(held, cfg.clip_norm)  # over the blocks it sends: their norm is what counts
    vec = layout.encode_blocks({**{k: np.zeros(s) for k, s in zip(layout.names, layout.shapes)}, **clipped},
                               weights)
    if noise_std > 0:
        rng = rng if rng is not None else noise_rng()
        vec[:layout.param_size] += rng.normal(0.0, noise_std, layout.param_size)
    return vec, norm


def noise_piece_std(cfg: DPConfig, threshold: int) -> float:
    """Std of each site's piece so that any ``threshold`` pieces sum to variance sigma^2."""
    if threshold < 1:
        raise ValueError(f"threshold {threshold} must be >= 1")
    return cfg.sigma / math.sqrt(threshold)


# A Gaussian coordinate exceeds NOISE_TAIL standard deviations with probability < 1e-88: the fixed-point range
# check below treats |noise| < NOISE_TAIL * std as certain (over 10^9 coordinates and 10^6 rounds, p < 1e-70).
NOISE_TAIL = 20.0


def distributed_noise_fits(clip_norm: float, piece_std: float, num_sites: int, frac_bits: int) -> str | None:
    """None if a site's clipped update (|x| <= C per coordinate) plus its noise piece stays inside the secure sum's
    fixed-point range (|x| < 2^(63 - frac_bits) / sites, so the sum cannot wrap), else the reason it may not.
    The noise is never clipped to fit (that would change the mechanism): the run is refused instead."""
    bound = 2.0 ** (63 - frac_bits) / max(num_sites, 1)
    worst = clip_norm + NOISE_TAIL * piece_std
    if not worst < bound:
        return (f"a site's clipped update plus its noise piece can reach {worst:.4g} (clip norm {clip_norm:g} + "
                f"{NOISE_TAIL:g} x noise std {piece_std:.4g}), beyond the fixed-point range +-{bound:.4g} of a "
                f"secure sum over {num_sites} sites with {frac_bits} fractional bits: lower dp-noise-multiplier "
                "or dp-clip-norm")
    return None


def site_noise_rng(seed: int, server_round: int, site_id: int) -> np.random.Generator:
    """A site's noise generator under distributed DP: from the OS when ``seed`` < 0 (deployment: nobody else can
    know it), else seeded by (seed, round, secure-aggregation site id) for reproducible simulations."""
    return noise_rng(None) if seed < 0 else np.random.default_rng([seed, server_round, site_id])


def add_central_noise(layout: UpdateLayout, total: np.ndarray, cfg: DPConfig,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """The coordinator's noise N(0, sigma^2) on the parameter part of a summed vector."""
    rng = rng if rng is not None else noise_rng()
    out = np.array(total, dtype=np.float64, copy=True)
    out[:layout.param_size] += rng.normal(0.0, cfg.sigma, layout.param_size)
    return out


def dp_decode(layout: UpdateLayout, total: np.ndarray, global_params: Mapping[str, np.ndarray]) -> Params:
    """New global parameters from the (noisy) sum: w_global + block sum / number of sites holding the block."""
    arrays, counts = layout.split(total)
    out: Params = {}
    for name in layout.names:
        g = np.asarray(global_params[name])
        s = counts[layout.block(name)]
        out[name] = (g.astype(np.float64) + arrays[name] / round(s)).astype(g.dtype) if s > 0.5 else g.copy()
    return out


def dp_aggregate(layout: UpdateLayout, global_params: Mapping[str, np.ndarray],
                 site_vectors: Sequence[np.ndarray], cfg: DPConfig,
                 rng: np.random.Generator | None = None) -> Params:
    """Central DP without secure aggregation: sum the sites' clipped vectors, add the noise, decode."""
    if not site_vectors:
        return {k: np.asarray(v).copy() for k, v in global_params.items()}
    total = add_central_noise(layout, np.sum(np.stack(site_vectors), axis=0), cfg, rng)
    return dp_decode(layout, total, global_params)


def effective_noise_multiplier(cfg: DPConfig, noise_pieces: int, threshold: int | None = None) -> float:
    """The multiplier a round actually achieved (noise std / sensitivity): z for central noise;
    z * sqrt((s - c) / t) for ``noise_pieces`` = s pieces of std sigma / sqrt(t) in the sum (c = colluding
    sites); halved under ``relation="replace"``. 0 when no honest piece is left."""
    scale = 0.5 if cfg.relation == "replace" else 1.0
    if cfg.noise == "central":
        return cfg.noise_multiplier * scale
    if threshold is None:
        raise ValueError("distributed noise needs the threshold the pieces were sized for")
    honest = max(noise_pieces - cfg.colluding_sites, 0)
    return cfg.noise_multiplier * math.sqrt(honest / threshold) * scale


# ----------------------------------------------------------------------------------------------- accounting


def rdp_epsilon(noise_multipliers: Sequence[float], delta: float,
                conversion: Literal["improved", "classical"] = "improved") -> float:
    """eps from the RDP curve a -> a * rho (rho = sum_t 1 / (2 z_t^2)) of composed Gaussian mechanisms, over real
    orders a > 1. ``classical`` (Mironov 2017): min_a a rho + log(1/delta)/(a-1) = rho + 2 sqrt(rho log(1/delta)).
    ``improved`` (Canonne, Kamath & Steinke 2020; what dp-accounting's RdpAccountant uses):
    min_a a rho + log((a-1)/a) - (log delta + log a)/(a-1)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    rho = sum(1.0 / (2.0 * z * z) for z in noise_multipliers)
    log_inv = math.log(1.0 / delta)
    if conversion == "classical":
        return rho + 2.0 * math.sqrt(rho * log_inv)

    def eps(a: float) -> float:
        return a * rho + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1.0)

    grid = 1.0 + np.logspace(-4, 5, 400)
    best = int(np.argmin([eps(a) for a in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    res = minimize_scalar(eps, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    return float(max(min(res.fun, eps(grid[best])), 0.0))


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Balle & Wang 2018), computed in log space."""
    a = log_ndtr(-eps / mu + mu / 2.0)
    b = eps + log_ndtr(-eps / mu - mu / 2.0)
    return float(math.exp(a) * -math.expm1(b - a)) if a > b else 0.0


def exact_epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """The smallest eps for which the composition is (eps, delta)-DP (Gaussian mechanisms compose to mu-GDP)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    mu = math.sqrt(sum(1.0 / (z * z) for z in noise_multipliers))
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2.0
    return float(brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


@dataclasses.dataclass
class PrivacyAccountant:
    """(epsilon, delta) after every round from the rounds' effective noise multipliers; JSON-serialisable."""

    delta: float
    noise_multipliers: list[float] = dataclasses.field(default_factory=list)

    def add_round(self, noise_multiplier: float) -> dict[str, float]:
        """Record one round; returns the cumulative guarantee after it (for the history)."""
        self.noise_multipliers.append(float(noise_multiplier))
        return self.spent()

    def spent(self) -> dict[str, float]:
        return {"rounds": len(self.noise_multipliers), "delta": self.delta,
                "epsilon": exact_epsilon(self.noise_multipliers, self.delta),
                "epsilon_rdp": rdp_epsilon(self.noise_multipliers, self.delta),
                "last_noise_multiplier": self.noise_multipliers[-1] if self.noise_multipliers else math.nan}

    def to_dict(self) -> dict:
        return {"delta": self.delta, "noise_multipliers": list(self.noise_multipliers)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PrivacyAccountant":
        return cls(float(d["delta"]), [float(z) for z in d["noise_multipliers"]])
