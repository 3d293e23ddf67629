"""What the coordinator can check of the sites' clipping on the decoded secure sum alone (no site's update)."""

# Under secure aggregation every site clips its update to C itself; a site running modified code can skip that, or
# weight its parameters by more than the count it puts in its weight slot (the summed counts still pass). The sum
# shows, per block b (an encoder, the shared layers), D_b = sum_i w_ib * delta_ib (weighted parameters minus the
# summed weight times the global block; under DP the block sum itself) and W_b = sum_i w_ib. For honest sites
# ||delta_ib|| <= ||delta_i|| <= C, so
#     ||D_b|| <= C * W_b                                  (every block: the block's mean step is at most C)
#     sum_b ||D_b / W_b||^2 <= n * C^2                    (n sites in the sum; Jensen over the weights)
# An honest round never breaks either (up to fixed-point and float32 rounding, allowed for below); a round that
# does is refused whole (the coordinator cannot tell which site caused it). What is still possible: a site that
# stays within the bound can point the mean step of a block anywhere within norm C (it cannot move the model
# further than one clipped step per block, but it can choose the direction): see docs/secure-aggregation.md.

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .secagg import UpdateLayout

TAIL = math.sqrt(2 * math.log(1e12))  # a chi variable exceeds sigma (sqrt(d) + TAIL) with probability < 1e-12


def block_steps(layout: UpdateLayout, update_sum: np.ndarray, global_params: Mapping[str, np.ndarray],
                encoded: str = "params") -> dict[str | None, tuple[float, float, int]]:
    """Per block: (||D_b||, W_b, coordinates). ``encoded``: "params" (weights x new parameters, plain secure
    aggregation) or "updates" (the DP encoding: the clipped update itself, noise included)."""
    if encoded not in ("params", "updates"):
        raise ValueError(f"encoded must be 'params' or 'updates', got {encoded!r}")
    arrays, wsum = layout.split(update_sum)
    sq: dict[str | None, float] = {}
    size: dict[str | None, int] = {}
    for name in layout.names:
        blk = layout.block(name)
        d = np.asarray(arrays[name], dtype=np.float64)
        if encoded == "params":
            d = d - wsum[blk] * np.asarray(global_params[name], dtype=np.float64)
        sq[blk] = sq.get(blk, 0.0) + float(np.sum(d * d))
        size[blk] = size.get(blk, 0) + d.size
    return {blk: (math.sqrt(sq[blk]), wsum[blk], size[blk]) for blk in sq}


def clip_bound_problems(layout: UpdateLayout, update_sum: np.ndarray, global_params: Mapping[str, np.ndarray],
                        clip_norm: float, sites: int, encoded: str = "params", noise_std: float = 0.0) -> list[str]:
    """Every way the decoded sum shows a site that did not clip to ``clip_norm`` (empty for an honest round).
    ``noise_std``: std per coordinate of the summed DP noise (0 without DP)."""
    steps = block_steps(layout, update_sum, global_params, encoded)
    gnorm = {blk: 0.0 for blk in steps}
    for name in layout.names:
        gnorm[layout.block(name)] += float(np.sum(np.asarray(global_params[name], dtype=np.float64) ** 2))
    problems, mean_sq = [], 0.0
    for blk, (norm, w, d) in steps.items():
        if w <= 0.5:
            continue
        # float32 rounding of each site's clipped parameters and the fixed point's rounding of the sum
        slack = w * (1e-6 * clip_norm + 2.0 ** -22 * (math.sqrt(gnorm[blk]) + clip_norm)) + sites * 2.0 ** -20 * \
            math.sqrt(d)
        noise = noise_std * (math.sqrt(d) + TAIL)
        bound = clip_norm * w + slack + noise
        label = "the shared layers" if blk is None else f"encoder {blk}"
        if not norm <= bound:
            problems.append(f"the summed step of {label} has norm {norm:.4g}, more than the clip norm {clip_norm:g} x "
                            f"its summed weight {w:g} (= {clip_norm * w:.4g}) allows: a site did not clip its "
                            "update or weighted it beyond its count")
        mean_sq += (max(norm - slack - noise, 0.0) / w) ** 2
    if not problems and noise_std == 0 and mean_sq > sites * clip_norm ** 2 * (1 + 1e-6):
        problems.append(f"the mean step has norm {math.sqrt(mean_sq):.4g}, more than sqrt({sites} sites) x the clip "
                        f"norm {clip_norm:g} allows")
    return problems
