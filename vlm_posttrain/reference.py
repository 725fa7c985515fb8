"""Reference judge: score a model's answer against a reference answer on 0-100, without a model.

Usage::

    from vlm_posttrain.reference import score_reference

    score_reference("The value for 2019 is 42.5 million.", "42.5")       # 100.0 (numeric, in a sentence)
    score_reference("yes, it is", "Yes.", answer_type="yes_no")            # 100.0
    score_reference("a bar chart of sales", "a line chart of sales", answer_type="long_text")  # F1 75.0

`score_reference(answer, reference, answer_type=None)` picks one rule from `answer_type` (`numeric`,
`yes_no`, `short_text`, `long_text`), or infers the type from the reference with `infer_answer_type`:

- `numeric` (`numeric_score`): ChartQA-style relaxed accuracy, 100 or 0. One number is taken from each
  side (`pick_number`) and they match when |answer - reference| <= 5% of |reference| (inclusive; exact
  equality when the reference is 0). A percent on one side only is matched both ways: "25%" equals "25",
  "0.25" and "25 percent"; without a percent sign "0.25" does not equal "25". Scale words ("million") and
  number words ("three") are not interpreted.
- `yes_no` (`yes_no_score`): 100 when the first "yes"/"no" word of the answer equals the reference's
  ("yes, it is" matches "Yes."), else 0, including answers with neither word.
- `short_text` (`exact_match_score`): 100 when both sides are equal after `normalize_text` (case,
  punctuation, articles and spacing ignored; a leading "my answer is" / "the answer is" / "answer:" is
  dropped), else 0.
- `long_text` (`token_f1`): SQuAD token F1 on `normalize_text` tokens, scaled to 0-100 (a bag of words:
  word order is ignored).

All functions are pure and deterministic; a missing answer (None) scores 0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

ANSWER_TYPES = ("numeric", "yes_no", "short_text", "long_text")
RELATIVE_TOLERANCE = 0.05
# References with more normalized words than this are scored with token F1 when the type is inferred.
SHORT_TEXT_MAX_WORDS = 5

# A number not glued to a word or to another number ("SFT1", "1.2.3"): optional sign, either comma-grouped
# thousands ("1,234.5") or plain digits, an optional decimal part, and an optional percent marker.
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212])?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<percent>\s?%|\s*per\s?cent\b)?",
    re.IGNORECASE,
)
# What may surround a lone number and still leave it "the whole answer": spaces, currency, closing stops.
_NUMBER_FRAME_RE = re.compile(r"[\s$€£¥:.,;!()]*")
_LEAD_IN_RE = re.compile(r"\banswer\s*(?:is\b|:)\s*", re.IGNORECASE)
_LEADING_LEAD_IN_RE = re.compile(r"^\s*(?:(?:my|the|final)\s+)?answer\s*(?:is\b|:)\s*", re.IGNORECASE)
_ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class Number:
    """A number found in text: its value (percent not divided out), whether it carried %, and the match."""

    value: float
    is_percent: bool
    text: str

    @property
    def is_year(self) -> bool:
        """Written like a calendar year ("2019"): such numbers are usually labels, not the answer."""
        return (
            not self.is_percent
            and re.fullmatch(r"\d{4}", self.text.strip()) is not None
            and (1800 <= self.value <= 2100)
        )


def extract_numbers(text: str) -> list[Number]:
    """Every number in `text`, in order; "1,234" is one number, "3, 39" is two, "2015-2016" is two."""
    numbers = []
    for match in _NUMBER_RE.finditer(text):
        value = float(match["digits"].replace(",", ""))
        if match["sign"] in ("-", "\u2212"):
            value = -value
        numbers.append(Number(value, match["percent"] is not None, match[0]))
    return numbers


def parse_number(text: str) -> Number | None:
    """The number when `text` is nothing but one number (currency, spaces and a final stop allowed)."""
    numbers = extract_numbers(text)
    if len(numbers) != 1:
        return None
    rest = _NUMBER_RE.sub("", text)
    return numbers[0] if _NUMBER_FRAME_RE.fullmatch(rest) else None


def pick_number(text: str, keep_years: bool = False) -> Number | None:
    """The one number that stands for the answer in `text`, or None if it has none.

    A text that is a lone number gives that number. Otherwise, after an "answer is" / "answer:" lead-in
    the first number following it is taken ("My answer is 45. In 2019 ..." gives 45); without a lead-in
    the last number is taken. Year-like numbers ("2019") are skipped when other numbers exist, unless
    `keep_years`, so "The value for 2019 is 42.5 million." gives 42.5.
    """
    whole = parse_number(text)
    if whole is not None:
        return whole
    lead_in = _LEAD_IN_RE.search(text)
    candidates = extract_numbers(text[lead_in.end() :] if lead_in else text)
    if not keep_years:
        candidates = [n for n in candidates if not n.is_year] or candidates
    if not candidates:
        return None
    return candidates[0] if lead_in else candidates[-1]


def within_tolerance(answer: float, reference: float, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    """|answer - reference| <= tolerance * |reference|, inclusive; exact equality when the reference is 0."""
    if reference == 0:
        return answer == 0
    # The tiny slack keeps the inclusive edge (e.g. 105 vs 100) from failing on float rounding.
    return abs(answer - reference) <= tolerance * abs(reference) * (1 + 1e-9)


def relaxed_match(answer: Number, reference: Number, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    """Relaxed numeric equality (`within_tolerance`); a percent on one side only is read both ways.

    With P% on one side, the other side matches as P ("25%" = "25") or as the fraction P/100
    ("25%" = "0.25"); "0.5%" does not match "50". Both sides percent, or neither: values compared as is.
    """
    candidates = [answer.value]
    # P% may be written on the other side as P or as the fraction P/100, never as 100*P.
    if answer.is_percent and not reference.is_percent:
        candidates.append(answer.value / 100)
    elif reference.is_percent and not answer.is_percent:
        candidates.append(answer.value * 100)
    return any(within_tolerance(c, reference.value, tolerance) for c in candidates)


def numeric_score(answer: str, reference: str, tolerance: float = RELATIVE_TOLERANCE) -> float:
    """100 if the answer's number matches the reference's within `tolerance` (see `relaxed_match`), else 0.

    Raises ValueError when the reference holds no number, since that is a data error, not a wrong answer.
    """
    ref = pick_number(reference)
    if ref is None:
        raise ValueError(f"numeric reference holds no number: {reference!r}")
    ref_is_year = ref.value.is_integer() and 1800 <= ref.value <= 2100
    ans = pick_number(answer, keep_years=ref_is_year)
    return 100.0 if ans is not None and relaxed_match(ans, ref, tolerance) else 0.0


def normalize_text(text: str) -> str:
    """Lower-case and NFKC; punctuation and symbols become spaces; articles dropped; spaces collapsed.

    "The Answer: Hard-drive!" becomes "answer hard drive"; "(3, 39)" becomes "3 39".
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def yes_no_label(text: str) -> str | None:
    """ "yes" or "no": the first of those words in the normalized text, None when neither occurs."""
    for word in normalize_text(text).split():
        if word in ("yes", "no"):
            return word
    return None


def yes_no_score(answer: str, reference: str) -> float:
    """100 if the answer's first yes/no word equals the reference's, else 0 (also when it has neither)."""
    ref = yes_no_label(reference)
    if ref is None:
        raise ValueError(f"yes/no reference says neither yes nor no: {reference!r}")
    return 100.0 if yes_no_label(answer) == ref else 0.0


def exact_match_score(answer: str, reference: str) -> float:
    """100 if both sides are equal after dropping a leading "answer is" and `normalize_text`, else 0."""

    def clean(text: str) -> str:
        return normalize_text(_LEADING_LEAD_IN_RE.sub("", text))

    return 100.0 if clean(answer) == clean(reference) else 0.0


def token_f1(answer: str, reference: str) -> float:
    """SQuAD token F1 x 100 over `normalize_text` words (multiset overlap); 100 when both are empty."""
    ans, ref = normalize_text(answer).split(), normalize_text(reference).split()
    if not ans or not ref:
        return 100.0 if ans == ref else 0.0
    common = sum((Counter(ans) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ans), common / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def infer_answer_type(reference: str) -> str:
    """`numeric` if the reference is a lone number, `yes_no` if it is just yes/no, then `short_text` for up
    to SHORT_TEXT_MAX_WORDS normalized words, else `long_text`."""
    if parse_number(reference) is not None:
        return "numeric"
    words = normalize_text(reference).split()
    if words in (["yes"], ["no"]):
        return "yes_no"
    return "short_text" if len(words) <= SHORT_TEXT_MAX_WORDS else "long_text"


_SCORERS = {
    "numeric": numeric_score,
    "yes_no": yes_no_score,
    "short_text": exact_match_score,
    "long_text": token_f1,
}


def score_reference(answer: str | None, reference: str, answer_type: str | None = None) -> float:
    """0-100 score of `answer` against `reference` by the rule for `answer_type` (inferred when None)."""
    if answer_type is None:
        answer_type = infer_answer_type(reference)
    if answer_type not in _SCORERS:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return 0.0
    return _SCORERS[answer_type](str(answer), str(reference))
