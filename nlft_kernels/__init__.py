"""nlft-kernels: fused kernels for Natural Language Fine-Tuning (arXiv 2412.20382)."""

from nlft_kernels.backends import backends
from nlft_kernels.config import NLFTConfig
from nlft_kernels.modules import NLFTLinearLoss
from nlft_kernels.ops.nlft_linear_loss import linear_token_logprobs, nlft_linear_loss
from nlft_kernels.ops.nlft_loss import NLFTDetails, nlft_loss
from nlft_kernels.ops.saliency_clusters import saliency_clusters
from nlft_kernels.ops.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = [
    "NLFTConfig",
    "NLFTDetails",
    "NLFTLinearLoss",
    "backends",
    "linear_token_logprobs",
    "nlft_linear_loss",
    "nlft_loss",
    "saliency_clusters",
    "token_logprobs",
]
