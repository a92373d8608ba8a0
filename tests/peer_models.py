"""Small stand-ins for networks as the public Lipschitz-network code bases write them.

Written for certify-fx's tests, not copied: each class uses the *patterns* of one code base
(hukkai/liresnet, SOC/Cayley/BCOP/LOT, SLL/CPL/AOL/Sandwich, deel-torchlip, orthogonium) that
symbolic tracing cannot follow or that have no module rule: Python loops over stacked weights,
branches on the input's shape or dtype, ``x.shape[0]`` in a constructor, einops on parameters,
weights computed by matrix solves or Björck iterations in ``forward``, MaxMin written with
``max``/``min`` or ``where``, and the input's FFT. ``NOMINAL`` gives the Lipschitz constant a
model's construction promises for its body (before the head), when it promises one.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (2, 6, 6)
CLASSES = 4


def _minmax_where(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.cat([torch.where(a > b, a, b), torch.where(a > b, b, a)], dim=1)


def _maxmin(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.cat([torch.max(a, b), torch.min(a, b)], dim=1)


def _groupsort2(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return x.reshape(n, -1, 2).sort(dim=-1)[0].reshape(x.shape)


class _Head(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], -1))


def _skew(w: torch.Tensor) -> torch.Tensor:
    return w - w.transpose(-1, -2)


def _cayley(w: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix from a square parameter: (I - A)(I + A)^-1 with A skew-symmetric."""
    a = _skew(w)
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.linalg.solve(eye + a, eye - a, left=False)


def _bjorck(w: torch.Tensor, steps: int = 25) -> torch.Tensor:
    w = w / torch.linalg.matrix_norm(w, ord=2)
    for _ in range(steps):
        w = 1.5 * w - 0.5 * w @ w.transpose(-1, -2) @ w
    return w


# -- LiResNet (hukkai/liresnet): stacked residual kernels, MinMax by where, shape branches --------------
class LiResNetStyle(nn.Module):
    def __init__(self, width: int = 4, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(SHAPE[0], width, 3, padding=1)
        self.kernels = nn.Parameter(torch.randn(depth, width, width, 3, 3) * 0.05)
        self.biases = nn.Parameter(torch.zeros(depth, width))
        self.head = _Head(width * SHAPE[1] * SHAPE[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.shape) == 3:
            x = x.unsqueeze(0)
        x = _minmax_where(self.stem(x))
        for kernel, bias in zip(self.kernels, self.biases):
            x = _minmax_where(x + F.conv2d(x, kernel, bias, padding=1))
        return self.head(x)


# -- SOC: skew-symmetric conv, its exponential by a Taylor series on the input --------------------------
class SOCStyle(nn.Module):
    nominal = 1.0

    def __init__(self, channels: int = 2, terms: int = 12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.1)
        self.terms = terms
        self.head = _Head(channels * SHAPE[1] * SHAPE[2])

    def _skew_kernel(self) -> torch.Tensor:
        w = self.weight
        return 0.5 * (w - w.transpose(0, 1).flip(2, 3))  # conv minus its adjoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        kernel = self._skew_kernel()
        out, term = x, x
        for i in range(1, self.terms):
            term = F.conv2d(term, kernel, padding=1) / i
            out = out + term
        return self.head(_maxmin(out))


# -- Cayley (Trockman & Kolter): a dense Cayley layer, and the FFT conv on the input --------------------
class CayleyDenseStyle(nn.Module):
    nominal = 1.0

    def __init__(self) -> None:
        super().__init__()
        features = math.prod(SHAPE)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(features, features) * 0.1) for _ in range(2)])
        self.head = _Head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for w in self.weights:
            x = _groupsort2(F.linear(x, _cayley(w)))
        return self.head(x)


class CayleyFFTStyle(nn.Module):
    """An orthogonal conv applied in the Fourier domain, the batch moved last for a batched matmul."""

    nominal = 1.0

    def __init__(self, channels: int = SHAPE[0]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.3)
        self.head = _Head(channels * SHAPE[1] * SHAPE[2])

    def _qfft(self, n: int) -> torch.Tensor:
        w = torch.fft.rfft2(self.weight, s=(n, n)).permute(2, 3, 0, 1)  # (n, n//2+1, cout, cin)
        a = w - w.conj().transpose(-1, -2)  # skew-Hermitian per frequency
        eye = torch.eye(a.shape[-1], dtype=a.dtype)
        return torch.linalg.solve(eye + a, eye - a)  # unitary per frequency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batches, cin, n, _ = x.shape
        xfft = torch.fft.rfft2(x).permute(2, 3, 1, 0).reshape(n * (n // 2 + 1), cin, batches)
        q = self._qfft(n).reshape(n * (n // 2 + 1), cin, cin)
        yfft = (q @ xfft).reshape(n, n // 2 + 1, cin, batches)
        y = torch.fft.irfft2(yfft.permute(3, 2, 0, 1), s=(n, n))
        return self.head(_maxmin(y))


class LOTStyle(nn.Module):
    """LOT (Xu et al.): per-frequency V (V^H V)^-1/2 by Newton-Schulz on the weights, applied with
    an einsum in the Fourier domain (the batch stays in front)."""

    nominal = 1.0

    def __init__(self, channels: int = SHAPE[0], steps: int = 30) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.3 + torch.eye(channels)[..., None, None])
        self.steps = steps
        self.head = _Head(channels * SHAPE[1] * SHAPE[2])

    def _qfft(self, n: int) -> torch.Tensor:
        v = torch.fft.rfft2(self.weight, s=(n, n)).permute(2, 3, 0, 1)  # (n, n//2+1, cout, cin)
        gram = v.conj().transpose(-1, -2) @ v
        scale = torch.linalg.matrix_norm(gram, ord="fro")[..., None, None]
        y, z = gram / scale, torch.eye(v.shape[-1], dtype=v.dtype).expand_as(gram)
        for _ in range(self.steps):  # y -> (G/s)^(1/2), z -> (G/s)^(-1/2)
            t = 0.5 * (3 * torch.eye(v.shape[-1], dtype=v.dtype) - z @ y)
            y, z = y @ t, t @ z
        return v @ z / scale.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        xfft = torch.fft.rfft2(x)
        yfft = torch.einsum("hwoi,bihw->bohw", self._qfft(n), xfft)
        return self.head(_groupsort2(torch.fft.irfft2(yfft, s=(n, n))))


class FFTAbsStyle(nn.Module):
    """The modulus of the input's spectrum: not a linear map of the input (refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _Head(SHAPE[0] * SHAPE[1] * (SHAPE[2] // 2 + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.rfft2(x).abs())


# -- BCOP: Björck-orthogonalised weights, circular padding ----------------------------------------------
class BCOPStyle(nn.Module):
    nominal = 1.0

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.pointwise = nn.Parameter(torch.randn(channels, channels))
        self.head = _Head(channels * SHAPE[1] * SHAPE[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _bjorck(self.pointwise)
        x = F.pad(x, (1, 1, 1, 1), mode="circular")
        x = F.conv2d(x, q[:, :, None, None])[:, :, 1:-1, 1:-1]  # an orthogonal 1x1 conv
        return self.head(_maxmin(x))


# -- AOL (Prach & Lampert): rescaling by the rows of |W^T W| computed in forward, einops --------------
class AOLStyle(nn.Module):
    nominal = 1.0

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3))
        self.head = _Head(channels * SHAPE[1] * SHAPE[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = einops.rearrange(w, "o i h w -> o (i h w)")
        # sum_j |W^T W|_ij for the conv: the full correlation of the kernel with itself
        ww = F.conv2d(w.transpose(0, 1), w.transpose(0, 1), padding=w.shape[-1] - 1).abs().sum((1, 2, 3))
        scale = ww.clamp_min(1e-12).rsqrt() * (flat.shape[1] > 0)
        x = F.conv2d(x, w * scale[None, :, None, None], padding=1)
        return self.head(_groupsort2(x))


# -- SLL (Araujo et al.): x - 2 W T^-1 relu(W^T x + b), T from |W^T W| and q -------------------------
class SLLStyle(nn.Module):
    nominal = 1.0

    def __init__(self, features: int = math.prod(SHAPE), hidden: int = 24, layers: int = 2) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(layers, hidden, features) * 0.2)
        self.biases = nn.Parameter(torch.zeros(layers, hidden))
        self.qs = nn.Parameter(torch.rand(layers, hidden) + 0.5)
        self.head = _Head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for w, b, q in zip(self.weights, self.biases, self.qs):
            t = (torch.abs(w @ w.T) * q[None, :] / q[:, None]).sum(1)
            x = x - 2 * F.linear(F.relu(F.linear(x, w, b)) / t, w.T)
        return self.head(x)


# -- CPL (Meunier et al.): x - 2/||W||^2 W relu(W^T x + b), ||W|| by power iteration in forward ---------
class CPLStyle(nn.Module):
    nominal = 1.0

    def __init__(self, features: int = math.prod(SHAPE), hidden: int = 24) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, features) * 0.2)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.register_buffer("u", F.normalize(torch.randn(features), dim=0))
        self.head = _Head(features)

    def _norm(self) -> torch.Tensor:
        u = self.u
        for _ in range(50):
            u = F.normalize(self.weight.T @ (self.weight @ u), dim=0)
        return (self.weight @ u).norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        scale = 2 / self._norm() ** 2
        return self.head(x - scale * F.linear(F.relu(F.linear(x, self.weight, self.bias)), self.weight.T))


# -- deel-torchlip: Frobenius-normalised linear, GroupSort2 by reshape/sort, scaled average pooling -----
class TorchlipStyle(nn.Module):
    nominal = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Parameter(torch.randn(4, SHAPE[0], 3, 3))
        self.head = _Head(4 * (SHAPE[1] // 2) * (SHAPE[2] // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv / (self.conv.norm() * 3)  # Frobenius norm times sqrt(k*k) bounds the conv's norm
        x = _groupsort2(F.conv2d(x, w, padding=1))
        return self.head(F.avg_pool2d(x, 2) * 2)  # a 2x2 average pool scaled by sqrt(4)


# -- orthogonium: MaxMin by torch.max/min, Cayley-orthogonal 1x1 conv with einops on the weight ---------
class OrthogoniumStyle(nn.Module):
    nominal = 1.0

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Parameter(torch.randn(channels, SHAPE[0], 1, 1))
        self.mix = nn.Parameter(torch.randn(2, channels, channels) * 0.3)
        self.head = _Head(channels * SHAPE[1] * SHAPE[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem / torch.linalg.matrix_norm(self.stem.flatten(1), ord=2)
        x = F.conv2d(x, stem)
        for w in self.mix:
            kernel = einops.rearrange(_cayley(w), "o i -> o i () ()")
            x = _maxmin(F.conv2d(x, kernel))
        return self.head(x)


# -- Sandwich (Wang & Manchester): sqrt(2) A Psi relu(sqrt(2) Psi^-1 B x + b), A and B blocks of one Cayley --
class SandwichStyle(nn.Module):
    def __init__(self, features: int = math.prod(SHAPE), hidden: int = 24) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features + hidden, features + hidden) * 0.1)
        self.psi = nn.Parameter(torch.rand(hidden) * 0.2)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.features = features
        self.head = _Head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        q = _cayley(self.weight)
        f = self.features
        a, b = q[:f, f:], q[f:, :f]
        h = F.relu(math.sqrt(2) * F.linear(x, torch.exp(-self.psi)[:, None] * b) + self.bias)
        return self.head(math.sqrt(2) * F.linear(h, a * torch.exp(self.psi)[None, :]))


# -- shape-driven Python: x.shape[0] in constructors, dim branches ------------------------------------
class ShapeBranchStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(SHAPE[0] + 1, 4, 3, padding=1)
        self.head = _Head(4 * SHAPE[1] * SHAPE[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, _, h, w = x.shape
        if x.dim() == 4 and h == w:
            x = torch.cat([x, torch.zeros(bs, 1, h, w, dtype=x.dtype)], dim=1)
        return self.head(F.relu(self.conv(x)))


STAND_INS = {
    "liresnet": LiResNetStyle, "soc": SOCStyle, "cayley_dense": CayleyDenseStyle, "bcop": BCOPStyle,
    "aol": AOLStyle, "sll": SLLStyle, "cpl": CPLStyle, "torchlip": TorchlipStyle, "orthogonium": OrthogoniumStyle,
    "sandwich": SandwichStyle, "shape_branch": ShapeBranchStyle, "cayley_fft": CayleyFFTStyle,
    "lot": LOTStyle,
}
#: stand-ins certify-fx refuses, each with the op its one-line refusal must name
REFUSED = {"fft_abs": (FFTAbsStyle, "rfft2")}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {**STAND_INS, **{k: v[0] for k, v in REFUSED.items()}}[name]().eval()


def head_rows(model: nn.Module) -> torch.Tensor:
    """``||w_i - w_j||`` of the head: the margin constant of a 1-Lipschitz body followed by it."""
    w = model.head.fc.weight.detach().double()
    return (w[:, None] - w[None, :]).norm(dim=-1)
