"""PyTorch's CPU random generator in NumPy: ``torch.randn``/``torch.rand`` with a seeded
``torch.Generator("cpu")``, reproduced without importing torch.

diffusers draws the initial latents, VAE latent samples, img2img noise and the per-step
noise of stochastic samplers from one CPU generator in sequence;
``TorchGenerator(seed)`` continues that stream call for call, so a seed gives the image
diffusers gives for the same seed.

What torch does (ATen, torch 2.13; the facts below were checked against torch itself):

* Engine: MT19937 (``aten/src/ATen/core/MT19937RNGEngine.h``), seeded by the reference
  ``init_genrand`` loop from the seed's low 32 bits only (seeds 5 and 2**32 + 5 give
  one stream).  NumPy's ``MT19937`` with that key and ``pos=624`` yields the same
  32-bit words from ``random_raw``.
* Uniforms (``TransformationHelper.h`` ``uniform_real``): a float32 takes the low 24
  bits of one word times 2**-24; a float64 the low 53 bits of ``(w0 << 32) | w1``
  (the first word is the high half) times 2**-53.  float16 ``rand`` rounds the float32
  uniform and maps a rounded-up 1 to 0.
* ``randn`` (``native/cpu/DistributionTemplates.h``, ``normal_kernel``):

  - >= 16 elements: fill the tensor with uniforms, then Box-Muller on each block of
    16 (``u1 = 1 - d[j]``, ``u2 = d[j + 8]``, ``d[j] = r cos``, ``d[j + 8] = r sin``);
    when the size is not a multiple of 16, the last 16 elements are refilled with 16
    fresh uniforms and transformed again (so n + 16 words are drawn).  float16 draws
    only the full blocks plus that tail block.
  - < 16 elements: ``normal_distribution<double>`` per element, which draws two double
    uniforms, returns ``r cos`` and caches ``r sin`` *in the generator*: the next
    small call (not a >= 16 one, which neither reads nor clears it) starts with it.

* Two Box-Muller kernels for float32 blocks.  ``NormalFill16<float>`` under
  ``CPU_CAPABILITY_AVX2`` uses ``log256_ps``/``sincos256_ps`` from
  ``native/cpu/avx_mathfun.h`` (Cephes polynomials in float32; GCC contracts their
  multiply-adds into FMAs).  x86-64 machines with AVX2 *and* those with AVX-512 run it:
  ``normal_stub`` registers no AVX-512 kernel, so dispatch falls back to AVX2 (on the
  AVX-512 machine this was measured on, the default output equals
  ``ATEN_CPU_CAPABILITY=avx2`` bit for bit).  ``ATEN_CPU_CAPABILITY=default`` and
  non-x86 builds run the scalar kernel: libm ``logf``/``cosf``/``sinf``.

This module ports the AVX2 kernel operation by operation, FMAs included (an exact
float32 FMA is emulated through float64), and approximates the scalar kernel with
float64 log/cos/sin rounded to float32 (correctly rounded; glibc's ``logf``, ``cosf``,
``sinf``, which the scalar kernel calls, are not always).  Measured against torch 2.13
on an AMD EPYC with AVX-512 and glibc 2.36, float32, seeds 0 and 1234, 18.1 M samples
per seed (one 2**24 draw, then 40 x ((2, 4, 64, 64), 1007)):

* ``BoxMullerKernel.AVX2`` vs torch's AVX2 kernel (the default here): bit-exact,
  0 values differ.
* ``BoxMullerKernel.SCALAR`` vs torch's scalar kernel (``ATEN_CPU_CAPABILITY=default``):
  1.5 % differ, max abs 4.8e-7, max 3 ulp.
* Across kernels (either port vs the other kernel, as torch's two kernels differ from
  each other): 38.5 % differ, max abs 2.5e-6.  Cephes sin/cos are accurate in absolute,
  not relative, terms, so in ulp that is unbounded near zero (14062 ulp at
  |x| >= 1e-3, 42 ulp at |x| >= 0.5).

Beyond the streams, the AVX2 Box-Muller block is bit-exact for every one of the 2**24
float32 values of u1 (u2 = 0) and of u2 (at a u1 giving radius 1), fed to torch
through its generator state.  Also measured:

* < 16 elements (float64 Box-Muller, rounded to float32): 0 differ in 0.8 M samples
  drawn in calls of 1 to 15 elements (the cached sample included).
* float16 ``randn`` and float32/float64/float16 ``rand``: bit-exact.
* float64 ``randn``: NumPy's float64 log/cos/sin are not glibc's; max 2 ulp
  (4.4e-16 abs) in 6.6 M samples.

Speed: a (1, 4, 128, 128) float32 ``randn`` takes 2.6 to 3.3 ms (one core, AMD EPYC).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["BoxMullerKernel", "TorchGenerator"]

_MT_N = 624
_SEED_LIMIT = 1 << 64
_F32_MASK = (1 << 24) - 1   # std::numeric_limits<float>::digits
_F64_MASK = (1 << 53) - 1   # std::numeric_limits<double>::digits
_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


class BoxMullerKernel(enum.Enum):
    """Which of torch's float32 Box-Muller kernels (blocks of >= 16 elements) to match."""

    AVX2 = "avx2"      # x86-64 with AVX2 or AVX-512: torch's default on such machines
    SCALAR = "scalar"  # ATEN_CPU_CAPABILITY=default and non-x86 builds (measured on glibc only)


def _mt19937_key(seed: int) -> np.ndarray:
    """MT19937 ``init_genrand``: at::mt19937_engine keeps only the low 32 bits."""
    key = np.empty(_MT_N, dtype=np.uint32)
    s = seed & 0xFFFFFFFF
    key[0] = s
    for j in range(1, _MT_N):
        s = (1812433253 * (s ^ (s >> 30)) + j) & 0xFFFFFFFF
        key[j] = s
    return key


# ---- float32 arithmetic of avx_mathfun.h -------------------------------------------------
# Which multiply-adds GCC fused into FMAs is not in the source; the choices below are the
# ones that match torch bit for bit (with none fused, 1 % of values differ, by <= 2.4e-7).

def _fma(a: np.ndarray, b, c) -> np.ndarray:
    """float32 fma(a, b, c), rounded once like vfmadd.

    a*b is exact in float64 (24 + 24 bits < 53), so only the add rounds before the final
    rounding to float32.  That double rounding can differ from one rounding only when the
    float64 sum lands exactly on a float32 rounding tie (the 29 dropped bits are
    1000...0) and was itself inexact; those rare lanes are nudged toward the exact sum.
    Valid for results in float32's normal range, which every fma here stays in.
    """
    p = a.astype(np.float64) * b
    s = p + c
    tie = (s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    if tie.any():
        pt, st = p[tie], s[tie]
        ct = np.broadcast_to(np.asarray(c, dtype=np.float64), s.shape)[tie]
        bb = st - pt
        err = (pt - (st - bb)) + (ct - bb)        # TwoSum: s + err == p + c exactly
        s[tie] = np.where(err == 0, st, np.nextafter(st, np.copysign(np.inf, err)))
    return s.astype(np.float32)


_f = np.float32
# log256_ps: Cephes logf
_SQRTHF = _f(0.707106781186547524)
_LOG_P = tuple(_f(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LOG_Q1 = _f(-2.12194440e-4)
_LOG_Q2 = _f(0.693359375)
# sincos256_ps: Cephes sinf/cosf
_FOPI = _f(1.27323954473516)   # 4 / pi
_MINUS_DP = (_f(-0.78515625), _f(-2.4187564849853515625e-4), _f(-3.77489497744594108e-8))
_COSCOF = (_f(2.443315711809948e-005), _f(-1.388731625493765e-003), _f(4.166664568298827e-002))
_SINCOF = (_f(-1.9515295891e-4), _f(8.3321608736e-3), _f(-1.6666654611e-1))
_TWO_PI_F32 = _f(2.0 * np.pi)   # _mm256_set1_ps(2.0f * c10::pi<double>)


def _log256(x: np.ndarray) -> np.ndarray:
    """log256_ps for x in (0, 1] (u1 = 1 - u is never 0, never denormal)."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 127).astype(np.float32) + _f(1)
    x = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(np.float32)  # mantissa in [0.5, 1)
    small = x < _SQRTHF
    e = e - small.astype(np.float32)
    x = (x - _f(1)) + np.where(small, x, _f(0))     # x + x - 1 or x - 1, as two float adds
    z = x * x
    y = _fma(np.full_like(x, _LOG_P[0]), x, _LOG_P[1])
    for p in _LOG_P[2:]:
        y = _fma(y, x, p)
    y = y * x
    y = _fma(y, z, e * _LOG_Q1)      # GCC fuses y*z into the add of e*q1
    y = y - z * _f(0.5)              # z*0.5 is exact: fused or not, one rounding
    return (x + y) + e * _LOG_Q2     # e*q2 is exact (q2 = 355/512, |e| <= 24)


def _sincos256(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for x >= 0 (theta = 2*pi*u2)."""
    j = (x * _FOPI).astype(np.int32)          # cvttps: truncation
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    for dp in _MINUS_DP:                       # x = ((x - y*DP1) - y*DP2) - y*DP3, fused
        x = _fma(y, dp, x)
    z = x * x
    yc = _fma(_fma(np.full_like(x, _COSCOF[0]), z, _COSCOF[1]), z, _COSCOF[2])
    yc = _fma(yc * z, z, -(z * _f(0.5))) + _f(1)
    ys = _fma(_fma(np.full_like(x, _SINCOF[0]), z, _SINCOF[1]), z, _SINCOF[2])
    ys = _fma(ys * z, x, x)
    first = (j & 2) == 0                       # polynomial selection mask
    sin = np.where(first, ys, yc)
    cos = np.where(first, yc, ys)
    np.negative(sin, out=sin, where=(j & 4) != 0)
    np.negative(cos, out=cos, where=(~(j - 2) & 4) != 0)
    return sin, cos


def _box_muller_avx2(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(_f(-2) * _log256(u1))
    sin, cos = _sincos256(_TWO_PI_F32 * u2)
    # _mm256_fmadd_ps(n, std=1, mean=0) is exact but turns -0 into +0; so does "+ 0".
    return radius * cos + _f(0), radius * sin + _f(0)


def _box_muller_scalar(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # NormalFill16<float>: float logf/cosf/sinf; theta = 2*pi (double) * u2, rounded to float.
    radius = np.sqrt(_f(-2) * np.log(u1.astype(np.float64)).astype(np.float32))
    theta = (2.0 * np.pi * u2.astype(np.float64)).astype(np.float32).astype(np.float64)
    return (radius * np.cos(theta).astype(np.float32) + _f(0),
            radius * np.sin(theta).astype(np.float32) + _f(0))


def _box_muller_f64(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    return radius * np.cos(theta) + 0.0, radius * np.sin(theta) + 0.0


_ROWS_PER_CHUNK = 1024   # 8192 pairs: float64 temporaries of 64 KiB stay in cache and in
                         # malloc's heap (larger ones are mmap'ed and page-faulted per op)


def _normal_fill_16(data: np.ndarray, box_muller) -> None:
    """In place on rows of 16 uniforms: u1 = 1 - d[:8], u2 = d[8:]."""
    one = data.dtype.type(1)
    for i in range(0, data.shape[0], _ROWS_PER_CHUNK):
        rows = data[i:i + _ROWS_PER_CHUNK]
        rows[:, :8], rows[:, 8:] = box_muller(one - rows[:, :8], rows[:, 8:])


# ---- the generator ----------------------------------------------------------------------

class TorchGenerator:
    """``torch.Generator("cpu").manual_seed(seed)`` and its ``randn``/``rand`` in NumPy.

    Successive calls continue one stream as successive torch calls on one generator do.
    ``kernel`` picks the float32 Box-Muller kernel to match (see the module docstring);
    the default matches torch on x86-64 machines with AVX2 or AVX-512.
    """

    def __init__(self, seed: int, kernel: BoxMullerKernel = BoxMullerKernel.AVX2):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__} {seed!r}")
        seed = int(seed)
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if not isinstance(kernel, BoxMullerKernel):
            raise TypeError(f"kernel must be a BoxMullerKernel ({', '.join(k.name for k in BoxMullerKernel)}), "
                            f"got {kernel!r}")
        self.seed = seed
        self.kernel = kernel
        self._box_muller = _box_muller_avx2 if kernel is BoxMullerKernel.AVX2 else _box_muller_scalar
        self._bitgen = np.random.MT19937()
        self._bitgen.state = {"bit_generator": "MT19937",
                              "state": {"key": _mt19937_key(seed), "pos": _MT_N}}
        # CPUGeneratorImpl::next_double_normal_sample_: the r*sin half of the last pair
        # drawn by the < 16 element path, returned first by the next such draw.
        self._next_double_normal: float | None = None

    def __repr__(self) -> str:
        return f"TorchGenerator(seed={self.seed}, kernel={self.kernel.name})"

    # -- raw draws --

    def _words(self, n: int) -> np.ndarray:
        return self._bitgen.random_raw(n)          # uint64 holding 32-bit words

    def _uniform(self, n: int, dtype: np.dtype) -> np.ndarray:
        """at::uniform_real_distribution<T>(0, 1): n draws."""
        if dtype == np.float64:
            w = self._words(2 * n)
            bits = ((w[0::2] << np.uint64(32)) | w[1::2]) & np.uint64(_F64_MASK)
            return bits.astype(np.float64) * 2.0 ** -53
        return (self._words(n) & np.uint64(_F32_MASK)).astype(np.float32) * _f(2.0 ** -24)

    def _normal_double(self, n: int) -> np.ndarray:
        """n draws of at::normal_distribution<double>(0, 1), with the generator's cache."""
        out = np.empty(n, dtype=np.float64)
        k = 0
        if n and self._next_double_normal is not None:
            out[0] = self._next_double_normal
            self._next_double_normal = None
            k = 1
        pairs = (n - k + 1) // 2
        if pairs:
            u = self._uniform(2 * pairs, np.dtype(np.float64))
            u1, u2 = u[0::2], u[1::2]               # u1 -> angle, u2 -> radius
            radius = np.sqrt(-2.0 * np.log1p(-u2))
            theta = 2.0 * np.pi * u1
            both = np.empty(2 * pairs, dtype=np.float64)
            both[0::2] = radius * np.cos(theta)
            both[1::2] = radius * np.sin(theta)
            out[k:] = both[: n - k]
            if (n - k) % 2:
                self._next_double_normal = float(both[-1])
        return out

    # -- public draws --

    def randn(self, shape: int | Sequence[int], dtype=np.float32) -> np.ndarray:
        """``torch.randn(shape, generator=g, dtype=dtype)`` on the CPU, as a NumPy array.

        float32 is bit-exact for the kernel chosen at construction; float16 follows
        torch's float16 path (Box-Muller in float32, then rounding); float64 is within
        an ulp or two of float64 (NumPy's libm is not glibc's).
        """
        shape, n = _check_shape(shape)
        dtype = _check_dtype(dtype)
        if n < 16:
            x = self._normal_double(n)
            # static_cast<scalar_t>(double): c10::Half goes through float first.
            return (x.astype(np.float32) if dtype == np.float16 else x).astype(dtype).reshape(shape)
        if dtype == np.float16:
            return self._randn_f16(n).reshape(shape)
        box_muller = _box_muller_f64 if dtype == np.float64 else self._box_muller
        data = self._uniform(n, dtype)
        full = n // 16 * 16
        _normal_fill_16(data[:full].reshape(-1, 16), box_muller)
        if n % 16:
            # torch refills the last 16 (overlapping the last full block) and transforms again
            tail = self._uniform(16, dtype).reshape(1, 16)
            _normal_fill_16(tail, box_muller)
            data[n - 16:] = tail.reshape(16)
        return data.reshape(shape)

    def _randn_f16(self, n: int) -> np.ndarray:
        # Reduced-precision path: each block's 16 uniforms in float (opmath), no uniforms
        # for the partial block, then a fresh tail block written over the last 16.
        out = np.empty(n, dtype=np.float16)
        full = n // 16 * 16
        blocks = self._uniform(full, np.dtype(np.float32)).reshape(-1, 16)
        _normal_fill_16(blocks, self._box_muller)
        out[:full] = blocks.reshape(-1)
        if n % 16:
            tail = self._uniform(16, np.dtype(np.float32)).reshape(1, 16)
            _normal_fill_16(tail, self._box_muller)
            out[n - 16:] = tail.reshape(16)
        return out

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        """Alias of :meth:`randn`, duck-compatible with ``numpy.random.Generator.standard_normal``."""
        return self.randn(size, dtype)

    def rand(self, shape: int | Sequence[int], dtype=np.float32) -> np.ndarray:
        """``torch.rand(shape, generator=g, dtype=dtype)`` on the CPU: uniforms in [0, 1), exact."""
        shape, n = _check_shape(shape)
        dtype = _check_dtype(dtype)
        if dtype != np.float16:
            return self._uniform(n, dtype).reshape(shape)
        # uniform_kernel draws float16 in float (opmath) and rounds; a value that rounds
        # up to 1 becomes 0, keeping [0, 1).
        x = self._uniform(n, np.dtype(np.float32)).astype(np.float16)
        x[x == 1] = 0
        return x.reshape(shape)


def _check_shape(shape) -> tuple[tuple[int, ...], int]:
    try:
        dims = (operator.index(shape),) if not isinstance(shape, Sequence) else tuple(map(operator.index, shape))
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have no negative dimension, got {dims}")
    return dims, int(np.prod(dims, dtype=np.int64))


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = None if dtype is None else np.dtype(dtype)   # np.dtype(None) would be float64
    except TypeError:
        dt = None
    if dt is None or dt not in _DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, float64, got {dtype!r}")
    return dt
