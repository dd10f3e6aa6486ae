"""Tokenizers with one interface: ``tokenize(list_of_str) -> np.ndarray`` of int32 ids, shape (B, max_length).

* ``WordTokenizer``: a closed word-level vocabulary for the procedural world's caption grammar, plus CLIP's
  special tokens and reserved *rare identifier* tokens (``sks`` ...) that personalization binds to a subject.
  The grammar is closed, so an unknown word is a bug in the caller and raises (unless an unk token is asked
  for).
* ``HFCLIPTokenizer``: transformers' ``CLIPTokenizer`` from a Stable Diffusion folder's ``tokenizer/``, padded
  and truncated to ``model_max_length`` exactly as the diffusers pipelines do.

* ``TokenizerPair``: SDXL's two CLIP tokenizers for its two text encoders, their ids side by side in one row
  (``split`` takes them apart), so batches, shots and minibatches carry one ``input_ids`` array as for SD-1.x.

Both lay a prompt out as CLIP does: ``<|startoftext|> w1 … wn <|endoftext|> pad…``, padding with the EOS id
unless a separate pad token is configured, so the CLIP encoder's EOS pooling finds the first EOS.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from metalora.train.io import atomic_write_text

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_RARE_TOKENS = ("sks", "ohwx", "zwx", "phol")
# Punctuation that captions use to separate phrases ("a photo of a person, smiling"); always in the vocabulary.
DEFAULT_PUNCTUATION = (",", ".")

# A word keeps inner hyphens/apostrophes ("t-shirt", "person's"); other punctuation is a token of its own.
_WORD_PATTERN = re.compile(r"[\w'\-]+|[^\w\s]")
_FORMAT = "metalora.WordTokenizer/1"


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of metalora needs from a tokenizer."""

    max_length: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def tokenize(self, texts: Sequence[str]) -> np.ndarray: ...

    def single_token_id(self, word: str) -> int:
        """The id of ``word`` if it is exactly one known token (textual inversion's identifier and class word);
        raises ``ValueError`` otherwise."""
        ...


class UnknownWordError(KeyError):
    """A word outside the tokenizer's closed vocabulary."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"tokenize expects a list of strings, got the single string {texts!r}; wrap it in a list")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokenize expects strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts


class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary.

    Ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>``, then the pad token (if separate), the unk token (if
    any), the rare identifier tokens, the punctuation tokens, and the vocabulary words in the order given
    (duplicates, and words already among the punctuation, dropped).
    Text is lowercased and split into words (``_WORD_PATTERN``).

    Args:
      vocabulary: the caption grammar's words (e.g. from the data module).
      max_length: every sequence is padded to this length, BOS and EOS included (SD's tokenizer uses 77).
      rare_tokens: reserved identifier tokens; they must not be vocabulary words (they must stay rare).
      punctuation: punctuation tokens added to the vocabulary (each a single non-word character).
      unk_token: if given, unknown words map to this token instead of raising.
      pad_token: if given, a separate padding token; by default sequences are padded with EOS, as CLIP does.
      truncate: if False (default), a caption longer than ``max_length - 2`` words raises; if True it is cut
        like SD's tokenizer (keeping the final EOS).
    """

    def __init__(self, vocabulary: Sequence[str], *, max_length: int = 24,
                 rare_tokens: Sequence[str] = DEFAULT_RARE_TOKENS, punctuation: Sequence[str] = DEFAULT_PUNCTUATION,
                 unk_token: str | None = None, pad_token: str | None = None, truncate: bool = False):
        if isinstance(vocabulary, str):
            raise TypeError("vocabulary must be a sequence of words, not a single string")
        if max_length < 3:
            raise ValueError(f"max_length={max_length} leaves no room for a word between BOS and EOS")
        punctuation = tuple(dict.fromkeys(punctuation))
        words = [w for w in dict.fromkeys(w.lower() for w in vocabulary) if w not in punctuation]
        for word in [*words, *rare_tokens, *punctuation]:
            if not word or _WORD_PATTERN.fullmatch(word) is None:
                raise ValueError(f"vocabulary entry {word!r} is not a single word under the word pattern "
                                 f"{_WORD_PATTERN.pattern!r}, so text could never produce it")
        clash = sorted(set(words) & {t.lower() for t in rare_tokens})
        if clash:
            raise ValueError(f"rare tokens {clash} also occur in the vocabulary; an identifier token must not be "
                             "a word the captions already use")
        specials = [BOS_TOKEN, EOS_TOKEN] + [t for t in (pad_token, unk_token) if t is not None]
        tokens = specials + [t.lower() for t in rare_tokens] + list(punctuation) + words
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"special/rare tokens collide: {specials + list(rare_tokens)}")
        self.max_length = int(max_length)
        self.truncate = bool(truncate)
        self.rare_tokens = tuple(t.lower() for t in rare_tokens)
        self.punctuation = punctuation
        self.unk_token = unk_token
        self.pad_token = pad_token
        self._vocabulary = tuple(words)
        self._tokens = tuple(tokens)
        self._ids = {t: i for i, t in enumerate(tokens)}
        self.bos_token_id = self._ids[BOS_TOKEN]
        self.eos_token_id = self._ids[EOS_TOKEN]
        self.pad_token_id = self._ids[pad_token] if pad_token is not None else self.eos_token_id
        self.unk_token_id = self._ids[unk_token] if unk_token is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens

    def token_to_id(self, token: str) -> int:
        if token in self._ids:
            return self._ids[token]
        if self.unk_token_id is not None:
            return self.unk_token_id
        raise UnknownWordError(f"unknown word {token!r}: not in the tokenizer's vocabulary of "
                               f"{len(self._vocabulary)} words or its rare tokens {list(self.rare_tokens)}")

    def single_token_id(self, word: str) -> int:
        if word not in self._ids:  # (token_to_id would map it to unk)
            raise ValueError(f"{word!r} is not a token of the tokenizer's vocabulary")
        return self._ids[word]

    def encode(self, text: str) -> list[int]:
        """Ids of one caption, with BOS/EOS, unpadded."""
        words = _WORD_PATTERN.findall(text.lower())
        try:
            ids = [self.token_to_id(w) for w in words]
        except UnknownWordError as e:
            raise UnknownWordError(f"{e} (in caption {text!r})") from None
        room = self.max_length - 2
        if len(ids) > room:
            if not self.truncate:
                raise ValueError(f"caption has {len(ids)} words, more than max_length={self.max_length} allows "
                                 f"({room} plus BOS/EOS): {text!r}")
            ids = ids[:room]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """(B, max_length) int32 ids, padded with ``pad_token_id``."""
        texts = _check_texts(texts)
        out = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, :len(ids)] = ids
        return out

    __call__ = tokenize

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The words of one id sequence, specials and padding dropped (stops at the first EOS)."""
        words = []
        for i in np.asarray(ids).tolist():
            if i == self.eos_token_id:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i in (self.bos_token_id, self.pad_token_id):
                continue
            words.append(self._tokens[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "vocabulary": list(self._vocabulary), "max_length": self.max_length,
                "rare_tokens": list(self.rare_tokens), "punctuation": list(self.punctuation),
                "unk_token": self.unk_token, "pad_token": self.pad_token, "truncate": self.truncate,
                "tokens": list(self._tokens)}

    @classmethod
    def from_dict(cls, data: dict) -> WordTokenizer:
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a metalora word tokenizer: format={data.get('format')!r}, expected {_FORMAT!r}")
        tok = cls(data["vocabulary"], max_length=data["max_length"], rare_tokens=data["rare_tokens"],
                  punctuation=data["punctuation"], unk_token=data["unk_token"], pad_token=data["pad_token"],
                  truncate=data["truncate"])
        if "tokens" in data and list(tok.tokens) != list(data["tokens"]):
            raise ValueError("tokenizer file is inconsistent: its token list does not match the one its vocabulary "
                             "and options produce (ids would silently shift)")
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSON atomically (temp file in the same folder, then rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


class HFCLIPTokenizer:
    """transformers' ``CLIPTokenizer`` behind the ``Tokenizer`` interface.

    Pads to ``max_length`` and truncates as diffusers' Stable Diffusion pipelines do (``padding="max_length"``,
    ``truncation=True``, ``max_length=tokenizer.model_max_length``).
    """

    def __init__(self, tokenizer, max_length: int | None = None):
        self._tokenizer = tokenizer
        if max_length is None:
            max_length = tokenizer.model_max_length
            # transformers' "no limit configured" sentinel is ~1e30
            if max_length is None or max_length > 100_000:
                raise ValueError("the tokenizer has no model_max_length (tokenizer_config.json); pass max_length")
        self.max_length = int(max_length)
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id)
        self.vocab_size = len(tokenizer)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, subfolder: str = "tokenizer",
                    max_length: int | None = None) -> HFCLIPTokenizer:
        """Loads from ``<path>/<subfolder>`` (a diffusers pipeline; SDXL's second is ``tokenizer_2``) or from
        ``path`` itself when it directly holds ``vocab.json``/``merges.txt``."""
        from transformers import CLIPTokenizer  # deferred: transformers is slow to import and only needed here

        path = pathlib.Path(path)
        folder = path / subfolder if (path / subfolder).is_dir() else path
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: missing {missing}")
        return cls(CLIPTokenizer.from_pretrained(str(folder)), max_length=max_length)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        ids = self._tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="np")["input_ids"]
        return ids.astype(np.int32)

    __call__ = tokenize

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True).strip()

    def single_token_id(self, word: str) -> int:
        ids = self._tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens for this CLIP tokenizer, not one")
        return int(ids[0])


class TokenizerPair:
    """Two tokenizers of one prompt (SDXL: CLIP ViT-L's and OpenCLIP bigG's, which pad differently): ``tokenize``
    returns (B, L1 + L2) ids, the first tokenizer's row followed by the second's, and ``split`` undoes it on any
    leading axes. One array keeps every batch, shot and minibatch code path the same as for one text encoder."""

    def __init__(self, first, second):
        self.first, self.second = first, second
        self.max_length = int(first.max_length) + int(second.max_length)
        self.vocab_size = first.vocab_size  # SDXL's two CLIP tokenizers share one BPE vocabulary (49408 tokens)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return np.concatenate([self.first.tokenize(texts), self.second.tokenize(texts)], axis=-1)

    __call__ = tokenize

    def split(self, ids):
        """(..., L1 + L2) → ((..., L1), (..., L2)) ids of the first and the second tokenizer."""
        if ids.shape[-1] != self.max_length:
            raise ValueError(f"TokenizerPair.split: ids have {ids.shape[-1]} positions, expected "
                             f"{self.first.max_length} + {self.second.max_length}")
        return ids[..., :self.first.max_length], ids[..., self.first.max_length:]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.first.decode(self.split(np.asarray(ids))[0])

    def single_token_id(self, word: str) -> int:
        raise ValueError("a token of its own is per tokenizer; with two text encoders (SDXL) it would be two tokens "
                         "to learn, which the token-embedding methods do not support")
