"""The served model's vocabulary as bytes: what a token spells, read from the model folder's ``tokenizer.json``.

The intent task needs it for one question: which tokens may start an answer under vLLM's ``choice`` constraint.
vLLM's grammar backend (xgrammar) works on bytes: a token may start the answer when the bytes it spells are a
prefix of one of the labels' bytes. The two vocabularies HF tokenizers write are read here:

- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): each character of a token stands for one byte (GPT-2's
  printable byte alphabet);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): ``▁`` is a space and ``<0xNN>`` one raw byte.

Special tokens (``added_tokens`` marked special) spell nothing: the grammar never allows them inside an answer.
Anything else is ``UnsupportedVocabulary``; the caller keeps the decode that needs no vocabulary.

>>> vocab = Vocabulary.from_folder(Path("/models/qwen2.5-7b-instruct"))   # doctest: +SKIP
>>> vocab.ids_of(b"refund")                                               # doctest: +SKIP
(1580,)
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class UnsupportedVocabulary(ValueError):
    """A tokenizer whose tokens cannot be read as bytes here (not byte-level BPE nor byte fallback)."""


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable character standing for a byte back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


def _byte_level(token: str) -> bytes | None:
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[char] for char in token)
    except KeyError:
        return None


def _byte_fallback(token: str) -> bytes:
    if match := _BYTE_TOKEN.fullmatch(token):
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode()


def _kinds(node: Any) -> set[str]:
    """The component types named in a tokenizer.json decoder or pre-tokenizer (sequences included)."""
    if not isinstance(node, dict):
        return set()
    found = {str(node.get("type"))}
    for child in node.get("decoders") or node.get("pretokenizers") or []:
        found |= _kinds(child)
    return found


@dataclass(frozen=True)
class Vocabulary:
    """Token bytes of one tokenizer: ``ids_of(b"...")`` gives the tokens that spell exactly those bytes."""

    key: str
    """sha256 of the tokenizer file: two folders with the same tokenizer share plans."""
    _ids: Mapping[bytes, tuple[int, ...]] = field(repr=False, compare=False)

    def ids_of(self, spelled: bytes) -> tuple[int, ...]:
        return self._ids.get(spelled, ())

    @classmethod
    def from_tokens(cls, key: str, tokens: Iterable[tuple[int, bytes]]) -> Vocabulary:
        ids: dict[bytes, list[int]] = {}
        for token_id, spelled in tokens:
            if spelled:
                ids.setdefault(spelled, []).append(token_id)
        return cls(key, {spelled: tuple(sorted(found)) for spelled, found in ids.items()})

    @classmethod
    def from_tokenizer_json(cls, raw: bytes) -> Vocabulary:
        try:
            data = json.loads(raw)
            model = data["model"]
            vocab: dict[str, int] = model["vocab"]
            added = list(data.get("added_tokens") or [])
        except (ValueError, KeyError, TypeError) as exc:
            raise UnsupportedVocabulary(f"not a tokenizer.json with a vocabulary ({exc})") from None
        if model.get("type") != "BPE" or not isinstance(vocab, dict):
            raise UnsupportedVocabulary(f"{model.get('type')} tokenizers are not read here (BPE only)")
        kinds = _kinds(data.get("decoder")) | _kinds(data.get("pre_tokenizer"))
        if "ByteLevel" in kinds:
            spell = _byte_level
        elif model.get("byte_fallback") or "ByteFallback" in kinds:
            spell = _byte_fallback
        else:
            raise UnsupportedVocabulary("neither a byte-level nor a byte-fallback BPE vocabulary")
        special = {int(t["id"]) for t in added if t.get("special")}
        literal = {int(t["id"]): str(t["content"]).encode() for t in added if not t.get("special")}
        tokens: list[tuple[int, bytes]] = []
        for text, token_id in vocab.items():
            if token_id in special or token_id in literal:
                continue
            spelled = spell(text)
            if spelled is not None:
                tokens.append((token_id, spelled))
        tokens.extend(literal.items())
        return cls.from_tokens(hashlib.sha256(raw).hexdigest(), tokens)

    @classmethod
    def from_folder(cls, folder: Path) -> Vocabulary:
        """The vocabulary of a model folder (its ``tokenizer.json``); OSError when there is none."""
        return cls.from_tokenizer_json((folder / TOKENIZER_FILE).read_bytes())
