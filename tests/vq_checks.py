"""Tie-aware comparison of vq_lookup results with the float64 reference."""
import torch

from fourm_fast.reference.vq import pairwise_distance_f64, vq_lookup_reference

U32 = 2.0**-24  # unit roundoff of float32

# Both executors round cosine-normalised codes to the input dtype before the dot product (the GPU
# feeds them to its tensor cores; the CPU does the same so the two rank identical numbers). That
# perturbs each score by up to one rounding of a unit vector's entries: bf16 keeps 8 significant
# bits, fp16 11. l2 codes are used as given.
CODE_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def code_rounding(dtype: torch.dtype, metric: str) -> float:
    return CODE_ROUNDING[dtype] if metric == "cosine" else 0.0


def score_tolerance(rows: torch.Tensor, codebook: torch.Tensor, metric: str, code_rounding: float = 0.0) -> torch.Tensor:
    """Per-row bound on how far an fp32-accumulated score may be from the exact one.

    The kernel ranks codes by |c|^2 - 2<x, c> (l2) or -<x, c/|c|> (cosine) accumulated in fp32 over
    D terms; the classic dot-product bound gives |error| <= (D + 2) u (|c|^2 + 2 |x| |c|). The
    factor 2 covers the comparison of two such scores. ``code_rounding`` adds the relative error
    of codes stored in a narrower type after normalisation (see CODE_ROUNDING).
    """
    D = codebook.shape[1]
    xn = rows.double().norm(dim=1)
    cmax = codebook.double().norm(dim=1).max()
    if metric == "l2":
        bound = (D + 2) * U32 * (cmax**2 + 2 * xn * cmax) + code_rounding * 2 * xn * cmax
    else:  # in units of cosine distance: the score divided by |x|
        bound = torch.full_like(xn, (D + 4) * U32 + code_rounding)
    return 2 * bound + 1e-30


def assert_vq_matches_reference(x, codebook, metric, indices, distance, code_rounding=0.0):
    D = codebook.shape[1]
    assert indices.dtype == torch.int64 and distance.dtype == torch.float32
    assert indices.shape == x.shape[:-1] and distance.shape == x.shape[:-1]
    ref_idx, _ = vq_lookup_reference(x.cpu(), codebook.cpu(), metric)
    idx = indices.cpu().reshape(-1)
    dist = distance.cpu().reshape(-1)
    ref_idx = ref_idx.reshape(-1)
    invalid = ref_idx < 0
    assert torch.equal(idx < 0, invalid), "rows marked invalid (-1) differ from the reference"
    assert torch.isnan(dist[invalid]).all()
    if invalid.all():
        return
    rows = x.cpu().reshape(-1, D)[~invalid]
    idx, dist = idx[~invalid], dist[~invalid]
    cb = codebook.cpu()
    finite_codes = torch.isfinite(cb).all(1)
    full = pairwise_distance_f64(rows, torch.where(finite_codes[:, None], cb, 0), metric)
    full = full.masked_fill(~finite_codes, float("inf"))
    chosen = full.gather(1, idx[:, None])[:, 0]
    best = full.min(1).values
    tol = score_tolerance(rows, cb[finite_codes], metric, code_rounding)
    excess = chosen - best  # in distance units for both metrics
    worst = (excess - tol).argmax()
    assert (excess <= tol).all(), (
        f"row {int(worst)}: chose code {int(idx[worst])} at {float(chosen[worst])!r}, best is "
        f"{float(best[worst])!r} (code {int(full[worst].argmin())}), tolerance {float(tol[worst])!r}"
    )
    # The returned distance is recomputed exactly in fp32 for the chosen code.
    exact = chosen
    if metric == "l2":
        dtol = 4 * (D + 2) * U32 * (rows.double() - cb[idx].double()).pow(2).sum(1) + 1e-30
    else:
        dtol = torch.full_like(exact, 4 * (D + 4) * U32)
    err = (dist.double() - exact).abs()
    assert (err <= dtol).all(), f"distance error {float(err.max())!r} above {float(dtol[err.argmax()])!r}"
