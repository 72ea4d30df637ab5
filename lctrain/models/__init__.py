"""Language models built from one mixer interface (see base.py). Importing this registers every mixer,
ffn and architecture preset."""
from lctrain.models.base import (ARCHS, FFNS, MIXERS, InferenceCache, InferenceKnobs, LanguageModel, LMConfig,
                                 ModelOutput, SeqContext, build_config, register_arch)
from lctrain.models import attention  # noqa: F401  (registers A, W)

register_arch("transformer", {"pattern": "A", "ffn_pattern": "S"})


def build_model(cfg: LMConfig) -> LanguageModel:
    return LanguageModel(cfg)


__all__ = ["ARCHS", "FFNS", "MIXERS", "InferenceCache", "InferenceKnobs", "LanguageModel", "LMConfig",
           "ModelOutput", "SeqContext", "build_config", "build_model", "register_arch"]
