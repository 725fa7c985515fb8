"""Tests for vlm_posttrain.reference: hand cases per rule, then every ChartInsights reference."""

import json
from collections import Counter
from pathlib import Path

import pytest

from vlm_posttrain.reference import (
    extract_numbers,
    infer_answer_type,
    normalize_text,
    numeric_score,
    parse_number,
    pick_number,
    score_reference,
    token_f1,
    yes_no_label,
)

# --- numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("104.9", "100", 100.0),  # +4.9%
        ("105.1", "100", 0.0),  # +5.1%
        ("95.1", "100", 100.0),  # -4.9%
        ("94.9", "100", 0.0),  # -5.1%
        ("105", "100", 100.0),  # exactly 5%: inclusive
        ("-104.9", "-100", 100.0),
        ("104.9", "-100", 0.0),
        ("0", "0", 100.0),
        ("0.0001", "0", 0.0),  # a zero reference needs an exact zero
        ("1049", "1,000", 100.0),
        ("1051", "1,000", 0.0),
    ],
)
def test_relaxed_tolerance_edges(answer: str, reference: str, expected: float) -> None:
    assert numeric_score(answer, reference) == expected


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("25%", "0.25", 100.0),
        ("0.25", "25%", 100.0),
        ("25", "25%", 100.0),
        ("25%", "25", 100.0),
        ("25 percent", "0.25", 100.0),
        ("16.2 %", "16.19%", 100.0),
        ("0.25", "25", 0.0),  # no percent sign anywhere: not rescaled
        ("0.5%", "50", 0.0),  # 0.5% is 0.005 or 0.5, never 50
        ("40%", "25%", 0.0),
    ],
)
def test_percent_both_ways(answer: str, reference: str, expected: float) -> None:
    assert numeric_score(answer, reference) == expected


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("The value for 2019 is 42.5 million.", "42.5", 100.0),
        ("42.5 million people lived there in 2019.", "42.5", 100.0),
        ("The total is 1,234 units.", "1234", 100.0),
        ("Sales reached $1,234.50 in March.", "1234.5", 100.0),
        ("My answer is 45. In 2019 it was 30.", "45", 100.0),
        ("It rose from 30 to 45.", "45", 100.0),
        ("It rose from 45 to 30.", "45", 0.0),  # the last number is the answer
        ("The peak came in 2021.", "2021.0", 100.0),
        ("In 2021 sales peaked.", "500", 0.0),  # only a year: kept, and it is wrong
        ("I cannot tell.", "5", 0.0),
    ],
)
def test_numbers_in_sentences(answer: str, reference: str, expected: float) -> None:
    assert numeric_score(answer, reference) == expected


def test_number_extraction_rules() -> None:
    assert [n.value for n in extract_numbers("3, 39 and 1,234 and SFT1 and 2015-2016 and -2.5")] == [
        3.0,
        39.0,
        1234.0,
        2015.0,
        2016.0,
        -2.5,
    ]
    assert parse_number(" $42. ").value == 42.0
    assert parse_number("42 apples") is None
    assert pick_number("In 2019 and 2020").value == 2020.0
    with pytest.raises(ValueError, match="no number"):
        numeric_score("5", "five")


# --- yes/no, short text, long text -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("Yes.", "yes", 100.0),
        ("yes, it is", "Yes.", 100.0),
        ("YES", "Yes", 100.0),
        ("My answer is no.", "No", 100.0),
        ("No, it is not.", "no", 100.0),
        ("No.", "Yes", 0.0),
        ("Not really", "No", 0.0),  # "not" is not "no"
        ("", "Yes", 0.0),
    ],
)
def test_yes_no(answer: str, reference: str, expected: float) -> None:
    assert score_reference(answer, reference, "yes_no") == expected


def test_yes_no_label() -> None:
    assert yes_no_label("Well... yes, mostly") == "yes"
    assert yes_no_label("nothing here") is None


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("thur", "Thur", 100.0),
        ("Thur.", "Thur", 100.0),
        ("My answer is Thur", "Thur", 100.0),
        ("3, 39", "(3, 39)", 100.0),
        ("8-2", "8\u20132", 100.0),  # ASCII hyphen vs en dash
        ("The Sun", "Sun", 100.0),  # articles ignored
        ("Thur, Sun", "Thur, Sun, Fri", 0.0),
        ("Sun, Thur, Fri", "Thur, Sun, Fri", 0.0),  # order matters for exact match
    ],
)
def test_short_text_exact_match(answer: str, reference: str, expected: float) -> None:
    assert score_reference(answer, reference, "short_text") == expected


def test_normalize_text() -> None:
    assert normalize_text("The Answer: Hard-drive!") == "answer hard drive"
    assert normalize_text("  A  b\tC ") == "b c"


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("a bar chart of sales", "a line chart of sales", 75.0),  # 3 of 4 words each side
        ("sales", "chart of sales", 50.0),  # P=1, R=1/3
        ("DVD drive, DVD burner", "DVD burner, DVD drive, Hard drive", 2 * 1 * (4 / 6) / (1 + 4 / 6) * 100),
        ("nothing shared", "chart of sales", 0.0),
        ("", "", 100.0),
        ("", "chart", 0.0),
    ],
)
def test_token_f1(answer: str, reference: str, expected: float) -> None:
    assert token_f1(answer, reference) == pytest.approx(expected)
    assert score_reference(answer, reference, "long_text") == pytest.approx(expected)


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("42.5", "numeric"),
        ("16.19%", "numeric"),
        ("1,234", "numeric"),
        ("Yes", "yes_no"),
        ("no.", "yes_no"),
        ("Thur, Sun, Fri", "short_text"),
        ("(3, 39)", "short_text"),
        ("DVD burner, DVD drive, Hard drive", "long_text"),
    ],
)
def test_infer_answer_type(reference: str, expected: str) -> None:
    assert infer_answer_type(reference) == expected


def test_score_reference_edges() -> None:
    assert score_reference("The value for 2019 is 42.5 million.", "42.5") == 100.0
    assert score_reference(None, "42") == 0.0
    with pytest.raises(ValueError, match="answer_type"):
        score_reference("x", "y", "essay")


# --- real ChartInsights references -------------------------------------------------------------------


def _chartinsights(shared_data: Path) -> list[dict]:
    lines = (shared_data / "chartinsights" / "annotations.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _wrong_answer(row: dict, same_type: list[str]) -> str:
    """An answer of the row's type that should not earn full marks."""
    ref, kind = str(row["answer"]), row["answer_type"]
    if kind == "numeric":
        number = pick_number(ref)
        wrong = number.value * 1.5 if number.value != 0 else 1.0
        return f"{wrong!r}%" if number.is_percent else repr(wrong)
    if kind == "yes_no":
        return "No" if yes_no_label(ref) == "yes" else "Yes"
    # Another reference of the same type whose normalized text differs.
    return next(o for o in same_type if normalize_text(o) != normalize_text(ref))


def test_chartinsights_references(shared_data: Path) -> None:
    rows = _chartinsights(shared_data)
    counts = Counter(r["answer_type"] for r in rows)
    print(f"\nChartInsights answer types: {dict(counts)}")
    assert counts == {"numeric": 338, "yes_no": 249, "short_text": 136, "long_text": 6}
    by_type: dict[str, list[str]] = {}
    for r in rows:
        by_type.setdefault(r["answer_type"], []).append(str(r["answer"]))
    for r in rows:
        ref, kind = str(r["answer"]), r["answer_type"]
        assert score_reference(ref, ref, kind) == 100.0, r["id"]
        assert score_reference(_wrong_answer(r, by_type[kind]), ref, kind) < 100.0, r["id"]


def test_chartinsights_type_inference(shared_data: Path) -> None:
    rows = _chartinsights(shared_data)
    mismatched = [r for r in rows if infer_answer_type(str(r["answer"])) != r["answer_type"]]
    # Only the 6-word score lists ("6-5, 13-0, 4-8" with en dashes) labelled short_text infer as long_text.
    assert len(mismatched) == 4
    assert all(r["answer_type"] == "short_text" for r in mismatched)
    for r in rows:
        assert score_reference(str(r["answer"]), str(r["answer"])) == 100.0
