"""Language models built from one mixer interface (see base.py). Importing this registers every mixer,
ffn and architecture preset."""
from lctrain.models.base import (ARCHS, FFNS, MIXERS, InferenceCache, InferenceKnobs, LanguageModel, LMConfig,
                                 ModelOutput, SeqContext, build_config, register_arch)
from lctrain.models import attention  # noqa: F401  (registers A, W)
from lctrain.models import based, gla, mamba2  # noqa: F401  (registers B, C, G, M)
from lctrain.models import memory, moe, sparse_attention  # noqa: F401  (registers X, R; FFNs E, P)
from lctrain.models.hydra import HYDRA_PRESET

register_arch("transformer", {"pattern": "A", "ffn_pattern": "S"})
# Mamba-2: SSD mixer only, no FFN (mamba_ssm's Mamba2 LM).
register_arch("mamba2", {"pattern": "M", "ffn_pattern": "-"})
# GLA: GLA mixer + SwiGLU FFN in every layer (fla's GLA LM).
register_arch("gla", {"pattern": "G", "ffn_pattern": "S"})
# BASED: the repeating unit of the 360M reference (HazyResearch/based,
# train/configs/experiment/reference/based-360m.yaml): layer i is Taylor linear attention if
# i % 5 == 1, sliding-window attention if i % 5 == 2, BaseConv otherwise; SwiGLU (hidden 2d) in every
# layer. The reference passes window_size=128 and uses flash-attn window (128 // 2, 0) = 64 tokens of
# left context plus the query itself: `window: 65` in our convention (W tokens counting the query).
# The 27-layer reference ("CBWCC" x 5 + "CC") is spelled out in recipes/based-360m.yaml.
register_arch("based", {"pattern": "CBWCC", "n_layers": 5, "ffn_pattern": "S", "ffn_mult": 2.0,
                        "mixers": {"swa": {"window": 65}}})

# Hydra: Mamba-2 backbone + sparse global attention + chunk-routed MoE + PKM + workspace (hydra.py).
register_arch("hydra", HYDRA_PRESET)


def build_model(cfg: LMConfig) -> LanguageModel:
    return LanguageModel(cfg)


__all__ = ["ARCHS", "FFNS", "MIXERS", "InferenceCache", "InferenceKnobs", "LanguageModel", "LMConfig",
           "ModelOutput", "SeqContext", "build_config", "build_model", "register_arch"]
