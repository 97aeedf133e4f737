"""Map character spans of a response onto positions in its *generated* token ids.

The tokens are never re-encoded: we decode the generated ids ourselves, token by token, and
record which characters of `response_text` each token produced.

Byte-level tokenizers (Qwen, the testbed) are decoded exactly: every token is a byte string.
For valid UTF-8 (the usual case) the char index of a byte is the count of lead bytes before it
(vectorised); otherwise a streaming UTF-8 decoder tells which character each byte ends up in,
invalid byte runs becoming one U+FFFD each, as `bytes.decode(errors="replace")` does. A token
that ends in the middle of a multi-byte character and the token that completes it *both* own
that character.
Other tokenizers fall back to decoding prefixes (exact, quadratic; fine for short texts).

Special tokens (e.g. "<|im_end|>") may be absent from `response_text`
(decode(skip_special_tokens=True)); they then own zero characters.

Boundary rule: the token slice of a char span is the minimal contiguous token range whose
characters cover the span's first through last non-whitespace character. So the slice may
carry extra characters only at its edges: whitespace a BPE token merged in front of a word
(" x", "\\n\\n-"), text merged across the boundary (".\\n"), or the bytes of a character split
between two tokens. A span with no non-whitespace character has no tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np


class AlignmentError(ValueError):
    """`response_text` is not the decoding of `response_token_ids`."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def is_byte_level(tokenizer: Any) -> bool:
    """Does the tokenizer decode through byte-level BPE (every token a byte string)?"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from tokenizers import decoders

    dec = backend.decoder
    return isinstance(dec, decoders.ByteLevel)


def _added_tokens(tokenizer: Any) -> dict[int, tuple[str, bool]]:
    """id -> (content, is_special) for tokens added on top of the BPE vocabulary."""
    return {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}


@dataclass
class _Memo:
    """What token_bytes reuses across calls for one tokenizer (size = len(tokenizer)): each
    id's bytes (a vocabulary entry's decoding never changes), with special tokens kept and
    with them blanked."""

    size: int
    kept: dict[int, bytes]
    skipped: dict[int, bytes]


# Keyed weakly by tokenizer; rebuilt when tokens are added (its size changes).
_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memo_for(tokenizer: Any) -> _Memo:
    size = len(tokenizer)
    try:
        memo = _MEMOS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no memo across calls
        memo = None
    if memo is None or memo.size != size:
        memo = _Memo(size, {}, {})
        with contextlib.suppress(TypeError):
            _MEMOS[tokenizer] = memo
    return memo


def token_bytes(tokenizer: Any, token_ids: Sequence[int], keep_special: bool) -> list[bytes]:
    """The bytes each token decodes to (byte-level tokenizers only); [T] entries."""
    memo = _memo_for(tokenizer)
    table = memo.kept if keep_special else memo.skipped
    try:
        return [table[t] for t in token_ids]
    except KeyError:
        pass
    missing = sorted({t for t in token_ids if t not in table})
    added = _added_tokens(tokenizer)
    alphabet = _byte_decoder()
    for tid, piece in zip(missing, tokenizer.convert_ids_to_tokens(missing), strict=True):
        if tid in added:
            content, special = added[tid]
            memo.kept[tid] = content.encode()
            memo.skipped[tid] = b"" if special else memo.kept[tid]
        else:
            memo.kept[tid] = memo.skipped[tid] = bytes(alphabet[c] for c in piece)
    return [table[t] for t in token_ids]


def _offsets_valid_utf8(pieces: list[bytes]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """Fast path for valid UTF-8: chars before a byte = lead (non-continuation) bytes before it.

    (text, start_chars_T, end_chars_T); None when the stream is not valid UTF-8 (then the
    streaming decoder handles it).
    """
    joined = b"".join(pieces)
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not joined:
        zeros_T = np.zeros(len(pieces), dtype=np.int64)
        return text, zeros_T, zeros_T
    bytes_B = np.frombuffer(joined, dtype=np.uint8)
    is_cont_B = (bytes_B & 0xC0) == 0x80
    # leads_before_B[b] = number of chars that start before byte b (length B + 1).
    leads_before_B = np.zeros(len(joined) + 1, dtype=np.int64)
    np.cumsum(~is_cont_B, out=leads_before_B[1:])
    lens_T = np.array(list(map(len, pieces)), dtype=np.int64)
    ends_T = np.cumsum(lens_T)
    starts_T = ends_T - lens_T
    nonempty_T = lens_T > 0
    # A piece opening with continuation bytes finishes the char begun by the previous piece.
    opens_mid_T = nonempty_T & is_cont_B[np.minimum(starts_T, len(joined) - 1)]
    start_chars_T = leads_before_B[starts_T] - opens_mid_T
    end_chars_T = np.where(nonempty_T, leads_before_B[ends_T], start_chars_T)
    return text, start_chars_T, end_chars_T


def _pairs(starts_T: np.ndarray, ends_T: np.ndarray) -> list[tuple[int, int]]:
    return list(zip(starts_T.tolist(), ends_T.tolist(), strict=True))


def offsets_from_bytes(pieces: list[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """Decode byte pieces as one UTF-8 stream; return the text and each piece's char range."""
    fast = _offsets_valid_utf8(pieces)
    return (fast[0], _pairs(*fast[1:])) if fast is not None else offsets_streaming(pieces)


def offsets_streaming(pieces: list[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """offsets_from_bytes for any byte stream (invalid UTF-8 too), one byte at a time."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text_parts: list[str] = []
    n_chars = 0
    offsets: list[tuple[int, int]] = []
    for piece in pieces:
        pending_before = bool(dec.getstate()[0])
        if not pending_before and piece.isascii():
            # Fast path: no pending bytes, so each ASCII byte is exactly one character.
            text_parts.append(piece.decode("ascii"))
            offsets.append((n_chars, n_chars + len(piece)))
            n_chars += len(piece)
            continue
        first = last = None
        for b in piece:
            out = dec.decode(bytes([b]))
            text_parts.append(out)
            n_chars += len(out)
            # A byte still buffered becomes part of the next emitted char; otherwise it was the
            # last byte of the most recent one.
            char = n_chars if dec.getstate()[0] else n_chars - 1
            first = char if first is None else first
            last = char
        offsets.append((n_chars, n_chars) if first is None else (first, last + 1))
    tail = dec.decode(b"", final=True)
    text_parts.append(tail)
    return "".join(text_parts), offsets


def _offsets_by_prefix(tokenizer: Any, token_ids: Sequence[int], keep_special: bool):
    """Fallback for non-byte-level tokenizers: piece i = decode(ids[:i+1]) minus decode(ids[:i])."""
    offsets: list[tuple[int, int]] = []
    prev = ""
    pending: list[int] = []
    for i in range(len(token_ids)):
        cur = tokenizer.decode(
            list(token_ids[: i + 1]),
            skip_special_tokens=not keep_special,
            clean_up_tokenization_spaces=False,
        )
        if cur.endswith("\ufffd") or not cur.startswith(prev):
            pending.append(i)  # an incomplete character: wait for the token that completes it
            offsets.append((len(prev), len(prev)))
            continue
        start = len(prev)
        offsets.append((start, len(cur)))
        for j in pending:
            offsets[j] = (start, min(start + 1, len(cur)))
        pending, prev = [], cur
    final = tokenizer.decode(
        list(token_ids), skip_special_tokens=not keep_special, clean_up_tokenization_spaces=False
    )
    return final, offsets


def _first_mismatch(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass(frozen=True)
class TokenOffsets:
    """Each generated token's half-open char range (offsets_T2, int64) and the sorted index
    that char_span_to_tokens searches: running maxima of the starts and of the ends.

    Arrays rather than [T] tuples: a response of thousands of tokens would otherwise cost
    thousands of Python objects, on the event loop that runs the annotator's requests.
    """

    offsets_T2: np.ndarray
    index: tuple[np.ndarray, np.ndarray]

    @classmethod
    def from_arrays(cls, starts_T: np.ndarray, ends_T: np.ndarray) -> TokenOffsets:
        offsets_T2 = np.stack([starts_T, ends_T], axis=1).astype(np.int64, copy=False)
        return cls(offsets_T2, (np.maximum.accumulate(starts_T), np.maximum.accumulate(ends_T)))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, int]]) -> TokenOffsets:
        offsets_T2 = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        return cls.from_arrays(offsets_T2[:, 0], offsets_T2[:, 1])

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [tuple(p) for p in self.offsets_T2.tolist()]


def token_offsets(tokenizer: Any, token_ids: Sequence[int], text: str) -> TokenOffsets:
    """token_char_offsets with its span-lookup index (cheap here for byte-level tokenizers)."""
    byte_level = is_byte_level(tokenizer)
    best = -1
    for keep_special in (False, True):
        if byte_level:
            pieces = token_bytes(tokenizer, token_ids, keep_special)
            fast = _offsets_valid_utf8(pieces)
            if fast is not None and fast[0] == text:
                return TokenOffsets.from_arrays(fast[1], fast[2])
            decoded, pairs = (fast[0], []) if fast is not None else offsets_streaming(pieces)
        else:
            decoded, pairs = _offsets_by_prefix(tokenizer, token_ids, keep_special)
        if decoded == text:
            return TokenOffsets.from_pairs(pairs)
        best = max(best, _first_mismatch(decoded, text))
    raise AlignmentError(
        f"response_text differs from the decoding of response_token_ids at char {best} "
        f"(text: {text[max(0, best - 20) : best + 20]!r}); the rollout stage must store "
        "response_text = tokenizer.decode(response_token_ids, skip_special_tokens=True, "
        "clean_up_tokenization_spaces=False) of the same tokenizer"
    )


def token_char_offsets(
    tokenizer: Any, token_ids: Sequence[int], text: str
) -> list[tuple[int, int]]:
    """Half-open char range of `text` that each generated token produced; [T] pairs.

    Tries the decoding with special tokens skipped, then with them kept; raises AlignmentError
    (saying where the texts differ) when neither equals `text`.
    """
    return token_offsets(tokenizer, token_ids, text).pairs


def offset_index(offsets: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted token starts and ends for char_span_to_tokens (compute once per response)."""
    # Running maxima keep both sorted even when a zero-width token follows a token that owns a
    # half-finished character.
    return TokenOffsets.from_pairs(offsets).index


def char_span_to_tokens(
    offsets: Sequence[tuple[int, int]] | np.ndarray,
    text: str,
    char_start: int,
    char_end: int,
    index: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[int, int] | None:
    """Minimal token range [token_start, token_end) covering the span's non-whitespace chars.

    `offsets` is token_char_offsets' output (or TokenOffsets.offsets_T2), `index` its
    offset_index (computed if None). None when the span holds only whitespace.
    """
    piece = text[char_start:char_end]
    stripped = piece.lstrip()
    if not stripped:
        return None
    first = char_start + len(piece) - len(stripped)
    last = first + len(stripped.rstrip()) - 1
    starts, ends = index if index is not None else offset_index(offsets)
    # First token whose range contains `first`: the earliest with end > first.
    t0 = int(np.searchsorted(ends, first, side="right"))
    # Last token whose range contains `last`: the latest with start <= last.
    t1 = int(np.searchsorted(starts, last, side="right")) - 1
    if t0 >= len(offsets) or t1 < t0:
        raise AlignmentError(
            f"char span [{char_start}, {char_end}) lies outside the tokens' text; "
            "offsets must come from token_char_offsets of the same text"
        )
    # Zero-width tokens (skipped specials) just before t0 are not part of the span.
    while t0 < t1 and offsets[t0][0] == offsets[t0][1]:
        t0 += 1
    return t0, t1 + 1
