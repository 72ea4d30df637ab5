"""Pure tensor ops (no nn.Module, no collectives): the gated linear-attention primitive, softmax
attention, causal conv, feature maps, and their single-step decode forms."""
from lctrain.kernels.attention import attention, attention_reference, attention_uses_flash
from lctrain.kernels.conv import causal_conv1d, causal_conv1d_step, short_conv
from lctrain.kernels.feature_maps import taylor_feature_map
from lctrain.kernels.gla import gated_linear_attention, gla_step

__all__ = ["attention", "attention_reference", "attention_uses_flash", "causal_conv1d", "causal_conv1d_step", "short_conv",
           "gated_linear_attention", "gla_step", "taylor_feature_map"]
