"""Long-context evaluation (issue 7): chunked long inference, the passkey prompt builder and scorer,
mitigations (neutral = identical; they bound a growing state), state statistics, the passkey data
source and the study file. Trained-model and CLI tests are in test_eval_cli.py."""
import random

import numpy as np
import pytest
import torch

from lctrain.config import LengthEvalConfig, recipe_from_dict
from lctrain.data.corpus import builtin_documents
from lctrain.data.passkey import (CHANCE, FILLER, KEYED_NEEDLE, KEYED_QUESTION, NAMES, NEEDLE, QUESTION, PromptBuilder,
                                  TokenPromptBuilder, first_number, haystack_stream, make_builder, passkey_documents,
                                  random_key, score)
from lctrain.data.tokenizer import train_tokenizer
from lctrain.eval.inference import chunk_bounds, chunked_logits, layer_states, log_edges, recurrent_layers, stream
from lctrain.eval.length import evaluate_length
from lctrain.eval.mitigations import parse_mitigation
from lctrain.models import ARCHS, FFNS, MIXERS, LanguageModel, build_config
from lctrain.schema import ConfigError

V = 61


# Small options for every mixer / ffn we know; a mixer registered later without an entry is built with
# its defaults at d_model 32 (and this test then tells its author whether chunked inference is exact).
TINY_MIXERS = {
    "attention": {"n_heads": 2}, "swa": {"n_heads": 2, "window": 5},
    "mamba2": {"d_state": 8, "headdim": 8, "ngroups": 2},
    "gla": {"n_heads": 2}, "based": {"n_heads": 2, "feature_dim": 4}, "baseconv": {},
    "sparse_attention": {"n_heads": 2, "window": 4, "block_size": 3, "top_k": 2, "query_chunk": 8},
    "workspace": {"n_slots": 4, "slot_dim": 16, "n_heads": 2, "chunk_size": 4},
}
TINY_FFNS = {"moe": {"n_experts": 4, "top_k": 2, "hidden": 16, "routing": "chunk", "chunk_size": 4},
             "pkm": {"n_heads": 2, "n_sub_keys": 4, "key_dim": 8, "top_k": 2}}


def _mixer_opts(letters):
    names = {MIXERS[ch].name for ch in letters}
    return {n: TINY_MIXERS[n] for n in names if n in TINY_MIXERS}


def _tiny_cfg(**over):
    from lctrain.models.base import FFN_CONFIGS
    over.setdefault("ffns", {n: o for n, o in TINY_FFNS.items() if n in FFN_CONFIGS})
    return build_config({"vocab_size": V, "d_model": 32, **over})


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_weight", "D", "bias")) or ".norm" in name:
                p.add_(0.3 * torch.randn_like(p))


def _check_chunked(cfg, T=41):
    model = LanguageModel(cfg).eval()
    _randomize(model)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        full = model(ids).logits
    for chunk in (1, 7, 16, T):
        torch.testing.assert_close(chunked_logits(model, ids, chunk), full, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"chunk {chunk}: {m}")
    # forced boundaries (the length study's recording positions) change nothing either
    parts = []
    stream(model, ids, chunk_size=16, marks=[1, 2, 3, 5, 9, 17, 33], on_chunk=lambda s, e, lg, c: parts.append(lg))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


# --- chunked long inference ---------------------------------------------------------------------

@pytest.mark.parametrize("letter", sorted(MIXERS))
def test_chunked_inference_equals_full_forward_every_mixer(letter):
    _check_chunked(_tiny_cfg(pattern=letter, n_layers=2, ffn_pattern="S", mixers=_mixer_opts(letter)))


@pytest.mark.parametrize("ffn", sorted(k for k in FFNS if k not in ("S", "-")))
def test_chunked_inference_equals_full_forward_every_ffn(ffn):
    _check_chunked(_tiny_cfg(pattern="M", n_layers=2, ffn_pattern=ffn, mixers=_mixer_opts("M")))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_chunked_inference_equals_full_forward_every_arch(arch):
    pattern = ARCHS[arch].get("pattern", "A")
    _check_chunked(_tiny_cfg(arch=arch, n_layers=len(pattern), mixers=_mixer_opts(pattern)))


def _cache_bytes(cache) -> int:
    def size(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        return 0
    return sum(size(layer) for layer in cache.layers)


@pytest.mark.parametrize("pattern,bounded", [("M", True), ("G", True), ("CBW", True), ("A", False)])
def test_cache_memory_does_not_grow_with_length_for_linear_models(pattern, bounded):
    model = LanguageModel(_tiny_cfg(pattern=pattern, n_layers=len(pattern), mixers=_mixer_opts(pattern))).eval()
    sizes = []
    for T in (64, 512):
        ids = torch.randint(0, V, (1, T))
        sizes.append(_cache_bytes(stream(model, ids, chunk_size=32)))
    assert (sizes[0] == sizes[1]) == bounded, sizes
    if not bounded:
        assert sizes[1] > 4 * sizes[0]          # full attention's KV cache is O(T)


def test_chunk_bounds_cover_and_split_at_marks():
    b = list(chunk_bounds(100, 32, marks=[5, 40, 99, 100, 250]))
    assert b[0][0] == 0 and b[-1][1] == 100
    assert all(e1 == s2 for (_, e1), (s2, _) in zip(b, b[1:]))
    assert all(e - s <= 32 for s, e in b)
    assert {e for _, e in b} >= {5, 32, 40, 64, 96, 99, 100}
    with pytest.raises(ValueError, match="chunk_size"):
        list(chunk_bounds(10, 0))


def test_log_edges():
    e = log_edges(1000, 2)
    assert e[0] == 1 and e[-1] == 1000 and e == sorted(set(e))
    assert 18 <= len(e) <= 22            # ~2 per doubling over log2(1000) ~ 10 doublings


# --- passkey prompts and scoring --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [t for _, t in builtin_documents()][:60]
    return train_tokenizer(iter(docs), str(tmp_path_factory.mktemp("tok") / "t.model"), 512, 300_000)


@pytest.mark.parametrize("preamble", [True, False])
def test_prompt_builder_hits_length_and_depth(tok, preamble):
    b = PromptBuilder(tok, preamble=preamble)
    rng = random.Random(0)
    fixed = b.fixed_tokens()
    for L in (fixed, fixed + 1, fixed + 13, 200, 512, 1000, 4096, 30_000):
        for depth in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
            p = b.build(L, depth, random_key(rng))
            assert abs(p.n_tokens - L) <= 0.01 * L, (L, depth, p.n_tokens)
            filler = (p.filler_end - p.filler_start) - (p.needle_end - p.needle_start)
            # depth: the needle sits at a word boundary closest to depth x filler tokens
            assert abs((p.needle_start - p.filler_start) - depth * filler) <= max(b._cycle) / 2, (L, depth)
            assert tok.decode(p.ids[p.needle_start:p.needle_end]).strip() == NEEDLE.format(key=p.key)
            assert p.text.endswith(QUESTION)
            assert tok.decode(p.ids[p.filler_end:]).strip() == QUESTION
            assert p.text.startswith("There is an important info" if preamble else " ")
            if filler > 40:
                assert FILLER.split(". ")[1] in p.text       # the haystack is the standard filler
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        b.build(fixed - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        b.build(500, 1.5, "12345")


def test_prompt_depth_extremes_and_digits(tok):
    b = PromptBuilder(tok, preamble=False)
    p0, p1 = b.build(400, 0.0, "31415"), b.build(400, 1.0, "31415")
    assert p0.needle_start == p0.filler_start                       # right after the start
    assert p1.needle_end == p1.filler_end                           # right before the question
    assert p0.needle_depth == 0.0 and p1.needle_depth == 1.0
    digits = [tok.sp.id_to_piece(i) for i in p0.ids[p0.needle_start:p0.needle_end]]
    assert "".join(d for d in digits if d.isdigit()) == "3141531415"   # one token per digit, twice


@pytest.mark.parametrize("preamble", [True, False])
def test_text_haystack_prompts_are_exact_windows_of_the_stream(tok, preamble):
    stream = np.arange(5000, dtype=np.int64) % 400 + 100       # distinguishable ids: every window is locatable
    b = TokenPromptBuilder(tok, stream, preamble=preamble)
    fixed = b.fixed_tokens()
    for L in (fixed, fixed + 1, fixed + 97, 1000, 4000):
        for depth in (0.0, 0.3, 0.5, 1.0):
            rng = random.Random(f"{L}:{depth}")
            p = b.build(L, depth, random_key(rng), rng)
            assert p.n_tokens == L                               # exact for any tokenizer: built in ids
            F = L - fixed
            assert p.needle_start - p.filler_start == round(depth * F)
            assert tok.decode(p.ids[p.needle_start:p.needle_end]).strip() == NEEDLE.format(key=p.key)
            assert tok.decode(p.ids[p.filler_end:]).strip() == QUESTION
            window = p.ids[p.filler_start:p.needle_start] + p.ids[p.needle_end:p.filler_end]
            assert len(window) == F
            if F:                                               # one contiguous window of the stream
                start = int(np.nonzero(stream == window[0])[0][0])
                assert any(np.array_equal(stream[s:s + F], window) for s in range(start, stream.size - F + 1, 400))
    r1, r2 = random.Random(1), random.Random(1)
    assert b.build(300, 0.5, "12345", r1).ids == b.build(300, 0.5, "12345", r2).ids        # seeded
    assert b.build(300, 0.5, "12345", random.Random(1)).ids != b.build(300, 0.5, "12345", random.Random(2)).ids
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        b.build(fixed - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        b.build(500, -0.1, "12345")
    with pytest.raises(ValueError, match="haystack holds 5000 tokens"):
        b.build(fixed + 5001, 0.5, "12345")


def test_keyed_needles_one_per_n_tokens_and_the_question_names_one(tok):
    import re
    b = make_builder(tok, False, None, needle_every=64)            # the repeated sentences, tiled
    for L in (b.fixed_tokens(), 200, 512, 1024, 2048):
        for depth in (0.0, 0.5, 1.0):
            rng = random.Random(f"{L}:{depth}")
            p = b.build(L, depth, random_key(rng), rng)
            assert p.n_tokens == L
            needles = re.findall(r"The pass key of (\w+) is (\d{5})\. Remember it\. (\d{5}) is the pass key of (\w+)\.", p.text)
            names = [n for n, k, k2, n2 in needles]
            assert all(k == k2 and n == n2 for n, k, k2, n2 in needles) and len(set(names)) == len(names)
            assert set(names) <= set(NAMES)
            assert len(needles) == max(1, L // 64) or L < 64 * 2    # short prompts hold what fits
            asked = p.text.rsplit("What is the pass key of ", 1)[1].split("?")[0]
            assert p.text.endswith(KEYED_QUESTION.format(name=asked))
            assert (asked, p.key) in [(n, k) for n, k, _, _ in needles]
            assert p.others == [(n, k) for n, k, _, _ in needles if n != asked]       # the others, in prompt order
            assert tok.decode(p.ids[p.needle_start:p.needle_end]).strip() == KEYED_NEEDLE.format(name=asked, key=p.key)
            assert p.filler_end - p.filler_start == L - len(tok.encode(" " + KEYED_QUESTION.format(name=asked)))
    with pytest.raises(ValueError, match="more than the 64 names"):
        b.build(64 * 65, 0.5, "12345", random.Random(0))
    from lctrain.eval.passkey import check_lengths
    check_lengths(b, [b.fixed_tokens(), 64 * 64])
    with pytest.raises(ConfigError, match="--lengths: 4160 tokens at one keyed needle per 64 tokens needs 65"):
        check_lengths(b, [512, 64 * 65])
    with pytest.raises(ConfigError, match="eval.passkey.needle_every"):
        recipe_from_dict({"eval": {"passkey": {"needle_every": 8}}})


def test_text_haystack_reads_the_named_split_of_the_corpus(tmp_path, tok):
    from lctrain.data.corpus import is_validation, iter_documents
    recipe = recipe_from_dict({"tokenizer": {"path": tok.path},
                               "data": {"cache_dir": str(tmp_path), "max_bytes": 1000, "val_fraction": 0.2}})
    held = haystack_stream(recipe.data, tok, validation=True, need=3000)
    train = haystack_stream(recipe.data, tok, validation=False, need=3000)
    assert held.size >= 3000 and train.size >= 3000                # data.max_bytes does not limit the haystack
    docs = [(d, t) for d, t in iter_documents(recipe.data.__class__(max_bytes=None))][:400]
    first_val = next(t for d, t in docs if is_validation(d, 0.2))
    first_train = next(t for d, t in docs if not is_validation(d, 0.2))
    n = 30
    assert held[:n].tolist() == tok.encode(first_val)[:n] and train[:n].tolist() == tok.encode(first_train)[:n]


def test_passkey_documents_with_the_text_haystack(tmp_path, tok):
    raw = {"tokenizer": {"path": tok.path}, "data": {"cache_dir": str(tmp_path), "passkey": {
           "docs": 12, "min_tokens": 80, "max_tokens": 200, "preamble": False, "haystack": "text", "seed": 1}}}
    recipe = recipe_from_dict(raw)
    docs = list(passkey_documents(recipe))
    assert len(docs) == 12 and docs == list(passkey_documents(recipe))
    fillers = set()
    for _, text in docs:
        assert 80 - 8 <= len(tok.encode(text)) <= 200 + 8
        prompt, answer = text.rsplit(QUESTION, 1)
        before, after = prompt.split(NEEDLE.format(key=answer.strip(" .")))
        assert answer == f" {answer.strip(' .')}." and FILLER.split(". ")[1] not in prompt   # real text, not the sentences
        fillers.add(before + after)
    assert len(fillers) == 12                                       # a fresh window per document
    repeat = recipe_from_dict({**raw, "data": {**raw["data"], "passkey": {**raw["data"]["passkey"], "haystack": "repeat"}}})
    from lctrain.data.dataset import token_cache_dir
    assert token_cache_dir(recipe, tok) != token_cache_dir(repeat, tok)
    with pytest.raises(ConfigError, match="data.passkey.haystack"):
        recipe_from_dict({"data": {"passkey": {"haystack": "essays"}}})


def test_score_hand_made_outputs():
    assert score(" 12345.", "12345")
    assert score("12345", "12345")
    assert score(" the pass key is 12345 and 777", "12345")      # the first number counts
    assert not score(" 54321 12345", "12345")
    assert not score(" 1234", "12345")
    assert not score(" 123456", "12345")
    assert not score(" 12,345", "12345")
    assert not score(" twelve", "12345")
    assert not score("", "12345")
    assert first_number("a7b") == "7" and first_number("none") is None
    assert 0 < CHANCE < 1e-4


def test_passkey_documents_source(tmp_path, tok):
    raw = {"tokenizer": {"path": tok.path}, "data": {"cache_dir": str(tmp_path),
           "passkey": {"docs": 20, "min_tokens": 90, "max_tokens": 160, "preamble": False, "seed": 3}}}
    recipe = recipe_from_dict(raw)
    docs = list(passkey_documents(recipe))
    assert len(docs) == 20 and len({d for d, _ in docs}) == 20
    for _, text in docs:
        n = len(tok.encode(text))
        assert 90 - 2 <= n <= 160 + 2, n
        prompt, answer = text.rsplit(QUESTION, 1)
        key = first_number(prompt)
        assert answer == f" {key}." and NEEDLE.format(key=key) in prompt
    assert docs == list(passkey_documents(recipe))                  # seeded
    assert list(passkey_documents(recipe_from_dict({**raw, "data": {**raw["data"], "passkey": {"docs": 0}}}))) == []
    with pytest.raises(ConfigError, match="data.passkey.max_tokens"):
        recipe_from_dict({"data": {"passkey": {"docs": 1, "min_tokens": 100, "max_tokens": 50}}})


def test_passkey_documents_with_several_questions(tmp_path, tok):
    import re
    pk = {"docs": 40, "min_tokens": 100, "max_tokens": 600, "preamble": False, "needle_every": 64, "seed": 2}
    raw = {"tokenizer": {"path": tok.path}, "data": {"cache_dir": str(tmp_path), "passkey": {**pk, "questions": 4}}}
    docs = list(passkey_documents(recipe_from_dict(raw)))
    counts = []
    for _, text in docs:
        assert len(tok.encode(text)) <= 600
        needles = dict(re.findall(r"The pass key of (\w+) is (\d{5})\. Remember", text))
        asked = re.findall(r"What is the pass key of (\w+)\? The pass key of \1 is (\d{5})\.", text)
        assert asked and text.endswith(f" {asked[-1][1]}.")
        assert len({n for n, _ in asked}) == len(asked) <= 4                  # distinct needles, at most 4
        assert all(needles[n] == k for n, k in asked)                         # each answer is its needle's key
        first_q = text.index("What is the pass key of")
        assert all(text.index(f"The pass key of {n} is") < first_q for n in needles)   # needles, then questions
        counts.append(len(asked))
    assert max(counts) == 4 and min(counts) < 4                               # short documents ask fewer
    one = list(passkey_documents(recipe_from_dict({**raw, "data": {**raw["data"], "passkey": pk}})))
    assert all(t.count("What is") == 1 for _, t in one)
    with pytest.raises(ConfigError, match="data.passkey.questions: more than one question needs keyed needles"):
        recipe_from_dict({"data": {"passkey": {"docs": 1, "questions": 2}}})
    with pytest.raises(ConfigError, match="data.passkey.questions: must be >= 1"):
        recipe_from_dict({"data": {"passkey": {"docs": 1, "questions": 0, "needle_every": 32}}})


def test_token_cache_key_covers_passkey_options(tmp_path, tok):
    from lctrain.data.dataset import token_cache_dir
    base = {"tokenizer": {"path": tok.path}, "data": {"cache_dir": str(tmp_path)}}
    key = lambda pk: token_cache_dir(recipe_from_dict({**base, "data": {**base["data"], "passkey": pk}}), tok)
    keys = [key({}), key({"docs": 10}), key({"docs": 10, "seed": 1}), key({"docs": 10, "max_tokens": 300}),
            key({"docs": 10, "preamble": False}), key({"docs": 10, "needle_every": 32, "questions": 2})]
    assert len(set(keys)) == len(keys)
    assert key({}) == key({"seed": 5})        # no documents mixed in: the options don't matter


def test_passkey_mix_adds_the_protocol_to_tokenizer_training(tmp_path):
    from lctrain.data.dataset import ensure_tokenizer, tokenizer_path
    base = {"tokenizer": {"vocab_size": 512, "train_bytes": 200_000}, "data": {"max_bytes": 8000, "cache_dir": str(tmp_path)}}
    with_pk = lambda pk: recipe_from_dict({**base, "data": {**base["data"], "passkey": pk}})
    plain, mixed = recipe_from_dict(base), with_pk({"docs": 5})
    assert tokenizer_path(plain) != tokenizer_path(mixed)
    assert tokenizer_path(plain) == tokenizer_path(with_pk({"docs": 0, "seed": 3}))   # inactive: unchanged
    tok = ensure_tokenizer(mixed, log=lambda m: None)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode(" Remember it. What is the pass key?")]
    assert "\u2581Remember" in pieces and "\u2581pass" in pieces and "\u2581What" in pieces
    plain_tok = ensure_tokenizer(plain, log=lambda m: None)
    assert "\u2581Remember" not in [plain_tok.sp.id_to_piece(i) for i in plain_tok.encode(" Remember")]


# --- mitigations ------------------------------------------------------------------------------------

def test_parse_mitigation():
    m = parse_mitigation(" decay_scale=2.0, state_window=64 ")
    assert m.name == "decay_scale=2,state_window=64" and m.decay_scale == 2.0 and m.state_window == 64
    assert parse_mitigation("none").neutral and parse_mitigation("decay_scale=1").neutral
    assert parse_mitigation("state_norm=auto").state_norm == "auto"
    for bad, msg in (("foo=1", "unknown knob"), ("decay_scale=-1", "positive"), ("state_window=0", "positive"),
                     ("state_window=1.5", "integer"), ("state_norm=10,state_window=5", "cannot be combined"),
                     ("decay_scale", "knob=value"), ("decay_scale=2,decay_scale=3", "twice"), ("", "spec")):
        with pytest.raises(ConfigError, match=msg) as e:
            parse_mitigation(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"eval.length.mitigations\[1\]"):
        recipe_from_dict({"eval": {"length": {"mitigations": ["none", "bogus"]}}})


@pytest.mark.parametrize("pattern", ["M", "G", "CB"])
def test_each_mitigation_is_identity_when_neutral(pattern):
    model = LanguageModel(_tiny_cfg(pattern=pattern, n_layers=len(pattern), mixers=_mixer_opts(pattern))).eval()
    _randomize(model)
    ids = torch.randint(0, V, (2, 50))
    with torch.no_grad():
        base = chunked_logits(model, ids, 16)
        full = model(ids).logits
    torch.testing.assert_close(base, full, rtol=1e-4, atol=1e-4)
    # neutral values: decay x1, a window longer than the input (bit-identical paths), an infinite cap
    assert torch.equal(chunked_logits(model, ids, 16, parse_mitigation("decay_scale=1").knobs()), base)
    assert torch.equal(chunked_logits(model, ids, 16, parse_mitigation("state_window=50").knobs()), base)
    assert torch.equal(chunked_logits(model, ids, 16, parse_mitigation("state_window=1000000").knobs()), base)
    # the cap runs token by token (a different, exact summation order): equal to float tolerance
    torch.testing.assert_close(chunked_logits(model, ids, 16, parse_mitigation("state_norm=1e30").knobs()), base,
                               rtol=1e-5, atol=1e-5)
    # and non-neutral values do change the output (so the comparisons above can fail)
    assert not torch.allclose(chunked_logits(model, ids, 16, parse_mitigation("state_window=8").knobs()), base)
    if pattern != "CB":          # BASED has no decay: decay_scale is a no-op there by definition
        assert not torch.allclose(chunked_logits(model, ids, 16, parse_mitigation("decay_scale=3").knobs()), base)


def _growing_model(pattern):
    """One recurrent layer whose state grows ~linearly on a constant input: decay ~ 1."""
    cfg = _tiny_cfg(pattern=pattern, n_layers=1, ffn_pattern="-", mixers=_mixer_opts(pattern))
    model = LanguageModel(cfg).eval()
    with torch.no_grad():
        mixer = model.layers[0].mixer
        if pattern == "M":
            mixer.A_log.fill_(float(np.log(1e-4)))        # g = A dt ~ -1.3e-4 per token: almost no forgetting
            mixer.dt_bias.fill_(0.55)                     # dt ~ softplus(0.55) ~ 1
        elif pattern == "G":
            mixer.gk_up.bias.fill_(8.0)                   # g = logsigmoid(~8) / 16 ~ -2e-5
    return model


DECAY = {"M": 100, "G": 2000}     # decay_scale giving a forgetting time of ~20-80 tokens on these models


def _norm_curve(result, name):
    """Largest per-head state norm at each recorded position for one mitigation."""
    st = result["mitigations"][name]["state"]
    return np.array([max(max(row) for row in (layer["norm"][i] for layer in st))
                     for i in range(len(result["state_positions"]))])


@pytest.mark.parametrize("pattern", ["M", "G", "B"])
def test_mitigations_bound_a_growing_state(pattern):
    model = _growing_model(pattern)
    T = 2048
    samples = [np.full(T, 7, dtype=np.int64)]             # one token repeated: k, v constant, the state piles up
    cfg = LengthEvalConfig(length=T, samples=1, buckets_per_octave=1, chunk_size=256, mitigations=["none"])
    res = evaluate_length(model, samples, cfg, train_len=64)
    pos = list(res["state_positions"])
    half, p128 = pos.index(T // 2), pos.index(128)
    none = _norm_curve(res, "none")
    assert none[-1] > 1.6 * none[half], none               # grows ~linearly without mitigation
    cap = float(none[p128])
    specs = [f"state_norm={cap!r}", "state_window=64"] + ([f"decay_scale={DECAY[pattern]}"] if pattern in DECAY else [])
    res = evaluate_length(model, samples, LengthEvalConfig(**{**cfg.__dict__, "mitigations": specs}), train_len=64)
    names = [n for n in res["mitigations"] if n != "none"]      # the baseline pass is always added first
    capped = _norm_curve(res, names[0])
    assert capped.max() <= cap * (1 + 1e-5) and capped[-1] >= 0.99 * cap      # held at the cap
    assert res["mitigations"][names[0]]["state_norm_cap"] == cap
    for name in names[1:]:
        c = _norm_curve(res, name)
        assert c[-1] < 0.25 * none[-1], (name, c[-1], none[-1])              # bounded well below
        assert abs(c[-1] - c[half]) <= 0.05 * c[half], (name, c)              # and flat: a plateau


def test_state_norm_auto_caps_each_head_at_its_own_norm_within_train_len():
    model = _growing_model("M")
    with torch.no_grad():                          # heads grow at different rates: per-head caps must differ
        model.layers[0].mixer.dt_bias.copy_(torch.linspace(-2.0, 1.0, model.layers[0].mixer.nheads))
    T = 1024
    cfg = LengthEvalConfig(length=T, samples=1, buckets_per_octave=1, chunk_size=128,
                           mitigations=["state_norm=auto"])
    res = evaluate_length(model, [np.full(T, 3, dtype=np.int64)], cfg, train_len=128)
    assert list(res["mitigations"]) == ["none", "state_norm=auto"]       # the baseline is added first
    i128 = res["state_positions"].index(128)
    none = np.array(res["mitigations"]["none"]["state"][0]["norm"])       # [positions, heads]
    auto = np.array(res["mitigations"]["state_norm=auto"]["state"][0]["norm"])
    caps = np.array(res["mitigations"]["state_norm=auto"]["head_state_norm"][0]["values"])
    np.testing.assert_allclose(caps, none[:i128 + 1].max(0), rtol=1e-6)    # each head: its own in-training peak
    assert caps.max() > 2 * caps.min()
    assert (auto <= caps * (1 + 1e-5)).all() and (none[-1] > 2 * caps).all()
    np.testing.assert_allclose(auto[:i128 + 1], none[:i128 + 1], rtol=1e-5)   # never binds inside train len
    np.testing.assert_allclose(auto[-1], caps, rtol=1e-3)                       # every head held at its own cap


def test_state_stats_and_recurrent_layers():
    model = LanguageModel(_tiny_cfg(pattern="MGAB", n_layers=4, mixers=_mixer_opts("MGAB"))).eval()
    assert [(l, k) for l, k, _ in recurrent_layers(model)] == [(0, "ssm"), (1, "state"), (3, "state")]
    cache = stream(model, torch.randint(0, V, (2, 30)), chunk_size=8)
    st = layer_states(model, cache)
    assert [(l, k) for l, k, _ in st] == [(0, "ssm"), (1, "state"), (3, "state")]
    for (_, _, S), (_, _, H) in zip(st, recurrent_layers(model)):
        assert S.dim() == 4 and S.shape[:2] == (2, H)


def test_length_study_loss_buckets_match_a_direct_computation():
    model = LanguageModel(_tiny_cfg(pattern="M", n_layers=2, mixers=_mixer_opts("M"))).eval()
    _randomize(model)
    T = 300
    samples = [np.random.default_rng(i).integers(0, V, T) for i in range(3)]
    cfg = LengthEvalConfig(length=T, samples=3, buckets_per_octave=2, chunk_size=64)
    res = evaluate_length(model, samples, cfg, train_len=100)
    ids = torch.from_numpy(np.stack(samples))
    with torch.no_grad():
        lg = model(ids).logits
    nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(3, T - 1)
    r = res["mitigations"]["none"]
    for i, b in enumerate(res["buckets"]):
        want = nll[:, b["lo"] - 1:b["hi"] - 1]
        assert r["count"][i] == want.numel()
        assert r["loss"][i] == pytest.approx(float(want.mean()), rel=1e-4)
    assert sum(r["count"]) == 3 * (T - 1)
