"""`train.init_from` a model file whose recipe metadata is not a YAML mapping: one ConfigError naming
the field and the file (was a yaml / AttributeError traceback)."""
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lctrain.config import recipe_from_dict
from lctrain.interop.hf import write_model_file
from lctrain.models import build_model
from lctrain.schema import ConfigError


@pytest.mark.parametrize("text, expect", [("a: [", "its recipe is not valid YAML"),
                                          ("- 1", "its recipe is not a mapping"),
                                          ("model: 3", "its recipe is not a mapping with a 'model' mapping")])
def test_init_from_a_model_file_with_a_bad_recipe(tmp_path, text, expect):
    recipe = recipe_from_dict({"model": {"arch": "mamba2", "vocab_size": 64, "d_model": 32, "n_layers": 1,
                                         "mixers": {"mamba2": {"d_state": 8, "headdim": 16}}}})
    good, bad = str(tmp_path / "good.safetensors"), str(tmp_path / "bad.safetensors")
    write_model_file(build_model(recipe.model), recipe, good, None, "test", "test")
    with safe_open(good, "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(good), bad, metadata={**meta, "recipe": text})
    with pytest.raises(ConfigError, match=rf"train.init_from: .*bad.safetensors: {expect}"):
        recipe_from_dict({"train": {"init_from": bad}})
    assert recipe_from_dict({"train": {"init_from": good}}).model.d_model == 32
