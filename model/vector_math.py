"""Logarithm and exponential over float64 arrays as plain arithmetic that LLVM vectorizes.

numba's LLVM has no vector math library (SVML) on this install, so ``math.log`` and
``math.exp`` in a numba loop are one scalar libm call per element, and they dominated the
kernels that call them (``model.balent``, ``model.moments``). These read and write the
float64 bits instead: exponent and mantissa, then a short series, all vectorizable, within
a few units in the last place of libm.

Both are ``inline="always"`` numba functions over 1-D contiguous float64 arrays with a
scratch array as long; they check nothing (garbage in, garbage out), so their callers keep
the inputs in range.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# fast-math without "nnan"/"ninf": NaN and inf checks must survive optimization
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# without "reassoc", which would fold exp_nonpositive's (x + magic) - magic rounding into x:
# the flags of a numba function apply to what it inlines, so its callers must use these too
FASTMATH_NO_REASSOC = {"nsz", "arcp", "contract", "afn"}

_LOG2 = math.log(2.0)
_MANTISSA_BITS = 0x000FFFFFFFFFFFFF
_EXPONENT_OF_ONE = 0x3FF0000000000000  # the bits of 1.0: exponent 0
_SQRT2 = math.sqrt(2.0)
# ln(m) = 2 atanh(s) = 2 s sum_j s^(2j) / (2j + 1), s = (m - 1) / (m + 1). For m in
# [sqrt(1/2), sqrt(2)], |s| <= 0.1716 and s^2 <= 0.0295, so the terms after j = 9 are below
# 3e-17 of the sum.
_ATANH_SERIES = tuple(1.0 / (2 * j + 1) for j in range(10))


@numba.njit(cache=True, inline="always", fastmath=FASTMATH)
def log_positive(x, scratch, out):  # pragma: no cover - numba
    """out = ln(x) for 1-D contiguous float64 `x` of positive normal numbers (anything else
    gives garbage, not an error); `scratch`: a float64 array as long. x = m 2^e with m in
    [1, 2) read from the bits, then m halved (e + 1) above sqrt(2)."""
    bits = x.view(np.int64)
    mantissa = scratch.view(np.int64)
    for k in range(x.shape[0]):
        mantissa[k] = (bits[k] & _MANTISSA_BITS) | _EXPONENT_OF_ONE
    c = _ATANH_SERIES
    for k in range(x.shape[0]):
        m = scratch[k]
        exponent = float(((bits[k] >> 52) & 0x7FF) - 1023)
        high = m > _SQRT2
        m = m * 0.5 if high else m
        exponent = exponent + 1.0 if high else exponent
        s = (m - 1.0) / (m + 1.0)  # m - 1 is exact here
        s2 = s * s
        series = c[0] + s2 * (c[1] + s2 * (c[2] + s2 * (c[3] + s2 * (c[4] + s2 * (
            c[5] + s2 * (c[6] + s2 * (c[7] + s2 * (c[8] + s2 * c[9]))))))))
        out[k] = exponent * _LOG2 + 2.0 * s * series


EXP_INPUT_MIN = -708.0  # exp(-708) = 3.3e-308, still a normal float64
# x = q ln 2 + r with q an integer and |r| <= ln(2) / 2; ln 2 split in two so that q ln 2 is
# exact to float64 for |q| <= 1022 (Cody and Waite)
_LN2_HIGH = 6.93147180369123816490e-01
_LN2_LOW = 1.90821492927058770002e-10
_INV_LN2 = 1.0 / math.log(2.0)
_ROUNDING_MAGIC = 6755399441055744.0  # 1.5 * 2**52: x + it keeps round(x) in the low mantissa bits
_ROUNDING_MAGIC_BITS = 0x4338000000000000  # its bits
# exp(r) = sum_j r^j / j! for |r| <= 0.3466: the terms after j = 13 are below 5e-18
_EXP_SERIES = tuple(1.0 / math.factorial(j) for j in range(14))


@numba.njit(cache=True, inline="always", fastmath=FASTMATH_NO_REASSOC)
def exp_nonpositive(x, scratch, out):  # pragma: no cover - numba
    """out = exp(x) for 1-D contiguous float64 `x` in [EXP_INPUT_MIN, 0] (anything else gives
    garbage); `scratch`: a float64 array as long. exp(x) = 2^q exp(r), q = round(x / ln 2)
    read from the bits of x / ln 2 + 1.5 * 2^52, 2^q built from its bits. Callers compile
    with ``FASTMATH_NO_REASSOC``."""
    power = scratch.view(np.int64)
    c = _EXP_SERIES
    for k in range(x.shape[0]):
        shifted = x[k] * _INV_LN2 + _ROUNDING_MAGIC
        q = shifted - _ROUNDING_MAGIC  # round(x / ln 2), exactly
        scratch[k] = shifted
        r = (x[k] - q * _LN2_HIGH) - q * _LN2_LOW
        out[k] = c[0] + r * (c[1] + r * (c[2] + r * (c[3] + r * (c[4] + r * (c[5] + r * (c[6] + r * (
            c[7] + r * (c[8] + r * (c[9] + r * (c[10] + r * (c[11] + r * (c[12] + r * c[13]))))))))))))
    for k in range(x.shape[0]):
        power[k] = (power[k] - _ROUNDING_MAGIC_BITS + 1023) << 52  # the bits of 2^q, q in [-1022, 0]
    for k in range(x.shape[0]):
        out[k] *= scratch[k]
