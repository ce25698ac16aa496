"""Answer extraction and scoring that decide exactly as VLMEvalKit's rule-based evaluation.

Reference: VLMEvalKit (github.com/open-compass/VLMEvalKit, checked at commit e8e78f0), the
toolkit behind the OpenCompass leaderboard and the TSVs ``mmzoo eval`` reads, run without an
LLM judge (its ``exact_matching`` policy). Every rule below matches it on every input: the same
string operations, Python ``float`` parsing, float64 arithmetic without epsilons, and the same
order of tries and tie rules.

- Multiple choice (AI2D, MMMU), ``can_infer``: first an option letter: the answer with
  ``.()[],:;!*#{}`` turned into spaces is split into words; exactly one word equal to an option
  letter, among the last 4 words, names it; no such word but a word ``Z`` gives ``Z`` ("none
  of them"), as do a few refusal phrases; then ``answer is X`` (X one of A-D). Failing those,
  the option text: the lower-cased answer, at most twice as long as all option texts together,
  must contain exactly one lower-cased option text. Nothing found counts as ``Z``.
- MMMU (``MMMU_preproc``): a question without option A becomes a two-option question, A = the
  answer text, B = "Other Answers", correct answer A; any answer that is not a single capital
  letter is taken as A.
- ChartQA (``relaxed_correctness``): the stripped prediction and the target are read with
  ``float`` (``"45%"`` is 0.45; ``"1,234"`` and ``"$3"`` are not numbers); two numbers with a
  non-zero target are right when ``abs(p - t) / abs(t) <= 0.05``, so 4.2 for 4 is wrong
  (0.05000000000000004); anything else needs equal strings after lower-casing only.
  Right for any accepted answer.
- DocVQA (``anls_compute``, ``hit_calculate``): distance = Levenshtein distance of the
  lower-cased, whitespace-collapsed strings / the longer raw string's length; score =
  ``1 - min distance`` over the accepted answers, 0 when that is below 0.5 (0.5 itself counts).

Reference quirks kept, so that scores stay comparable (each is tested):

- ``answer is X`` is matched case-insensitively, letter included: "The answer is a dog" picks
  A and "The answer is cat" picks C.
- A letter among the first words of a long answer is not taken ("B is right because ..."),
  and two letters are no answer ("(B) or maybe C"), while "B) A cat" picks the option whose
  text is "A cat".
- MMMU open questions match by substring: answer "4" takes "14" as right, and so is "A"; an
  open question whose answer is one capital letter (say "C") can never be right; a choice
  question whose answer lists letters ("['A', 'C']") takes A as its only right letter.
- ChartQA: "nan" for "nan" is wrong (both parse; NaN compares false).
- ANLS divides by the length of the raw strings (surrounding spaces and upper-casing included):
  " abcx " for "abcd" is distance 1/6, not 1/4.
- VLMEvalKit with the ``VERBOSE`` environment variable set also refuses a lone ``A`` among more
  than 3 words; mmzoo follows the default (unset).
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Mapping, Sequence


def answer_list(value: object) -> list[str]:
    """Accepted answers from a cell: a list literal (``"['a', 'b']"``) or else the cell as one answer."""
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    return [str(v) for v in parsed] if isinstance(parsed, list) else [text]


# ---------------------------------------------------------------- multiple choice

NO_CHOICE = "Z"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter (or ``"Z"``) an answer names; ``None`` when no rule applies.

    Args:
        prediction: the model's answer.
        options: option letter -> option text, in letter order.
    """
    text = str(prediction)
    return _choice_by_letter(text, options) or _choice_by_text(text, options)


def _choice_by_letter(text: str, options: Mapping[str, str]) -> str | None:
    if "Failed to obtain answer via API" in text:
        return None
    if any(refusal in text for refusal in _REFUSALS):
        return NO_CHOICE
    words = text.translate(_SEPARATORS).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and NO_CHOICE in words:
        return NO_CHOICE
    stated = _ANSWER_IS.search(text)
    if stated and stated.group(1).upper() in options:
        return stated.group(1).upper()
    return None


def _choice_by_text(text: str, options: Mapping[str, str]) -> str | None:
    text = text.lower()
    if len(text) > 2 * sum(len(value) for value in options.values()):
        return None
    found = [letter for letter, value in options.items() if value.lower() in text]
    return found[0] if len(found) == 1 else None


def mmmu_choice(options: Mapping[str, str], answer: str) -> tuple[dict[str, str], str]:
    """The options and the right letter of an MMMU question, as VLMEvalKit scores it.

    A question without option A (an open question) gets A = its answer, B = "Other Answers".
    The right letter is the answer when that is a single capital letter, else A.
    """
    if "A" not in options:
        options = dict(sorted({**options, "A": answer, "B": "Other Answers"}.items()))
    return dict(options), answer if len(answer) == 1 and answer in string.ascii_uppercase else "A"


# ---------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    """``float(text)``; a trailing ``%`` (one or more) divides by 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness of one answer against one target.

    Both parse as numbers and the target is non-zero: ``abs(p - t) / abs(t) <= max_relative_change``
    in float64. Otherwise the stripped prediction and the target must be equal once lower-cased.
    """
    pred, target = str(prediction).strip(), str(target)
    p, t = _to_float(pred), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return pred.lower() == target.lower()


def relaxed_accuracy(prediction: str, targets: Sequence[str]) -> float:
    """1.0 when the prediction is relaxed-correct for any accepted answer, else 0.0."""
    return float(any(relaxed_correct(prediction, t) for t in targets))


# ---------------------------------------------------------------- DocVQA


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_distance(prediction: str, target: str) -> float:
    """Levenshtein distance of the lower-cased, whitespace-collapsed strings over the raw length.

    The length is that of the longer string as given, upper-cased (VLMEvalKit's rule, spaces
    included); two empty strings are at distance 0.
    """
    pred, gold = (" ".join(s.strip().lower().split()) for s in (prediction, target))
    length = max(len(prediction.upper()), len(target.upper()))
    return 0.0 if length == 0 else levenshtein(pred, gold) / length


def anls(prediction: str, targets: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one answer: ``1 - min distance`` over ``targets``, 0.0 when below ``threshold``."""
    if not targets:
        return 0.0
    similarity = 1 - min(anls_distance(str(prediction), str(t)) for t in targets)
    return 0.0 if similarity < threshold else similarity
