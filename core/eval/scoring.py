"""Answer extraction and scoring rules, written from the benchmarks' public descriptions.

- Multiple choice (AI2D, MMMU): a letter is extracted by rules (bare letter, ``(B)``, ``B.``,
  ``The answer is B``, a lone option letter, the option text itself); ``None`` when nothing
  parses, which scores as wrong and is flagged.
- MMMU open questions: numbers and key phrases are pulled from the answer's concluding clauses
  and matched against the accepted answers (numbers rounded to 2 decimals, strings contained).
- ChartQA: relaxed accuracy, numbers within 5% of the ground truth (relative to it), otherwise
  exact match after normalisation.
- DocVQA: ANLS, ``1 - normalised Levenshtein distance`` when below the 0.5 threshold, else 0,
  maximised over the accepted answers.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Mapping, Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces (decimal points kept), whitespace collapsed."""
    text = re.sub(r"(?<=\d)[.,](?=\d)", "\0", str(text).lower())  # keep 3.5 and 1,000 intact
    return " ".join(_PUNCT.sub(" ", text).replace("\0", ".").split())


def answer_list(value: object) -> list[str]:
    """Accepted answers from a cell: a Python/JSON list literal (``"['a', 'b']"``) or one string."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [text]


# ---------------------------------------------------------------- multiple choice

_ANSWER_IS = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|would be|should be)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])"
)


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer names, or ``None`` when no rule applies.

    Rules, in order: the whole answer is a letter (``B``, ``(B)``, ``B.``); an explicit
    statement (``The answer is B``, ``Answer: (B)``); the answer starts with ``B.``/``B)``/``B:``;
    exactly one parenthesised option letter; exactly one standalone option letter ("A" or "I"
    before a lower-case word is a word, not a letter); the answer equals, or contains exactly one
    of, the option texts (the longest wins when one contains another).
    """
    letters = set(options)
    text = str(prediction).strip()
    if not text:
        return None
    whole = re.fullmatch(r"\(?([A-Z])\)?[.:)]?", text)
    if whole:
        return whole.group(1) if whole.group(1) in letters else None
    stated = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    stated = [s for s in stated if s in letters]
    if stated:
        return stated[-1]
    lead = re.match(r"\(?([A-Z])[.:)]\s", text + " ")
    if lead and lead.group(1) in letters:
        return lead.group(1)
    bracketed = {m for m in re.findall(r"\(([A-Z])\)", text) if m in letters}
    if len(bracketed) == 1:
        return bracketed.pop()
    lone = {
        m.group(1)
        for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", text)
        if m.group(1) in letters and not (m.group(1) in "AI" and re.match(r" [a-z]", text[m.end() :]))
    }
    if len(lone) == 1:
        return lone.pop()
    return _match_option_text(text, options)


def _match_option_text(text: str, options: Mapping[str, str]) -> str | None:
    norm = normalize_text(text)
    texts = {letter: normalize_text(value) for letter, value in options.items() if normalize_text(value)}
    for letter, value in texts.items():
        if norm == value:
            return letter
    found = [
        letter for letter, value in texts.items() if re.search(rf"(?<!\w){re.escape(value)}(?!\w)", norm)
    ]
    # Keep the options no other found option contains ("black cat" over "cat").
    found = [a for a in found if not any(a != b and texts[a] in texts[b] for b in found)]
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------- numbers

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def parse_number(text: str) -> float | None:
    """A number written alone, allowing a currency sign, thousands separators, ``%`` or a unit.

    ``"1,234.5"`` -> 1234.5, ``"45%"`` -> 45.0, ``"$3"`` -> 3.0, ``"12 kg"`` -> 12.0;
    ``"12 and 13"`` or ``"abc"`` -> ``None``.
    """
    s = str(text).strip().rstrip(".").strip()
    m = re.fullmatch(rf"[$€£¥]?\s*({_NUMBER.pattern})\s*(?:%|[A-Za-z°$€£¥]+\.?)?", s)
    if not m:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:
        return None


# ---------------------------------------------------------------- ChartQA

_PREAMBLE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)


def short_answer(prediction: str) -> str:
    """The first line of an answer without an "The answer is" preamble, quotes or a final period."""
    text = str(prediction).strip().splitlines()[0] if str(prediction).strip() else ""
    return _PREAMBLE.sub("", text).strip().rstrip(".").strip().strip("\"'")


def relaxed_correct(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy for one answer.

    Both numbers: ``|pred - target| <= tolerance * |target|`` (exact when the target is 0).
    Otherwise the normalised strings must be equal.
    """
    pred, gold = short_answer(prediction), str(target).strip()
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        if g == 0:
            return p == 0
        return abs(p - g) <= tolerance * abs(g) * (1 + 1e-9)  # 1e-9: 105 vs 100 is exactly 5%
    return normalize_text(pred) == normalize_text(gold)


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


def anls(prediction: str, targets: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one answer, maximised over ``targets``.

    Strings are lower-cased with whitespace collapsed; a normalised distance at or above
    ``threshold`` scores 0.
    """
    pred = " ".join(str(prediction).strip().lower().split())
    best = 0.0
    for target in targets:
        gold = " ".join(str(target).strip().lower().split())
        if not pred and not gold:
            return 1.0
        distance = levenshtein(pred, gold) / max(len(pred), len(gold))
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# ---------------------------------------------------------------- MMMU open questions

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def open_candidates(prediction: str) -> list[str | float]:
    """Candidate answers of a free-form response, as the MMMU reference describes them.

    The response is split into clauses; from each, the text after the last concluding word
    ("is", "so", "therefore", "answer", ... and "=" in the last clause) is kept. Numbers found
    in those pieces become floats; the pieces themselves are kept as normalised strings.
    """
    text = str(prediction).strip().strip(".").lower()
    clauses = [c for c in re.split(r"\.\s(?=[a-z])|\n", text) if c.strip()]
    pieces: list[str] = []
    for i, clause in enumerate(clauses):
        indicators = _INDICATORS + (("=",) if i == len(clauses) - 1 else ())
        tail = None
        for word in indicators:
            if word in clause:
                candidate = clause.split(word)[-1].strip()
                if tail is None or len(candidate) < len(tail):
                    tail = candidate
        if tail and tail not in {":", ",", ".", "!", "?", ";", "'"}:
            pieces.append(tail)
    if not pieces:
        pieces = [text]
    found: list[str | float] = []
    for piece in pieces:
        for number in _NUMBER.findall(piece):
            value = _float(number)
            if value is not None:
                found.append(round(value, 2))
        found.append(normalize_text(piece))
    return list(dict.fromkeys(found))


def _float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def open_correct(prediction: str, targets: Sequence[str]) -> bool:
    """MMMU open-question matching: a number equal after rounding to 2 decimals, or an accepted
    answer (normalised) contained in a candidate string."""
    candidates = open_candidates(prediction)
    for target in targets:
        number = parse_number(target)
        if number is not None:
            if any(isinstance(c, float) and c == round(number, 2) for c in candidates):
                return True
            continue
        gold = normalize_text(target)
        if gold and any(isinstance(c, str) and gold in c for c in candidates):
            return True
    return False
