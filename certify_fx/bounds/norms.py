"""Sound upper bounds on the operator norms of linear layers.

Power iteration (:mod:`.power_iteration`) converges to ``||A||`` from below, so it is only an
*estimate*. A certificate rests on the upper bounds here:

* dense ``W``: the exact largest singular value, in float64, times ``1 + SAFETY``;
* convolutions: the linear (zero-padded) convolution is a restriction of a circular convolution
  on a large enough canvas, whose singular values are exactly those of the per-frequency matrices
  of the kernel's 2-D DFT (Sedghi et al., 2019). Strides are removed first by an orthogonal
  space-to-depth rearrangement of the (padded) input, which turns a stride-``s`` conv into a
  stride-1 "valid" conv with ``s*s`` times as many input channels; a conv whose kernel equals its
  stride then has a single frequency and its norm is that of the reshaped kernel, exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "SAFETY",
    "NormBound",
    "dense_norm_bound",
    "conv2d_norm_bound",
    "conv2d_adjoint",
    "frequency_response_norm_bound",
    "largest_singular_value",
    "reference_bounds",
    "structured_bounds",
]

# Relative slack on every computed norm; float64 SVD/FFT round-off is ~1e-13, so this is generous.
SAFETY = 1e-6
# Largest number of complex matrix entries handled in one batch of per-frequency eigenproblems.
_CHUNK_ENTRIES = 2**23
# Largest number of complex entries of per-frequency Gram matrices kept between the ranking and
# the proof (2 GiB); above it they are assembled twice.
_KEPT_ENTRIES = 2**27
_REFERENCE = False
# Relative slack on a proven eigenvalue threshold (5e-8 on a norm, against SAFETY's 1e-6).
_THRESHOLD_SLACK = 1e-7


def structured_bounds() -> bool:
    """Whether bounds may use structure (channel factors, kept Gram matrices): False inside
    :func:`reference_bounds`."""
    return not _REFERENCE


@contextlib.contextmanager
def reference_bounds() -> Iterator[None]:
    """Bound every conv from its full kernel, as before structure was used (the reference the
    tests and ``benchmarks/bound_speed.py`` compare against); same values up to float64 round-off."""
    global _REFERENCE
    saved, _REFERENCE = _REFERENCE, True
    try:
        yield
    finally:
        _REFERENCE = saved


@dataclass(frozen=True)
class NormBound:
    """An upper bound on an operator norm and how it was obtained.

    ``sound`` is True only when ``value`` is a proven upper bound (not an estimate).
    """

    value: float
    sound: bool
    method: str

    def __mul__(self, other: "NormBound") -> "NormBound":
        return NormBound(self.value * other.value, self.sound and other.sound, _join(self.method, other.method, "*"))

    def __add__(self, other: "NormBound") -> "NormBound":
        return NormBound(self.value + other.value, self.sound and other.sound, _join(self.method, other.method, "+"))


def _join(a: str, b: str, sep: str) -> str:
    if a == b or not b or b == "exact":
        return a
    if not a or a == "exact":
        return b
    return f"{a}{sep}{b}"


def exact(value: float) -> NormBound:
    """A norm known in closed form (reshapes, selections, averaging, scalings)."""
    return NormBound(float(value), True, "exact")


def largest_singular_value(matrices: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a batch (..., m, n), via the smaller Gram matrix;
    inf for a batch holding a NaN/inf (eigh would fail on it; nothing is proven either way)."""
    if not bool(torch.isfinite(matrices).all()):
        return torch.full(matrices.shape[:-2], math.inf, dtype=matrices.real.dtype, device=matrices.device)
    m, n = matrices.shape[-2:]
    gram = matrices @ matrices.mH if m <= n else matrices.mH @ matrices
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


@torch.no_grad()
def dense_norm_bound(weight: torch.Tensor) -> NormBound:
    """Sound bound on ``||W||_2`` for a dense (out, in) matrix: exact in float64, plus slack.

    The largest eigenvalue of the smaller Gram matrix (2-4x faster than an SVD from 1k rows on;
    its float64 round-off, about ``n u`` relative, is far inside :data:`SAFETY`)."""
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    if w.numel() == 0:
        return NormBound(0.0, True, "svd")
    sigma = largest_singular_value(w).item() if structured_bounds() else torch.linalg.matrix_norm(w, ord=2).item()
    return NormBound(sigma * (1 + SAFETY), True, "svd")


@torch.no_grad()
def frequency_response_norm_bound(response: torch.Tensor) -> NormBound:
    """Sound bound on the norm of a circular convolution given by its frequency response
    ``(..., c_out, c_in)`` (one matrix per frequency): the largest singular value over the
    frequencies, exact in float64, plus slack (a circular convolution is block-diagonalised by the
    unitary DFT, so its norm is the largest norm of a block)."""
    w = response.detach().to(torch.complex128).reshape(-1, *response.shape[-2:])
    if w.numel() == 0:
        return NormBound(0.0, True, "fft")
    return NormBound(largest_singular_value(w).max().item() * (1 + SAFETY), True, "fft")


def _axis_plan(n: int, pad_lo: int, pad_hi: int, k_eff: int, stride: int) -> tuple[int, int, int]:
    """Per spatial axis: (input length after cropping, canvas size, phase count) for the DFT bound."""
    # Negative padding crops the input; cropping has norm <= 1, so bound the conv on the cropped input.
    n = n + min(pad_lo, 0) + min(pad_hi, 0)
    pad_lo, pad_hi = max(pad_lo, 0), max(pad_hi, 0)
    if stride == 1:
        # Reads that fall outside [0, n) wrap into the zero region [n, canvas) iff canvas >= n + max pad.
        return n, max(n + max(pad_lo, pad_hi), k_eff), 1
    padded = n + pad_lo + pad_hi
    return n, max(math.ceil(padded / stride), math.ceil(k_eff / stride)), stride


def _dilate(weight: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    if dilation == (1, 1):
        return weight
    o, c, kh, kw = weight.shape
    dh, dw = dilation
    out = weight.new_zeros(o, c, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    out[:, :, ::dh, ::dw] = weight
    return out


def _space_to_depth_kernel(weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Rearrange a stride-s kernel into the stride-1 kernel acting on the space-to-depth input."""
    sh, sw = stride
    o, c, kh, kw = weight.shape
    qh, qw = math.ceil(kh / sh), math.ceil(kw / sw)
    padded = F.pad(weight, (0, qw * sw - kw, 0, qh * sh - kh))
    # kernel tap (q*s + r) reads phase r of input block q
    return rearrange(padded, "o c (qh sh) (qw sw) -> o (c sh sw) qh qw", sh=sh, sw=sw)


@torch.no_grad()
def conv2d_norm_bound(
    weight: torch.Tensor,
    input_hw: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    at_least: float = 0.0,
) -> NormBound:
    """Sound upper bound on the l2 operator norm of a 2-D convolution with zero padding.

    Args:
        weight: kernel of shape (out_channels, in_channels // groups, kh, kw).
        input_hw: spatial size (H, W) of the input.
        stride, dilation: per axis.
        padding: zero padding (top, bottom, left, right); negative values crop.
        groups: the norm of a grouped conv is the maximum over its groups.
        at_least: a value the caller takes the maximum with anyway (the identity part of a reduced
            residual block): proving that the norm does not exceed it is enough, and cheaper
            than finding the norm.
    """
    w = _dilate(weight.detach().to(torch.float64), dilation)
    o, c_g, kh, kw = w.shape
    (_, mh, _), (_, mw, _) = (
        _axis_plan(input_hw[0], padding[0], padding[1], kh, stride[0]),
        _axis_plan(input_hw[1], padding[2], padding[3], kw, stride[1]),
    )
    w = _space_to_depth_kernel(w, stride)
    kh, kw = w.shape[-2:]
    w = w.reshape(groups, o // groups, w.shape[1], kh, kw)
    if kh == 1 and kw == 1:
        # a single frequency: the conv is a block-diagonal copy of one matrix, norm exact
        sigma = max(largest_singular_value(w[..., 0, 0]).max().item(), at_least)
        return NormBound(sigma * (1 + SAFETY), True, "svd")
    sigma = math.sqrt(_max_gram_eigenvalue_on_grid(w, mh, mw, at_least**2))
    return NormBound(sigma * (1 + SAFETY), True, "fft")


def _max_gram_eigenvalue_on_grid(w: torch.Tensor, mh: int, mw: int, at_least: float = 0.0) -> float:
    """``max`` over the ``mh x mw`` DFT grid and the groups of ``lambda_max(A(w) A(w)^H)``.

    ``w`` is (groups, out, in, kh, kw) in float64 and ``A(w) = sum_t W_t exp(-i w.t)``. The Gram
    matrix is a trigonometric polynomial in the tap lags ``d = t - t'``: its coefficients
    ``G_d = sum_{t - t' = d} W_t W_t'^T`` are computed once, so each frequency costs a small sum,
    not a matrix product. The maximum is then *proved*: exact eigenvalues at the few frequencies
    that power iteration ranks highest give a threshold ``T``, and a Cholesky factorisation of
    ``T I - G(w)`` succeeding at every other frequency proves ``G(w) <= T I`` there; frequencies
    where it fails get exact eigenvalues too.

    With ``at_least`` (the result is at least that), ``T = at_least`` is tried first: when every
    frequency passes, no eigenvalue is computed at all.
    """
    g, o, c, kh, kw = w.shape
    if mh * (mw // 2 + 1) * 8 < (kh * kw) ** 2:
        # few frequencies (small inputs): one Gram product per frequency is cheaper than the lags
        spectrum = torch.fft.rfft2(w, s=(mh, mw)).permute(0, 3, 4, 1, 2).reshape(-1, o, c)
        return max(at_least, *(largest_singular_value(m).max().item() ** 2 for m in spectrum.split(16)))
    taps = w.permute(0, 3, 4, 1, 2).reshape(g, kh * kw, o, c)
    if o > c:  # use the smaller Gram side: A^H A = sum W_t^T W_t' ...
        taps = taps.transpose(-1, -2)
    size = taps.shape[-2]
    offsets = [(t // kw, t % kw) for t in range(kh * kw)]
    lags: dict[tuple[int, int], torch.Tensor] = {}
    for a, (ya, xa) in enumerate(offsets):
        for b in range(a, len(offsets)):
            yb, xb = offsets[b]
            term = taps[:, a] @ taps[:, b].transpose(-1, -2)
            # the pair (b, a) contributes the transpose at the opposite lag
            for d, value in (((ya - yb, xa - xb), term), ((yb - ya, xb - xa), term.transpose(-1, -2))):
                lags[d] = lags[d] + value if d in lags else value
                if a == b:
                    break
    keys = list(lags)
    coeffs = torch.stack([lags[k] for k in keys], 1).reshape(g, len(keys), size * size).to(torch.complex128)
    # Real kernels: G(-w) is the conjugate of G(w), so half of the grid suffices.
    ky, kx = torch.meshgrid(torch.arange(mh), torch.arange(mw // 2 + 1), indexing="ij")
    # in float64 from the start: integer / int is float32, whose rounding moves the frequencies
    freqs = torch.stack([ky.flatten().double() / mh, kx.flatten().double() / mw], 1)
    dys = torch.tensor([k[0] for k in keys], dtype=torch.float64)
    dxs = torch.tensor([k[1] for k in keys], dtype=torch.float64)
    chunk = max(1, _CHUNK_ENTRIES // (g * size * size))

    def grams(index: torch.Tensor) -> torch.Tensor:
        f = freqs[index]
        phase = torch.exp(-2j * math.pi * (f[:, :1] * dys + f[:, 1:] * dxs))  # (F, lags)
        return (phase @ coeffs).reshape(g, -1, size, size)  # (g, F, size, size)

    kept = structured_bounds() and len(freqs) * g * size * size <= _KEPT_ENTRIES
    store = torch.empty(g, len(freqs), size, size, dtype=torch.complex128) if kept else None

    def batches(index: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for part in index.split(chunk):
            if store is None:
                yield part, grams(part)
            else:
                yield part, store[:, part]

    eye = torch.eye(size, dtype=torch.complex128)

    def proven(threshold: float, index: torch.Tensor) -> torch.Tensor:
        """The frequencies of ``index`` where ``G(w) <= T I`` is not proven by a Cholesky factorisation."""
        failed = []
        for part, gram in batches(index):
            _, info = torch.linalg.cholesky_ex(threshold * eye - gram)
            failed.append(part[(info != 0).any(0)])
        return torch.cat(failed)

    def exact(index: torch.Tensor) -> float:
        return max(torch.linalg.eigvalsh(gram)[..., -1].max().item() for _, gram in batches(index))

    everything = torch.arange(len(freqs))
    if store is not None:
        for index in everything.split(chunk):
            store[:, index] = grams(index)
        floor = at_least * (1 + _THRESHOLD_SLACK)
        if at_least > 0 and not len(proven(floor, everything)):
            return floor
    # 1. rank frequencies by a few power-iteration steps (Rayleigh quotients are lower bounds)
    scores = []
    for _, gram in batches(everything):
        v = torch.ones(*gram.shape[:-1], 1, dtype=gram.dtype)
        for _ in range(6 if store is not None else 12):  # kept: the proof corrects a wrong rank cheaply
            v = gram @ v
            v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-300)
        scores.append((v.mH @ gram @ v).real[..., 0, 0].amax(0))
    order = torch.cat(scores).argsort(descending=True)

    # 2. exact eigenvalues at the top-ranked frequencies give a threshold T (with a relative slack
    #    of 1e-7, so that the many near-equal maxima of an almost orthogonal conv pass at once)
    structured = structured_bounds()
    top = 1 if store is not None else 4
    slack = _THRESHOLD_SLACK if structured else 1e-9
    threshold = max(exact(order[:top]), at_least) * (1 + slack) + 1e-300
    # 3. in rank order, prove G(w) <= T I by Cholesky; where that fails, the highest-ranked failure
    #    gets an exact eigenvalue that raises T, and the other failures are tried again against it
    #    (a frequency that passed a lower T passes the final one too); the reference decomposes
    #    every failure, as before
    for index in order[top:].split(chunk):
        failed = proven(threshold, index)
        while len(failed):
            worst = failed[:1] if structured else failed
            threshold = max(threshold, exact(worst) * (1 + slack))
            failed = proven(threshold, failed[len(worst):])
    return threshold


def conv2d_adjoint(
    y: torch.Tensor,
    weight: torch.Tensor,
    input_hw: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Adjoint of ``conv2d(pad(x, padding), weight, stride, dilation, groups)`` applied to ``y``.

    ``output_padding`` restores the full padded size, which a strided conv would otherwise lose.
    """
    top, bottom, left, right = padding
    padded = (input_hw[0] + top + bottom, input_hw[1] + left + right)
    kh, kw = weight.shape[-2:]
    output_padding = tuple(
        p - ((n - 1) * s + d * (k - 1) + 1)
        for p, n, s, d, k in zip(padded, y.shape[-2:], stride, dilation, (kh, kw))
    )
    x = F.conv_transpose2d(y, weight, stride=stride, dilation=dilation, groups=groups, output_padding=output_padding)
    return F.pad(x, (-left, -right, -top, -bottom))
