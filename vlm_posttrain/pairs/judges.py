"""Pairwise judges for preference data, behind one interface, with a protocol that cancels order and label bias.

Three judges (``pairs.judge`` in the config):
- ``self``: the policy compares two of its own answers. The verdict is the difference of the log-probabilities
  of the two label tokens right after ``ASSISTANT:`` (nothing is parsed, so nothing fails to parse); below
  ``tie_margin`` nats it is a tie.
- ``critic``: a LLaVA-Critic-style VLM (any image-text-to-text checkpoint) writes a verdict for the critic's
  own pairwise prompt; :func:`parse_verdict` reads first / second / tie and calls anything else unparsed.
- ``reference``: the answer closer to the reference answer (:func:`vlm_posttrain.reference.score_reference`).

Protocol (:class:`PairwiseJudge`): every pair is shown twice, in both orders. The two labels stay with the
positions, so they swap with the order relative to the answers: a judge that prefers a position or a label
names a different answer each time, and a pair whose two verdicts disagree is a tie. Which label comes first
alternates between pairs (by a hash of the pair's key), so position and label effects can be told apart.

With K samples per prompt, :func:`tournament` scores each sample by wins minus losses over all its pairs.

    judge = build_judge(cfg.pairs, base_dir, cfg.model, adapter_dir)
    verdicts = judge.judge_pairs([PairTask(image, question, answer_a, answer_b, reference)])
    verdicts[0].winner  # "a", "b", "tie" or "unparsed"
"""

from __future__ import annotations

import abc
import functools
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_posttrain import families, modeling, prompts
from vlm_posttrain.config import ModelConfig, PairsConfig
from vlm_posttrain.reference import score_reference

FIRST, SECOND, TIE, UNPARSED = "first", "second", "tie", "unparsed"


@dataclass(frozen=True)
class PairTask:
    """Two answers to one question about one image; ``key`` (stable per pair) sets the label order."""

    image: Any
    question: str
    answer_a: str
    answer_b: str
    reference: str = ""
    answer_type: str = ""
    key: str = ""


@dataclass(frozen=True)
class Presentation:
    """One showing of a pair: which answer came first, the labels shown with (first, second), the verdict."""

    a_first: bool
    labels: tuple[str, str]
    verdict: str = UNPARSED  # positional: FIRST, SECOND, TIE or UNPARSED
    margin: float = math.nan  # self: log p(first label) - log p(second label); reference: score difference
    raw: str = ""

    @property
    def winner(self) -> str:
        """The answer this showing prefers: "a", "b", TIE or UNPARSED."""
        if self.verdict not in (FIRST, SECOND):
            return self.verdict
        return "a" if (self.verdict == FIRST) == self.a_first else "b"

    @property
    def winning_label(self) -> str | None:
        return {FIRST: self.labels[0], SECOND: self.labels[1]}.get(self.verdict)


@dataclass(frozen=True)
class PairVerdict:
    winner: str  # "a", "b", TIE (explicit, or the two orders disagree) or UNPARSED (a showing unreadable)
    presentations: tuple[Presentation, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-ready (a NaN margin becomes None)."""
        shown = [
            {**asdict(p), "margin": None if math.isnan(p.margin) else p.margin} for p in self.presentations
        ]
        return {"winner": self.winner, "presentations": shown}

    @classmethod
    def from_dict(cls, data: dict) -> PairVerdict:
        shown = tuple(
            Presentation(**{**p, "labels": tuple(p["labels"]), "margin": _nan(p["margin"])})
            for p in data["presentations"]
        )
        return cls(data["winner"], shown)


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def combine(shown: Sequence[Presentation]) -> str:
    """One verdict from the showings: the same answer every time, else a tie; any unreadable one: unparsed."""
    winners = {p.winner for p in shown}
    if UNPARSED in winners:
        return UNPARSED
    if len(winners) == 1 and winners <= {"a", "b"}:
        return winners.pop()
    return TIE


def label_order(key: str, labels: tuple[str, str]) -> tuple[str, str]:
    """Alternate which label is shown first between pairs, deterministically by the pair's key."""
    flip = hashlib.sha256(key.encode()).digest()[0] % 2 == 1
    return (labels[1], labels[0]) if flip else labels


class PairwiseJudge(abc.ABC):
    """Both orders, labels swapped with the order; subclasses decide single showings in ``decide``."""

    name = "judge"
    labels: tuple[str, str] = prompts.CRITIC_LABELS
    # Neutral labels (letters) alternate their order between pairs; positional labels ("first") cannot.
    counterbalance_labels = False

    def presentations(self, task: PairTask) -> tuple[Presentation, Presentation]:
        labels = label_order(task.key, self.labels) if self.counterbalance_labels else self.labels
        return Presentation(a_first=True, labels=labels), Presentation(a_first=False, labels=labels)

    def judge_pairs(self, tasks: Sequence[PairTask]) -> list[PairVerdict]:
        shown = [(task, p) for task in tasks for p in self.presentations(task)]
        decided = self.decide(shown) if shown else []
        verdicts = []
        for i in range(len(tasks)):
            pair = tuple(decided[2 * i : 2 * i + 2])
            verdicts.append(PairVerdict(combine(pair), pair))
        return verdicts

    @abc.abstractmethod
    def decide(self, shown: list[tuple[PairTask, Presentation]]) -> list[Presentation]:
        """One verdict per single showing (task, presentation), in order."""


def ordered(task: PairTask, shown: Presentation) -> tuple[str, str]:
    """(first answer, second answer) as this showing presents them."""
    return (task.answer_a, task.answer_b) if shown.a_first else (task.answer_b, task.answer_a)


def _with(shown: Presentation, verdict: str, margin: float, raw: str) -> Presentation:
    return Presentation(shown.a_first, shown.labels, verdict, margin, raw)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- reference ---------------------------------------------------------------------------------------------


def reference_score(answer: str, task: PairTask) -> float:
    try:
        return score_reference(answer, task.reference, task.answer_type or None)
    except ValueError:
        # A declared type the reference does not fit (e.g. "numeric" with no number): infer it instead.
        return score_reference(answer, task.reference)


class ReferenceJudge(PairwiseJudge):
    """Prefers the answer that scores higher against the reference answer; equal scores tie."""

    name = "reference"

    def decide(self, shown: list[tuple[PairTask, Presentation]]) -> list[Presentation]:
        out = []
        for task, p in shown:
            first, second = (reference_score(a, task) for a in ordered(task, p))
            verdict = FIRST if first > second else SECOND if second > first else TIE
            out.append(_with(p, verdict, first - second, f"{first:.1f} vs {second:.1f}"))
        return out


# ---- self ----------------------------------------------------------------------------------------------------


def label_tokens(processor, labels: tuple[str, str]) -> tuple[list[int], tuple[int, int]]:
    """Tokens the labels' answers share after the prompt, then the first token that tells them apart.

    " X" may be one token or a space then "X", depending on the tokenizer: the shared part is appended to
    every prompt, and the verdict compares the probabilities of the two distinguishing tokens.
    """
    messages = prompts.self_judge_messages("q", "a", "b", labels)
    prompt = prompts.render(processor, messages, add_generation_prompt=True)
    tok = processor.tokenizer
    base = tok(prompt, add_special_tokens=False)["input_ids"]
    tails = []
    for label in labels:
        ids = tok(prompt + prompts.completion_text(processor, messages, label), add_special_tokens=False)[
            "input_ids"
        ]
        if ids[: len(base)] != base:
            raise ValueError(f"label '{label}' merges with the prompt's last token; choose another label")
        tails.append(ids[len(base) :])
    shared = 0
    while shared < min(map(len, tails)) and tails[0][shared] == tails[1][shared]:
        shared += 1
    if shared == min(map(len, tails)):
        raise ValueError(
            f"labels {labels} tokenize identically; choose labels that differ in their first token"
        )
    return tails[0][:shared], (tails[0][shared], tails[1][shared])


class SelfJudge(PairwiseJudge):
    """The policy judges its own answers by the probabilities of two neutral label tokens."""

    name = "self"
    labels = prompts.SELF_JUDGE_LABELS
    counterbalance_labels = True

    def __init__(self, policy, tie_margin: float, batch_size: int):
        # ``policy`` is a loaded :class:`vlm_posttrain.generation.Generator` (model, processor, encode).
        self.policy = policy
        self.tie_margin = tie_margin
        self.batch_size = batch_size
        self.labels = families.of_processor(policy.processor).self_judge_labels
        shared, ids = label_tokens(policy.processor, self.labels)
        self.shared = torch.tensor(shared, dtype=torch.long)
        self.label_ids = dict(zip(self.labels, ids, strict=True))

    def decide(self, shown: list[tuple[PairTask, Presentation]]) -> list[Presentation]:
        out: list[Presentation] = []
        for chunk in _chunks(shown, self.batch_size):
            out.extend(self._decide_batch(chunk))
        return out

    def label_logprobs(self, images: list, texts: list[str]) -> torch.Tensor:
        """log p(next token) at the end of each prompt (after the labels' shared tokens), one row per prompt."""
        inputs = self.policy.encode(images, texts)
        if len(self.shared):
            tail = self.shared.to(inputs["input_ids"].device).expand(len(texts), -1)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
            for key in families.TOKEN_TYPE_KEYS & inputs.keys():  # the tail is text
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(tail)], dim=1)
        with torch.inference_mode():
            logits = self.policy.model(**inputs, logits_to_keep=1).logits[:, -1]
        return logits.float().log_softmax(-1).cpu()

    def _decide_batch(self, chunk: list[tuple[PairTask, Presentation]]) -> list[Presentation]:
        texts = [
            prompts.self_judge_prompt(self.policy.processor, t.question, *ordered(t, p), p.labels)
            for t, p in chunk
        ]
        logp = self.label_logprobs([t.image for t, _ in chunk], texts)
        out = []
        for row, (_, p) in zip(logp, chunk, strict=True):
            first, second = (float(row[self.label_ids[label]]) for label in p.labels)
            margin = first - second
            verdict = FIRST if margin > self.tie_margin else SECOND if margin < -self.tie_margin else TIE
            raw = f"logp {p.labels[0]}={first:.4f} {p.labels[1]}={second:.4f}"
            out.append(_with(p, verdict, margin, raw))
        return out


# ---- critic --------------------------------------------------------------------------------------------------

_NOUN = r"(?:response|answer|one|option|reply|output|candidate)"
_ORDINALS = {"first": ("first", "1st"), "second": ("second", "2nd")}
_NUMERALS = {"first": ("1",), "second": ("2",)}
_ADVERB = (
    r"(?:(?:clearly|slightly|much|far|significantly|definitely|overall|generally|indeed|therefore|thus|"
    r"also|somewhat|a\s+bit|marginally|notably|evidently)\s+)*"
)
_STRONG = (
    r"(?:the\s+)?(?:better|best|superior|preferred|preferable|stronger|winner|more\s+(?:accurate|correct))"
)
_NEGATIVE = (
    r"(?:worse|inferior|weaker|less\s+(?:accurate|correct|helpful|relevant|detailed|informative|complete))"
)
_WEAK = (
    r"more\s+(?:accurate|correct|precise|helpful|detailed|informative|relevant|complete|comprehensive|"
    r"appropriate|faithful|reliable|thorough|factual|coherent|concise)"
)
_BE = r"\s+(?:is|was|seems|appears|remains|would\s+be|is\s+rated)\s+"
_TIE = [
    r"\bboth\s+(?:of\s+the\s+)?(?:responses|answers|of\s+them)\s+(?:are|were)\s+(?:equally|similarly|comparabl[ey]|"
    r"about\s+(?:equally|the\s+same)|equivalent|on\s+par|of\s+(?:equal|similar|the\s+same)\s+quality)",
    r"\b(?:equally|similarly)\s+(?:good|bad|accurate|inaccurate|correct|incorrect|helpful|valid|poor|wrong|"
    r"relevant|strong|weak)\b",
    r"\b(?:it'?s|it\s+is|this\s+is|result\s+is)\s+a\s+tie\b",
    r"\bneither\s+(?:response|answer|one)\s+is\s+(?:clearly\s+|significantly\s+)?(?:better|superior|preferred)",
    r"\bneither\b[^.!?;]*\bnor\b",
    r"\bno\s+(?:clear\s+)?(?:winner|preference)\b",
    r"\bthey\s+are\s+(?:equally|equivalent)",
    r"^\W*(?:tie|equal|draw)\W*$",
]
_CONCLUSION = re.compile(
    r"(?:^|[.!?;\n]\s*)(?:overall|therefore|thus|hence|so|in\s+conclusion|in\s+summary|ultimately|finally|"
    r"in\s+short|verdict|final\s+(?:verdict|answer|decision))\b[^.!?;\n]*$",
    re.IGNORECASE,
)
_NEGATION = re.compile(r"\b(?:not|never|neither|nor|cannot|hardly)\b|n't\b", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.!?;,:\n]")


def _aliases(label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(words that go before the noun, words that go after it): "first response", "response 1", "response X"."""
    key = label.lower()
    if key in _ORDINALS:
        return _ORDINALS[key], _NUMERALS[key]
    return (), (re.escape(label),)


def _name(label: str) -> str:
    before, after = _aliases(label)
    forms = []
    if before:
        forms.append(rf"\b(?:the\s+)?(?:{'|'.join(before)})\s+{_NOUN}\b")
    forms.append(rf"\b{_NOUN}\s*\(?#?(?:{'|'.join(after)})\)?(?!\w)")
    return "(?:" + "|".join(forms) + ")"


@functools.lru_cache(maxsize=16)
def _patterns(labels: tuple[str, str]) -> dict[str, list[tuple[re.Pattern, int]]]:
    """Regexes per strength, each with the index of the label it votes for."""
    out: dict[str, list[tuple[re.Pattern, int]]] = {"strong": [], "weak": []}
    for side, label in enumerate(labels):
        name, other = _name(label), 1 - side
        flags = re.IGNORECASE
        out["strong"] += [
            (re.compile(name + _BE + _ADVERB + _STRONG, flags), side),
            (re.compile(name + _BE + _ADVERB + _NEGATIVE, flags), other),
            (
                re.compile(r"\b(?:prefer|choose|pick|select|favou?r|recommend|go\s+with)\s+" + name, flags),
                side,
            ),
            (
                re.compile(r"\b(?:better|best|preferred|superior|winning)\s+" + _NOUN + _BE + name, flags),
                side,
            ),
            (re.compile(name + r"\s+(?:outperforms|beats|wins|is\s+the\s+winner)\b", flags), side),
        ]
        out["weak"] += [
            (re.compile(name + _BE + _ADVERB + _WEAK, flags), side),
            (
                re.compile(
                    name + r"\s+(?:provides|gives|offers|has)\s+(?:a\s+)?(?:better|" + _WEAK + ")", flags
                ),
                side,
            ),
        ]
    return out


def _negated(text: str, start: int) -> bool:
    """A negation between the last clause break and the match ("nor the second response is better")."""
    clause_start = max((m.end() for m in _CLAUSE_BREAK.finditer(text, 0, start)), default=0)
    return _NEGATION.search(text, clause_start, start) is not None


def _votes(text: str, patterns: list[tuple[re.Pattern, int]]) -> list[tuple[int, int]]:
    votes = []
    for pattern, side in patterns:
        for m in pattern.finditer(text):
            if not _negated(text, m.start()):
                votes.append((m.start(), side))
    return votes


def _decide_votes(text: str, votes: list[tuple[int, int]]) -> int | None:
    """The side all votes agree on; if they disagree, the side of the concluding sentences, if they agree."""
    sides = {side for _, side in votes}
    if len(sides) == 1:
        return sides.pop()
    concluding = {side for start, side in votes if _CONCLUSION.search(text[: start + 1])}
    return concluding.pop() if len(concluding) == 1 else None


def _bare_label(text: str, labels: tuple[str, str]) -> int | None:
    """A reply that is nothing but a label: "X", "Response X.", "The first one", "**Second**"."""
    core = re.sub(r"^[\W_]+|[\W_]+$", "", text.strip()).lower()
    core = re.sub(r"^(?:the\s+)?(?:answer|verdict|choice)\s*(?:is\s*:?|:)\s*", "", core)
    for side, label in enumerate(labels):
        before, after = _aliases(label)
        words = {w.lower().replace("\\", "") for w in (*before, *after)} | {label.lower()}
        if core in words or re.fullmatch(_name(label), core, re.IGNORECASE):
            return side
    return None


def parse_verdict(text: str | None, labels: tuple[str, str] = prompts.CRITIC_LABELS) -> str:
    """FIRST (``labels[0]`` is better), SECOND, TIE or UNPARSED, from a judge's free text.

    Explicit verdicts ("The first response is better", "I prefer response 2", "the second is worse") win;
    if they disagree, only concluding sentences ("Overall, ...") count, and if those disagree too the text
    is unparsed. Then stated ties ("Both responses are equally accurate"), then comparatives ("... is more
    detailed"), then a reply that is only a label. Anything else is UNPARSED, never guessed.
    """
    if not text or not text.strip():
        return UNPARSED
    text = " ".join(text.split())
    found = _patterns(tuple(labels))
    strong = _votes(text, found["strong"])
    if strong:
        return _side(_decide_votes(text, strong))
    if any(re.search(p, text, re.IGNORECASE) for p in _TIE):
        return TIE
    weak = _votes(text, found["weak"])
    if weak:
        return _side(_decide_votes(text, weak))
    return _side(_bare_label(text, labels))


def _side(index: int | None) -> str:
    return UNPARSED if index is None else (FIRST, SECOND)[index]


class CriticJudge(PairwiseJudge):
    """A critic VLM answers LLaVA-Critic's pairwise prompt (greedy); its text is parsed by :func:`parse_verdict`."""

    name = "critic"
    labels = prompts.CRITIC_LABELS

    def __init__(self, model, processor, max_new_tokens: int, batch_size: int):
        from vlm_posttrain.generation import Generator

        # The Generator gives left-padded batched greedy decoding with the critic's own template and tokens.
        self.critic = Generator(model, processor)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @classmethod
    def load(cls, cfg: PairsConfig) -> CriticJudge:
        """``pairs.critic_model``, writing up to ``pairs.critic_max_new_tokens``, ``pairs.batch_size`` at once."""
        return cls(*modeling.load_critic(cfg.critic_model), cfg.critic_max_new_tokens, cfg.batch_size)

    def decide(self, shown: list[tuple[PairTask, Presentation]]) -> list[Presentation]:
        from vlm_posttrain.generation import Sampling

        out: list[Presentation] = []
        greedy = Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens)
        for chunk in _chunks(shown, self.batch_size):
            texts = [
                prompts.critic_prompt(self.critic.processor, t.question, *ordered(t, p)) for t, p in chunk
            ]
            replies = self.critic.generate([t.image for t, _ in chunk], texts, k=1, sampling=greedy).texts
            for (_, p), (reply,) in zip(chunk, replies, strict=True):
                out.append(_with(p, parse_verdict(reply, self.labels), math.nan, reply))
        return out


# ---- K samples: a round robin ----------------------------------------------------------------------------


def all_pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def tournament(k: int, winners: dict[tuple[int, int], str]) -> list[int]:
    """Each sample's wins minus losses over its judged pairs (ties and unparsed count for neither)."""
    scores = [0] * k
    for (i, j), winner in winners.items():
        if winner in ("a", "b"):
            won, lost = (i, j) if winner == "a" else (j, i)
            scores[won] += 1
            scores[lost] -= 1
    return scores


def best_and_worst(scores: Sequence[int]) -> tuple[int, int] | None:
    """(best, worst) sample indices, the lowest index on equal scores; None when best and worst tie."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)


def build_judge(
    pairs_cfg: PairsConfig,
    base_dir: str | Path,
    model_cfg: ModelConfig,
    adapter_dir: str | Path | None = None,
    policy=None,
):
    """The configured judge; ``self`` loads the policy unless a loaded Generator is passed as ``policy``."""
    if pairs_cfg.judge == "reference":
        return ReferenceJudge()
    if pairs_cfg.judge == "critic":
        return CriticJudge.load(pairs_cfg)
    if policy is None:
        from vlm_posttrain.generation import Generator

        policy = Generator.load(base_dir, model_cfg, adapter_dir)
    return SelfJudge(policy, pairs_cfg.tie_margin, pairs_cfg.batch_size)
