"""The `equations` annotator: checks the arithmetic a response writes out, deterministically,
with no model, prompt or API (annotate.backend: equations).

It reads every plain-text equation "a op b = c" of a response, chained forms included
("3 x 4 = 12 + 1 = 13", "2 books + 4 books = 6"): operands are numbers (thousands separators,
decimals), optionally followed by up to three unit words before the next operator or "="; the
operators are + - * / x × ÷ \\times \\cdot \\div, with the usual precedence. Each "=" joins two
expressions, and the equation is wrong when any joined pair differs in value (exact rationals),
except that a side going on from the value before it is a running total ("12 + 1 = 13").

Operands are read with what is written against them (issue 26): a sign ("-5 + 3 = -2",
"4 * -2"; a bullet "- 5" is not a sign), a currency sign ("$5 + $3 = $9" is seen, and wrong),
a percent sign ("20% of 50 = 10", "50% + 20% = 70%": "of" multiplies after a percentage). A
plain decimal result is right when it is the value rounded to the decimals it shows
("10 / 3 = 3.33", "2/3 = 0.67"; not "10/3 = 3.4"; an integer result is never rounded:
"100 / 7 = 14" is wrong). A quotient with a remainder, "17 / 5 = 3 remainder 2" ("3 R 2",
"3 r2", "3 with a remainder of 2"), is right when it is the division with remainder. ">=",
"<=", "!=" and "==" are not equations. A percent result of a plain product is its unit
("0.25 * 100 = 25%"), and "a - p%" / "a + p%" may mean p percent of a ("$50 - 20% = $40").
A list bullet at a line start is neither a sign nor a minus; a "$" that opens a math span
("$6 \\times 7 = 42$") is left out of the span. Equations this reader would misread are left
out (missed, never falsely marked): mixed numbers ("1 1/2 + 1 = 2 1/2") and ranges written
"5-10"; the tail of a longer expression ("3x + 4 - 4 = 28", "(30 - 12)/2 = 18/2", "8 times 1/2
equals 4") or one that goes on into a variable ("8/3 = 24/Y", "3*30 = 30 + M"); a label or
a unit conversion ("1.5 quarts = 4 * 1.5 = 6", "12 * 1 = 12 inches = 1 foot"); clocks and
leading zeros ("0900-0130"), "25 / 1/3", a result followed by "%" or a space-grouped "000".
An equation never runs across a line break. On the gsm8k reference solutions (8792, test and
train; `benchmarks/equation_cases.py --solutions`) 40 have an equation marked wrong, most of
them typos of the data set ("8*3 = 240"); 277 before these rules, with 8% more equations read.

- **error route** (incorrect rollout): the first wrong equation is the error span, labelled with
  what it should say ("14 - 11 = 2 is wrong: 14 - 11 = 3"). A response with no wrong equation
  gets `no_spans` (its error is in the setup or the answer, which this annotator cannot see).
- **key route** (correct rollout): the equations that produce the final answer: the last
  equation whose result is the reference answer, then, latest first, the earlier equations whose
  results it (or one of them) uses as an operand. None -> `no_spans`.

Spans are character ranges mapped to tokens like every annotator's (align.py). Under the coverage
cap each equation is admitted whole, in the order above, while it fits; one that does not fit is
cut down to its most specific part, the result it writes after its (first wrong) "=", never to
its opening tokens; when not even that fits, the row is `too_broad` (no spans; the trainer
treats it as unannotated).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from trace_rl.stages.annotators.align import char_span_to_tokens
from trace_rl.stages.annotators.base import Job, make_row
from trace_rl.stages.annotators.config import AnnotateConfig

_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_CUR = "$€£¥₹"
# An operand: a sign written against it ("-5", not a bullet "- 5"), a currency sign, a number,
# a percent sign.
_OPD = rf"[-−]?[{_CUR}]?(?:{_NUM})%?"
# "of" multiplies only after a percentage: "20% of 50".
_OP = rf"[-+*/×÷−]|x(?=\s*[{_CUR}]?\d)|\\times|\\cdot|\\div|(?<=%)of\b|(?<=% )of\b"
# Spaces only within one line: "112 km\nChloe = 9 * 5 = 45" is two equations, not one chain.
_SP = r"[ \t]"
_UNITS = rf"(?:{_SP}+(?!x{_SP}*\d)[A-Za-z][A-Za-z/']*){{1,3}}"
# "17 / 5 = 3 remainder 2", "3 R 2", "3 r2", "3 with a remainder of 2".
_REMAINDER = r"\s*(?:remainder|rem\b|R|r|with\s+(?:a\s+)?remainder(?:\s+of)?)\s*"
_EXPR = rf"(?:{_OPD})(?:(?:{_UNITS})?{_SP}*(?:{_OP}){_SP}*(?:{_OPD}))*"
_SIDE = rf"(?:{_EXPR})(?:{_REMAINDER}(?:{_NUM})\b)?"
# "=" but not ">=", "<=", "!=", "==": those are not equations.
_EQ_SIGN = r"(?<![<>!=])=(?!=)|\bequals\b"
_EQ_RE = re.compile(
    rf"(?<![\w.,])(?:{_EXPR})(?:(?:{_UNITS})?{_SP}*(?:{_EQ_SIGN}){_SP}*(?:{_SIDE}))+"
    # not "100/5 = 5A/5", "8/3 = 24/Y", "3*30 = 30 + M trees": the expression goes on
    rf"(?![\d=]|[.,]\d|[A-Za-z](?![A-Za-z])|{_SP}*(?:[-+*/×÷]|\\times|\\cdot){_SP}*[\w(\\])"
)
# The equation is the tail of a longer expression this reader cannot parse: an operator, a
# bracket or a dash before it ("3x + 4 - 4 = 28", "(30 - 12)/2 = 18/2 = 9", "120 – 80 - 15 =
# 25"), maybe across words ("25 classmates + his 1 teacher + 1 himself = 27"), or an operator
# word ("8 times 1/2 equals 4").
_OPERAND_BEFORE_RE = re.compile(
    r"(?:[-+*/×÷()–—^−]|\b[xX])(?:[ \t]+[A-Za-z][A-Za-z']*)*[ \t]*$"
    r"|\b(?:times|plus|minus|by|of|over|divided|multiplied)[ \t]*$"
)
_MIXED_BEFORE_RE = re.compile(r"\d[ \t]+$")
_MIXED_AFTER_RE = re.compile(r"[ \t]+(?:and[ \t]+)?\d+\s*/\s*\d")
# After the result: "18 000" (grouped by a space), "20 %", "33.333...%"; inside: a clock or a
# leading zero ("0900-0130"), a division by a fraction "25 / 1/3" (precedence reads (25/1)/3).
_UNREADABLE_AFTER_RE = re.compile(r"[ \u00a0\u2009\u202f]\d{3}\b|[ \t]*(?:\.\.\.)?[ \t]*%")
_UNREADABLE_IN_RE = re.compile(r"(?<![\d.,])0\d|/\s+\d+/\d|\d/\s+\d+/")
_RANGE_SIDE_RE = re.compile(r"^\s*(\d+)-(\d+)\s*(?:=|\bequals\b)")
_PERCENT_SHORTHAND_RE = re.compile(
    rf"^\s*[{_CUR}]?(?P<a>{_NUM})\s*(?P<op>[-+−])\s*(?P<p>{_NUM})%\s*$"
)
_BULLET_RE = re.compile(r"(?m)^[ \t]*[-*•][ \t]")
_SIDE_SPLIT_RE = re.compile(r"=|\bequals\b")
# Unit words ("stickers/bag") are read as words so that their letters are never operators.
_TOKEN_RE = re.compile(
    rf"(?P<num>{_NUM})(?P<pct>%)?|(?P<op>\\times|\\cdot|\\div|x(?=\s*[{_CUR}]?\d)|(?<=%)of\b"
    rf"|(?<=% )of\b|[-+*/×÷−])|[A-Za-z][A-Za-z/']*"
)
_REMAINDER_SIDE_RE = re.compile(rf"^\s*(?P<q>{_NUM}){_REMAINDER}(?P<r>{_NUM})\s*$")
_DIVISOR_RE = re.compile(rf"(?:/|÷|\\div)\s*[{_CUR}]?(?P<d>{_NUM})\s*$")
_PLAIN_DECIMAL_RE = re.compile(rf"^\s*[-−]?[{_CUR}]?\d[\d,]*\.(?P<dec>\d+)%?\s*$")
_OP_NAMES = {"×": "*", "x": "*", "\\times": "*", "\\cdot": "*", "÷": "/", "\\div": "/",
             "of": "*", "−": "-"}


@dataclass(frozen=True)
class Equation:
    """One equation chain: its char span, the value of each side, and, when wrong, where the
    first wrong side is written (``wrong_start``/``wrong_end``) and what it should be."""

    start: int
    end: int
    text: str
    values: tuple[Fraction, ...]
    operands: tuple[Fraction, ...]  # the numbers written in its first side
    wrong_at: int | None  # index of the first side that differs from the one before it
    wrong_start: int = 0
    wrong_end: int = 0
    result_start: int = 0  # char span of the number after the last "="
    result_end: int = 0

    @property
    def result(self) -> Fraction:
        return self.values[-1]


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def evaluate(side: str) -> tuple[Fraction | None, list[Fraction]]:
    """Value of one side ("4 bags * 4 cookies per bag", "-5 + 3", "20% of 50") and its numbers;
    None when it divides by zero or has no number. A minus where a number is due is its sign."""
    nums: list[Fraction] = []
    ops: list[str] = []
    negate = False
    for m in _TOKEN_RE.finditer(side):
        if m.group("num") is not None:
            n = _number(m.group("num")) / (100 if m.group("pct") else 1)
            nums.append(-n if negate else n)
            negate = False
        elif m.group("op") is not None:
            op = _OP_NAMES.get(m.group("op"), m.group("op"))
            if len(ops) < len(nums):
                ops.append(op)
            elif op == "-":  # "-5 + 3", "4 * -2", "= -2"
                negate = not negate
    if not nums or len(ops) != len(nums) - 1:
        return None, nums
    return _combine(nums, ops), nums


def _combine(nums: list[Fraction], ops: list[str]) -> Fraction | None:
    """``nums`` joined by ``ops`` with the usual precedence; None on a division by zero."""
    terms, signs = [nums[0]], []
    for op, n in zip(ops, nums[1:], strict=True):
        if op in "*/":
            if op == "/" and n == 0:
                return None
            terms[-1] = terms[-1] * n if op == "*" else terms[-1] / n
        else:
            signs.append(op)
            terms.append(n)
    total = terms[0]
    for sign, t in zip(signs, terms[1:], strict=True):
        total = total + t if sign == "+" else total - t
    return total


def _side_value(side: str, before: str | None) -> tuple[Fraction | None, list[Fraction], bool]:
    """Value, numbers and validity of one side; ``before`` is the side it follows. A quotient
    with a remainder ("3 R 2" after "17 / 5") is worth 3 + 2/5, and valid only when the
    remainder is less than the divisor."""
    rem = _REMAINDER_SIDE_RE.match(side)
    if rem is None:
        value, nums = evaluate(side)
        return value, nums, True
    divisor = _DIVISOR_RE.search(before or "")
    if divisor is None:
        return None, [], False
    d, q, r = (_number(divisor.group("d")), _number(rem.group("q")), _number(rem.group("r")))
    if d == 0:
        return None, [], False
    # One number, not [q, r]: "47 r 1" after 188 / 4 is a claim about 188 / 4, never a
    # running total going on from 47.
    return q + r / d, [q + r / d], 0 <= r < d and q == int(q) and r == int(r)


def _same(before: Fraction, value: Fraction, side: str) -> bool:
    """Whether a side states the value before it: exactly, or, for a plain decimal, rounded to
    the decimals it shows ("10 / 3 = 3.33", "2/3 = 0.67"; not "10/3 = 3.4")."""
    if value == before:
        return True
    if side.rstrip().endswith("%") and value * 100 == before:
        return True  # "0.25 * 100 = 25%": the percent sign names the unit of the result
    shown = _PLAIN_DECIMAL_RE.match(side)
    if shown is None:
        return False
    return abs(value - before) <= Fraction(1, 2 * 10 ** len(shown.group("dec")))


def find_equations(text: str) -> list[Equation]:
    """Every equation chain with at least one operator, in text order."""
    found = []
    # A list bullet ("- 12 - 4 = 8" on a new line) is neither a sign nor a minus joining it to
    # the line before; blanked with offsets kept.
    text = _BULLET_RE.sub(lambda b: " " * len(b.group(0)), text)
    for m in _EQ_RE.finditer(text):
        eq = m.group(0)
        if _unreadable(text, m.start(), m.end(), eq):
            continue
        if not any(t.group("op") for t in _TOKEN_RE.finditer(eq)):
            continue
        pieces, pos = [], 0
        for sep in _SIDE_SPLIT_RE.finditer(eq):
            pieces.append((pos, sep.start()))
            pos = sep.end()
        pieces.append((pos, len(eq)))
        values, wrong_at, spans = [], None, []
        first_nums: list[Fraction] = []
        for k, (a, b) in enumerate(pieces):
            before = eq[pieces[k - 1][0]:pieces[k - 1][1]] if k else None
            value, nums, valid = _side_value(eq[a:b], before)
            if value is None:
                break
            if k == 0:
                first_nums = nums
            values.append(value)
            spans.append((a, b))
            # "3 x 4 = 12 + 1 = 13" is a running total: a side that goes on from the value
            # before it (its first number) is a new step, not a claim that 12 + 1 = 12.
            running = k > 0 and len(nums) > 1 and nums[0] == values[k - 1] and valid
            right = k == 0 or (valid and _same(values[k - 1], value, eq[a:b]))
            if not right and k > 0 and valid:  # "$50 - 20% = $40": 20% of the 50
                shorthand = _percent_shorthand(eq[pieces[k - 1][0]:pieces[k - 1][1]])
                right = shorthand is not None and _same(shorthand, value, eq[a:b])
            if wrong_at is None and not right and not running:
                wrong_at = k
        if len(values) != len(pieces) or _label_or_conversion(eq, pieces, wrong_at):
            continue
        ws, we = spans[wrong_at] if wrong_at is not None else (0, 0)
        rs, re_ = spans[-1]
        base = m.start()
        if eq.startswith("$") and text.startswith("$", m.end()) and "$" not in eq[1:]:
            # "$6 \times 7 = 42$": a math delimiter, not a dollar sign; the span starts after it
            eq, base = eq[1:], base + 1
            ws, we, rs, re_ = max(ws - 1, 0), max(we - 1, 0), rs - 1, re_ - 1
        found.append(Equation(
            base, m.end(), eq, tuple(values), tuple(first_nums), wrong_at,
            base + _lstrip(eq, ws), base + len(eq[:we].rstrip()),
            base + _lstrip(eq, rs), base + len(eq[:re_].rstrip()),
        ))
    return found


def _unreadable(text: str, start: int, end: int, eq: str) -> bool:
    """Equations this reader would misread, so it leaves them out (a missed error is better
    than a false one): a mixed number on either side ("1 1/2 + 1 = 2 1/2" is not
    "1/2 + 1 = 2"), a range "5-10" written with no spaces ("pages 5-10 = 6 pages")."""
    if _MIXED_BEFORE_RE.search(text, 0, start) or _MIXED_AFTER_RE.match(text, end):
        return True
    if _OPERAND_BEFORE_RE.search(text, max(0, start - 60), start):
        return True
    if _UNREADABLE_AFTER_RE.match(text, end) or _UNREADABLE_IN_RE.search(eq):
        return True
    if re.search(r"\d:$", text[max(0, start - 2):start]):  # "6:00+18 hours = 00:00"
        return True
    first = _RANGE_SIDE_RE.match(eq)
    return first is not None and _number(first.group(1)) < _number(first.group(2))


def _bare(side: str) -> bool:
    """A side with no operator: "1.5 quarts", "Remaining 10", "12 inches"."""
    return not any(t.group("op") for t in _TOKEN_RE.finditer(side))


def _label_or_conversion(eq: str, pieces: list[tuple[int, int]], wrong_at: int | None) -> bool:
    """Whether the first disagreement is a label or a unit conversion, not arithmetic:
    "1.5 quarts = 4 * 1.5 = 6", "Remaining 10 = 62,300/10 = $6230" (a bare first side),
    "12 * 1 = 12 inches = 1 foot" (two bare sides, with a unit); such equations are left out."""
    if wrong_at is None:
        return False
    side = [eq[a:b] for a, b in pieces]
    pair = side[wrong_at - 1 : wrong_at + 1]
    converts = all(map(_bare, pair)) and re.search("[A-Za-z]", "".join(pair)) is not None
    return (wrong_at == 1 and _bare(side[0])) or converts  # "2 + 2 = 4 = 5" stays wrong


def _percent_shorthand(side: str) -> Fraction | None:
    """The value of "a + p%" / "a - p%" read as a raised or lowered by p percent of itself,
    the way prices are written ("$50 - 20% = $40", "100 + 10% = 110"); None otherwise."""
    m = _PERCENT_SHORTHAND_RE.match(side)
    if m is None:
        return None
    a, p = _number(m.group("a")), _number(m.group("p")) / 100
    return a * (1 + p) if m.group("op") == "+" else a * (1 - p)


def _lstrip(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _answer_value(answer: str | None) -> Fraction | None:
    m = re.fullmatch(rf"\s*\$?\s*(-?(?:{_NUM}))\s*\$?\s*", answer or "")
    return _number(m.group(1)) if m else None


def key_equations(equations: list[Equation], answer: Fraction) -> list[Equation]:
    """The last correct equation whose result is `answer`, then the earlier correct equations
    whose results feed it (latest first); [] when no equation produces the answer."""
    ok = [e for e in equations if e.wrong_at is None]
    finals = [e for e in ok if e.result == answer]
    if not finals:
        return []
    chosen = [finals[-1]]
    needed = set(finals[-1].operands)
    for e in reversed(ok[: ok.index(finals[-1])]):
        if e.result in needed:
            chosen.append(e)
            needed |= set(e.operands)
    return chosen


def plan_spans(
    job: Job, equations: list[tuple[Equation, int, int, str]], cap: float
) -> tuple[list[dict], str]:
    """Token spans for (equation, preferred char span, fallback char span, label) in priority
    order, under the cap; returns the spans and a status (ok | too_broad | no_spans)."""
    offsets = job.offsets()
    text = job.item["response_text"]
    n_tokens = len(offsets.offsets_T2)
    budget = math.floor(cap * n_tokens + 1e-9)
    spans: list[dict] = []
    covered: set[int] = set()
    for eq, fb_start, fb_end, label in equations:
        for c0, c1 in ((eq.start, eq.end), (fb_start, fb_end)):
            tok = char_span_to_tokens(offsets.offsets_T2, text, c0, c1, offsets.index)
            if tok is None or tok[1] <= tok[0]:
                continue
            new = set(range(*tok)) - covered
            if len(covered) + len(new) > budget:
                continue
            covered |= new
            spans.append(_span(job, c0, c1, tok, label))
            break
    if spans:
        return sorted(spans, key=lambda s: s["token_start"]), "ok"
    return [], "too_broad" if equations else "no_spans"


def _span(job: Job, c0: int, c1: int, tok: tuple[int, int], label: str) -> dict:
    seg_ids = [s.segment_id for s in job.segments if s.char_start < c1 and c0 < s.char_end]
    return {"segment_ids": seg_ids, "char_start": c0, "char_end": c1,
            "token_start": tok[0], "token_end": tok[1], "label": label}


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{float(v):g}"


def _should_be(e: Equation, k: int) -> str:
    """What the wrong side ``k`` of ``e`` should say: "3.33333, not 3.4", or for a quotient
    with a remainder "3 remainder 2, not 2 R 7" (whose value may even be right)."""
    side = e.text[e.wrong_start - e.start : e.wrong_end - e.start]
    before = e.text[: e.wrong_start - e.start].rsplit("=", 1)[0]
    divisor = _DIVISOR_RE.search(before.rstrip())
    if _REMAINDER_SIDE_RE.match(side) and divisor is not None:
        d = _number(divisor.group("d"))
        q, r = divmod(e.values[k - 1] * d, d)
        return f"{_fmt(q)} remainder {_fmt(r)}, not {side}"
    return f"{_fmt(e.values[k - 1])}, not {_fmt(e.values[k])}"


def choose(job: Job) -> tuple[list[tuple[Equation, int, int, str]], str | None]:
    """The equations to mark for a job, with their fallback spans and labels, and a note when
    there are none."""
    text = job.item["response_text"]
    equations = find_equations(text)
    if job.item["route"] == "error":
        wrong = [e for e in equations if e.wrong_at is not None]
        if not wrong:
            return [], f"no wrong equation among {len(equations)}"
        e = wrong[0]
        k = e.wrong_at or 0
        label = f"{text[e.start:e.end]} is wrong: {_should_be(e, k)}"
        return [(e, e.wrong_start, e.wrong_end, label[:120])], None
    answer = _answer_value(job.item.get("answer"))
    if answer is None:
        return [], "the reference answer is not a plain number"
    chosen = key_equations(equations, answer)
    if not chosen:
        return [], f"no equation among {len(equations)} produces the answer"
    return [(e, e.result_start, e.result_end, "key step") for e in chosen], None


def equation_rows(cfg: AnnotateConfig, jobs: list[Job], annotator: str,
                  tick: Callable[[], None]) -> list[dict]:
    """Rows of prepared jobs (key or error route)."""
    rows = []
    for job in jobs:
        chosen, note = choose(job)
        if not chosen:
            rows.append(make_row(job.item, annotator, "no_spans", error=note))
        else:
            spans, status = plan_spans(job, chosen, cfg.coverage_cap)
            n = len(job.offsets().offsets_T2)
            covered = sum(s["token_end"] - s["token_start"] for s in spans)
            err = None if status == "ok" else (
                f"too_broad: the smallest part of the first equation exceeds coverage_cap "
                f"{cfg.coverage_cap} x {n} tokens")
            rows.append(make_row(job.item, annotator, status, spans=spans,
                                 coverage=covered / n if n else 0.0,
                                 raw=" | ".join(c[3] for c in chosen), error=err))
        tick()
    return rows
