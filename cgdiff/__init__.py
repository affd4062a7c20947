"""cgdiff: conditioned-guided denoising diffusion for texture anomaly detection."""

__version__ = "0.1.0"
__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    # `from cgdiff import Detector` (as model cards show) without importing torch for `import cgdiff`.
    if name == "Detector":
        from .detector import Detector

        return Detector
    raise AttributeError(f"module 'cgdiff' has no attribute '{name}'")
