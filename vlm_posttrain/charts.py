"""Deterministic synthetic chart-QA rows: matplotlib bar, line and pie charts with questions answered from the data.

Every row is a small chart (PNG bytes) plus a LLaVA-OneVision conversation about it. Answers are computed
from the numbers behind the chart, never read back from the image, so they are exact. Row ``i`` depends
only on ``(seed, i)`` (and the keyword arguments), so a run is reproducible byte for byte and
``synthetic_charts(10, s)`` is a prefix of ``synthetic_charts(100, s)``.

    from vlm_posttrain.charts import synthetic_charts

    rows = synthetic_charts(100, seed=0, image_size=128, turns=2)
    rows[0]["conversations"]  # [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]
    rows[0]["image"]  # PNG bytes, 128 x 128

Rendering uses ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot state), so it may run
in several threads at once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import PathPatch, Rectangle, Wedge
from matplotlib.path import Path
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

KINDS = ("bar", "line", "pie")
# Questions answered by reading labels and numbers, and questions about coarse visual features. The tiny
# base is tuned on ``kind``, ``summary`` and ``comparison``; the embedded default's SFT data asks
# ``chart_type``, ``is_type`` and ``direction`` (unseen but not out of scope).
READING_FAMILIES = ("value", "extremes", "comparison", "summary", "trend")
VISUAL_FAMILIES = ("kind", "chart_type", "is_type", "direction")
FAMILIES = READING_FAMILIES + VISUAL_FAMILIES
LINE_ONLY = ("trend", "direction")
MIN_IMAGE_SIZE = 32
# The smallest charts (three bars or slices) have 12 distinct questions; 8 leaves room to pick among them.
MAX_TURNS = 8
ANSWER_TYPES = ("numeric", "yes_no", "short_text", "long_text")

# Names stay short so that they fit beside a bar at 128 px.
VOCABULARY = {
    "fruits": ("Apples", "Pears", "Kiwis", "Plums", "Mangos", "Grapes", "Lemons", "Limes"),
    "countries": ("France", "Spain", "Italy", "Japan", "Brazil", "Canada", "Kenya", "India"),
    "months": ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug"),
    "colors": ("Red", "Blue", "Green", "Yellow", "Purple", "Orange", "Pink", "Gray"),
}
SERIES = ("Sales", "Visitors", "Revenue", "Rainfall", "Downloads", "Orders")
NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
DPI = 100
# Slices below 10% put two labels on top of each other at 128 px.
MIN_SHARE = 10


@dataclass(frozen=True)
class Chart:
    """The data behind one chart: ``labels[j]`` has value ``values[j]`` (a percent for pie)."""

    kind: str
    noun: str  # the vocabulary ("fruits") for bar and pie; the series name ("Sales") for line
    labels: tuple[str, ...]
    values: tuple[int, ...]

    def value_of(self, label: str) -> int:
        return self.values[self.labels.index(label)]

    @property
    def argmax(self) -> str:
        return self.labels[int(np.argmax(self.values))]

    @property
    def argmin(self) -> str:
        return self.labels[int(np.argmin(self.values))]


@dataclass(frozen=True)
class QA:
    family: str
    question: str
    answer: str
    answer_type: str


def synthetic_charts(
    n: int,
    seed: int,
    *,
    image_size: int = 128,
    turns: int = 1,
    kinds: tuple[str, ...] = KINDS,
    families: tuple[str, ...] = READING_FAMILIES,
) -> list[dict]:
    """``n`` chart-QA rows in the LLaVA-OneVision schema; row ``i`` depends only on ``(seed, i)``.

    Each row has ``example_id``, ``image`` (PNG bytes, ``image_size`` square), ``conversations``
    (``turns`` question/answer pairs, all different questions about the same chart), ``source``
    (``"synthetic/<kind>"``) and ``answer_type`` (that of the last answer). Questions come from
    ``families`` (those of them that apply to the chart's kind: ``trend`` and ``direction`` are line-only).
    """
    kinds = _validate(n, seed, image_size, turns, kinds)
    families = validate_families(families, kinds)
    return [_row(seed, i, image_size, turns, kinds, families) for i in range(n)]


def validate_families(families, kinds) -> tuple[str, ...]:
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
    if set(kinds) - {"line"} and not set(families) - set(LINE_ONLY):
        raise ValueError(f"families {families!r} ask only about lines; add one for bar and pie charts")
    return families


def _validate(n, seed, image_size, turns, kinds) -> tuple[str, ...]:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if not isinstance(turns, (int, np.integer)) or not 1 <= turns <= MAX_TURNS:
        raise ValueError(f"turns must be an integer from 1 to {MAX_TURNS}, got {turns!r}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    return kinds


def _row(
    seed: int, i: int, image_size: int, turns: int, kinds: tuple[str, ...], families: tuple[str, ...]
) -> dict:
    chart = chart_data(seed, i, kinds)
    # A separate stream for questions keeps the chart identical whatever ``turns`` is.
    qas = pick_questions(chart, turns, np.random.default_rng([seed, i, 1]), families)
    conversations = []
    for t, qa in enumerate(qas):
        prefix = "<image>\n" if t == 0 else ""
        conversations.append({"from": "human", "value": prefix + qa.question})
        conversations.append({"from": "gpt", "value": qa.answer})
    return {
        "example_id": f"synth-{seed}-{i:06d}",
        "image": render_png(chart, image_size),
        "conversations": conversations,
        "source": f"synthetic/{chart.kind}",
        "answer_type": qas[-1].answer_type,
    }


# ---------------------------------------------------------------- data


def chart_data(seed: int, i: int, kinds: tuple[str, ...] = KINDS) -> Chart:
    """The data behind row ``i`` of ``synthetic_charts(..., seed, kinds=kinds)``."""
    rng = np.random.default_rng([seed, i, 0])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "line":
        return _line_data(rng)
    noun = list(VOCABULARY)[int(rng.integers(len(VOCABULARY)))]
    k = int(rng.integers(3, 7 if kind == "bar" else 6))
    labels = tuple(rng.choice(VOCABULARY[noun], size=k, replace=False).tolist())
    values = _distinct_ints(rng, k) if kind == "bar" else _shares(rng, k)
    return Chart(kind, noun, labels, values)


def _distinct_ints(rng: np.random.Generator, k: int) -> tuple[int, ...]:
    # Distinct values make every comparison and extreme well defined.
    return tuple(int(v) for v in rng.choice(np.arange(3, 100), size=k, replace=False))


def _shares(rng: np.random.Generator, k: int) -> tuple[int, ...]:
    """``k`` distinct integer percents, each >= ``MIN_SHARE``, summing to exactly 100."""
    while True:
        raw = rng.dirichlet(np.full(k, 3.0)) * 100
        shares = np.maximum(np.round(raw).astype(int), MIN_SHARE)
        shares[int(np.argmax(shares))] += 100 - int(shares.sum())
        if shares.min() >= MIN_SHARE and len(set(shares.tolist())) == k:
            return tuple(int(s) for s in shares)


def _line_data(rng: np.random.Generator) -> Chart:
    """A yearly series with a clear trend: the slope outweighs the noise, so first-to-last sets the trend."""
    series = SERIES[int(rng.integers(len(SERIES)))]
    k = int(rng.integers(5, 9))
    first_year = int(rng.integers(2008, 2016))
    years = tuple(str(first_year + t) for t in range(k))
    while True:
        slope = int(rng.integers(4, 10)) * (1 if rng.random() < 0.5 else -1)
        span = abs(slope) * (k - 1)
        start = int(rng.integers(10, 95 - span))
        base = start + slope * np.arange(k) if slope > 0 else start + span + slope * np.arange(k)
        values = base + rng.integers(-4, 5, size=k)
        if len(set(values.tolist())) == k:
            return Chart("line", series, years, tuple(int(v) for v in values))


# ---------------------------------------------------------------- questions


def question_pool(chart: Chart, families: tuple[str, ...] = READING_FAMILIES) -> dict[str, list[QA]]:
    """The questions of ``families`` this module can ask about ``chart``, by family, answered from the data."""
    makers = {
        "value": lambda: [_value_qa(chart, lab) for lab in chart.labels],
        "extremes": lambda: [_extreme_qa(chart, highest) for highest in (True, False)],
        "comparison": lambda: [
            _comparison_qa(chart, a, b) for a in chart.labels for b in chart.labels if a != b
        ],
        "summary": lambda: [
            QA("summary", "Summarize the chart in one sentence.", summarize(chart), "long_text")
        ],
        "trend": lambda: _trend_qas(chart),
        "kind": lambda: [QA("kind", "What kind of chart is this?", chart.kind, "short_text")],
        "chart_type": lambda: [
            QA("chart_type", "What type of chart is shown?", f"A {chart.kind} chart.", "short_text")
        ],
        "is_type": lambda: [_is_type_qa(chart, chart.kind), _is_type_qa(chart, _other_kind(chart))],
        "direction": lambda: [QA("direction", "Does the line go up or down?", _up_down(chart), "short_text")],
    }
    return {f: makers[f]() for f in families if chart.kind == "line" or f not in LINE_ONLY}


def pick_questions(
    chart: Chart, turns: int, rng: np.random.Generator, families: tuple[str, ...] = READING_FAMILIES
) -> list[QA]:
    """``turns`` different questions: a family at random (among those with questions left), then one of it."""
    pool = question_pool(chart, families)
    available = sum(len(qas) for qas in pool.values())
    if turns > available:
        raise ValueError(
            f"turns={turns}: a {chart.kind} chart has only {available} questions in "
            f"families {families!r}; lower turns or add families"
        )
    picked = []
    for _ in range(turns):
        left = [f for f, qas in pool.items() if qas]
        qas = pool[left[int(rng.integers(len(left)))]]
        picked.append(qas.pop(int(rng.integers(len(qas)))))
    return picked


def _value_qa(chart: Chart, label: str) -> QA:
    v = chart.value_of(label)
    if chart.kind == "pie":
        return QA("value", f"What percentage of the chart is {label}?", f"{v}%", "numeric")
    if chart.kind == "line":
        return QA("value", f"What is the value of {chart.noun} in {label}?", str(v), "numeric")
    return QA("value", f"What is the value of {label}?", str(v), "numeric")


def _extreme_qa(chart: Chart, highest: bool) -> QA:
    answer = chart.argmax if highest else chart.argmin
    word = "highest" if highest else "lowest"
    if chart.kind == "pie":
        question = f"Which category has the {'largest' if highest else 'smallest'} share?"
    elif chart.kind == "line":
        question = f"In which year is {chart.noun} {word}?"
    else:
        question = f"Which category has the {word} value?"
    return QA("extremes", question, answer, "short_text")


def _comparison_qa(chart: Chart, a: str, b: str) -> QA:
    answer = "Yes" if chart.value_of(a) > chart.value_of(b) else "No"
    if chart.kind == "pie":
        question = f"Is the share of {a} greater than the share of {b}?"
    elif chart.kind == "line":
        question = f"Is {chart.noun} in {a} greater than in {b}?"
    else:
        question = f"Is {a} greater than {b}?"
    return QA("comparison", question, answer, "yes_no")


def _trend_qas(chart: Chart) -> list[QA]:
    years, values = chart.labels, chart.values
    qas = [QA("trend", "What is the overall trend?", _direction(chart), "short_text")]
    for a in range(len(years)):
        for b in range(a + 1, len(years)):
            answer = "Yes" if values[b] > values[a] else "No"
            question = f"Does {chart.noun} increase from {years[a]} to {years[b]}?"
            qas.append(QA("trend", question, answer, "yes_no"))
    return qas


def _is_type_qa(chart: Chart, kind: str) -> QA:
    return QA("is_type", f"Is this a {kind} chart?", "Yes" if kind == chart.kind else "No", "yes_no")


def _other_kind(chart: Chart) -> str:
    """A kind the chart is not, fixed by its data: "Is this a <kind> chart?" is then "Yes" half the time."""
    others = [k for k in KINDS if k != chart.kind]
    return others[sum(chart.values) % len(others)]


def _up_down(chart: Chart) -> str:
    return "up" if chart.values[-1] > chart.values[0] else "down"


def _direction(chart: Chart) -> str:
    return "increasing" if chart.values[-1] > chart.values[0] else "decreasing"


def summarize(chart: Chart) -> str:
    """One sentence built from the data, naming the highest and lowest labels with their values."""
    hi, lo = chart.argmax, chart.argmin
    vhi, vlo = chart.value_of(hi), chart.value_of(lo)
    count = f"{NUMBER_WORDS[len(chart.labels)]} {chart.noun}"
    if chart.kind == "pie":
        return (
            f"The pie chart shows the shares of {count}; {hi} has the largest share at {vhi}% "
            f"and {lo} the smallest at {vlo}%."
        )
    if chart.kind == "line":
        y0, y1 = chart.labels[0], chart.labels[-1]
        return (
            f"The line chart shows {chart.noun} from {y0} to {y1}, {_direction(chart)} overall from "
            f"{chart.values[0]} to {chart.values[-1]}, with a high of {vhi} in {hi} and a low of {vlo} in {lo}."
        )
    return f"The bar chart shows {count}; {hi} is highest at {vhi} and {lo} lowest at {vlo}."


# ---------------------------------------------------------------- rendering
# Everything is drawn as figure-level artists in figure fractions (the figure is square), with no Axes:
# creating an Axes builds tick machinery that costs more than the whole chart. Text is drawn from glyph
# outlines cached per string, because laying out a matplotlib Text costs ~1 ms per label here, more than
# all the rest of a chart; the labels come from a small vocabulary, so the cache stays small.

# Bundled with matplotlib, so the glyphs (and the PNG bytes) do not depend on the fonts a machine has.
_FONT = FontProperties(family="DejaVu Sans")
_CAP_HEIGHT = 0.73  # DejaVu Sans capitals and digits, in em
TEXT_EM = 0.07  # text height as a fraction of the image: ~9 px at 128 px


def render_png(chart: Chart, image_size: int = 128) -> bytes:
    """The chart as ``image_size`` square RGBA PNG bytes, identical on every call."""
    inches = image_size / DPI
    fig = Figure(figsize=(inches, inches), dpi=DPI)
    FigureCanvasAgg(fig)
    {"bar": _draw_bar, "line": _draw_line, "pie": _draw_pie}[chart.kind](fig, chart)
    buf = io.BytesIO()
    # No Software tag (it carries the matplotlib version), so the bytes depend on the data alone.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


@lru_cache(maxsize=4096)
def _outline(s: str) -> tuple[Path, float, float]:
    """The outline of ``s`` at 1 px per em, baseline at y=0, with its ink's left and right x."""
    text_path = TextPath((0, 0), s, size=1, prop=_FONT)
    # A plain Path: TextPath recomputes its vertices lazily, which is not safe to share across threads.
    path = Path(text_path.vertices, text_path.codes)
    box = path.get_extents()
    return path, box.x0, box.x1


def _text(
    fig: Figure, x: float, y: float, s: str, scale: float = 1.0, ha: str = "left", va: str = "base"
) -> None:
    """Draws ``s`` at figure fraction (x, y); ``va`` puts y at the baseline, the cap-height middle or top."""
    path, left, right = _outline(s)
    dx = {"left": -left, "center": -(left + right) / 2, "right": -right}[ha]
    dy = {"base": 0.0, "center": -_CAP_HEIGHT / 2, "top": -_CAP_HEIGHT}[va]
    size = fig.bbox.width
    em = TEXT_EM * size * scale
    transform = Affine2D().translate(dx, dy).scale(em).translate(x * size, y * size)
    fig.add_artist(PathPatch(path, transform=transform, facecolor="black", linewidth=0))


def _title(fig: Figure, s: str) -> None:
    _text(fig, 0.5, 0.975, s, scale=1.1, ha="center", va="top")


def _em_points(fig: Figure) -> float:
    """The text em in points: line widths scale with it so a 32 px chart is a shrunken 128 px one."""
    return TEXT_EM * fig.bbox.width * 72 / DPI


def _line(fig: Figure, xs, ys, **kw) -> None:
    fig.add_artist(Line2D(xs, ys, transform=fig.transFigure, **kw))


def _draw_bar(fig: Figure, chart: Chart) -> None:
    # Horizontal bars keep the category names readable at 128 px: no rotated or overlapping labels.
    left, width, bottom, top = 0.32, 0.54, 0.03, 0.86
    row = (top - bottom) / len(chart.labels)
    for j, (label, v) in enumerate(zip(chart.labels, chart.values, strict=True)):
        y = top - (j + 0.5) * row
        length = width * v / 100
        bar = Rectangle((left, y - 0.35 * row), length, 0.7 * row, transform=fig.transFigure)
        bar.set(facecolor=PALETTE[0], linewidth=0)
        fig.add_artist(bar)
        _text(fig, left - 0.02, y, label, ha="right", va="center")
        _text(fig, left + length + 0.015, y, str(v), va="center")
    _line(fig, [left, left], [bottom, top], color="black", linewidth=_em_points(fig) * 0.12)
    _title(fig, chart.noun.capitalize())


def _draw_line(fig: Figure, chart: Chart) -> None:
    left, right, bottom, height = 0.07, 0.93, 0.15, 0.66
    step = (right - left) / (len(chart.labels) - 1)
    xs = [left + j * step for j in range(len(chart.labels))]
    ys = [bottom + height * v / 100 for v in chart.values]
    em = _em_points(fig)
    _line(fig, xs, ys, color=PALETTE[3], marker="o", markersize=em * 0.5, linewidth=em * 0.15)
    _line(fig, [0.02, 0.98], [bottom - 0.04] * 2, color="black", linewidth=em * 0.12)
    for x, y, year, v in zip(xs, ys, chart.labels, chart.values, strict=True):
        _text(fig, x, y + 0.03, str(v), scale=0.85, ha="center")
        # Two-digit years fit eight points across 128 px; the full span is in the title.
        _text(fig, x, bottom - 0.065, f"'{year[2:]}", scale=0.85, ha="center", va="top")
    _title(fig, f"{chart.noun} {chart.labels[0]}-{chart.labels[-1]}")


def _draw_pie(fig: Figure, chart: Chart) -> None:
    cx, cy, radius = 0.5, 0.44, 0.25
    theta = 90.0  # clockwise from twelve o'clock, like most pie charts
    for j, (label, v) in enumerate(zip(chart.labels, chart.values, strict=True)):
        sweep = 3.6 * v
        wedge = Wedge((cx, cy), radius, theta - sweep, theta, transform=fig.transFigure)
        wedge.set(facecolor=PALETTE[j], edgecolor="white", linewidth=_em_points(fig) * 0.08)
        fig.add_artist(wedge)
        _pie_label(fig, cx, cy, radius, np.deg2rad(theta - sweep / 2), label, f"{v}%")
        theta -= sweep
    _title(fig, f"Share of {chart.noun}")


def _pie_label(fig: Figure, cx: float, cy: float, radius: float, angle: float, name: str, share: str) -> None:
    """Name over share just outside the wedge, aligned away from the pie so it never covers it."""
    dx, dy = np.cos(angle), np.sin(angle)
    ha = "center" if abs(dx) < 0.3 else ("left" if dx > 0 else "right")
    line = TEXT_EM * 0.85 * 1.15  # two-line block height is 2 * line
    # Shift the block so its near edge (not its middle) touches the anchor point above and below the pie.
    middle = cy + 1.08 * radius * dy + (line if dy > 0.3 else -line if dy < -0.3 else 0.0)
    x = cx + 1.08 * radius * dx
    _text(fig, x, middle + 0.1 * line, name, scale=0.85, ha=ha, va="base")
    _text(fig, x, middle - 0.1 * line, share, scale=0.85, ha=ha, va="top")
