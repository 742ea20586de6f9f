"""Numpy-only regularized incomplete beta function and its inverse.

scipy is deliberately not a dependency, so the Beta quantiles behind credible
intervals are computed here: ``betainc`` follows the continued fraction (modified
Lentz) and, for very large parameters, the Gauss-Legendre approximation of
Numerical Recipes (3rd ed., section 6.4); ``betaincinv`` is a bracketed Halley
iteration on ``betainc``. Everything is vectorized over broadcast parameter
arrays; loops run over iterations, never over elements.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["betainc", "betaincinv", "betaln"]

_EPS = np.finfo(np.float64).eps
_FPMIN = np.finfo(np.float64).tiny / _EPS
# Above this in both parameters the continued fraction needs O(sqrt(a+b)) terms,
# so the quadrature approximation (accurate to ~1e-10 there) takes over.
_SWITCH = 3000.0
_CF_MAXIT = 100_000
_STIRLING_MIN = 10.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_MAXIT = 200
_X_TINY = 1e-300
_X_FLOOR = 1e-308
_INV_RTOL = 1e-9

# 18-point Gauss-Legendre rule mapped from [-1, 1] to [0, 1].
_GL_X, _GL_W = np.polynomial.legendre.leggauss(18)
_GL_Y = 0.5 * (_GL_X + 1.0)
_GL_W = 0.5 * _GL_W

_lgamma_obj = np.frompyfunc(math.lgamma, 1, 1)


def _lgamma(x: np.ndarray) -> np.ndarray:
    # math.lgamma is correctly rounded to ~1 ulp; numpy has no vectorized lgamma and the
    # arrays here are per-arm (small), so the ufunc wrapper costs nothing that matters.
    return np.asarray(_lgamma_obj(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def _stirling_corr(x: np.ndarray) -> np.ndarray:
    """lgamma(x) - [(x - 1/2) log x - x + log(2 pi)/2]; series accurate to ~1e-14 for x >= 10."""
    r = 1.0 / x
    r2 = r * r
    return r * (
        1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0 - r2 / 1188.0)))
    )


def _log_ratio(x: np.ndarray, other: np.ndarray, s: np.ndarray) -> np.ndarray:
    """log(x / s) where s = x + other, via log1p when x dominates (keeps small logs exact)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > other, np.log1p(-other / s), np.log(x / s))


def betaln(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """log B(a, b), elementwise, without the cancellation of lgamma sums at large arguments.

    Summing three lgammas of size ~1e8 would leave only ~1e-8 absolute accuracy, which
    becomes relative error in every tail probability; the Stirling forms below keep it
    near machine precision.
    """
    a_, b_ = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    lo = np.minimum(a_, b_)
    hi = np.maximum(a_, b_)
    s = lo + hi
    out = np.empty(a_.shape)
    small = hi < _STIRLING_MIN
    if small.any():
        out[small] = _lgamma(lo[small]) + _lgamma(hi[small]) - _lgamma(s[small])
    mixed = ~small & (lo < _STIRLING_MIN)
    if mixed.any():
        # lgamma(b) - lgamma(a + b) for large b, written so the O(b log b) parts cancel exactly.
        x, y, t = lo[mixed], hi[mixed], s[mixed]
        out[mixed] = (
            _lgamma(x)
            - (y - 0.5) * np.log1p(x / y)
            - x * np.log(t)
            + x
            + _stirling_corr(y)
            - _stirling_corr(t)
        )
    both = ~small & ~mixed
    if both.any():
        x, y, t = lo[both], hi[both], s[both]
        out[both] = (
            _HALF_LOG_2PI
            - 0.5 * np.log(t)
            + (x - 0.5) * _log_ratio(x, y, t)
            + (y - 0.5) * _log_ratio(y, x, t)
            + _stirling_corr(x)
            + _stirling_corr(y)
            - _stirling_corr(t)
        )
    return out


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Continued fraction for I_x(a, b) (1-D inputs); converges fast for x < (a+1)/(a+b+2)."""
    out = np.empty_like(x)
    idx = np.arange(x.size)
    qab = a + b
    qap = a + 1.0
    qam = a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < _FPMIN, _FPMIN, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, _CF_MAXIT + 1):
        m2 = 2.0 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < _FPMIN, _FPMIN, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _FPMIN, _FPMIN, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < _FPMIN, _FPMIN, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _FPMIN, _FPMIN, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        done = np.abs(delta - 1.0) <= _EPS
        if done.any():
            # Retire converged elements so the loop only pays for the slow ones.
            out[idx[done]] = h[done]
            keep = ~done
            if not keep.any():
                return out
            idx, a, b, x, qab, qap, qam, c, d, h = (
                v[keep] for v in (idx, a, b, x, qab, qap, qam, c, d, h)
            )
    out[idx] = h  # not converged within _CF_MAXIT: best available estimate
    return out


def _betainc_cf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """I_x(a, b) via the continued fraction, for 0 < x < 1 (1-D inputs)."""
    log_front = a * np.log(x) + b * np.log1p(-x) - betaln(a, b)
    front = np.exp(log_front)
    lower = x < (a + 1.0) / (a + b + 2.0)
    out = np.empty_like(x)
    if lower.any():
        al, bl, xl = a[lower], b[lower], x[lower]
        out[lower] = front[lower] * _betacf(al, bl, xl) / al
    upper = ~lower
    if upper.any():
        # Symmetry I_x(a,b) = 1 - I_{1-x}(b,a) keeps the fraction in its fast regime.
        au, bu, xu = a[upper], b[upper], x[upper]
        out[upper] = 1.0 - front[upper] * _betacf(bu, au, 1.0 - xu) / bu
    return out


def _betainc_quad(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """I_x(a, b) by Gauss-Legendre quadrature of the tail, for large a and b (1-D inputs)."""
    a1 = a - 1.0
    b1 = b - 1.0
    mu = a / (a + b)
    lnmu = np.log(mu)
    lnmuc = np.log1p(-mu)
    sd = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))
    above = x > mu
    # Integrate over the nearer tail only, out to where the density is negligible.
    xu = np.where(
        above,
        np.minimum(1.0, np.maximum(mu + 10.0 * sd, x + 5.0 * sd)),
        np.maximum(0.0, np.minimum(mu - 10.0 * sd, x - 5.0 * sd)),
    )
    t = x[:, None] + (xu - x)[:, None] * _GL_Y[None, :]
    with np.errstate(divide="ignore"):  # nodes at exactly 0 or 1 give log = -inf -> weight 0
        integrand = np.exp(
            a1[:, None] * (np.log(t) - lnmu[:, None])
            + b1[:, None] * (np.log1p(-t) - lnmuc[:, None])
        )
    total = (integrand * _GL_W[None, :]).sum(axis=1)
    # log of mu^(a-1) (1-mu)^(b-1) / B(a, b) in closed form: the O(a) terms of betaln cancel
    # against a1*lnmu + b1*lnmuc analytically, so they are never formed.
    s = a + b
    log_peak = (
        0.5 * np.log(s / (2.0 * math.pi))
        - 0.5 * (lnmu + lnmuc)
        - (_stirling_corr(a) + _stirling_corr(b) - _stirling_corr(s))
    )
    ans = total * (xu - x) * np.exp(log_peak)
    # Branch on the side, not on the sign of ans (as NR does): a tail that underflows to
    # 0 would otherwise turn an upper-tail result of 1 into 0.
    return np.where(above, 1.0 - ans, -ans)


def betainc(a: np.ndarray | float, b: np.ndarray | float, x: np.ndarray | float) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, elementwise with broadcasting."""
    a_, b_, x_ = np.broadcast_arrays(
        np.asarray(a, dtype=np.float64),
        np.asarray(b, dtype=np.float64),
        np.asarray(x, dtype=np.float64),
    )
    shape = a_.shape
    a1, b1, x1 = a_.ravel(), b_.ravel(), x_.ravel()
    out = np.full(a1.shape, np.nan)
    out[x1 <= 0.0] = 0.0
    out[x1 >= 1.0] = 1.0
    inner = (x1 > 0.0) & (x1 < 1.0) & (a1 > 0.0) & (b1 > 0.0)
    big = inner & (a1 > _SWITCH) & (b1 > _SWITCH)
    small = inner & ~big
    if big.any():
        out[big] = _betainc_quad(a1[big], b1[big], x1[big])
    if small.any():
        out[small] = _betainc_cf(a1[small], b1[small], x1[small])
    return np.clip(out, 0.0, 1.0).reshape(shape)


def _initial_guess(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Starting point for the inverse (Numerical Recipes 6.4), usually within a few percent."""
    with np.errstate(all="ignore"):
        # a, b >= 1: Cornish-Fisher-style normal approximation.
        pp = np.where(p < 0.5, p, 1.0 - p)
        t = np.sqrt(-2.0 * np.log(pp))
        z = (2.30753 + t * 0.27061) / (1.0 + t * (0.99229 + t * 0.04481)) - t
        z = np.where(p < 0.5, -z, z)
        al = (z * z - 3.0) / 6.0
        h = 2.0 / (1.0 / (2.0 * a - 1.0) + 1.0 / (2.0 * b - 1.0))
        w = z * np.sqrt(al + h) / h - (1.0 / (2.0 * b - 1.0) - 1.0 / (2.0 * a - 1.0)) * (
            al + 5.0 / 6.0 - 2.0 / (3.0 * h)
        )
        x_big = a / (a + b * np.exp(2.0 * w))
        # Otherwise: invert the leading power-law terms of either tail.
        lna = np.log(a / (a + b))
        lnb = np.log(b / (a + b))
        ta = np.exp(a * lna) / a
        tb = np.exp(b * lnb) / b
        tw = ta + tb
        x_small = np.where(
            p < ta / tw,
            np.power(a * tw * p, 1.0 / a),
            1.0 - np.power(b * tw * (1.0 - p), 1.0 / b),
        )
        x = np.where((a >= 1.0) & (b >= 1.0), x_big, x_small)
    return np.where(np.isfinite(x) & (x > 0.0) & (x < 1.0), x, 0.5)


def betaincinv(a: np.ndarray | float, b: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
    """Inverse of ``betainc`` in x: the p-quantile of Beta(a, b), elementwise with broadcasting."""
    a_, b_, p_ = np.broadcast_arrays(
        np.asarray(a, dtype=np.float64),
        np.asarray(b, dtype=np.float64),
        np.asarray(p, dtype=np.float64),
    )
    shape = a_.shape
    a1, b1, p1 = a_.ravel().copy(), b_.ravel().copy(), p_.ravel().copy()
    out = np.full(a1.shape, np.nan)
    out[p1 <= 0.0] = 0.0
    out[p1 >= 1.0] = 1.0
    todo = np.flatnonzero((p1 > 0.0) & (p1 < 1.0) & (a1 > 0.0) & (b1 > 0.0))
    if todo.size == 0:
        return out.reshape(shape)

    a, b, p = a1[todo], b1[todo], p1[todo]
    lbeta = betaln(a, b)
    x = _initial_guess(a, b, p)
    # Safeguarded Halley iteration in the style of rtsafe: the bracket [lo, hi] always
    # holds the root, and bisection replaces any step that would leave it or that fails to
    # at least halve the step before last (Halley crawls in flat far tails), so
    # convergence is guaranteed from any start and fast from a good one.
    lo = np.zeros_like(x)
    hi = np.ones_like(x)
    dx = np.ones_like(x)
    dx_old = np.ones_like(x)
    idx = np.arange(x.size)
    for _ in range(_INV_MAXIT):
        f = betainc(a, b, x) - p
        lo = np.where(f < 0.0, x, lo)
        hi = np.where(f > 0.0, x, hi)
        with np.errstate(all="ignore"):
            pdf = np.exp((a - 1.0) * np.log(x) + (b - 1.0) * np.log1p(-x) - lbeta)
            u = f / pdf
            curv = (a - 1.0) / x - (b - 1.0) / (1.0 - x)
            # Clipping u*curv keeps an overflowing correction from collapsing the step to 0
            # (a false "converged"); the resulting huge step is then rejected for bisection.
            step = u / (1.0 - 0.5 * np.clip(u * curv, -1e10, 1.0))
            x_halley = x - step
        usable = np.isfinite(x_halley) & np.isfinite(u) & np.isfinite(curv) & (pdf > 0.0)
        # Halley converges cubically, so a step below 1e-9 of the distance to the nearer end
        # of [0, 1] leaves x_halley accurate to the limit of betainc itself; demanding more
        # would only chase betainc's rounding noise. Judged on the raw step because such an
        # x_halley may land on a bracket end and be rejected by the safeguard below.
        tol = np.maximum(_INV_RTOL * np.minimum(x, 1.0 - x), np.spacing(x))
        converged = (f == 0.0) | (
            usable & (np.abs(step) <= tol) & (x_halley >= lo) & (x_halley <= hi)
        )
        collapsed = (
            (np.nextafter(lo, 1.0) >= hi)
            | (hi - lo <= 4.0 * _EPS * np.minimum(hi, 1.0 - lo))
            | (hi <= _X_TINY)  # quantile below 1e-300: as good as 0 for any use here
            | (lo >= 1.0 - _EPS)  # within an ulp of 1: x rounds to 1
        )
        # Bisect geometrically when the bracket lies near 0 (or near 1), since tail
        # quantiles of skewed posteriors can sit at 1e-10 and below; otherwise halve.
        # An open end (0 or 1) is replaced by a value just beyond where the search stops
        # (below 1e-300; within half an ulp of 1), so an unbounded side still terminates.
        with np.errstate(all="ignore"):
            arith = 0.5 * (lo + hi)
            mid = np.where(
                hi <= 0.5,
                np.sqrt(np.maximum(lo, _X_FLOOR) * hi),
                np.where(
                    lo >= 0.5,
                    1.0 - np.sqrt((1.0 - lo) * np.maximum(1.0 - hi, 0.25 * _EPS)),
                    arith,
                ),
            )
            mid = np.where((mid > lo) & (mid < hi), mid, arith)
        inside = usable & (x_halley > lo) & (x_halley < hi)
        take_halley = inside & (2.0 * np.abs(step) <= np.abs(dx_old))
        x_next = np.where(take_halley, x_halley, mid)
        dx_old = dx
        dx = np.abs(x_next - x)
        x = np.where(
            converged,
            np.where(usable, x_halley, x),
            np.where(collapsed, np.where(lo >= 1.0 - _EPS, 1.0, 0.5 * (lo + hi)), x_next),
        )
        done = converged | collapsed
        if done.any():
            out[todo[idx[done]]] = x[done]
            keep = ~done
            if not keep.any():
                break
            idx, a, b, p, lbeta, x, lo, hi, dx, dx_old = (
                v[keep] for v in (idx, a, b, p, lbeta, x, lo, hi, dx, dx_old)
            )
    else:
        out[todo[idx]] = x  # iteration cap: the bracketed estimate is still the best we have
    return out.reshape(shape)
