"""The value an "the answer is ..." / "Answer: ..." statement states.

The statement's text runs to the end of its sentence or line (extract.py); what it *states* is
its first complete value, read here:

- a number (sign, thousands separators, decimals) with an optional currency sign before it and
  a unit, ``%`` or any words after it: "The answer is $1,200 a month." states 1200;
- an arithmetic chain counts as one value, its last right-hand side: "8 x 5 = 40" states 40,
  "18 - 6" states 12; a justification or parenthetical after it is not part of it:
  "40 (from 8 x 5)", "9 because 3 + 4 = 7", "4, not 5";
- a leading math span (``$40$``, ``\\(8 \\times 5 = 40\\)``) is read the same way inside.

A statement that offers several values as alternatives is a **hedge** and states no answer:
"12 or 13", "12 marbles or maybe 13", "either 6 or 7", "between 2 and 3", "2 to 3", "2-3". The
checker scores it ``no_answer`` (reward 0): no single value was committed to, and an earlier
statement does not count either, since the response withdrew it by hedging last.

Anything that does not open with a plain number (``\\frac{1}{2}``, ``x = 2``, ``3\\sqrt{2}``,
``5, 7``, "Sam has 9 marbles") is left to math-verify over the whole statement, as before.

A statement read with no confidence is **unclear** and, like a hedge, states no answer (a false
reward is worse than a missed one: a policy trained on the reward learns to say whatever pays):

- negated or retracted: "not 12", "never 6", "12, which is wrong";
- a bound, not a value: "at least 12", "more than", "under", "nearly", "up to", "12 or more",
  "40 at most", ``\\geq 7``. "approximately / about / around / roughly 12" and "12 or so" do
  state 12: an approximation is still a claim that the value is 12 (the checker compares it
  with the reference like any value, and a rounded decimal only within the decimals it shows);
- a compound quantity that is not one number: "2 hours 30 minutes", "5 feet 3 inches",
  "6 apples and 4 oranges";
- "X% of Y" with no result: the rate X or the part X% x Y, who knows;
- a question: "12?";
- an operation or an operand, not the value: "12 squared", "12 times 3", "2 to the 12th power",
  "12-ish", "12 short of 20", "half of 12", "twice 12", "a loss of 12", "divisible by 12";
- an alternative or a correction later in the statement: "12 if x is even, else 13", "12;
  alternatively 13", "12 | 13", "12, but it is 15" (not after a box: a solution's sentence
  goes on), and "12 (though 13 is possible)"; a vulgar fraction after it ("2½").

Some quantities are read whole instead: sign words ("negative 5", "minus 5" state -5,
"positive 5" states 5), scale words ("1.5 million" states 1500000, "4 dozen" 48), mixed numbers
("3 1/2", "3 and a half" state 7/2), and "X% of Y = Z" / "X% of Y is Z" states Z.

Implicit statements (extract.py: a concluding, result or single-value sentence) have no answer
phrase to anchor a reading, so the whole sentence must be free of these cues (``unclear_sentence``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

_MATH_SPAN_RE = re.compile(r"^(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])", re.DOTALL)
_CURRENCY = "$€£¥₹"
# A number: optional sign, digits with thousands separators "1,234" (a comma NOT followed by a
# space and three digits is the end of the value), optional decimals.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_OP = r"(?:[-+*/×÷x]|\\times|\\cdot|\\div)"
_LEAD_WORDS_RE = re.compile(
    r"^(?:(?:approximately|about|around|roughly|exactly|just|only)\s+|[~≈]\s*)", re.IGNORECASE
)
_HEDGE_OPEN_RE = re.compile(r"^(?:either|between)\b", re.IGNORECASE)
_NUMBER_RE = re.compile(_NUMBER)
_CHAIN_RE = re.compile(
    rf"(?P<chain>{_NUMBER}(?:\s*(?:{_OP}|=)\s*[{re.escape(_CURRENCY)}]?{_NUMBER})*)"
)
# After the value: what makes it a hedge ("or 13", "or maybe 13", "to 3", "-3" range, "and 3"
# after "between"), what makes it something other than a plain number (LaTeX, a variable, a
# power: math-verify reads those), and a list "5, 7" (math-verify reads it as a set).
_HEDGE_AFTER_RE = re.compile(
    rf"^\s*(?:,?\s*(?:or|to)\s+(?:maybe\s+|perhaps\s+|possibly\s+|even\s+)?|[-–~]\s*"
    rf"|(?:[A-Za-z]+,?\s+){{1,2}}or\s+(?:maybe\s+|perhaps\s+|possibly\s+)?)"
    rf"[{re.escape(_CURRENCY)}]?{_NUMBER}\b",
    re.IGNORECASE,
)
_NOT_PLAIN_AFTER_RE = re.compile(
    r"^(?:[A-Za-z(\\^_{!'√]|\s*[\\^_{]|\s*:\s*\d|\s*[a-z]\b(?!\s+[a-z]))"
)
_LIST_AFTER_RE = re.compile(rf"^\s*(?:,|;|,?\s*and\s)\s*\$?{_NUMBER}\b(?!\s*[a-z])")
_LATEX_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\{,\}|,\\!|\\,|\\!|\\ )(?=\d{3})")
_TIMES_RE = re.compile(r"\\times|\\cdot|×|(?<=\d)\s*x\s*(?=\d)")

# Cues that make a statement unclear (module docstring). Negation: "not", "never", "isn't"...
_NEGATION_RE = re.compile(
    r"\b(?:not|never|no\s+longer|cannot|neither|nor|hardly|scarcely|unlikely)\b|n[’']t\b", re.I
)
_BOUND_WORDS = (
    r"at\s+(?:least|most)|(?:no\s+)?(?:more|less|fewer|greater|higher|lower|bigger|smaller)"
    r"\s+than(?:\s+or\s+equal\s+to)?|under|over|above|below|beyond|nearly|almost|up\s+to"
    r"|just\s+(?:under|over|shy\s+of)|upwards\s+of|in\s+excess\s+of|exceed(?:s|ed|ing)?"
    r"|at\s+minimum|at\s+maximum|within|an?\s+(?:minimum|maximum)\s+of|close\s+to"
)
_BOUND_SYMBOLS = r"\\(?:geq?|leq?|gt|lt|geqslant|leqslant)\b|[<>≤≥≦≧]"
# A bound right before the value: "at least 12", "$\geq 7$".
_BOUND_BEFORE_RE = re.compile(rf"(?:\b(?:{_BOUND_WORDS})|{_BOUND_SYMBOLS})\s*$", re.I)
# In a sentence, only bound words count: "$x \\geq 5$" is an inequality, a value of its own.
_BOUND_BEFORE_NUMBER_RE = re.compile(
    rf"\b(?:{_BOUND_WORDS})\s*[{re.escape(_CURRENCY)}]?\s*-?\d", re.I
)
_BOUND_AFTER_RE = re.compile(
    r"^\s*(?:[A-Za-z]+\s+)?(?:,\s*)?(?:or\s+(?:more|less|fewer|greater|higher|lower|above|below"
    r"|over|under|bigger|smaller)|at\s+(?:least|most)|(?:and|or)\s+(?:up|above|over|below|beyond)"
    r"|\+(?!\s*[\w\\($])|(?:at\s+)?(?:minimum|maximum)|max\b|min\b|tops\b"
    r"|at\s+the\s+(?:very\s+)?(?:least|most)|give\s+or\s+take|at\s+(?:best|worst)"
    r"|in\s+the\s+(?:best|worst)\s+case)",
    re.I,
)
_BOUND_AFTER_NUMBER_RE = re.compile(
    r"\d\s*(?:[A-Za-z]+\s+)?(?:or\s+(?:more|less|fewer|greater|higher|lower|above|below|over"
    r"|under)|at\s+(?:least|most))\b", re.I,
)
_RETRACTION_RE = re.compile(
    r"\b(?:wrong|incorrect|mistaken?|not\s+(?:right|correct|sure)|unsure|doubtful)\b"
    r"|\b(?:but|though|although|or)\b[^.]*\b(?:could|might|may)\s+(?:also\s+|well\s+)?be\b",
    re.I,
)
_RETRACT_NEXT_RE = re.compile(
    r"\b(?:that|this|it|which|my\s+answer)(?:[’']s|\s+is|\s+was|\s+seems|\s+looks|\s+must\s+be"
    r"|\s+might\s+be)?\s+(?:\w+\s+)?(?:wrong|incorrect|not\s+(?:right|correct)|a\s+mistake)\b"
    r"|\bI\s+(?:made\s+a\s+mistake|was\s+wrong|am\s+not\s+sure|[’']m\s+not\s+sure)\b"
    r"|\b(?:scratch\s+that|just\s+kidding|never\s*mind|on\s+second\s+thought)\b"
    r"|^\W*(?:actually|wait|hmm),?\s+no\b",
    re.I,
)
# "12 ≤ x" is a bound; "-80 \\leq g(x) \\leq 82" (another number follows) is an interval.
_INEQUALITY_AFTER_RE = re.compile(r"^\s*(?:[<>≤≥]|\\(?:le|ge|lt|gt)q?\b)(?![^.]*\d)")
_UNSURE_RE = re.compile(r"\b(?:not\s+(?:sure|certain)|unsure|uncertain|doubtful)\b", re.I)
# After the value, what makes it something else (issue 26 review): an operation on it ("12
# squared", "12 times 3", "2 to the 12th power", "12-ish"), a vulgar fraction ("2½"), or, later
# in the same statement, an alternative or a correction with another number ("12 if x is even,
# else 13", "12; alternatively 13", "12 | 13", "12, but it is 15", "12 - just kidding, 14").
_OPERATION_AFTER_RE = re.compile(
    r"^\s*(?:squared|cubed|factorial|doubled|halved|tripled|quadrupled|-?ish\b|raised\b"
    r"|(?:times|plus|minus|divided\s+by|multiplied\s+by|mod|modulo|choose)\s+\$?\d"
    r"|times\s+(?:as|more|less|fewer|bigger|larger|smaller)\b|plus\b|(?:short|shy)\s+of\b"
    r"|to\s+the\s+\w+(?:\s+power)?\b)",
    re.I,
)
_VULGAR_AFTER_RE = re.compile(r"^\s*[½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞]")
_ALTERNATIVE_LATER_RE = re.compile(
    r"\b(?:or|alternatively|otherwise|else|unless|maybe|perhaps|possibly|versus|vs|but|though"
    r"|although|also"
    r"|actually|kidding|instead|rather)\b[^.]*?\d|\|\s*\$?\d",
    re.I,
)
# Words right before the number that make it an operand, not the value: "half of 12", "twice
# 12", "a loss of 12", "a multiple of 12", "divisible by 12" ("a total of 12" is the value).
_OPERAND_LEAD_RE = re.compile(
    r"(?:\b(?<!total\s)of|\bby|\btwice|\bthrice|\bhalf|\bdouble|\btriple|\btimes|\bto\s+the)"
    r"\s*$",
    re.I,
)
# "12 ± 1", "12 $\pm$ 1", "12 (13 if Sam counts)", "5 degrees below zero".
_RANGE_AFTER_RE = re.compile(
    rf"^\s*(?:±|\$?\s*\\pm(?![A-Za-z])|\+\s*/\s*-|\+-)"
    rf"|^\s*[(\[]\s*[{re.escape(_CURRENCY)}]?{_NUMBER}[^)\]]*\b(?:if|when|otherwise|unless"
    rf"|including|excluding|counting|without)\b"
    rf"|^\s*(?:[A-Za-z]+\s+)?below\s+(?:zero|0|sea\s+level)\b",
    re.I,
)
# Outside math, in a sentence with no answer phrase: "Sam has 12+ apples", "the total is ≥ 12".
_PROSE_BOUND_RE = re.compile(r"[≥≤≧≦]|\d\s*\+(?!\s*[\d$(\\])|(?<![\w$\\])[<>]\s*\d")
_PROSE_SIGN_RE = re.compile(r"\bnegative\b|\bbelow\s+zero\b", re.I)
_BOX_BOUND_RE = re.compile(
    r"^\s*(?:\\(?:geq?|leq?|gt|lt|geqslant|leqslant)(?![A-Za-z])|[<>≤≥])|\d\s*\+\s*$"
)
_BOX_NEGATED_AFTER_RE = re.compile(
    r"^(?:(?:is|was|seems|looks|would\s+be)\s+(?:not\b|wrong|incorrect)|(?:is|was|does)n[’']t\b)",
    re.I,
)
_SPACE_GROUPS_RE = re.compile(r"^-?\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?![\d.,/-])")
_SIGN_WORD_RE = re.compile(r"^(?P<word>negative|minus|positive|plus)\s+(?=[$\d])", re.I)
_SIGN_WORD_NUMBER_RE = re.compile(r"\b(?:negative|minus)\s+\$?\d", re.I)
# "1.5 million": the number times its scale.
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9,
           "trillion": 10**12, "dozen": 12}
_SCALE_AFTER_RE = re.compile(rf"^\s+(?P<scale>{'|'.join(_SCALES)})s?\b", re.I)
_SCALE_AFTER_NUMBER_RE = re.compile(rf"\d\s+(?:{'|'.join(_SCALES)})s?\b", re.I)
# "3 1/2", "3 and 1/2", "3 and a half": a mixed number, read whole.
_MIXED_AFTER_RE = re.compile(
    r"^\s+(?:and\s+)?(?:(?P<num>\d+)\s*/\s*(?P<den>\d+)\b|an?\s+(?P<part>half|quarter|third))",
    re.I,
)
_PARTS = {"half": "1/2", "quarter": "1/4", "third": "1/3"}
# "2 hours 30 minutes", "6 apples and 4 oranges": units, then another number. Words that join
# a justification ("15 dollars for 2 hours", "12 km in 3 hours") do not make a compound.
_LINK_WORDS = frozenset(
    "a an the for in of per from because since as each with after at by to on which so when if "
    "than times over out every is are was were this that these those who or".split()
)
_COMPOUND_AFTER_RE = re.compile(
    rf"^\s*(?P<words>(?:[A-Za-z]+\s*){{1,2}}?)(?:,\s*)?(?:and\s+)?[{re.escape(_CURRENCY)}]?\d"
)
# "25% of 200 = 50" states 50; "25% of 200" alone is the rate or the part.
_PERCENT_OF_RE = re.compile(
    rf"^\s*(?:%|percent)\s+of\s+(?:the\s+)?[{re.escape(_CURRENCY)}]?{_NUMBER}"
    rf"(?:\s+[A-Za-z]+){{0,2}}\s*(?:=|\bis\b|\bequals\b|\bgives\b|\bmakes\b)\s*"
    rf"[{re.escape(_CURRENCY)}]?(?P<value>{_NUMBER})"
)
_FRACTION_OF_RE = re.compile(_PERCENT_OF_RE.pattern.replace(r"(?:%|percent)\s+of", r"of", 1))
_PERCENT_OF_ANY_RE = re.compile(r"^\s*(?:%|percent)\s+of\s+(?:the\s+)?\S*\d", re.I)
_HEDGE_AFTER_MORE_RE = re.compile(
    rf"^\s*[,;(\[]?\s*(?:or\b|maybe\b|perhaps\b|possibly\b|probably\b)\s*(?:maybe\s+|perhaps\s+"
    rf"|possibly\s+|even\s+)?[{re.escape(_CURRENCY)}]?{_NUMBER}",
    re.I,
)
_HEDGE_SENTENCE_RE = re.compile(
    rf"{_NUMBER}\s*(?:[A-Za-z]+\s+)?,?\s*or\s+(?:maybe\s+|perhaps\s+|possibly\s+)?"
    rf"[{re.escape(_CURRENCY)}]?{_NUMBER}|{_NUMBER}\s+to\s+{_NUMBER}"
    rf"|\beither\b[^.]*\d[^.]*\bor\b|\bbetween\s+\$?\d[^.]*\band\s+\$?\d",
    re.I,
)

StatedKind = Literal["value", "hedge", "unclear"]


@dataclass(frozen=True)
class Stated:
    """What a statement states: a plain ``value`` (sympy-ready text), a ``hedge``, or an
    ``unclear`` statement (``text`` then says why)."""

    kind: StatedKind
    text: str


def unclear_lead(lead: str, *, near: bool = False) -> str | None:
    """Why the text of a sentence before its stated value makes the value unclear, or None:
    "I don't think the answer is", "The answer is at least". With ``near`` only a negation
    right before the value counts ("is not $\\boxed{6}$"): a box often closes a sentence that
    names what it counts ("the integers not divisible by 3 is $\\boxed{12}$")."""
    clause = re.split(r"[,;:–—]\s", lead)[-1]  # "Not counting the lid, the answer is 36" is fine
    if near:
        clause = " ".join(clause.replace("$", " ").split()[-3:])
    if _NEGATION_RE.search(clause) or re.search(r"\bno\s*$", clause, re.I):
        return "negated"  # "the answer is no 12" too
    if _UNSURE_RE.search(lead):  # "I'm not sure, but the answer is 12"
        return "retracted"
    if _BOUND_BEFORE_RE.search(lead.rstrip(" *_$(")):
        return "a bound, not a value"
    return None


def unclear_sentence(sentence: str) -> str | None:
    """Why a sentence with no answer phrase ("Sam has at least 14 stickers.") states no clear
    value, or None; only used for implicit statements, which have no phrase to anchor to."""
    checks = (
        (_NEGATION_RE, "negated"),
        (_RETRACTION_RE, "retracted"),
        (_BOUND_BEFORE_NUMBER_RE, "a bound, not a value"),
        (_BOUND_AFTER_NUMBER_RE, "a bound, not a value"),
        (_SIGN_WORD_NUMBER_RE, "a sign word"),
        (_SCALE_AFTER_NUMBER_RE, "a scale word"),
        (_HEDGE_SENTENCE_RE, "a hedge"),
        (re.compile(r"%\s*of\s+(?:the\s+)?\S*\d|percent\s+of", re.I), "a percentage of a number"),
    )
    for pattern, why in checks:
        if pattern.search(sentence):
            return why
    if sentence.rstrip(" *_$.").endswith("?"):
        return "a question"
    prose = re.sub(r"\$[^$]*\$|\\\(.*?\\\)", " ", sentence)  # "$x \\geq 5$" is a value
    if _PROSE_BOUND_RE.search(prose):
        return "a bound, not a value"
    if _PROSE_SIGN_RE.search(prose):
        return "a sign word"
    return None


def unclear_box(content: str) -> str | None:
    """Why a box's content is a bound, not a value ("\\geq 12", "12+"), or None."""
    return "a bound, not a value" if _BOX_BOUND_RE.search(content) else None


def unclear_after_box(rest: str, *, answer_phrase: bool) -> str | None:
    """Why the rest of a box's sentence withdraws the box, or None: "$\\boxed{12}$ is not the
    answer", "$\\boxed{12}$, give or take 1", "... or $\\boxed{13}$" is a set (math-verify). A
    bound counts only after an answer phrase ("the answer is $\\boxed{12}$ or more"): "Zach
    can have $\\boxed{2}$ pencils at most" answers a max question."""
    rest = re.sub(r"^[\s$]*(?:\\[\])])?[\s$]*", "", rest)
    if _BOX_NEGATED_AFTER_RE.match(rest):
        return "negated"
    why = _unclear_after(" " + rest, later=False)
    if why is None and _HEDGE_AFTER_MORE_RE.match(rest):
        return "a hedge"
    if why == "a bound, not a value" and not answer_phrase:
        return None
    return why


def stated_value(statement: str) -> Stated | None:
    """The first complete value of an answer statement's text, a hedge, an unclear statement,
    or None when the text does not open with a plain number (the caller then parses the whole
    text as before)."""
    text = statement.strip().lstrip(":*_ ").strip()
    lead = re.split(r"[\d$\\]", text, maxsplit=1)[0]
    if (why := unclear_lead(lead)) is not None:
        return Stated("unclear", why)
    # Only when a number follows: "The volume of $ABCD$ is 120" names what the value is of.
    starts_number = re.match(r"(?:\$|\\\(|\\\[)?\s*[-$€£¥₹]?\d", text[len(lead):]) is not None
    if starts_number and _OPERAND_LEAD_RE.search(lead.rstrip(" *_(")):
        return Stated("unclear", "an operand, not the value")
    if (span := _MATH_SPAN_RE.match(text)) is not None:
        inner = next(g for g in span.groups() if g is not None).strip()
        if re.match(rf"(?:{_BOUND_WORDS})\b|{_BOUND_SYMBOLS}", inner, re.I):
            return Stated("unclear", "a bound, not a value")
        inner = _LATEX_THOUSANDS_RE.sub(",", inner)
        rest = text[span.end():]
        got = _leading(inner, rest_after=rest)
        if got is not None and got.kind == "value" and (why := _unclear_after(rest)):
            return Stated("unclear", why)
        return Stated("hedge", text) if got is not None and got.kind == "hedge" else got
    got = _leading(text, rest_after="")
    if got is None and _HEDGE_SENTENCE_RE.search(text):
        return Stated("hedge", text)  # "somewhere around 11 to 13": math-verify would take 13
    return got


def _unclear_after(after: str, *, later: bool = True) -> str | None:
    """Why the text after a value makes it unclear ("12 or more", "12, which is wrong"); with
    ``later`` also an alternative anywhere in the rest of the statement ("12; alternatively
    13"), which is left out after a box: a solution's sentence goes on ("Only $\\boxed{49}$
    leaves 1 when divided by 2, 3, 4, or 6")."""
    if _BOUND_AFTER_RE.match(after) or _INEQUALITY_AFTER_RE.match(after):
        return "a bound, not a value"
    if _RETRACTION_RE.search(after):
        return "retracted"
    if after.strip(" *_$").startswith("?"):
        return "a question"
    if _RANGE_AFTER_RE.match(after):
        return "a range or an alternative"
    if _OPERATION_AFTER_RE.match(after):
        return "an operation on the value"
    if _VULGAR_AFTER_RE.match(after):
        return "a mixed number"
    if later and _ALTERNATIVE_LATER_RE.search(after):
        return "an alternative or a correction after the value"
    return None


def unclear_after_statement(after: str) -> str | None:
    """Why the text after a response's last statement withdraws it, or None: a question mark
    right after it ("The answer is 12?"), or a retraction in the sentence after it ("... 12.
    But that is wrong."). Only that sentence, and only a retraction of "that / it / my answer":
    a solution may go on to discuss a common mistake."""
    if after.lstrip(" *_$").startswith("?"):
        return "a question"
    next_sentence = re.match(r"[^.!?]*[.!?]*[^.!?]*", after)
    if next_sentence and _RETRACT_NEXT_RE.search(next_sentence.group(0)):
        return "retracted"
    return None


def _leading(text: str, rest_after: str) -> Stated | None:
    text = _LEAD_WORDS_RE.sub("", text)
    sign = ""
    if (word := _SIGN_WORD_RE.match(text)) is not None:
        sign = "-" if word.group("word").lower() in ("negative", "minus") else ""
        text = text[word.end():]
    if _HEDGE_OPEN_RE.match(text):
        return Stated("hedge", text) if len(_NUMBER_RE.findall(text)) >= 2 else None
    if text[:1] in _CURRENCY and text[1:2].isdigit():
        text = text[1:]
    # "12 000": digits grouped by spaces are one number (else "12" would be read, issue 26).
    text = _SPACE_GROUPS_RE.sub(lambda g: re.sub(r"\s", "", g.group(0)), text, count=1)
    m = _CHAIN_RE.match(text)
    if m is None:
        return None
    chain, after = m.group("chain"), text[m.end():]
    is_range = re.fullmatch(rf"{_NUMBER}\s*[-–~]\s*{_NUMBER}", chain) and " - " not in chain
    if "=" not in chain and is_range and not re.match(r"[A-Za-z\\]", after):  # "5-12i" is not
        return Stated("hedge", chain)  # "2-3": a range, not a subtraction
    if (why := _unclear_after(after + rest_after, later=False)) is not None:
        return Stated("unclear", why)
    if "=" not in chain and (
        _HEDGE_AFTER_RE.match(after + rest_after) or _HEDGE_AFTER_MORE_RE.match(after + rest_after)
    ):
        return Stated("hedge", text)
    if _ALTERNATIVE_LATER_RE.search(after + rest_after):
        return Stated("unclear", "an alternative or a correction after the value")
    single = _NUMBER_RE.fullmatch(chain) is not None
    if single and (whole := _whole_quantity(chain, after)) is not None:
        return whole if whole.kind != "value" else Stated("value", sign + whole.text)
    if _NOT_PLAIN_AFTER_RE.match(after) or _LIST_AFTER_RE.match(after):
        return None
    if sign and not single:
        return Stated("unclear", "a sign word before an expression")
    if "=" not in chain and ("/" in chain or "." in chain):
        if (part := _FRACTION_OF_RE.match(after)) is not None:  # "1/2 of 24 = 12" states 12
            return Stated("value", part.group("value").replace(",", ""))
        if re.match(rf"^\s+of\s+(?:the\s+)?[{re.escape(_CURRENCY)}]?\d", after):
            return Stated("unclear", "a fraction of a number, with no result")
    value = chain.rsplit("=", 1)[-1].strip()
    value = _TIMES_RE.sub("*", value).replace("÷", "/").replace("\\div", "/")
    value = re.sub(rf"[{re.escape(_CURRENCY)}]", "", value)
    value = re.sub(r"(?<=\d),(?=\d{3})", "", value)
    return Stated("value", sign + value)


def _whole_quantity(number: str, after: str) -> Stated | None:
    """A single number read together with what follows it: a scale ("1.5 million"), a mixed
    number ("3 1/2"), a percentage of a number, or a compound quantity (unclear); None when
    the number stands alone."""
    plain = number.replace(",", "")
    if (scale := _SCALE_AFTER_RE.match(after)) is not None:
        value = Fraction(plain) * _SCALES[scale.group("scale").lower()]
        return Stated("value", str(value))
    if (mixed := _MIXED_AFTER_RE.match(after)) is not None and "." not in plain:
        part = _PARTS[mixed.group("part").lower()] if mixed.group("part") else (
            f"{mixed.group('num')}/{mixed.group('den')}")
        return Stated("value", str(Fraction(plain) + Fraction(part)))
    if (pct := _PERCENT_OF_RE.match(after)) is not None:
        return Stated("value", pct.group("value").replace(",", ""))
    if _PERCENT_OF_ANY_RE.match(after):
        return Stated("unclear", "a percentage of a number, with no result")
    compound = _COMPOUND_AFTER_RE.match(after)
    if compound is not None and compound.group("words").strip():
        words = compound.group("words").lower().split()
        if not any(w in _LINK_WORDS for w in words):
            return Stated("unclear", "a compound quantity")
    return None
