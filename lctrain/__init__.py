"""lctrain: distributed long-context pretraining for hybrid recurrent / attention / MoE language models."""
__version__ = "0.1.0"
