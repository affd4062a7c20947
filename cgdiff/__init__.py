"""cgdiff: conditioned-guided denoising diffusion for texture anomaly detection."""

__version__ = "0.1.0"
