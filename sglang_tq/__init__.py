"""sglang-tq: TurboQuant low-bit KV cache for SGLang (arXiv 2504.19874)."""

from .config import TQConfig
from .format.quantizer import TurboQuantizer

__all__ = ["TQConfig", "TurboQuantizer"]
__version__ = "0.1.0"
