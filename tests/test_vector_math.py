"""The vectorizable logarithm and exponential of the numba kernels, against libm."""

import math

import numba
import numpy as np

from model.vector_math import EXP_INPUT_MIN, FASTMATH_NO_REASSOC, exp_nonpositive, log_positive


def test_vectorized_logarithm_matches_libm_over_the_whole_positive_range():
    """The kernels' own logarithm (bits split into exponent and mantissa, an atanh series) on
    positive normal numbers from 1e-300 to 1e300, around 1, and at the mantissa split sqrt(2)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.exp(rng.uniform(np.log(1e-300), np.log(1e300), 20_000)),
        1.0 + rng.uniform(-1e-3, 1e-3, 2_000), [1.0, 2.0, 0.5, 1e-30, 1.0 - 1e-15, np.finfo(np.float64).tiny],
        math.sqrt(2.0) * (1.0 + np.linspace(-1e-12, 1e-12, 101)), np.nextafter(math.sqrt(2.0), [0.0, 4.0]),
    ])
    out = np.empty_like(x)
    log_positive(x, np.empty_like(x), out)
    np.testing.assert_allclose(out, np.log(x), rtol=1e-15, atol=5e-16)
    assert out[np.flatnonzero(x == 1.0)[0]] == 0.0  # exactly: the small-parameter path relies on ln(1) = 0


@numba.njit(fastmath=FASTMATH_NO_REASSOC)
def _exp_in_a_kernel(x, scratch, out):
    exp_nonpositive(x, scratch, out)  # inlined, under a caller's fast-math flags, as the kernels use it


def test_vectorized_exponential_matches_libm_from_the_input_floor_to_zero():
    """exp_nonpositive over [EXP_INPUT_MIN, 0]: random points, the ends, around the rounding
    boundaries of q = x / ln 2 (half-integers), and tiny negatives; called as is and inlined."""
    rng = np.random.default_rng(1)
    ln2 = math.log(2.0)
    x = np.concatenate([
        rng.uniform(EXP_INPUT_MIN, 0.0, 20_000), -np.exp(rng.uniform(np.log(1e-300), 0.0, 2_000)),
        [0.0, -0.0, EXP_INPUT_MIN, -1e-300, -ln2 / 2, -ln2, -1.0],
        np.outer(-(np.arange(1, 1021) + 0.5) * ln2, [1.0 - 1e-15, 1.0, 1.0 + 1e-15]).ravel(),
    ])
    x = x[x >= EXP_INPUT_MIN]
    for function in (exp_nonpositive, _exp_in_a_kernel):
        out = np.empty_like(x)
        function(x, np.empty_like(x), out)
        np.testing.assert_allclose(out, np.exp(x), rtol=4e-16, atol=0)
        assert out[np.flatnonzero(x == 0.0)[0]] == 1.0
