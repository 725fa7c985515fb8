"""Reference judge: score a model's answer against a reference answer on 0-100, without a model.

Usage::

    from vlm_posttrain.reference import judge_reference, score_reference

    score_reference("The value for 2019 is 42.5 million.", "42.5")       # 100.0 (numeric, in a sentence)
    score_reference("There is no doubt: yes.", "Yes")                      # 100.0
    score_reference("a bar chart of sales", "a line chart of sales", answer_type="long_text")  # F1 75.0
    judge_reference("It is 30 or 40.", "30")    # Judgement(score=100.0, reason="alternatives: 30, 40")

`score_reference(answer, reference, answer_type=None)` picks one rule from `answer_type` (`numeric`,
`yes_no`, `short_text`, `long_text`), or infers the type from the reference with `infer_answer_type`;
`judge_reference` returns the same score with `reason`, non-empty when the answer was ambiguous;
`reference_scores(rows)` scores a table of answers (the eval stage's Ray Data step: this module imports no
torch, so a fresh worker scores at once).

- `numeric` (`numeric_score`): ChartQA-style relaxed accuracy, 100 or 0. One number is read from each
  side (`read_number`) and they match when |answer - reference| <= 5% of |reference| (inclusive; exact
  equality when the reference is 0). A percent on one side only is matched both ways: "25%" equals "25",
  "0.25" and "25 percent"; without a percent sign "0.25" does not equal "25". Currency signs, units
  ("45kg", "3.5bn") and comma thousands ("1,900") are allowed; scale and number words ("billion",
  "three") are not interpreted, so "$3.5 billion" reads 3.5. A lone number is read as is. In a sentence
  the answer's number is read as a grader would, without looking at the reference:
  1. Not candidates: numbers glued into names (letters or a hyphenated word before or after: "COVID-19",
     "Q3-2020", "H2O", "5-year", "4G", "2nd", "1990s"; a camel-case name before: "iPhone 12"), a day after
     a month ("March 3"), and years: a plain 4-digit 1800-2100 integer is a date unless it follows an
     asserting word below and nothing marks it as a date (in/since/from/by/for/until/during/between/as of/
     year/FY or a month before it, "'s" after it, a range with such a year). When the reference itself is
     year-like, years are candidates (the one rule that looks at the reference), asserted only as above.
     Capitalised names ("Windows 10") are not recognised: their number is a candidate.
  2. Asserted candidates: after is/was/are/were/be/been/equals/reached/totals/at/to/":"/"=", after "of"
     following a value word ("a total of 1,900"), or opening the answer or a sentence ("300 cases ...");
     filler words and currency may sit between ("is about $40"); "to" after compared/relative/close/up
     does not assert. Numbers inside brackets ("(up from 35)") are asides and never asserted.
  3. The number read: the first candidate after an "answer is"/"answer:" lead-in; else the first asserted
     candidate (so "The highest is 80 and the lowest is 20" reads 80: a later clause, after and/but/while/
     ","/";"/a sentence end, is context); else the first candidate outside brackets; else the first aside.
  4. Ambiguous (`reason` set): the number read is followed, through only or/and/to/","/"-"/fillers, by a
     different number ("30 or 40", "between 30 and 40", "30-40"); another asserted number in its clause
     differs ("it is 30 or it is 40"); two answer lead-ins disagree; or nothing is asserted and candidates
     differ ("Germany leads with 45, France follows with 30").
- `yes_no` (`yes_no_score`): 100 when the answer's label (`read_yes_no`) equals the reference's, else 0,
  including answers with no label. Signals, the first one wins: yes/yeah/yep/yup anywhere; "no" as a
  reply (first word of the answer or after punctuation, "answer is", so/then/think/say/..., or followed by
  punctuation or the end), not mid-sentence before a word ("there is no doubt: yes" reads yes; "no
  doubt" and "no question" are never a reply); negations: "not really/at all/quite/exactly/likely/true/correct/right/
  the case", "I don't think so", "probably/certainly/of course ... not" at a clause end, nope/nah/false/
  incorrect/untrue (so "it is not true that X" reads no); affirmations: "I think/believe/guess so", and
  true/correct/right/indeed/absolutely/certainly/definitely/sure/of course as the reply ("That's correct.",
  "It is true that X"). "Not sure" is no label. Signals for both labels ("yes and no") are ambiguous.
- `short_text` (`exact_match_score`): 100 when both sides are equal after `normalize_text` (case,
  punctuation, articles and spacing ignored; a leading "my answer is" / "the answer is" / "answer:" is
  dropped), else 0.
- `long_text` (`token_f1`): SQuAD token F1 on `normalize_text` tokens, scaled to 0-100 (a bag of words:
  word order is ignored).

An ambiguous answer is scored by the number or label read above (the first one) and keeps its row; the
evaluation table records the flag as `reference/ambiguous`, so such rows can be counted or excluded. All
functions are pure and deterministic; a missing answer (None) scores 0.
"""

from __future__ import annotations

import bisect
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import pandas as pd

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

# --- reading a number in a sentence (rules 1-4 of the module docstring) ---------------------------------

_FILLERS = (
    r"about|approximately|approx|around|roughly|nearly|almost|exactly|precisely|just|only|some|circa|"
    r"either|between|maybe|perhaps|possibly|probably|an\s+estimated|estimated"
)
_CURRENCY = r"US\$|[$€£¥₹]|\b(?:usd|eur|gbp|jpy|cny|rmb|inr)\b"
# One filler word, currency sign or space at the end of the text before a number (stripped repeatedly).
_FILLER_TAIL_RE = re.compile(rf"(?:\s+|{_CURRENCY}|\b(?:{_FILLERS})\b)$", re.IGNORECASE)
_ASSERTING_WORDS = frozenset(
    "is was are were be been being equals equal equaled equalled reached reaches reach reaching totals "
    "totaled totalled totaling totalling remains remained it's that's there's here's what's at".split()
)
# "to" asserts ("rose to 45", "from 30 to 45") except after these ("compared to 30").
_NOT_ASSERTING_BEFORE_TO = frozenset(
    "compared relative close next up similar prior contrast opposed due".split()
)
# "of" asserts only after a word naming a value ("a total of 1,900", "a peak of 45"), not in "2 of 5".
_VALUE_WORDS = frozenset(
    "value values total sum high low peak level average mean median maximum minimum max min figure rate "
    "score count amount price cost share percentage growth increase decrease drop rise decline difference "
    "gap margin ratio change number".split()
)
_LAST_WORD_RE = re.compile(r"([A-Za-z]+(?:'[a-z]+)?)$")
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_DATE_WORDS = frozenset(
    "in since from by for until till through thru during between before after around year years fy".split()
)
_DATE_BEFORE_RE = re.compile(
    rf"(?:\b(?:{'|'.join(sorted(_DATE_WORDS))})|\bas\s+of|\b{_MONTH}\.?(?:\s+\d{{1,2}}(?:st|nd|rd|th)?,?)?)\s+$",
    re.IGNORECASE,
)
_MONTH_BEFORE_RE = re.compile(rf"\b{_MONTH}\.?\s+$", re.IGNORECASE)
_MONTH_AFTER_RE = re.compile(rf"(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\b", re.IGNORECASE)
_YEAR_RANGE_GAP_RE = re.compile(r"\s*(?:[-‐–—/]|\b(?:to|and|or|through|until|till)\b)\s*", re.IGNORECASE)
# Letters directly after a number that leave it a value: units and scale abbreviations, case-sensitive so
# that "4G" and "3D" stay names while "45g", "10M" and "$3.5B" are values.
_UNITS = frozenset(
    "k m b bn mn mln t tn kg g mg lb lbs km cm mm ml l h hr hrs min sec ms x pp pt pts kw mw gw kwh mph kmh "
    "K M B Bn BN Mn T Tn L GB MB TB KB kB kW MW GW kWh".split()
)
# Where a clause ends: a sentence stop, ";", a new line, ", " or a conjunction.
_CLAUSE_BREAK_RE = re.compile(
    r"[.!?](?=\s|$)|[;\n]|,(?=\s)|\b(?:and|but|while|whereas|although|though|however|yet)\b", re.IGNORECASE
)
_WINDOW = 100
# What may join the number read to an alternative: "30 or 40", "30, 35", "between 30 and 40", "30-40".
_ALTERNATIVE_GAP_RE = re.compile(rf"(?:\s|[,/‐–—-]|{_CURRENCY}|\b(?:or|and|to|{_FILLERS})\b)*", re.IGNORECASE)


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


@dataclass(frozen=True)
class NumberReading:
    """The number a grader reads in a text (None when it has none), and why it is ambiguous ("" if not)."""

    number: Number | None
    reason: str = ""


@dataclass(frozen=True)
class LabelReading:
    """ "yes", "no" or None read from a text, and why it is ambiguous ("" if not)."""

    label: str | None
    reason: str = ""


@dataclass(frozen=True)
class Judgement:
    """A 0-100 reference score and, when the answer was ambiguous, why (see the module docstring)."""

    score: float
    reason: str = ""

    @property
    def ambiguous(self) -> bool:
        return bool(self.reason)


@dataclass(frozen=True)
class _Candidate:
    number: Number
    start: int
    end: int
    asserted: bool
    aside: bool
    clause: int


def _number(match: re.Match) -> Number:
    value = float(match["digits"].replace(",", ""))
    if match["sign"] in ("-", "\u2212"):
        value = -value
    return Number(value, match["percent"] is not None, match[0])


def extract_numbers(text: str) -> list[Number]:
    """Every number in `text`, in order; "1,234" is one number, "3, 39" is two, "2015-2016" is two."""
    return [_number(match) for match in _NUMBER_RE.finditer(text)]


def parse_number(text: str) -> Number | None:
    """The number when `text` is nothing but one number (currency, spaces and a final stop allowed)."""
    numbers = extract_numbers(text)
    if len(numbers) != 1:
        return None
    rest = _NUMBER_RE.sub("", text)
    return numbers[0] if _NUMBER_FRAME_RE.fullmatch(rest) else None


def _is_name_part(before: str, after: str) -> bool:
    """Glued into a name or a modifier: "COVID-19", "Q3-2020", "5-year", "4G", "2nd", "1990s", "iPhone 12"."""
    hyphen_word = re.search(r"(\w+)[-‐–]$", before)
    if hyphen_word and any(ch.isalpha() for ch in hyphen_word[1]):
        return True
    if re.match(r"[-‐–][A-Za-z]", after):
        return True
    letters = re.match(r"[A-Za-z]+", after)
    if letters and letters[0] not in _UNITS:
        return True
    return re.search(r"\b[A-Za-z]*[a-z][A-Z][A-Za-z]*\s+$", before) is not None


def _lead(before: str) -> str | None:
    """ "lead" when an asserting word (or ":"/"=") precedes the number, "open" when it opens the answer or a
    sentence, else None; fillers and currency between are skipped."""
    text = before
    while (tail := _FILLER_TAIL_RE.search(text)) is not None:
        text = text[: tail.start()]
    if not text or text[-1] in ".!?\n":
        return "open"
    if text[-1] in ":=":
        return "lead"
    last = _LAST_WORD_RE.search(text)
    if last is None:
        return None
    word = last[1].lower()
    if word in _ASSERTING_WORDS:
        return "lead"
    previous = _LAST_WORD_RE.search(text[: last.start()].rstrip())
    previous_word = previous[1].lower() if previous else ""
    if word == "to" and previous_word not in _NOT_ASSERTING_BEFORE_TO:
        return "lead"
    if word == "of" and previous_word in _VALUE_WORDS:
        return "lead"
    return None


def _candidates(text: str, keep_years: bool) -> list[_Candidate]:
    """The candidate numbers of `text` (rule 1), each marked asserted, aside, and with its clause index."""
    breaks = [m.end() for m in _CLAUSE_BREAK_RE.finditer(text)]
    out: list[_Candidate] = []
    last_date_end = None
    depth, counted = 0, 0  # bracket depth of text[:counted]
    for match in _NUMBER_RE.finditer(text):
        number, start, end = _number(match), match.start(), match.end()
        # Every rule looks at a few words around the number: windows keep long answers linear.
        before, after = text[max(0, start - _WINDOW) : start], text[end : end + _WINDOW]
        gap = text[counted:start]
        depth += gap.count("(") + gap.count("[") - gap.count(")") - gap.count("]")
        counted = start
        if _is_name_part(before, after):
            continue
        lead = _lead(before)
        plain_int = re.fullmatch(r"\d{1,2}", number.text.strip()) is not None
        if (
            plain_int
            and 1 <= number.value <= 31
            and (_MONTH_BEFORE_RE.search(before) or _MONTH_AFTER_RE.match(after))
        ):
            continue  # the day of a date
        if number.is_year:
            dated = (
                _DATE_BEFORE_RE.search(before) is not None
                or re.match(r"'s\b", after) is not None
                or (
                    last_date_end is not None
                    and _YEAR_RANGE_GAP_RE.fullmatch(text[last_date_end:start]) is not None
                )
            )
            if dated or lead != "lead":
                last_date_end = end
                if not keep_years:
                    continue
            asserted = lead is not None and not dated
        else:
            asserted = lead is not None
        out.append(_Candidate(number, start, end, asserted, depth > 0, bisect.bisect_right(breaks, start)))
    return out


def _same(a: Number, b: Number) -> bool:
    """Equal values, reading a percent on one side only as P or P/100 ("45%" = "45" = "0.45")."""
    if a.is_percent == b.is_percent:
        return math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-12)
    percent, other = (a, b) if a.is_percent else (b, a)
    return any(
        math.isclose(v, other.value, rel_tol=1e-9, abs_tol=1e-12)
        for v in (percent.value, percent.value / 100)
    )


def _differing(pick: _Candidate, others: list[_Candidate]) -> list[_Candidate]:
    return [c for c in others if not _same(c.number, pick.number)]


def _texts(candidates: list[_Candidate]) -> str:
    return ", ".join(c.number.text.strip() for c in candidates)


def read_number(text: str, keep_years: bool = False) -> NumberReading:
    """The number a grader reads as the answer in `text` (rules 1-4 of the module docstring), with the reason
    it is ambiguous ("" if not). `keep_years` makes years candidates (for year-like references)."""
    whole = parse_number(text)
    if whole is not None:
        return NumberReading(whole)
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'")
    candidates = _candidates(text, keep_years)
    if not candidates:
        return NumberReading(None)
    reason = ""
    outside = [c for c in candidates if not c.aside]
    after_lead_ins = [
        next((c for c in outside if c.start >= lead_in.end()), None) for lead_in in _LEAD_IN_RE.finditer(text)
    ]
    after_lead_ins = [c for c in after_lead_ins if c is not None]
    asserted = [c for c in outside if c.asserted]
    if after_lead_ins:
        pick = after_lead_ins[0]
        if differing := _differing(pick, after_lead_ins):
            reason = f"answer lead-ins disagree: {_texts([pick, *differing])}"
    elif asserted:
        pick = asserted[0]
        if differing := _differing(pick, [c for c in asserted if c.clause == pick.clause]):
            reason = f"asserted together: {_texts([pick, *differing])}"
    elif outside:
        pick = outside[0]
        if differing := _differing(pick, outside):
            reason = f"several numbers, none asserted: {_texts([pick, *differing])}"
    else:
        pick = candidates[0]
    if not reason:
        chain, current = [pick], pick
        for nxt in candidates[candidates.index(pick) + 1 :]:
            if not _ALTERNATIVE_GAP_RE.fullmatch(text[current.end : nxt.start]):
                break
            chain.append(nxt)
            current = nxt
        if differing := _differing(pick, chain):
            reason = f"alternatives: {_texts([pick, *differing])}"
    return NumberReading(pick.number, reason)


def pick_number(text: str, keep_years: bool = False) -> Number | None:
    """The number `read_number` reads in `text` (None if it has none), ambiguity aside.

    "The value for 2019 is 42.5 million." gives 42.5; "My answer is 45. In 2019 it was 30." gives 45;
    "There were 1900 units sold in 2019." gives 1900 with `keep_years` (a year-like reference).
    """
    return read_number(text, keep_years).number


def _year_like(number: Number) -> bool:
    return number.value.is_integer() and 1800 <= number.value <= 2100


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


def judge_numeric(answer: str, reference: str, tolerance: float = RELATIVE_TOLERANCE) -> Judgement:
    """`numeric_score` with the reason the answer's number was ambiguous ("" if not)."""
    ref = pick_number(reference)
    if ref is None:
        raise ValueError(f"numeric reference holds no number: {reference!r}")
    reading = read_number(answer, keep_years=_year_like(ref))
    matched = reading.number is not None and relaxed_match(reading.number, ref, tolerance)
    return Judgement(100.0 if matched else 0.0, reading.reason)


def numeric_score(answer: str, reference: str, tolerance: float = RELATIVE_TOLERANCE) -> float:
    """100 if the answer's number matches the reference's within `tolerance` (see `relaxed_match`), else 0.

    Raises ValueError when the reference holds no number, since that is a data error, not a wrong answer.
    """
    return judge_numeric(answer, reference, tolerance).score


def normalize_text(text: str) -> str:
    """Lower-case and NFKC; punctuation and symbols become spaces; articles dropped; spaces collapsed.

    "The Answer: Hard-drive!" becomes "answer hard drive"; "(3, 39)" becomes "3 39".
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(word for word in text.split() if word not in _ARTICLES)


# --- reading yes/no ---------------------------------------------------------------------------------------

_YES_WORDS = frozenset({"yes", "yeah", "yep", "yup"})
_NO_WORDS = frozenset({"nope", "nah", "false", "incorrect", "untrue"})
_NOT_FOLLOWERS = frozenset({"really", "quite", "exactly", "likely", "true", "correct", "right"})
_NOT_PHRASES = (("at", "all"), ("so", "much"), ("the", "case"))
_SO_VERBS = frozenset({"think", "believe", "suppose", "guess"})
_NEGATED_DO = frozenset({"don't", "doesn't", "didn't", "do", "does", "did"})
_HEDGES_BEFORE_NOT = frozenset(
    "probably certainly definitely absolutely surely likely perhaps maybe hopefully course think guess "
    "believe suppose afraid".split()
)
_REPLY_CUES = frozenset(
    "so then therefore thus hence well think say guess believe probably definitely certainly absolutely "
    "surely simply just maybe perhaps".split()
)
_AFFIRMATIONS = frozenset(
    "true correct right indeed absolutely certainly definitely sure affirmative".split()
)
_COPULA = frozenset({"is", "it's", "that's", "'s", "be", "was"})
_NOT_A_REPLY_AFTER_NO = frozenset({"doubt", "question", "wonder"})


def _yes_no_signals(text: str) -> list[tuple[int, str]]:
    """(token index, label) of every yes/no signal in `text`, in order (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    tokens = re.findall(r"[a-z]+(?:'[a-z]+)?|[^\w\s]", text)
    n = len(tokens)

    def word(i: int) -> str:
        return tokens[i] if 0 <= i < n and tokens[i][0].isalpha() else ""

    def ends(i: int) -> bool:  # token i is followed by punctuation or the end
        return i + 1 >= n or not tokens[i + 1][0].isalpha()

    def reply_position(i: int) -> bool:  # token i starts a reply
        return (
            i == 0
            or not tokens[i - 1][0].isalpha()
            or tokens[i - 1] in _REPLY_CUES
            or (word(i - 2), word(i - 1)) == ("answer", "is")
        )

    signals, used = [], set()
    # Negations first: "not true" and "don't think so" must not read as affirmations.
    for i, tok in enumerate(tokens):
        span = None
        if tok == "not":
            if word(i + 1) in _NOT_FOLLOWERS:
                span = (i, i + 2)
            elif (word(i + 1), word(i + 2)) in _NOT_PHRASES:
                span = (i, i + 3)
            elif word(i - 1) in _HEDGES_BEFORE_NOT and ends(i):
                span = (i - 1, i + 1)
        elif tok in _NEGATED_DO:
            k = i + 1 if tok.endswith("n't") else (i + 2 if word(i + 1) == "not" else None)
            if k is not None and word(k) in _SO_VERBS and word(k + 1) == "so":
                span = (i, k + 2)
        elif tok in _NO_WORDS:
            span = (i, i + 1)
        elif tok == "no" and word(i + 1) not in _NOT_A_REPLY_AFTER_NO and (ends(i) or reply_position(i)):
            span = (i, i + 1)
        if span and not used.intersection(range(*span)):
            signals.append((span[0], "no"))
            used.update(range(*span))
    for i, tok in enumerate(tokens):
        if i in used:
            continue
        if tok in _YES_WORDS:
            signals.append((i, "yes"))
        elif tok == "so" and word(i - 1) in _SO_VERBS and i - 1 not in used:
            signals.append((i - 1, "yes"))
        elif tok == "course" and word(i - 1) == "of" and (ends(i) or reply_position(i - 1)):
            signals.append((i - 1, "yes"))
        elif (
            tok in _AFFIRMATIONS
            and (ends(i) or word(i + 1) == "that")
            and (reply_position(i) or word(i - 1) in _COPULA)
        ):
            signals.append((i, "yes"))
    return sorted(signals)


def read_yes_no(text: str) -> LabelReading:
    """The yes/no label a grader reads in `text`: its first signal; ambiguous when it signals both."""
    signals = _yes_no_signals(text)
    if not signals:
        return LabelReading(None)
    labels = {label for _, label in signals}
    return LabelReading(signals[0][1], "signals both yes and no" if len(labels) > 1 else "")


def yes_no_label(text: str) -> str | None:
    """ "yes" or "no" as `read_yes_no` reads `text`, None when it signals neither."""
    return read_yes_no(text).label


def judge_yes_no(answer: str, reference: str) -> Judgement:
    """`yes_no_score` with the reason the answer was ambiguous ("" if not)."""
    ref = yes_no_label(reference)
    if ref is None:
        raise ValueError(f"yes/no reference says neither yes nor no: {reference!r}")
    reading = read_yes_no(answer)
    return Judgement(100.0 if reading.label == ref else 0.0, reading.reason)


def yes_no_score(answer: str, reference: str) -> float:
    """100 if the answer's yes/no label equals the reference's, else 0 (also when it has none)."""
    return judge_yes_no(answer, reference).score


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


_JUDGES = {
    "numeric": judge_numeric,
    "yes_no": judge_yes_no,
    "short_text": lambda a, r: Judgement(exact_match_score(a, r)),
    "long_text": lambda a, r: Judgement(token_f1(a, r)),
}


def judge_reference(answer: str | None, reference: str, answer_type: str | None = None) -> Judgement:
    """The 0-100 score of `answer` against `reference` (as `score_reference`) and why it was ambiguous."""
    if answer_type is None:
        answer_type = infer_answer_type(reference)
    if answer_type not in _JUDGES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return Judgement(0.0)
    return _JUDGES[answer_type](str(answer), str(reference))


def score_reference(answer: str | None, reference: str, answer_type: str | None = None) -> float:
    """0-100 score of `answer` against `reference` by the rule for `answer_type` (inferred when None)."""
    return judge_reference(answer, reference, answer_type).score


def reference_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """``reference/score``, ``reference/raw`` (the rule used) and ``reference/ambiguous`` for every answer.

    ``reference/ambiguous`` is True where the answer offers competing readings ("30 or 40", "yes and no"); such
    a row is still scored, by its first reading (see :mod:`vlm_posttrain.reference`).
    """
    judged = [
        judge_reference(a, r, t or None)
        for a, r, t in zip(rows["answer"], rows["reference"], rows["answer_type"], strict=True)
    ]
    return rows.assign(
        **{
            "reference/score": [j.score for j in judged],
            "reference/raw": rows["answer_type"].fillna(""),
            "reference/ambiguous": pd.Series([j.ambiguous for j in judged], index=rows.index, dtype=bool),
        }
    )
