"""Peer methods run on the same images as the detector, for the benchmark (`cgdiff bench`).

- `PatchCore`: a PatchCore-style nearest-neighbour detector (Roth et al., CVPR 2022) on the
  detector's own pretrained backbone. Fit: patch features of the normal training images
  (stride-8 and stride-16 stages, each smoothed with the scorer's 3 x 3 local mean, the
  stride-16 one upsampled to stride 8 and concatenated) form a memory bank, optionally thinned
  by greedy coreset subsampling. Map: each test patch's distance to its nearest neighbour in
  the bank, upsampled to the image size and Gaussian-smoothed (sigma 4); score = max.
- `AnoDDPM`: plain partial-noise diffusion reconstruction (Wyatt et al., CVPRW 2022, with
  Gaussian noise): the same denoiser and the same sampler (`cgdiff.sampler.reconstruct`) with
  conditioning and blur guidance switched off (w = 0, s = 0); map = channel mean of
  |x_rec - y|, Gaussian-smoothed (sigma 4); score = max.

Both map a batch B x 3 x H x W in [-1, 1] to B x H x W anomaly maps (`maps`), like the
detector, and never look at test-set statistics.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .images import ImageLike, to_batch
from .sampler import SamplerConfig, gaussian_blur, reconstruct
from .scorer import FeatureExtractor

__all__ = ["PatchCore", "AnoDDPM", "greedy_coreset"]


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of `n` rows of `features` (N x D) chosen by greedy k-center selection (PatchCore's
    coreset), on a random projection to `projection_dim` dimensions for speed."""
    total = features.shape[0]
    if n >= total:
        return torch.arange(total)
    if n < 1:
        raise ValueError(f"a coreset needs at least one sample, got {n}.")
    g = torch.Generator().manual_seed(seed)
    f = features.float()
    if projection_dim and f.shape[1] > projection_dim:
        proj = torch.randn(f.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        f = f @ proj.to(f.device)
    first = int(torch.randint(total, (1,), generator=g))
    chosen = [first]
    dist = torch.cdist(f, f[first : first + 1])[:, 0]
    for _ in range(n - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, torch.cdist(f, f[i : i + 1])[:, 0])
    return torch.tensor(chosen)


class PatchCore:
    """PatchCore-style detector on a frozen feature extractor (see the module docstring)."""

    def __init__(
        self,
        backbone: FeatureExtractor,
        image_size: int,
        feature_smoothing: int = 3,
        map_sigma: float = 4.0,
        coreset_ratio: float = 1.0,
        chunk: int = 4096,
    ):
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}.")
        self.backbone = backbone.eval()
        self.image_size = int(image_size)
        self.feature_smoothing = int(feature_smoothing)
        self.map_sigma = float(map_sigma)
        self.coreset_ratio = float(coreset_ratio)
        self.chunk = int(chunk)
        self.memory: Optional[torch.Tensor] = None  # M x D
        self.fit_seconds: Optional[float] = None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x D x H/8 x W/8 patch features."""
        feats = self.backbone(x.to(self.device))
        k = self.feature_smoothing
        size = feats[0].shape[-2:]
        out = []
        for f in feats:
            f = f.float()
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def fit(self, images: Sequence[ImageLike] | torch.Tensor, batch_size: int = 8) -> "PatchCore":
        """Build the memory bank from normal images (paths, PIL images, arrays or a tensor)."""
        start = time.perf_counter()
        x_all = to_batch(images, self.image_size)
        bank = []
        for i in range(0, x_all.shape[0], batch_size):
            e = self.embed(x_all[i : i + batch_size])
            bank.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
        memory = torch.cat(bank)
        if self.coreset_ratio < 1:
            keep = greedy_coreset(memory, max(1, round(self.coreset_ratio * memory.shape[0])))
            memory = memory[keep.to(memory.device)]
        self.memory = memory
        self.fit_seconds = time.perf_counter() - start
        return self

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly maps B x H x W (on the CPU) for a batch in [-1, 1] at any size."""
        if self.memory is None:
            raise RuntimeError("PatchCore is not fitted: call fit(normal_images) first.")
        e = self.embed(x)
        b, d, h, w = e.shape
        q = e.permute(0, 2, 3, 1).reshape(-1, d)
        nearest = torch.empty(q.shape[0], device=q.device)
        memory = self.memory.double()  # cdist's matrix-product form cancels badly in float32
        for i in range(0, q.shape[0], self.chunk):
            nearest[i : i + self.chunk] = torch.cdist(q[i : i + self.chunk].double(), memory).amin(dim=1).float()
        amap = nearest.view(b, 1, h, w)
        amap = F.interpolate(amap, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.map_sigma > 0:
            amap = gaussian_blur(amap, self.map_sigma)
        return amap[:, 0].cpu()


class AnoDDPM:
    """Plain partial-noise diffusion reconstruction with a pixel-difference map (see the module
    docstring). `eps_model(x, t)` is the denoiser, e.g. `detector._eps`."""

    def __init__(self, eps_model, alphas_cumprod: torch.Tensor, t0: int = 250, steps: int = 10,
                 eta: float = 0.0, seed: int = 0, map_sigma: float = 4.0):
        self.eps_model = eps_model
        self.alphas_cumprod = alphas_cumprod
        self.sampler = SamplerConfig(t0=t0, steps=steps, w=0.0, guidance_scale=0.0, eta=eta, seed=seed)
        self.map_sigma = float(map_sigma)
        self.fit_seconds = 0.0  # nothing to fit beyond the denoiser's own training

    @classmethod
    def from_detector(cls, detector, map_sigma: float = 4.0) -> "AnoDDPM":
        """The detector's denoiser and start step / steps / eta / seed, without w and s."""
        s = detector.sampler
        return cls(detector._eps, detector.alphas_cumprod, s.t0, s.steps, s.eta, s.seed, map_sigma)

    @torch.no_grad()
    def reconstruct(self, y: torch.Tensor) -> torch.Tensor:
        return reconstruct(self.eps_model, y, self.alphas_cumprod, self.sampler)

    @torch.no_grad()
    def maps(self, y: torch.Tensor) -> torch.Tensor:
        amap = (self.reconstruct(y) - y).abs().mean(dim=1, keepdim=True)
        if self.map_sigma > 0:
            amap = gaussian_blur(amap, self.map_sigma)
        return amap[:, 0].float().cpu()
