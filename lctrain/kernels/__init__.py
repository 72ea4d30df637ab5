"""Pure tensor ops (no nn.Module, no collectives): the gated linear-attention primitive, softmax
attention, causal conv, feature maps, and their single-step decode forms."""
from lctrain.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
