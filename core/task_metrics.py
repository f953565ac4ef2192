"""Held-out task metrics on text: what one generated answer scores against its reference, and the set-level
classification scores. Pure functions, no model; ``core.evaluate`` feeds them.

Normalisation (SQuAD's, used by exact match, contains and token F1): lower-case, drop punctuation, drop the
articles a/an/the, collapse whitespace. Words are runs of letters and digits; each CJK character is a word of
its own (Chinese has no spaces), so the metrics work beyond ASCII.

    exact_match(answer, reference)  1.0 if norm(answer) == norm(reference) else 0.0
    contains(answer, reference)     1.0 if norm(reference) is a whole-word part of norm(answer)
    token_f1(answer, reference)     P = |common| / |answer words|, R = |common| / |reference words|,
                                    F1 = 2PR / (P + R), common counted with multiplicity (SQuAD v1.1)
    rouge_l(answer, reference)      ROUGE-L F-measure from the ``rouge-score`` package (longest common
                                    subsequence of the words); words are lower-cased runs of letters and
                                    digits with articles kept (as rouge-score's own tokenizer, no stemming)

Classification (``classify``): a prediction is the training label whose normalised form equals the normalised
answer, else ``OTHER``. accuracy = mean(norm(answer) == norm(reference)); macro-F1 = the mean over the labels
seen in training of F1_L = 2·TP / (2·TP + FP + FN), leaving out labels with no reference and no prediction in
the held-out rows (their F1 is 0/0); the confusion table counts (reference label, predicted label) pairs.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import cache

OTHER = "(other)"  # the predicted class of an answer that is none of the training labels
_PUNCT = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】…—·")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")  # a CJK char, or a run


def normalize(text: str) -> str:
    """SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def words(text: str) -> list[str]:
    """The words of normalised ``text``."""
    return _WORD.findall(normalize(text))


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    """Whether the reference appears in the answer, word-aligned, after normalisation."""
    ref = words(reference)
    ans = words(answer)
    if not ref:
        return float(not ans)
    n = len(ref)
    return float(any(ans[i : i + n] == ref for i in range(len(ans) - n + 1)))


def token_f1(answer: str, reference: str) -> float:
    ans, ref = words(answer), words(reference)
    if not ans or not ref:
        return float(ans == ref)
    common = sum((Counter(ans) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ans), common / len(ref)
    return 2 * p * r / (p + r)


class _Words:
    """The tokenizer interface rouge-score expects: ``tokenize(text) -> list[str]``; CJK-aware, articles kept."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


@cache
def _rouge():
    from rouge_score import rouge_scorer  # noqa: PLC0415 - it imports nltk (seconds): only when first scored

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(answer: str, reference: str) -> float:
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


GENERATIVE = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l, "token_f1": token_f1}


def generative_scores(answer: str, reference: str) -> dict[str, float]:
    """Every per-row metric of a generated answer."""
    return {name: fn(answer, reference) for name, fn in GENERATIVE.items()}


@dataclass
class Classification:
    accuracy: float
    macro_f1: float
    labels: list[str]  # the training labels, in the order the confusion table uses
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # {reference: {prediction: count}}
    predictions: list[str] = field(default_factory=list)  # per row: a training label or OTHER


def classify(answers: list[str], references: list[str], train_labels: list[str]) -> Classification:
    """Accuracy, macro-F1 over the training labels and the confusion table (see the module docstring)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    by_norm: dict[str, str] = {}
    for label in train_labels:
        by_norm.setdefault(normalize(label), label)
    preds = [by_norm.get(normalize(a), OTHER) for a in answers]
    correct = [normalize(a) == normalize(r) for a, r in zip(answers, references)]
    accuracy = sum(correct) / len(answers) if answers else 0.0
    f1s = []
    for label in dict.fromkeys(train_labels):
        tp = sum(p == label and r == label for p, r in zip(preds, references))
        fp = sum(p == label and r != label for p, r in zip(preds, references))
        fn = sum(p != label and r == label for p, r in zip(preds, references))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    confusion: dict[str, dict[str, int]] = {}
    for r, p in zip(references, preds):
        row = confusion.setdefault(r, {})
        row[p] = row.get(p, 0) + 1
    return Classification(accuracy, sum(f1s) / len(f1s) if f1s else 0.0, list(dict.fromkeys(train_labels)),
                          confusion, preds)


__all__ = ["GENERATIVE", "OTHER", "Classification", "classify", "contains", "exact_match", "generative_scores",
           "normalize", "rouge_l", "token_f1", "words"]
