"""Block reflector orthogonal convolution (BRO; Lai et al., ICML 2025, "Enhancing Certified
Robustness via Block Reflector Orthogonal Layers and Logit Annealing Loss").

A block reflector ``W = I - 2 V (V^* V)^{-1} V^*`` is orthogonal and Hermitian for any full-rank
``V`` (``c x r``, ``r < c``): it fixes the orthogonal complement of ``V``'s range and negates the
range. BRO builds one per frequency from the discrete Fourier transform of a learnable ``k x k``
kernel ``V`` (``c`` output by ``r`` input channels), which makes the whole layer a circular
convolution whose frequency response is a reflector at every frequency, i.e. an orthogonal map. The
input is zero-padded by ``k // 2`` before the circular convolution and cropped after (both of norm
at most 1), so the layer is 1-Lipschitz with no series to truncate and no iteration.

With a ridge ``delta`` (``V^* V + delta I``, for rank-deficient ``V``) the eigenvalues become
``1 - 2 s^2 / (s^2 + delta)`` in ``(-1, 1]``: still at most 1 in norm. The bound compiler never
takes this on trust: its rule bounds the frequency response the forward computes, exactly per
frequency (:class:`certify_fx.bounds.operators.FourierConv2d`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BRO", "block_reflector"]


def block_reflector(v: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """``I - 2 V (V^* V + delta I)^{-1} V^*`` for a batch of ``(..., c, r)`` matrices (complex or
    real); ``delta = ridge * mean(diag(V^* V))`` per matrix, computed without gradient."""
    gram = v.mH @ v
    shift = gram.diagonal(dim1=-2, dim2=-1).real.mean(-1).detach().clamp_min(torch.finfo(v.real.dtype).tiny) * ridge
    eye_r = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    eye_c = torch.eye(v.shape[-2], dtype=v.dtype, device=v.device)
    return eye_c - 2 * v @ torch.linalg.solve(gram + shift[..., None, None] * eye_r, v.mH)


class BRO(nn.Module):
    """A ``channels -> channels`` orthogonal convolution: ``crop(IFFT(W(w) FFT(pad(x)))) + b`` with
    ``W(w)`` the block reflector of the kernel's transform at frequency ``w``.

    Args:
        channels: input and output channels.
        kernel_size: odd size of the kernel ``V`` (the padding is ``kernel_size // 2``).
        rank: ``r``, the input channels of ``V`` (the reflected subspace's dimension per frequency);
            ``channels // 2`` by default, as BRONet's ``mask_level=0.5``.
        bias: learn a per-channel bias.
        ridge: relative ridge of the per-frequency solve (see :func:`block_reflector`).
    """

    def __init__(self, channels: int, kernel_size: int = 3, rank: int | None = None, bias: bool = True,
                 ridge: float = 1e-5) -> None:
        super().__init__()
        rank = channels // 2 if rank is None else rank
        if kernel_size % 2 == 0:
            raise ValueError(f"BRO needs an odd kernel_size, got {kernel_size}")
        if not 1 <= rank < channels:
            raise ValueError(f"BRO's rank must be in [1, {channels - 1}], got {rank}")
        self.channels, self.kernel_size, self.rank, self.ridge = channels, kernel_size, rank, ridge
        weight = torch.zeros(channels, rank, kernel_size, kernel_size)
        # starts as the reflector of the first r channels (V the centre tap of a selection), as the authors' id_init
        weight[torch.arange(rank), torch.arange(rank), kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = nn.Parameter(weight + 0.01 * torch.randn_like(weight))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def frequency_response(self, height: int, width: int) -> torch.Tensor:
        """``(height, width // 2 + 1, channels, channels)`` complex: the reflector at each frequency of
        the ``height x width`` (padded) grid, as the forward applies it to the half spectrum."""
        v = torch.fft.rfft2(self.weight, (height, width))  # its scale does not change the reflector
        return block_reflector(v.permute(2, 3, 0, 1), self.ridge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        height, width = x.shape[-2] + 2 * p, x.shape[-1] + 2 * p
        response = self.frequency_response(height, width)
        y = apply_frequency_response(F.pad(x, (p, p, p, p)), response)[..., p:height - p, p:width - p]
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, rank={self.rank}, bias={self.bias is not None}"


def apply_frequency_response(x: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """The circular convolution of ``x`` (``(..., c_in, H, W)``, real) whose frequency response is
    ``response`` (``(H, W // 2 + 1, c_out, c_in)``): ``IFFT(response(w) FFT(x)(w))``."""
    size = x.shape[-2:]
    spectrum = torch.fft.rfft2(x, norm="ortho")
    mixed = torch.einsum("uvoi,...iuv->...ouv", response.to(spectrum.dtype), spectrum)
    return torch.fft.irfft2(mixed, s=size, norm="ortho")
