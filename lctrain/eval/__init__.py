"""Long-context evaluation (issue 7): long chunked inference for any model, passkey retrieval, the
state-collapse length study with training-free mitigations, and studies that train and evaluate model
variants end to end.

- inference.py   chunked streaming through the model's InferenceCache (memory independent of length for
                 linear / windowed models), recurrent-state discovery and per-head statistics
- passkey.py     `lctrain eval passkey` (prompt builder and scorer: lctrain/data/passkey.py)
- length.py      `lctrain eval length`: per-position loss buckets, state stats, mitigations
- mitigations.py composable mitigation specs -> InferenceKnobs
- loading.py     a run / checkpoint directory -> model, tokenizer, recipe
- plots.py       heatmap and line plots (PNG)
- study.py       `lctrain eval study recipes/studies/*.yaml` -> report.md
- cli.py         the `lctrain eval` subcommands
"""
