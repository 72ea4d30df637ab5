"""Sentencepiece BPE tokenizer: trained on the run's data when none exists yet, stored for reuse.

Settings keep source code intact: identity normalisation, no whitespace folding, no dummy prefix,
newline as its own symbol, byte fallback (no unknown tokens) and split digits (numbers are read
digit by digit, which passkey retrieval relies on). Id 1 is the end-of-document token.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator

import sentencepiece as spm

from lctrain.tempfiles import clean_dead_temps, temp_path

EOD_PIECE_ID = 1


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer: file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(path)
        except Exception:
            raise TokenizerError(f"tokenizer: {path} is not a sentencepiece model") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else EOD_PIECE_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
        """Ids of each text; `threads` sentencepiece threads (0: its default, all cores)."""
        return self.sp.encode(texts, num_threads=threads or -1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _sentences(texts: Iterable[str], budget: int, piece: int = 4000) -> Iterator[str]:
    """Split documents into pieces sentencepiece accepts, stopping after `budget` characters."""
    used = 0
    for text in texts:
        for i in range(0, len(text), piece):
            yield text[i:i + piece]
            used += min(piece, len(text) - i)
            if used >= budget:
                return


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int, train_bytes: int) -> Tokenizer:
    """Train a BPE model on up to `train_bytes` characters of `texts`; written atomically to out_path."""
    buf = io.BytesIO()
    errors: list[BaseException] = []

    def guarded():       # an error of the data source (lctrain.data.corpus.DataError) is the cause to report
        try:
            yield from _sentences(texts, train_bytes)
        except Exception as e:
            errors.append(e)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=16384, unk_id=0, bos_id=-1, eos_id=EOD_PIECE_ID, pad_id=-1,
            user_defined_symbols=["\n"], num_threads=min(8, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        msg = str(e).splitlines()[-1] if str(e) else "training failed"
        raise TokenizerError(f"tokenizer.vocab_size: cannot train a {vocab_size}-piece BPE on this data ({msg})") from None
    if errors:
        raise errors[0]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    clean_dead_temps(os.path.dirname(os.path.abspath(out_path)))
    tmp = temp_path(out_path)
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)
