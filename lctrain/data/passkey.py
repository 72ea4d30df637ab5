"""Passkey retrieval: the prompt builder, the scorer and the training-data source.

The standard protocol (Mohtashami & Jaggi 2023, "Landmark Attention"; used by LongLoRA, Stuffed Mamba):

    [preamble] <filler ...> The pass key is 12345. Remember it. 12345 is the pass key. <filler ...>
    What is the pass key? The pass key is

The haystack repeats "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
back again." The needle sits at a relative depth in [0, 1] of the haystack (0: right after the
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
from dataclasses import dataclass
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

    def build(self, n_tokens: int, depth: float, key: str) -> PasskeyPrompt:
        """A prompt of `n_tokens` tokens (question included) with the needle at `depth` of the haystack."""
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

    Each document is a prompt of uniformly random token length in [min_tokens, max_tokens] (answer
    included), uniformly random depth and key, followed by the answer " <key>.". Seeded per document.
    """
    cfg = recipe.data.passkey
    if cfg.docs <= 0:
        return
    from lctrain.data.dataset import tokenizer_path
    from lctrain.data.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path(recipe))
    builder = PromptBuilder(tok, preamble=cfg.preamble)
    ans = len(tok.encode(answer_text("12345")))
    lo = max(cfg.min_tokens, builder.fixed_tokens() + ans)
    if cfg.max_tokens < lo:
        raise ValueError(f"data.passkey.max_tokens: {cfg.max_tokens} is shorter than the shortest passkey "
                         f"document ({lo} tokens with this tokenizer)")
    for i in range(cfg.docs):
        rng = random.Random(f"passkey:{cfg.seed}:{i}")
        n = rng.randint(lo, cfg.max_tokens)
        p = builder.build(n - ans, rng.random(), random_key(rng))
        yield f"passkey/{cfg.seed}/{i}", p.text + answer_text(p.key)


TOKENIZER_COPIES = 1000     # ~0.45 MB of protocol text in the tokenizer's training sample


def _tokenizer_text(recipe) -> list[str]:
    """The protocol's sentences for tokenizer training (none unless passkey documents are mixed in)."""
    if recipe.data.passkey.docs <= 0:
        return []
    sample = " ".join([PREAMBLE] + [FILLER] * 3 + [NEEDLE.format(key="12345"), QUESTION + answer_text("67890")])
    return [sample] * TOKENIZER_COPIES


passkey_documents.tokenizer_text = _tokenizer_text
