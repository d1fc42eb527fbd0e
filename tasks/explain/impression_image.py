"""The image a class impression optimises: its prior, its random transformations, its parameterisation.

- :func:`total_variation`, the smoothness prior (Mahendran & Vedaldi 2015)::

      TV_beta(x) = mean_{c,i,j} ( (x_{c,i+1,j} - x_{c,i,j})^2 + (x_{c,i,j+1} - x_{c,i,j})^2 )^(beta/2)

- :func:`transform`, the random transformation T_t,k of each image between iterations: a
  per-channel RGB shift, then ONE batched affine resampling (:func:`affine_matrices`)
  composing the random crop, the rotation, the zoom and the jitter;
- :class:`Parameterised`, what Adam optimises: the pixels, or a 1/f-scaled Fourier spectrum
  through a sigmoid (:func:`fourier_scale`; Olah et al. 2017)::

      x_k = sigmoid( irfft2( s(f) * theta_k ) ),   s(f) = 1 / max(|f|, 1/S)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visaudit.tasks.explain.impression_settings import ImpressionSettings


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """TV_beta of each image of a (N, C, H, W) batch, as a per-pixel mean: (N,).

    TV_beta(x) = mean_{c,i,j} (dy^2 + dx^2)^(beta/2), with dy, dx the forward differences
    (the last row/column, which has no neighbour, contributes its one difference).
    """
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    if beta == 2.0:  # the sum splits: no padding, no per-pixel combination (the hot path)
        return (dy.pow(2).sum(dim=(1, 2, 3)) + dx.pow(2).sum(dim=(1, 2, 3))) / x[0].numel()
    squared = F.pad(dy, (0, 0, 0, 1)).pow(2) + F.pad(dx, (0, 1, 0, 0)).pow(2)
    return (squared + 1e-8).pow(beta / 2).mean(dim=(1, 2, 3))


def transform_draws(settings: ImpressionSettings, k: int, generator: torch.Generator) -> torch.Tensor:
    """All transformation draws of the run, (iterations, K, 10) uniform in [0, 1), drawn up front
    on the CPU so that a seed fixes them whatever the device, and moved with a single transfer."""
    return torch.rand((settings.iterations, k, 10), generator=generator)


def affine_matrices(u: torch.Tensor, settings: ImpressionSettings) -> torch.Tensor:
    """(K, 2, 3) ``affine_grid`` matrices (output -> input, normalised coordinates) from uniform draws.

    An output point p maps to the input point  f R(theta) p / s + c + t : zoom s, rotation
    theta, crop of side f (the crop is resized to the full image) centred at c, jitter t.
    """
    size = settings.image_size
    lo, hi = settings.scale
    theta = (2 * u[:, 0] - 1) * math.radians(settings.rotation)
    zoom = lo + (hi - lo) * u[:, 1]
    frac = settings.crop_fraction + (1 - settings.crop_fraction) * u[:, 2]
    cx, cy = (2 * u[:, 3] - 1) * (1 - frac), (2 * u[:, 4] - 1) * (1 - frac)
    shift = 2 * settings.jitter / size  # pixels -> normalised units (the image spans 2)
    tx, ty = (2 * u[:, 5] - 1) * shift, (2 * u[:, 6] - 1) * shift
    a = frac / zoom
    cos, sin = torch.cos(theta) * a, torch.sin(theta) * a
    row0 = torch.stack([cos, -sin, cx + tx], dim=1)
    row1 = torch.stack([sin, cos, cy + ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def transform(x: torch.Tensor, u: torch.Tensor, settings: ImpressionSettings, mean: torch.Tensor,
              std: torch.Tensor) -> torch.Tensor:
    """Random transformation of the whole batch, then normalisation: pixels (K,3,S,S) -> model input.

    RGB shift per image and channel, normalise, then one batched affine resampling; the
    zero padding of the normalised tensor is the model's mean colour.
    """
    shift = (2 * u[:, 7:10] - 1)[:, :, None, None] * settings.rgb_jitter
    z = (x + shift.to(x.dtype) - mean) / std
    if not settings.has_geometry:
        return z
    grid = F.affine_grid(affine_matrices(u, settings).to(x.dtype), list(z.shape), align_corners=False)
    return F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fourier_scale(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(S, S//2 + 1) spectrum scale 1 / max(|f|, 1/S) of the Fourier parameterisation (Lucent's, decay 1)."""
    fy = torch.fft.fftfreq(size, device=device)[:, None]
    fx = torch.fft.rfftfreq(size, device=device)[None, :]
    return 1.0 / torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / size)


class Parameterised:
    """The optimised tensor and the pixels it stands for.

    pixel:    x = theta, clamped to [0, 1] after every step.
    fourier:  x = sigmoid( irfft2( s(f) * theta ) ), theta the (K, 3, S, S//2+1) complex spectrum
              (stored as real/imaginary pairs), s(f) = 1 / max(|f|, 1/S) (Olah et al. 2017; Lucent);
              Adam steps of equal size on every coefficient then move low frequencies most.
              theta starts at rfft2(logit(x0)) / s, so both start from the same noise image x0.
    """

    def __init__(self, start: torch.Tensor, kind: str) -> None:
        self.kind = kind
        if kind == "pixel":
            self.parameter = start.clone().requires_grad_(True)
        else:
            size = start.shape[-1]
            self.scale = fourier_scale(size, start.device)
            spectrum = torch.fft.rfft2(torch.logit(start, eps=1e-3), norm="ortho") / self.scale
            self.parameter = torch.view_as_real(spectrum).contiguous().requires_grad_(True)

    def pixels(self) -> torch.Tensor:
        """The (K, 3, S, S) images in [0, 1] that the parameter stands for (part of the graph)."""
        if self.kind == "pixel":
            return self.parameter
        size = self.parameter.shape[-3]
        spectrum = torch.view_as_complex(self.parameter) * self.scale
        return torch.sigmoid(torch.fft.irfft2(spectrum, s=(size, size), norm="ortho"))

    def project(self) -> None:
        """After a step: clamp pixels to [0, 1] (the Fourier images are in range by construction)."""
        if self.kind == "pixel":
            self.parameter.clamp_(0, 1)
