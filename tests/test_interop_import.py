"""`lctrain import`: tiny random transformers Mamba2ForCausalLM / LlamaForCausalLM checkpoints and the
mamba_ssm layout, written locally, imported, and compared with transformers' own forward (fp32, <= 1e-4)
on unpacked and packed inputs and with transformers' greedy `generate` token for token; config fields
and values lctrain does not implement fail with one line naming them; .bin files never unpickle code."""
import json
import os

import pytest
import torch

from lctrain.interop.hf import InteropError, import_checkpoint
from lctrain.models import SeqContext
from lctrain.train.export import load_exported
from tests.foundation_utils import ROOT, run_cli
from tests.interop_utils import VOCAB, _greedy, hf_llama, hf_mamba2, mamba_ssm_dir

pytest.importorskip("transformers")
TOL = 1e-4


def _import(src, arch, out):
    import_checkpoint(str(src), arch, str(out))
    model, _ = load_exported(str(out / "model.safetensors"))
    return model


def _hf_packed_logits(hf, ids, lengths):
    """Reference for packed documents: transformers runs each document on its own."""
    outs, s = [], 0
    for n in lengths:
        outs.append(hf(ids[:, s:s + n]).logits)
        s += n
    return torch.cat(outs, 1)


def _compare(hf, model, gen_steps=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 37), generator=g)
    with torch.no_grad():
        d_unpacked = (hf(ids).logits - model(ids).logits).abs().max().item()
        lengths = [9, 17, 11]
        packed = ids[:1]
        starts = torch.zeros(1, 37, dtype=torch.bool)
        starts[0, [0, 9, 26]] = True
        ours = model(packed, SeqContext(doc_start=starts)).logits
        d_packed = (_hf_packed_logits(hf, packed, lengths) - ours).abs().max().item()
    assert d_unpacked <= TOL, d_unpacked
    assert d_packed <= TOL, d_packed
    prompt = ids[:, :12]
    ref = _greedy(hf, prompt, gen_steps)
    mine = model.generate(prompt, gen_steps)       # recurrent state / KV cache, token by token
    assert torch.equal(ref, mine), (ref, mine)
    return d_unpacked, d_packed


def test_hf_mamba2(tmp_path):
    hf = hf_mamba2(tmp_path / "src")
    model = _import(tmp_path / "src", "mamba2", tmp_path / "out")
    assert model.config.mixers["mamba2"].ngroups == 2 and not model.config.tie_embeddings
    _compare(hf, model)


def test_hf_mamba2_tied_and_safetensors_reload_via_cli(tmp_path):
    hf = hf_mamba2(tmp_path / "src", tie=True, seed=3)
    r = run_cli("import", str(tmp_path / "src"), "--arch", "mamba2", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["layout"] == "hf-mamba2" and summary["vocab_size"] == VOCAB
    assert os.path.isfile(tmp_path / "out" / "recipe.yaml")
    model, recipe = load_exported(str(tmp_path / "out" / "model.safetensors"))
    assert recipe.model.tie_embeddings and model.lm_head.weight is model.embed.weight
    _compare(hf, model, gen_steps=6)


def test_mamba_ssm_layout_bin(tmp_path):
    hf = hf_mamba2(None, tie=True, seed=4)
    src = mamba_ssm_dir(str(tmp_path / "src"), hf, tie=True)
    model = _import(tmp_path / "src", "mamba2", tmp_path / "out")
    assert os.path.isfile(os.path.join(src, "pytorch_model.bin"))
    _compare(hf, model, gen_steps=6)


def test_hf_llama(tmp_path):
    hf = hf_llama(tmp_path / "src")
    model = _import(tmp_path / "src", "transformer", tmp_path / "out")
    a = model.config.mixers["attention"]
    assert (a.n_heads, a.n_kv_heads, a.rope_base) == (4, 2, 50000.0)
    _compare(hf, model)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")     # model.safetensors.index.json
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    sharded = _import(tmp_path / "sharded", "transformer", tmp_path / "out2")
    assert all(torch.equal(v, sharded.state_dict()[k]) for k, v in model.state_dict().items())


def _edit_config(src, **changes):
    p = os.path.join(src, "config.json")
    cfg = json.load(open(p))
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            cfg[a][b] = v
        else:
            cfg[k] = v
    json.dump(cfg, open(p, "w"))


@pytest.mark.parametrize("maker,arch,change,msg", [
    ("mamba2", "mamba2", {"time_step_limit": [0.0, 0.1]}, r"time_step_limit=\[0.0, 0.1\] is not supported by lctrain"),
    ("mamba2", "mamba2", {"use_bias": True}, "use_bias=True is not supported"),
    ("mamba2", "mamba2", {"some_new_option": 3}, "field 'some_new_option' is not supported"),
    ("mamba_ssm", "mamba2", {"ssm_cfg.norm_before_gate": True}, "ssm_cfg: norm_before_gate=True is not supported"),
    ("mamba_ssm", "mamba2", {"ssm_cfg.D_has_hdim": True}, "ssm_cfg: D_has_hdim=True"),
    ("mamba_ssm", "mamba2", {"d_intermediate": 128}, "d_intermediate=128 is not supported"),
    ("llama", "transformer", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters.rope_type='llama3' is not supported"),
    ("llama", "transformer", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("llama", "transformer", {"intermediate_size": 200}, "intermediate_size=200 is not supported"),
    ("llama", "mamba2", {}, "holds a hf-llama checkpoint: use --arch transformer"),
])
def test_unsupported_config_fails_naming_the_field(tmp_path, maker, arch, change, msg):
    src = str(tmp_path / "src")
    if maker == "mamba_ssm":
        mamba_ssm_dir(src, hf_mamba2(None))
    else:
        (hf_mamba2 if maker == "mamba2" else hf_llama)(src)
    _edit_config(src, **change)
    with pytest.raises(InteropError, match=msg) as e:
        import_checkpoint(src, arch, str(tmp_path / "out"))
    assert "\n" not in str(e.value) and "config.json" in str(e.value) or "--arch" in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bin_is_never_unpickled(tmp_path):
    src = str(tmp_path / "src")
    mamba_ssm_dir(src, hf_mamba2(None))
    torch.save({"backbone.embedding.weight": Evil()}, os.path.join(src, "pytorch_model.bin"))
    r = run_cli("import", src, "--arch", "mamba2", "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "weights_only=True" in r.stderr and not os.path.exists(os.path.join(ROOT, "pwned")) and not os.path.exists(tmp_path / "pwned")
