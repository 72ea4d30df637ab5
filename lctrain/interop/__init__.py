"""Interoperability with checkpoints written by other libraries (Hugging Face transformers, mamba_ssm).

`lctrain import` (hf.py) turns a local Mamba-2 or Llama checkpoint into an lctrain model file;
`lctrain export --format hf` writes an lctrain model back as a transformers directory; `train.init_from`
(init.py) starts continued pretraining from either. transformers is imported only here, lazily.
"""
