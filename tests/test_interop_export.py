"""`lctrain export --format hf`: lctrain Mamba-2 and Transformer models as transformers directories that
AutoModelForCausalLM.from_pretrained loads with the same logits (fp32, <= 1e-4) and greedy tokens, with
the tokenizer (AutoTokenizer gives lctrain's ids); import -> export round trip; a run directory exports."""
import json
import os

import pytest
import torch

from lctrain.config import recipe_from_dict
from lctrain.data.corpus import builtin_documents
from lctrain.data.tokenizer import train_tokenizer
from lctrain.interop.hf import import_checkpoint, write_model_file
from lctrain.models import build_model
from lctrain.train.export import export_hf
from tests.foundation_utils import run_cli, tiny_recipe
from tests.interop_utils import VOCAB, _greedy, _perturb, hf_llama

transformers = pytest.importorskip("transformers")
TOL = 1e-4
MODELS = {
    "mamba2": {"arch": "mamba2", "d_model": 64, "n_layers": 2,
               "mixers": {"mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2}}},
    "transformer": {"arch": "transformer", "d_model": 64, "n_layers": 2, "tie_embeddings": False,
                    "mixers": {"attention": {"n_heads": 4, "n_kv_heads": 2, "rope_base": 20000.0}}},
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [t for _, t in builtin_documents()][:30]
    return train_tokenizer(iter(docs), str(tmp_path_factory.mktemp("tok") / "t.model"), VOCAB, 200_000)


def _model_file(tmp_path, arch, tok):
    recipe = recipe_from_dict({"model": {**MODELS[arch], "vocab_size": VOCAB}})
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    _perturb(model, seed=1)
    path = str(tmp_path / f"{arch}.safetensors")
    write_model_file(model, recipe, path, open(tok.path, "rb").read(), "test", "test")
    return model, path


def _same_logits(ours, hf, ids):
    with torch.no_grad():
        d = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert d <= TOL, d
    return d


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_export_hf_loads_with_the_same_logits_and_tokenizer(tmp_path, arch, tok):
    model, path = _model_file(tmp_path, arch, tok)
    out = tmp_path / "hf"
    r = run_cli("export", path, "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["architecture"] == \
        {"mamba2": "Mamba2ForCausalLM", "transformer": "LlamaForCausalLM"}[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, VOCAB, (2, 33))
    _same_logits(model, hf, ids)
    ref = _greedy(hf, ids[:, :8], 6)
    assert torch.equal(ref, model.generate(ids[:, :8], 6))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = open(os.__file__).read()[:4000] + "\n\t x = 12345  # héllo 你好\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eod_id


def test_import_export_round_trip(tmp_path):
    hf = hf_llama(tmp_path / "src", seed=5)
    import_checkpoint(str(tmp_path / "src"), "transformer", str(tmp_path / "imp"))
    export_hf(str(tmp_path / "imp"/ "model.safetensors"), str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= TOL


def test_export_run_dir_and_refusals(tmp_path):
    from lctrain.eval.loading import load_run
    from lctrain.train.trainer import train
    run = str(tmp_path / "run")
    train(tiny_recipe(str(tmp_path / "cache"), steps=2, val_every=0), run_dir=run, log=lambda m: None)
    summary = export_hf(run, str(tmp_path / "hf"))
    assert summary["tokenizer"] and summary["architecture"] == "LlamaForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = load_run(run).model
    _same_logits(ours, hf, torch.randint(0, ours.config.vocab_size, (1, 24)))
    # an arch transformers has no class for: one line, nothing written
    recipe = recipe_from_dict({"model": {"arch": "gla", "d_model": 32, "n_layers": 1, "vocab_size": 300}})
    write_model_file(build_model(recipe.model), recipe, str(tmp_path / "gla.safetensors"), None, "t", "t")
    r = run_cli("export", str(tmp_path / "gla.safetensors"), "--format", "hf", "--out", str(tmp_path / "gla_hf"))
    assert r.returncode == 1 and "arch 'gla'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "gla_hf")
    # an existing non-empty --out is never replaced
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export_hf(run, str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
