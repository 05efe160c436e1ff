"""nlft-kernels: fused kernels for Natural Language Fine-Tuning (arXiv 2412.20382)."""

from nlft_kernels.backend_report import backends
from nlft_kernels.config import NLFTConfig
from nlft_kernels.modules import NLFTLinearLoss
from nlft_kernels.ops.nlft_linear_loss import linear_token_logprobs, nlft_linear_loss
from nlft_kernels.ops.nlft_loss import NLFTDetails, nlft_loss
from nlft_kernels.ops.saliency_clusters import saliency_clusters
from nlft_kernels.ops.token_logprobs import token_logprobs
from nlft_kernels.ops.token_weighted_cross_entropy import (
    linear_token_weighted_cross_entropy,
    token_weighted_cross_entropy,
)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, the one source); an in-place build
    that was never installed (``python setup.py build_ext --inplace``) reads pyproject.toml itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nlft-kernels")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


__version__ = _version()

__all__ = [
    "NLFTConfig",
    "NLFTDetails",
    "NLFTLinearLoss",
    "backends",
    "linear_token_logprobs",
    "linear_token_weighted_cross_entropy",
    "nlft_linear_loss",
    "nlft_loss",
    "saliency_clusters",
    "token_logprobs",
    "token_weighted_cross_entropy",
]
