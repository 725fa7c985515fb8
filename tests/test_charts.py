"""Tests for the synthetic chart-QA generator: determinism, images, answers against the data, validation.

Answers are re-derived here from the chart data by parsing each question on its own (not by calling the
module's question code), so a wrong answer, a tie or an unknown question shape fails a test.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from vlm_posttrain.charts import ANSWER_TYPES, MAX_TURNS, Chart, chart_data, render_png, synthetic_charts

SEED = 3


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return synthetic_charts(60, seed=SEED)


@pytest.fixture(scope="module")
def multi() -> list[dict]:
    return synthetic_charts(30, seed=SEED + 1, turns=3)


def _chart_of(row: dict) -> Chart:
    _, seed, i = row["example_id"].split("-")
    return chart_data(int(seed), int(i))


def _qa_pairs(row: dict) -> list[tuple[str, str]]:
    turns = row["conversations"]
    return [
        (turns[t]["value"].removeprefix("<image>\n"), turns[t + 1]["value"]) for t in range(0, len(turns), 2)
    ]


def _expected(chart: Chart, question: str) -> str | None:
    """The answer computed from the data, or None for the summary (checked separately)."""
    value = dict(zip(chart.labels, chart.values, strict=True))
    ranked = sorted(value, key=value.get)
    patterns = [
        (r"What is the value of (\w+)\?", lambda a: f"{value[a]}"),
        (r"What is the value of \w+ in (\d{4})\?", lambda a: f"{value[a]}"),
        (r"What percentage of the chart is (\w+)\?", lambda a: f"{value[a]}%"),
        (r"Which category has the (?:highest value|largest share)\?", lambda: ranked[-1]),
        (r"Which category has the (?:lowest value|smallest share)\?", lambda: ranked[0]),
        (r"In which year is \w+ highest\?", lambda: ranked[-1]),
        (r"In which year is \w+ lowest\?", lambda: ranked[0]),
        (
            r"Is (?:the share of )?(\w+) greater than (?:the share of )?(\w+)\?",
            lambda a, b: _yes(value[a] > value[b]),
        ),
        (r"Is \w+ in (\d{4}) greater than in (\d{4})\?", lambda a, b: _yes(value[a] > value[b])),
        (r"Does \w+ increase from (\d{4}) to (\d{4})\?", lambda a, b: _yes(value[b] > value[a])),
        (r"What is the overall trend\?", lambda: _trend(chart.values)),
        (r"Summarize the chart in one sentence\.", lambda: None),
    ]
    for pattern, answer in patterns:
        if m := re.fullmatch(pattern, question):
            return answer(*m.groups())
    raise AssertionError(f"question shape unknown to the test: {question!r}")


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def _trend(values: tuple[int, ...]) -> str:
    slope = np.polyfit(np.arange(len(values)), values, 1)[0]
    return "increasing" if slope > 0 else "decreasing"


def test_same_seed_gives_identical_rows():
    assert synthetic_charts(8, seed=7) == synthetic_charts(8, seed=7)


def test_different_seed_gives_different_rows():
    a, b = synthetic_charts(8, seed=7), synthetic_charts(8, seed=8)
    assert all(x["image"] != y["image"] for x, y in zip(a, b, strict=True))
    assert [x["conversations"] for x in a] != [y["conversations"] for y in b]


def test_smaller_call_is_a_prefix_of_a_bigger_one():
    assert synthetic_charts(5, seed=7) == synthetic_charts(12, seed=7)[:5]


def test_turns_do_not_change_the_chart_or_first_question():
    one, three = synthetic_charts(6, seed=7), synthetic_charts(6, seed=7, turns=3)
    for a, b in zip(one, three, strict=True):
        assert a["image"] == b["image"]
        assert a["conversations"] == b["conversations"][:2]


def test_zero_rows():
    assert synthetic_charts(0, seed=1) == []


def test_row_schema(rows):
    for i, row in enumerate(rows):
        assert set(row) == {"example_id", "image", "conversations", "source", "answer_type"}
        assert row["example_id"] == f"synth-{SEED}-{i:06d}"
        assert row["source"] == f"synthetic/{_chart_of(row).kind}"
        assert row["answer_type"] in ANSWER_TYPES


def test_image_is_the_rendered_chart_data(rows):
    # Ties chart_data (which the answer checks use) to the pixels the model sees.
    for row in rows[:10]:
        assert render_png(_chart_of(row), 128) == row["image"]


@pytest.mark.parametrize("size", [32, 128, 200])
def test_image_decodes_to_requested_size(size):
    for row in synthetic_charts(3, seed=11, image_size=size, kinds=("bar", "line", "pie")):
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG"
        assert image.size == (size, size)
        assert image.mode in ("RGB", "RGBA")
        assert len(image.convert("RGB").getcolors(maxcolors=size * size)) > 3, "blank image"


def test_every_answer_type_and_kind_occurs(rows):
    assert {r["answer_type"] for r in rows} == set(ANSWER_TYPES)
    assert {r["source"] for r in rows} == {"synthetic/bar", "synthetic/line", "synthetic/pie"}


def test_kinds_restricts_the_charts():
    assert {r["source"] for r in synthetic_charts(6, seed=2, kinds=("pie",))} == {"synthetic/pie"}


def test_answers_match_the_chart_data(rows, multi):
    for row in rows + multi:
        chart = _chart_of(row)
        for question, answer in _qa_pairs(row):
            expected = _expected(chart, question)
            if expected is None:
                _check_summary(chart, answer)
            else:
                assert answer == expected, (row["example_id"], question)


def _check_summary(chart: Chart, answer: str) -> None:
    by_value = sorted(zip(chart.values, chart.labels, strict=True))
    (vlo, lo), (vhi, hi) = by_value[0], by_value[-1]
    phrases = {
        "bar": (f"{hi} is highest at {vhi} ", f"{lo} lowest at {vlo}."),
        "pie": (f"{hi} has the largest share at {vhi}% ", f"{lo} the smallest at {vlo}%."),
        "line": (f"a high of {vhi} in {hi} ", f"a low of {vlo} in {lo}."),
    }[chart.kind]
    assert all(p in answer for p in phrases), (phrases, answer)
    if chart.kind != "line":
        assert _count_word(chart) in answer, answer
    assert answer.endswith(".") and answer.count(". ") == 0, "one sentence"


def _count_word(chart: Chart) -> str:
    return {3: "three", 4: "four", 5: "five", 6: "six"}[len(chart.labels)] + f" {chart.noun}"


def test_answer_type_matches_the_last_answer(rows, multi):
    shapes = {
        "numeric": r"\d+%?",
        "yes_no": r"Yes|No",
        "short_text": r"[A-Za-z0-9]+",
        "long_text": r"The (bar|line|pie) chart .{20,}\.",
    }
    for row in rows + multi:
        assert re.fullmatch(shapes[row["answer_type"]], row["conversations"][-1]["value"]), row


def test_comparisons_have_both_answers(rows, multi):
    answers = [a for row in rows + multi for q, a in _qa_pairs(row) if q.startswith("Is ")]
    assert len(answers) >= 10
    assert 0.2 < answers.count("Yes") / len(answers) < 0.8


def test_data_has_no_ties_and_pies_sum_to_100():
    for i in range(300):
        chart = chart_data(9, i)
        assert len(set(chart.values)) == len(chart.values), chart
        assert len(set(chart.labels)) == len(chart.labels), chart
        if chart.kind == "pie":
            assert sum(chart.values) == 100, chart
        if chart.kind == "line":
            # The stated trend must agree with a least-squares fit, not just first-versus-last.
            first_to_last = "increasing" if chart.values[-1] > chart.values[0] else "decreasing"
            assert first_to_last == _trend(chart.values), chart


def test_multi_turn_structure(multi):
    for row in multi:
        turns = row["conversations"]
        assert len(turns) == 6
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        questions = [q for q, _ in _qa_pairs(row)]
        assert len(set(questions)) == len(questions), questions


def test_threads_render_the_same_bytes():
    serial = synthetic_charts(6, seed=5)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: synthetic_charts(6, seed=5), range(3)))
    assert all(r == serial for r in results)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n": -1}, "n"),
        ({"seed": -1}, "seed"),
        ({"turns": 0}, "turns"),
        ({"turns": MAX_TURNS + 1}, "turns"),
        ({"image_size": 31}, "image_size"),
        ({"kinds": ("bar", "scatter")}, "kinds"),
        ({"kinds": ()}, "kinds"),
    ],
)
def test_bad_arguments_raise(kwargs, argument):
    args = {"n": 2, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=rf"^{argument} must ") as info:
        synthetic_charts(**args)
    assert "\n" not in str(info.value)
