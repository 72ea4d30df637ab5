"""Passkey retrieval: the prompt builder, the scorer and the training-data source.

The standard protocol (Mohtashami & Jaggi 2023, "Landmark Attention"; used by LongLoRA, Stuffed Mamba):

    [preamble] <filler ...> The pass key is 12345. Remember it. 12345 is the pass key. <filler ...>
    What is the pass key? The pass key is

The haystack repeats "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
back again." (`haystack: repeat`), or is a window of real text (`haystack: text`, TokenPromptBuilder:
the run's own corpus, as Needle-in-a-Haystack uses essays). The needle sits at a relative depth in [0, 1] of the haystack (0: right after the
preamble, 1: right before the question). The prompt length is measured in tokens of the model's own
tokenizer; the answer is scored by `score` (the first number in the output equals the key).

Exact lengths: the text is a sequence of whitespace-separated words, and a sentencepiece model that
splits by whitespace (ours does) encodes it as the concatenation of its words' encodings. So the
builder knows every word's token count, picks the filler window (start word and word count in the
repeating haystack) whose token count makes the prompt exactly the requested length, and the needle
split that puts it closest to the requested depth. The final text is encoded once more and that
encoding is authoritative (a tokenizer that does not split by whitespace gets a nearby length).

Training data (`data.passkey` in a recipe): `passkey_documents(recipe)` yields synthetic documents
(prompt followed by " <key>.") of uniformly random token length, depth and key, mixed into the token
cache through `lctrain.data.dataset.EXTRA_SOURCES["passkey"]`. When the run trains its own tokenizer,
`passkey_documents.tokenizer_text` adds the protocol's sentences to its training text, so the
protocol's words are single pieces (a code-only BPE splits them into fragments, which makes the task
much slower to learn at CPU scale).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
            "them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
CHANCE = 1.0 / 9 / 10 ** (KEY_DIGITS - 1)     # a uniformly guessed 5-digit key (10000..99999)

_FILLER_WORDS = FILLER.split()


@dataclass
class PasskeyPrompt:
    text: str
    ids: list[int]
    key: str
    depth: float              # requested needle depth
    needle_start: int         # token index of the needle's first token
    needle_end: int           # one past its last token
    filler_start: int         # token index of the haystack's first token (after the preamble)
    filler_end: int           # one past the haystack's last token (the question follows)
    others: list[tuple[str, str]] = field(default_factory=list)   # keyed: (name, key) of the other needles, in order

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def needle_depth(self) -> float:
        """Achieved depth: filler tokens before the needle / all filler tokens."""
        filler = (self.filler_end - self.filler_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.filler_start) / filler if filler > 0 else 0.0


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1))


class PromptBuilder:
    """Builds passkey prompts of an exact token length for one tokenizer (caches word token counts)."""

    def __init__(self, tokenizer, preamble: bool = True):
        self.tok = tokenizer
        self.preamble = preamble
        self._wlen: dict[str, int] = {}
        cyc = [self._word_len(w) for w in _FILLER_WORDS]
        self._cycle = cyc
        self._cycle_tokens = sum(cyc)

    def _word_len(self, word: str) -> int:
        n = self._wlen.get(word)
        if n is None:
            n = self._wlen[word] = len(self.tok.encode(" " + word))
        return n

    def _seg_len(self, text: str, first: bool) -> int:
        return len(self.tok.encode(text if first else " " + text))

    def fixed_tokens(self, key: str = "12345") -> int:
        """Tokens of a prompt with no filler at all (preamble, needle, question)."""
        parts = ([PREAMBLE] if self.preamble else []) + [NEEDLE.format(key=key), QUESTION]
        return sum(self._seg_len(p, i == 0 and self.preamble) for i, p in enumerate(parts))

    def _filler_sum(self, start: int, n: int) -> int:
        full, rest = divmod(n, len(self._cycle))
        total = full * self._cycle_tokens
        for i in range(rest):
            total += self._cycle[(start + i) % len(self._cycle)]
        return total

    def _pick_window(self, target: int) -> tuple[int, int]:
        """(start word, word count) of filler with exactly `target` tokens, else the closest."""
        if target <= 0:
            return 0, 0
        per_word = self._cycle_tokens / len(self._cycle)
        guess = int(target / per_word)
        best = None
        for n in range(max(0, guess - 8), guess + 9):
            for s in range(len(self._cycle)):
                err = abs(self._filler_sum(s, n) - target)
                cand = (err, n, s)
                if best is None or cand < best:
                    best = cand
            if best[0] == 0:
                break
        return best[2], best[1]

    def build(self, n_tokens: int, depth: float, key: str, rng: Optional[random.Random] = None) -> PasskeyPrompt:
        """A prompt of `n_tokens` tokens (question included) with the needle at `depth` of the haystack
        (`rng` is unused: the repeated haystack has no randomness)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
        fixed = self.fixed_tokens(key)
        if n_tokens < fixed:
            raise ValueError(f"passkey: length {n_tokens} is shorter than the prompt without filler "
                             f"({fixed} tokens: {'preamble, ' if self.preamble else ''}needle, question)")
        start, n = self._pick_window(n_tokens - fixed)
        words = [_FILLER_WORDS[(start + i) % len(_FILLER_WORDS)] for i in range(n)]
        lens = [self._word_len(w) for w in words]
        filler_total = sum(lens)
        # needle split: filler words before it whose tokens are closest to depth * filler tokens
        want, acc, split, best = depth * filler_total, 0, 0, abs(depth * filler_total)
        for i, L in enumerate(lens):
            acc += L
            if abs(acc - want) < best:
                best, split = abs(acc - want), i + 1
        needle = NEEDLE.format(key=key)
        segs: list[tuple[str, str]] = []          # (kind, text)
        if self.preamble:
            segs.append(("preamble", PREAMBLE))
        segs += [("filler", w) for w in words[:split]] + [("needle", needle)]
        segs += [("filler", w) for w in words[split:]] + [("question", QUESTION)]
        # without the preamble the text starts with a space, so every word is encoded as " word"
        lead = "" if self.preamble else " "
        text = lead + " ".join(t for _, t in segs)
        ids = self.tok.encode(text)
        # token spans from per-segment counts (exact for whitespace-splitting tokenizers, checked below)
        pos, spans = 0, []
        for i, (kind, t) in enumerate(segs):
            L = self._word_len(t) if kind == "filler" else self._seg_len(t, i == 0 and self.preamble)
            spans.append((kind, pos, pos + L))
            pos += L
        if pos != len(ids):       # not whitespace-splitting: locate the spans by prefix encodings
            spans = []
            for i in range(len(segs)):
                lo = len(self.tok.encode(lead + " ".join(t for _, t in segs[:i]))) if i else 0
                hi = len(self.tok.encode(lead + " ".join(t for _, t in segs[:i + 1])))
                spans.append((segs[i][0], lo, hi))
        nd = next(s for s in spans if s[0] == "needle")
        fs = spans[1][1] if self.preamble else 0
        fe = next(s for s in spans if s[0] == "question")[1]
        return PasskeyPrompt(text=text, ids=ids, key=key, depth=depth, needle_start=nd[1], needle_end=nd[2],
                             filler_start=fs, filler_end=fe)


# Names of the keyed needles (`needle_every`): short words, none of them in the repeated haystack.
NAMES = ("red", "black", "white", "orange", "purple", "pink", "brown", "gray", "gold", "silver", "cat", "dog",
         "fox", "owl", "bee", "ant", "cow", "pig", "hen", "bat", "elk", "yak", "ram", "eel", "apple", "pear",
         "plum", "lime", "fig", "kiwi", "melon", "grape", "peach", "lemon", "olive", "rice", "corn", "bean",
         "oak", "elm", "pine", "rose", "lily", "iris", "fern", "moss", "sand", "rock", "hill", "lake", "river",
         "sea", "moon", "star", "rain", "snow", "wind", "fire", "salt", "milk", "tea", "bread", "cake", "soup")
KEYED_NEEDLE = "The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
KEYED_QUESTION = "What is the pass key of {name}? The pass key of {name} is"


class TokenPromptBuilder:
    """Passkey prompts built in token ids, so their length is exact for any tokenizer, over a haystack
    given as a token stream: real text (`haystack: text`, windows of the run's corpus, as
    Needle-in-a-Haystack uses essays; Kamradt 2023) or the repeated sentences tiled.

    With `needle_every` = N > 0 the prompt holds one keyed needle per N tokens ("The pass key of red is
    12345. ..."), each with its own name and key, and the question names the one asked: RULER's
    multi-key needle-in-a-haystack (Hsieh et al. 2024, §3.1). Why it exists: with one needle a selective
    SSM learns to write only the key into its state and nothing of the haystack, so its recall does not
    depend on the state size; when the model cannot know at write time which needle will be asked, it
    has to keep all of them, and the number it can keep apart is bounded by its state ("state capacity",
    Chen et al. 2024, §5; associative recall vs state size, Arora et al. 2023).

    Layout: [preamble] window[:s] needle window[s:] question, with the other needles (keyed mode) at
    uniformly random offsets of the window, s = round(depth x window tokens). Fixed parts are encoded as
    they appear mid-text (leading space). `stream`: 1-D int token ids; each prompt's window starts at an
    offset drawn from `rng`, as are the other needles' names, keys and places.
    """

    def __init__(self, tokenizer, stream, preamble: bool = True, needle_every: int = 0):
        import numpy as np
        self.tok = tokenizer
        self.preamble = preamble
        self.needle_every = needle_every
        self.stream = np.asarray(stream, dtype=np.int64).reshape(-1)
        self._pre = tokenizer.encode(PREAMBLE) if preamble else []
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tok.encode(" " + text)
        return ids

    def _needle(self, key: str, name: Optional[str]) -> list[int]:
        return self.tok.encode(" " + (NEEDLE.format(key=key) if name is None else KEYED_NEEDLE.format(name=name, key=key)))

    def _question(self, name: Optional[str]) -> list[int]:
        return self._ids(QUESTION if name is None else KEYED_QUESTION.format(name=name))

    def fixed_tokens(self, key: str = "12345") -> int:
        """Tokens of the prompt without haystack (the longest over names in keyed mode)."""
        names = NAMES if self.needle_every else (None,)
        return len(self._pre) + max(len(self._needle(key, n)) + len(self._question(n)) for n in names)

    def build(self, n_tokens: int, depth: float, key: str, rng: Optional[random.Random] = None) -> PasskeyPrompt:
        """A prompt of exactly `n_tokens` tokens. Raises ValueError for a depth outside [0, 1], a length
        below `fixed_tokens()`, more keyed needles than NAMES, or a haystack stream shorter than the
        window the prompt needs."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
        rng = rng or random.Random(0)
        others: list[tuple[str, str, list[int]]] = []      # (name, key, needle ids) of the other needles
        name = None
        if self.needle_every:
            count = max(1, n_tokens // self.needle_every)
            if count > len(NAMES):
                raise ValueError(f"passkey: {n_tokens} tokens at one needle per {self.needle_every} need {count} "
                                 f"needles, more than the {len(NAMES)} names")
            name, *rest = rng.sample(NAMES, count)
            for other in rest:
                other_key = random_key(rng)
                others.append((other, other_key, self._needle(other_key, other)))
        needle, question = self._needle(key, name), self._question(name)
        F = n_tokens - len(self._pre) - len(needle) - len(question)
        if F < 0:
            raise ValueError(f"passkey: length {n_tokens} is shorter than the prompt without filler "
                             f"({n_tokens - F} tokens: {'preamble, ' if self.preamble else ''}needle, question)")
        while others and sum(len(o[2]) for o in others) > F:      # short prompts hold fewer needles
            others.pop()
        F -= sum(len(o[2]) for o in others)
        if F > self.stream.size:
            raise ValueError(f"passkey: the haystack holds {self.stream.size} tokens, fewer than the {F} "
                             f"a {n_tokens}-token prompt needs")
        start = rng.randrange(self.stream.size - F + 1)
        window = self.stream[start:start + F].tolist()
        split = round(depth * F)
        inserts = sorted([(split, 1, needle, None)] + [(rng.randint(0, F), 0, ids, (o, k)) for o, k, ids in others],
                         key=lambda t: (t[0], t[1]))
        ids, pos, ns, placed = list(self._pre), 0, 0, []
        for at, asked, part, name_key in inserts:
            ids += window[pos:at]
            pos = at
            if asked:
                ns = len(ids)
            else:
                placed.append(name_key)
            ids += part
        ids += window[pos:]
        fe = len(ids)
        ids += question
        return PasskeyPrompt(text=self.tok.decode(ids), ids=ids, key=key, depth=depth, needle_start=ns,
                             needle_end=ns + len(needle), filler_start=len(self._pre), filler_end=fe,
                             others=placed)


def make_builder(tokenizer, preamble: bool, haystack_stream=None, needle_every: int = 0):
    """The prompt builder: the word-exact repeated-sentence builder for the standard protocol
    (`haystack_stream` None, one needle), else a TokenPromptBuilder over `haystack_stream` or, without
    one, over the repeated sentences tiled."""
    if haystack_stream is None and not needle_every:
        return PromptBuilder(tokenizer, preamble=preamble)
    if haystack_stream is None:
        import numpy as np
        cycle = tokenizer.encode(" " + FILLER)
        haystack_stream = np.tile(np.asarray(cycle, dtype=np.int64), 1 + (1 << 17) // len(cycle))
    return TokenPromptBuilder(tokenizer, haystack_stream, preamble=preamble, needle_every=needle_every)


def haystack_stream(data, tokenizer, validation: bool, need: Optional[int]):
    """The text haystack of a run: documents of one split of its corpus (lctrain.data.corpus
    split_token_docs; training documents for training, held-out ones for evaluation), joined by a blank
    line into one int64 stream of at least `need` tokens when the split holds that many.
    Raises ValueError when the split holds no text."""
    import numpy as np

    from lctrain.data.corpus import DOC_SEPARATOR, split_token_docs
    docs = split_token_docs(data, tokenizer, validation=validation, need=need)
    if not docs:
        raise ValueError(f"passkey: haystack text: the {'held-out' if validation else 'training'} split of the "
                         f"run's corpus (data.source={data.source}) has no documents")
    sep = np.asarray(tokenizer.encode(DOC_SEPARATOR), dtype=np.int64)
    parts = []
    for d in docs:
        parts += [d.astype(np.int64), sep]
    return np.concatenate(parts[:-1])


_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> Optional[str]:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def score(output: str, key: str) -> bool:
    """The standard passkey score: the first number in the model's output equals the key."""
    return first_number(output) == str(key)


# --- training data --------------------------------------------------------------------------------

def answer_text(key: str) -> str:
    return f" {key}."


def passkey_documents(recipe) -> Iterator[tuple[str, str]]:
    """Synthetic passkey documents for `recipe.data.passkey` (none when `docs` is 0).

    Each document is a prompt of uniformly random token length in [min_tokens, max_tokens] (answers
    included), uniformly random depth and key, followed by the answer " <key>.". Seeded per document.
    `haystack: text` fills it with windows of the corpus's training split (TokenPromptBuilder).
    Keyed needles with `questions` = Q > 1: the prompt is followed by up to Q - 1 more questions, each
    naming another of its needles and followed by that needle's answer (multi-query associative recall,
    Arora et al. 2023, "Zoology" §3: Q answers to learn from per document instead of one); they take
    their tokens from the same length budget, so a document never exceeds max_tokens.
    """
    cfg = recipe.data.passkey
    if cfg.docs <= 0:
        return
    from lctrain.data.dataset import tokenizer_path
    from lctrain.data.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path(recipe))
    stream = None
    if cfg.haystack == "text":           # enough training text for a fresh window per document (when the corpus has it)
        stream = haystack_stream(recipe.data, tok, validation=False, need=cfg.docs * cfg.max_tokens)
    builder = make_builder(tok, cfg.preamble, stream, cfg.needle_every)
    ans = len(tok.encode(answer_text("12345")))
    lo = max(cfg.min_tokens, builder.fixed_tokens() + ans)
    if cfg.max_tokens < lo:
        raise ValueError(f"data.passkey.max_tokens: {cfg.max_tokens} is shorter than the shortest passkey "
                         f"document ({lo} tokens with this tokenizer)")
    extra = 0                            # tokens of one more question and its answer (the longest name)
    if cfg.needle_every and cfg.questions > 1:
        extra = ans + max(len(builder._question(n)) for n in NAMES)
    for i in range(cfg.docs):
        rng = random.Random(f"passkey:{cfg.seed}:{i}")
        n = rng.randint(lo, cfg.max_tokens)
        k = min(cfg.questions - 1, (n - lo) // extra) if extra else 0     # extra questions that fit
        p = builder.build(n - ans - k * extra, rng.random(), random_key(rng), rng)
        text = p.text + answer_text(p.key)
        for name, key in rng.sample(p.others, min(k, len(p.others))):
            text += " " + KEYED_QUESTION.format(name=name) + answer_text(key)
        yield f"passkey/{cfg.seed}/{i}", text


TOKENIZER_COPIES = 1000     # ~0.45 MB of protocol text in the tokenizer's training sample


def _tokenizer_text(recipe) -> list[str]:
    """The protocol's sentences for tokenizer training (none unless passkey documents are mixed in)."""
    if recipe.data.passkey.docs <= 0:
        return []
    sample = " ".join([PREAMBLE] + [FILLER] * 3 + [NEEDLE.format(key="12345"), QUESTION + answer_text("67890")])
    if recipe.data.passkey.needle_every:          # the keyed needles' names become single pieces too
        sample += " " + " ".join(KEYED_NEEDLE.format(name=n, key="24680") for n in NAMES)
        sample += " " + KEYED_QUESTION.format(name="red") + answer_text("13579")
    return [sample] * TOKENIZER_COPIES


passkey_documents.tokenizer_text = _tokenizer_text
