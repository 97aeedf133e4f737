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

import bisect
import codecs
import weakref
from collections.abc import Sequence
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


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from tokenizers import decoders

    dec = backend.decoder
    return isinstance(dec, decoders.ByteLevel)


def _added_tokens(tokenizer: Any) -> dict[int, tuple[str, bool]]:
    """id -> (content, is_special) for tokens added on top of the BPE vocabulary."""
    return {i: (t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()}


# Per-tokenizer memo of id -> bytes: the byte-decoding of a vocabulary entry never changes.
_BYTES_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memo_for(tokenizer: Any) -> dict[int, bytes]:
    try:
        return _BYTES_MEMO.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo across calls
        return {}


def token_bytes(tokenizer: Any, token_ids: Sequence[int], keep_special: bool) -> list[bytes]:
    """The bytes each token decodes to (byte-level tokenizers only); [T] entries."""
    memo = _memo_for(tokenizer)
    missing = sorted({t for t in token_ids if t not in memo})
    if missing:
        added = _added_tokens(tokenizer)
        table = _byte_decoder()
        for tid, piece in zip(missing, tokenizer.convert_ids_to_tokens(missing), strict=True):
            memo[tid] = added[tid][0].encode() if tid in added else bytes(table[c] for c in piece)
    if keep_special:
        return [memo[t] for t in token_ids]
    special = {i for i, (_, is_special) in _added_tokens(tokenizer).items() if is_special}
    return [b"" if t in special else memo[t] for t in token_ids]


def _offsets_valid_utf8(pieces: list[bytes]) -> tuple[str, list[tuple[int, int]]] | None:
    """Fast path for valid UTF-8: chars before a byte = lead (non-continuation) bytes before it.

    None when the stream is not valid UTF-8 (then the streaming decoder handles it).
    """
    joined = b"".join(pieces)
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not joined:
        return text, [(0, 0)] * len(pieces)
    bytes_B = np.frombuffer(joined, dtype=np.uint8)
    is_cont_B = (bytes_B & 0xC0) == 0x80
    # leads_before_B[b] = number of chars that start before byte b (length B + 1).
    leads_before_B = np.zeros(len(joined) + 1, dtype=np.int64)
    np.cumsum(~is_cont_B, out=leads_before_B[1:])
    lens_T = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    ends_T = np.cumsum(lens_T)
    starts_T = ends_T - lens_T
    nonempty_T = lens_T > 0
    # A piece opening with continuation bytes finishes the char begun by the previous piece.
    opens_mid_T = nonempty_T & is_cont_B[np.minimum(starts_T, len(joined) - 1)]
    start_chars_T = leads_before_B[starts_T] - opens_mid_T
    end_chars_T = np.where(nonempty_T, leads_before_B[ends_T], start_chars_T)
    return text, list(zip(start_chars_T.tolist(), end_chars_T.tolist(), strict=True))


def offsets_from_bytes(pieces: list[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """Decode byte pieces as one UTF-8 stream; return the text and each piece's char range."""
    fast = _offsets_valid_utf8(pieces)
    return fast if fast is not None else offsets_streaming(pieces)


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


def token_char_offsets(
    tokenizer: Any, token_ids: Sequence[int], text: str
) -> list[tuple[int, int]]:
    """Half-open char range of `text` that each generated token produced; [T] pairs.

    Tries the decoding with special tokens kept, then with them skipped; raises AlignmentError
    (saying where the texts differ) when neither equals `text`.
    """
    byte_level = _is_byte_level(tokenizer)
    best = -1
    for keep_special in (False, True):
        if byte_level:
            decoded, offsets = offsets_from_bytes(token_bytes(tokenizer, token_ids, keep_special))
        else:
            decoded, offsets = _offsets_by_prefix(tokenizer, token_ids, keep_special)
        if decoded == text:
            return offsets
        best = max(best, _first_mismatch(decoded, text))
    raise AlignmentError(
        f"response_text differs from the decoding of response_token_ids at char {best} "
        f"(text: {text[max(0, best - 20) : best + 20]!r}); the rollout stage must store "
        "response_text = tokenizer.decode(response_token_ids, skip_special_tokens=True, "
        "clean_up_tokenization_spaces=False) of the same tokenizer"
    )


def offset_index(offsets: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted token starts and ends for char_span_to_tokens (compute once per response)."""
    # Running maxima keep both lists sorted even when a zero-width token follows a token that
    # owns a half-finished character.
    if not offsets:
        return [], []
    starts_T, ends_T = np.array(offsets, dtype=np.int64).T
    return (np.maximum.accumulate(starts_T).tolist(), np.maximum.accumulate(ends_T).tolist())


def char_span_to_tokens(
    offsets: Sequence[tuple[int, int]],
    text: str,
    char_start: int,
    char_end: int,
    index: tuple[list[int], list[int]] | None = None,
) -> tuple[int, int] | None:
    """Minimal token range [token_start, token_end) covering the span's non-whitespace chars.

    `offsets` is token_char_offsets' output, `index` its offset_index (computed if None).
    None when the span holds only whitespace.
    """
    piece = text[char_start:char_end]
    stripped = piece.lstrip()
    if not stripped:
        return None
    first = char_start + len(piece) - len(stripped)
    last = first + len(stripped.rstrip()) - 1
    starts, ends = index if index is not None else offset_index(offsets)
    # First token whose range contains `first`: the earliest with end > first.
    t0 = bisect.bisect_right(ends, first)
    # Last token whose range contains `last`: the latest with start <= last.
    t1 = bisect.bisect_right(starts, last) - 1
    if t0 >= len(offsets) or t1 < t0:
        raise AlignmentError(
            f"char span [{char_start}, {char_end}) lies outside the tokens' text; "
            "offsets must come from token_char_offsets of the same text"
        )
    # Zero-width tokens (skipped specials) just before t0 are not part of the span.
    while t0 < t1 and offsets[t0][0] == offsets[t0][1]:
        t0 += 1
    return t0, t1 + 1
