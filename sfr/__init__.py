"""sfr: Semantic Flow Regularization for LLM fine-tuning.

A small flow-matching head, fed the LM's final hidden state, learns the distribution of a frozen
sentence encoder's embedding of the future text; its loss keeps fine-tuned models diverse. The head
is discarded at inference.
"""
__version__ = "0.1.0"

from sfr.config import SFRConfig  # noqa: E402
from sfr.head import FlowHead  # noqa: E402
from sfr_kernels import sfr_loss  # noqa: E402

__all__ = ["FlowHead", "SFRConfig", "sfr_loss", "__version__"]
