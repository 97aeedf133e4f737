"""Locating the stated final answer in a response.

Only an answer the response *states* is verified; prose that merely contains numbers is not an
answer (a response cut off mid-sentence must not be rewarded because some expression in it
happens to equal the reference). The search runs on the final region: the text after the last
``</think>`` (none when thinking never closed), cut at the first chat-template end-of-turn
token (``<|im_end|>``, ``<|im_start|>``, ``<|eot_id|>``, ...), since nothing after it was part of
the response.

Explicit statements, of which the LAST one that states something counts:

- ``\\boxed{...}`` / ``\\fbox{...}``: the last box, with the boxes right before it that form one
  multi-part answer (``\\boxed{1} and \\boxed{2}``);
- "the (final) answer is ...", "answer: ...", "the solution is ...", "answer would/should be
  ...": the text after the phrase up to the end of its sentence or line, of which the first
  complete value is the answer (stated.py: units, currency signs, thousands separators, a
  justification or parenthetical after it are not part of it; a hedge "12 or 13" states none);
- a line starting with "Answer" / "Final answer" (``**Answer:** 9``, ``Answer $$ 9 $$``), read
  the same way;
- GSM8K's ``#### ...``: the rest of that line.

A statement states nothing when its text is empty or math-verify finds nothing in it (an empty
``\\boxed{}``, "I hope the answer is right."); such a statement is skipped and the one before it
counts. Only without any explicit statement does an implicit one count:

- the whole response is a single line of math with no words (``$004$``, ``4, 10, -2``);
- a concluding sentence: the last sentence, complete (ending in ``.``, ``!``, ``?`` or a closed
  math span), containing math or a digit, and opening a clause with "therefore / thus / hence /
  so / consequently / in conclusion / finally / we find (get, obtain, conclude, see)" (only the
  text from that marker on is verified), or saying "... is the (our) answer / solution";
- a closing value: the last sentence ends with "is / are / equals / = / :" and a math span
  (``The identity matrix is $I$.``); only that span is verified;
- a result sentence: the last sentence works out plain-text arithmetic, "Sam has 18 - 6 = 9
  marbles now."; the result of its last equation (9) is verified. Word-problem answers from
  small models end this way when they skip the requested "The answer is N"; operands may
  carry units ("4 bags * 4 cookies per bag = 16");
- a single-value sentence: the last sentence is plain text holding exactly one number, "Yuki
  now has 20 apples."; that number is verified.

The last two are not read in a response cut by its token limit (``finish_reason: length``),
whose last complete sentence is working that happened to end, not a conclusion. In such a
response a statement that runs into the cut unclosed ("the answer is 12" of 125, an unclosed
``\\boxed{``) states nothing either (math_verifier.py).

Sign-off sentences after the last one ("I hope it is correct.") are skipped.

Anything else -- no statement, or a last sentence cut off mid-way -- has no answer (verdict
``no_answer``, reward 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(\s*)")
# Boxes of one multi-part answer ("\boxed{1} and \boxed{2}") sit close together; a box further
# back than this, or behind a blank line, belongs to earlier work.
MAX_GROUP_GAP_CHARS = 80


@dataclass(frozen=True)
class Boxed:
    """One ``\\boxed{...}``: its content and the half-open char span of the whole command."""

    content: str
    start: int
    end: int


def final_region(text: str) -> str | None:
    """The part of a response that states the answer: what follows the last ``</think>``.

    Returns None when a thinking block was opened and never closed (the response was cut off
    while thinking, so it has no answer). Responses without thinking tags are returned whole.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE) :]
    if THINK_OPEN in text:
        return None
    return text


def _match_brace(text: str, open_pos: int, escapes: bool) -> int | None:
    """Index just past the brace closing ``text[open_pos] == '{'``, or None if unbalanced.

    With ``escapes`` a backslash skips the next char, so ``\\{`` and ``\\}`` (set braces) do
    not count; without it they count like plain braces.
    """
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\" and escapes:
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def find_boxed(text: str) -> list[Boxed]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}`` in order (also ``\\boxed 5``).

    A box left unbalanced by escaped braces is retried with ``\\}`` counted as a brace, since
    models sometimes write a stray backslash before the closing brace (``\\boxed{185\\}``).
    """
    found: list[Boxed] = []
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        if i < len(text) and text[i] == "{":
            end = _match_brace(text, i, escapes=True) or _match_brace(text, i, escapes=False)
            if end is None:
                pos = i
                continue
            found.append(Boxed(text[i + 1 : end - 1], m.start(), end))
        else:
            word = re.match(r"[^\s$\\{}]+", text[i:]) if m.group(1) else None
            if word is None:
                pos = i
                continue
            end = i + word.end()
            found.append(Boxed(word.group(0), m.start(), end))
        pos = end
    return found


def final_boxed_group(text: str) -> list[Boxed]:
    """The last box and the boxes right before it that form one answer.

    ``"... so x = \\boxed{3}. Answer: \\boxed{1} and \\boxed{2}"`` gives ["1", "2"] when the
    gap before ``\\boxed{1}`` exceeds MAX_GROUP_GAP_CHARS or holds a blank line (contents shown).
    """
    boxes = find_boxed(text)
    if not boxes:
        return []
    group = [boxes[-1]]
    for prev in reversed(boxes[:-1]):
        gap = text[prev.end : group[0].start]
        if len(gap) > MAX_GROUP_GAP_CHARS or "\n\n" in gap:
            break
        group.insert(0, prev)
    return group


# ---------------------------------------------------------------- stated answers

# Chat-template end-of-turn tokens: a model that runs past one writes the next turn itself.
_TURN_END_RE = re.compile(r"<\|(?:im_end|im_start|eot_id|endoftext|end|start_header_id)\|>|</s>")
# Math spans, display first so ``$$`` is not read as an empty inline span.
_DISPLAY_RE = r"\$\$.+?\$\$|\\\[.+?\\\]|\\begin\{(?P<env>[A-Za-z]+\*?)\}.+?\\end\{(?P=env)\}"
_INLINE_RE = r"(?<!\\)\$(?:\\.|[^$\\])+?\$|\\\(.+?\\\)"
# The leading lookahead lets the scan skip, cheaply, every position that cannot open math.
_MATH_RE = re.compile(rf"(?=[$\\])(?:(?P<display>{_DISPLAY_RE})|{_INLINE_RE})", re.DOTALL)
_INLINE_FILL, _DISPLAY_FILL = "\x01", "\x02"
_SENTENCE_END_RE = re.compile(r"(?=[.!?\n])(?:[.!?]+(?=\s|$)|\n[ \t]*\n)")
# "solution:" is left out: "Here is the solution:" introduces working, not an answer.
_ANSWER_PHRASE_RE = re.compile(
    r"(?=[as])\b(?:answer(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\b|\s*[:=])|solution\s+is\b)"
    r"[\s*:]*",
    re.IGNORECASE,
)
# A sentence that ends by giving a value in math: "The identity matrix is $I$.", "Sum: $7$".
_CLOSING_VALUE_RE = re.compile(
    rf"(?:\b(?:is|are|equals)|[=:])\s*(?P<value>[{_INLINE_FILL}{_DISPLAY_FILL}]+)\s*[.!]?\s*$"
)
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final\s+)?answer\b[ \t*_:]*", re.IGNORECASE | re.MULTILINE
)
_GSM8K_RE = re.compile(r"^[ \t]*####[ \t]*", re.MULTILINE)
_CONCLUSION_RE = re.compile(
    r"(?:^|[,;:]\s+)\W*\b(?P<marker>therefore|thus|hence|so|consequently|in\s+conclusion|finally"
    r"|we\s+(?:find|get|obtain|conclude|see))\b",
    re.IGNORECASE,
)
_IS_ANSWER_RE = re.compile(
    r"\bis\s+(?:the|our)\s+(?:final\s+)?(?:answer|solution)\b", re.IGNORECASE
)
_SIGN_OFF_RE = re.compile(
    r"\b(?:hope|thank|let\s+me\s+know|feel\s+free|questions?|helps?|good\s+luck)\b", re.IGNORECASE
)
_WORD_RE = re.compile(r"(?<!\\)\b[A-Za-z]{2,}")
# Plain-text arithmetic with its result, "18 - 6 = 9" / "3 x 4 = 12 + 1 = 13": the last result.
_PLAIN_NUMBER = r"\d[\d,]*(?:\.\d+)?"
# An operand may carry its unit: "4 bags of cookies * 4 cookies per bag = 16".
_OPERAND = rf"{_PLAIN_NUMBER}(?:\s+[A-Za-z][A-Za-z/']*){{0,3}}"
_RESULT_EQ_RE = re.compile(
    rf"(?<![\w.]){_OPERAND}(?:\s*(?:[-+*/×÷x]|\\times|\\cdot)\s*{_OPERAND})+"
    rf"(?:\s*=\s*{_OPERAND}(?:\s*(?:[-+*/×÷x])\s*{_OPERAND})*)*"
    rf"\s*=\s*(?P<value>-?{_PLAIN_NUMBER})(?![\w,]*\d)"
)
_NUMBER_TOKEN_RE = re.compile(rf"(?<![\w.]){_PLAIN_NUMBER}(?![\w])")
StatementKind = Literal[
    "boxed", "answer_phrase", "answer_line", "gsm8k", "whole", "conclusion", "closing_value",
    "result", "single_value",
]


@dataclass(frozen=True)
class Statement:
    """One place where a response states its answer: ``text`` holds the answer (for ``boxed``
    the box contents, one per box of the group, are in ``boxes``); ``start`` orders them."""

    kind: StatementKind
    text: str
    start: int
    boxes: tuple[str, ...] = ()


def cut_at_turn_end(text: str) -> str:
    """``text`` up to the first chat-template end-of-turn token."""
    m = _TURN_END_RE.search(text)
    return text if m is None else text[: m.start()]


def mask_math(text: str) -> str:
    """``text`` with every math span's characters replaced (same length), so that periods and
    newlines inside math do not end sentences; display spans get a fill of their own."""
    return _MATH_RE.sub(
        lambda m: (_DISPLAY_FILL if m.group("display") else _INLINE_FILL) * len(m.group(0)), text
    )


def _clause_end(masked: str, start: int) -> int:
    """Where the statement starting at ``start`` ends: its sentence end or line break (leading
    whitespace skipped, so ``Answer:\\n\\n$$ 9 $$`` reaches the display)."""
    i = start
    while i < len(masked) and masked[i].isspace():
        i += 1
    m = re.compile(r"[.!?](?=\s|$)|\n").search(masked, i)
    return len(masked) if m is None else m.start()


def explicit_statements(region: str, masked: str | None = None) -> list[Statement]:
    """Every explicit answer statement in ``region`` (see the module docstring), by start;
    ``masked`` is ``mask_math(region)`` when the caller has it already."""
    found: list[Statement] = []
    group = final_boxed_group(region)
    if group:
        text = region[group[0].start : group[-1].end]
        found.append(Statement("boxed", text, group[0].start, tuple(b.content for b in group)))
    masked = mask_math(region) if masked is None else masked
    kinds: tuple[tuple[StatementKind, re.Pattern[str]], ...] = (
        ("answer_phrase", _ANSWER_PHRASE_RE),
        ("answer_line", _ANSWER_LINE_RE),
        ("gsm8k", _GSM8K_RE),
    )
    for kind, pattern in kinds:
        for m in pattern.finditer(masked):
            if kind == "gsm8k":  # the whole line: "#### 1,234.5" has no sentence in it
                line_end = masked.find("\n", m.end())
                end = len(masked) if line_end < 0 else line_end
            else:
                end = _clause_end(masked, m.end())
            text = region[m.end() : end].strip()
            if text:
                found.append(Statement(kind, text, m.start()))
    return sorted(found, key=lambda st: st.start)


def _sentences(masked: str) -> list[tuple[int, int, bool]]:
    """(start, end, complete) of each sentence; only the last can be incomplete (cut off)."""
    spans: list[tuple[int, int, bool]] = []
    pos = 0
    for m in _SENTENCE_END_RE.finditer(masked):
        if masked[pos : m.start()].strip():
            spans.append((pos, m.end(), True))
        pos = m.end()
    tail = masked[pos:].strip()
    if tail:
        spans.append((pos, len(masked), tail.endswith(_DISPLAY_FILL)))
    return spans


def implicit_statement(
    region: str, masked: str | None = None, *, results: bool = True
) -> Statement | None:
    """The answer a response states without an explicit statement, or None (module docstring);
    ``results=False`` leaves result sentences out (for a response cut by its token limit)."""
    masked = mask_math(region) if masked is None else masked
    bare = masked.strip()
    if bare and "\n" not in bare and _WORD_RE.search(bare.replace(_INLINE_FILL, " ")) is None:
        return Statement("whole", region.strip(), len(region) - len(region.lstrip()))
    sentences = _sentences(masked)
    while sentences and sentences[-1][2]:
        s, e, _ = sentences[-1]
        if _has_content(masked[s:e]) or _SIGN_OFF_RE.search(masked[s:e]) is None:
            break
        sentences.pop()
    if not sentences:
        return None
    s, e, complete = sentences[-1]
    sentence = masked[s:e]
    if not complete and not sentence.rstrip().endswith(_INLINE_FILL):
        return None  # cut off mid-sentence
    if not _has_content(sentence):
        return None
    markers = list(_CONCLUSION_RE.finditer(sentence))
    if markers:
        start = s + markers[-1].start("marker")
    elif _IS_ANSWER_RE.search(sentence):
        start = s + len(sentence) - len(sentence.lstrip())
    elif (value := _CLOSING_VALUE_RE.search(sentence)) is not None:
        return Statement(
            "closing_value",
            region[s + value.start("value") : s + value.end("value")],
            s + value.start("value"),
        )
    elif results and (eqs := list(_RESULT_EQ_RE.finditer(sentence))):
        v = eqs[-1]
        text = region[s + v.start("value") : s + v.end("value")].rstrip(".,")
        return Statement("result", text, s + v.start("value"))
    elif results and (single := _single_number(sentence)) is not None:
        return Statement("single_value", region[s + single[0] : s + single[1]], s + single[0])
    else:
        return None
    return Statement("conclusion", region[start:e].strip(), start)


def _single_number(masked_sentence: str) -> tuple[int, int] | None:
    """The span of the one number of a plain-text sentence (no math, no other digit)."""
    if _INLINE_FILL in masked_sentence or _DISPLAY_FILL in masked_sentence:
        return None
    numbers = list(_NUMBER_TOKEN_RE.finditer(masked_sentence))
    if len(numbers) != 1 or sum(ch.isdigit() for ch in masked_sentence) != len(
        [ch for ch in numbers[0].group(0) if ch.isdigit()]
    ):
        return None
    start, end = numbers[0].start(), numbers[0].end()
    while masked_sentence[end - 1] in ",.":
        end -= 1
    if start > 0 and masked_sentence[start - 1] in "-−" and (
        start == 1 or not masked_sentence[start - 2].isalnum()
    ):
        start -= 1  # "-8 degrees" states -8, not 8
    return start, end


def _has_content(masked_sentence: str) -> bool:
    """Whether a (math-masked) sentence holds math or a digit, i.e. something to verify."""
    return any(ch.isdigit() or ch in (_INLINE_FILL, _DISPLAY_FILL) for ch in masked_sentence)
