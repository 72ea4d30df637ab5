"""Tiny random transformers / mamba_ssm checkpoints written locally for the interop tests."""
from __future__ import annotations

import json
import os
import warnings

import torch

VOCAB = 512


def _perturb(model, scale=0.05, seed=0):
    """Move every parameter off its initial value (norm weights 1, D 1, ...) so a missed mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def hf_mamba2(path, tie=False, seed=0, **over):
    warnings.filterwarnings("ignore")
    from transformers import Mamba2Config, Mamba2ForCausalLM
    torch.manual_seed(seed)
    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_heads=8, head_dim=16, expand=2, n_groups=2, state_size=16,
                       num_hidden_layers=2, conv_kernel=4, chunk_size=16, tie_word_embeddings=tie, **over)
    model = Mamba2ForCausalLM(cfg).eval()
    _perturb(model, seed=seed)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def mamba_ssm_dir(path, hf_model, tie=True, ssm_extra=None):
    """The mamba_ssm layout (config.json of MambaConfig + pytorch_model.bin) of a transformers Mamba-2."""
    c = hf_model.config
    os.makedirs(path, exist_ok=True)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf_model.state_dict().items()}
    if tie:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    ssm = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand, "headdim": c.head_dim,
           "ngroups": c.n_groups, "chunk_size": c.chunk_size, **(ssm_extra or {})}
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": c.vocab_size,
           "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": tie}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def hf_llama(path, seed=0, **over):
    warnings.filterwarnings("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    kw.update(over)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    _perturb(model, seed=seed)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def _greedy(hf, prompt, n):
    """transformers' greedy `generate` for exactly n tokens (no end-of-sequence stop, which would also
    mask that token while a minimum length is pending)."""
    hf.generation_config.eos_token_id = None
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + n
    return out[:, prompt.shape[1]:]
