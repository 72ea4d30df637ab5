"""`train.init_from`: continued pretraining from an imported checkpoint. The loss of step 1 (the forward
before the first update) equals transformers' loss of the source model on the same batch (documents run
separately: lctrain resets state at document starts); a mismatching model fails before the run
directory is touched; the source's tokenizer is used when the recipe names none."""
import os

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import recipe_from_dict
from lctrain.data.corpus import builtin_documents
from lctrain.data.dataset import DataOrder, prepare_data
from lctrain.data.tokenizer import train_tokenizer
from lctrain.interop.hf import import_checkpoint
from lctrain.train.checkpoint import CheckpointError
from lctrain.train.trainer import train
from tests.foundation_utils import read_metrics, tiny_recipe_dict
from tests.interop_utils import VOCAB, hf_llama, hf_mamba2

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [t for _, t in builtin_documents()][:30]
    return train_tokenizer(iter(docs), str(tmp_path_factory.mktemp("tok") / "t.model"), VOCAB, 200_000)


def _hf_loss(hf, batch):
    """Mean next-token loss of transformers' model, each document of each row run on its own."""
    total, count = 0.0, 0
    for ids, labels, starts in zip(batch["input_ids"], batch["labels"], batch["doc_start"]):
        cuts = torch.nonzero(starts).flatten().tolist() + [len(ids)]
        cuts = ([0] if cuts[0] != 0 else []) + cuts
        logits = torch.cat([hf(ids[None, a:b]).logits[0] for a, b in zip(cuts[:-1], cuts[1:]) if b > a])
        total += F.cross_entropy(logits.double(), labels, reduction="sum").item()
        count += labels.numel()
    return total / count


@pytest.mark.parametrize("arch", ["mamba2", "transformer"])
def test_step0_loss_equals_the_source_models_loss(tmp_path, tok, arch):
    src = tmp_path / "src"
    hf = hf_mamba2(src, seed=7) if arch == "mamba2" else hf_llama(src, seed=7)
    import_checkpoint(str(src), arch, str(tmp_path / "imp"), tokenizer=tok.path)
    raw = tiny_recipe_dict(str(tmp_path / "cache"), steps=1, val_every=0, seq_len=48,
                           init_from=str(tmp_path / "imp"))
    raw.pop("model")                      # the architecture comes from the imported model
    raw.pop("tokenizer")                  # and so does the tokenizer
    raw["data"]["max_bytes"] = 150_000
    recipe = recipe_from_dict(raw)
    assert recipe.model.arch == arch and recipe.model.vocab_size == VOCAB
    out = train(recipe, run_dir=str(tmp_path / "run"), log=lambda m: None)
    assert recipe.tokenizer.path and open(recipe.tokenizer.path, "rb").read() == open(tok.path, "rb").read()
    step1 = read_metrics(str(tmp_path / "run"))[0]
    assert step1["step"] == 1
    data = prepare_data(recipe, log=lambda m: None)
    t = recipe.train
    batch = data.train.batch(DataOrder(len(data.train), recipe.seed).indices(0, t.batch_size))
    with torch.no_grad():
        ref = _hf_loss(hf, batch)
    assert abs(step1["loss"] - ref) <= 1e-5 * max(1.0, abs(ref)), (step1["loss"], ref)
    assert out["status"] == "completed"


def test_mismatching_model_fails_before_the_run_dir_is_touched(tmp_path, tok):
    hf_llama(tmp_path / "src")
    import_checkpoint(str(tmp_path / "src"), "transformer", str(tmp_path / "imp"), tokenizer=tok.path)
    raw = tiny_recipe_dict(str(tmp_path / "cache"), steps=1, init_from=str(tmp_path / "imp" / "model.safetensors"))
    raw["model"] = {"arch": "transformer", "d_model": 32, "n_layers": 2, "vocab_size": VOCAB}
    raw["tokenizer"] = {"path": tok.path}
    raw["data"]["max_bytes"] = 100_000
    with pytest.raises(CheckpointError, match=r"train.init_from: .*model.safetensors: embed.weight has shape \(512, 64\), "
                                              r"the recipe's model \(512, 32\)"):
        train(recipe_from_dict(raw), run_dir=str(tmp_path / "run"), log=lambda m: None)
    assert not os.path.exists(tmp_path / "run")


def test_init_from_missing_path_is_a_config_error(tmp_path):
    from lctrain.schema import ConfigError
    with pytest.raises(ConfigError, match="train.init_from: no such model file or directory"):
        recipe_from_dict({"train": {"init_from": str(tmp_path / "nope")}})


def test_model_keys_override_the_source_and_eval_loads_the_import(tmp_path, tok):
    from lctrain.eval.loading import load_run
    from lctrain.train.export import load_exported
    hf_mamba2(tmp_path / "src", seed=2)
    import_checkpoint(str(tmp_path / "src"), "mamba2", str(tmp_path / "imp"), tokenizer=tok.path)
    r = recipe_from_dict({"train": {"init_from": str(tmp_path / "imp")}, "model": {"mixers": {"mamba2": {"dt_max": 0.2}}}})
    assert r.model.arch == "mamba2" and r.model.d_model == 64 and r.model.mixers["mamba2"].dt_max == 0.2
    assert r.model.mixers["mamba2"].ngroups == 2
    lm = load_run(str(tmp_path / "imp" / "model.safetensors"))        # what lctrain eval passkey|length|study load
    assert lm.tokenizer.vocab_size == tok.vocab_size and lm.model.config.arch == "mamba2"
    ref, _ = load_exported(str(tmp_path / "imp" / "model.safetensors"))
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)
