"""Final-answer extraction and answer verifiers.

Extraction follows the prompt template the response was sampled with; a response with no
parsable answer is a *format failure*, its own verdict, never scored as an answer.
Verifiers are chosen per dataset (``VerifyMode``) in config, never guessed from dataset
names; ``auto`` (the default) picks one per prompt from the shape of its gold answer.

Deliberately unlike the reference pipeline (each pinned by a test):
- ANLS is similarity = 1 - dist / max_len, correct at >= 0.5 (it was inverted there);
- a multiple-choice answer is never cut at its first "." (``2.5`` is not ``2``);
- a response is never rewritten: a wrong ``12`` stays ``12``.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from fractions import Fraction

TRIGGERS = ("Final answer:", "Final Answer:", "Answer:", "答案:", "答案：")
BOXED = "\\boxed{"


class VerifyMode(StrEnum):
    EXACT = "exact"  # VQA-normalised exact match
    CHOICE = "choice"  # multiple-choice letter A-N
    NUMERIC = "numeric"  # numbers with relative tolerance
    ANLS = "anls"  # document VQA: normalised Levenshtein similarity >= 0.5
    AUTO = "auto"  # per gold answer: choice for a lone letter, numeric for a number (with a unit), else exact


class Verdict(StrEnum):
    CORRECT = "correct"
    WRONG = "wrong"
    FORMAT_FAILURE = "format_failure"


# ---------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(BOXED) : i - 1].strip()
        start = text.rfind(BOXED, 0, start)  # unbalanced: try an earlier one
    return None


def _after_last_trigger(text: str) -> str | None:
    position, trigger = max((text.rfind(t), t) for t in TRIGGERS)
    if position < 0:
        return None
    rest = text[position + len(trigger) :].strip()
    # Split on "\n" only: the vectorised twin in mpo.pairs does the same.
    line = next((ln.strip() for ln in rest.split("\n") if ln.strip()), "")
    boxed = last_boxed(line)
    return boxed if boxed is not None else line


def extract_answer(response: str, template: str) -> str | None:
    """The final answer a response gives under ``template``, or ``None`` (format failure).

    - ``en`` / ``zh``: text after the *last* trigger (``Final answer:``, ``Answer:``, ``答案:``);
    - ``en_v2``: the last ``\\boxed{}`` (a response without one is a format failure);
    - ``r1``: a closed ``<think>...</think>`` followed by a ``\\boxed{}`` after it;
    - any other template id: ``\\boxed{}`` first, then the trigger rule.
    """
    if template == "r1":
        if "</think>" not in response:
            return None
        answer = last_boxed(response.rsplit("</think>", 1)[1])
    elif template == "en_v2":
        answer = last_boxed(response)
    elif template in ("en", "zh"):
        answer = _after_last_trigger(response)
    else:
        answer = last_boxed(response)
        if answer is None:
            answer = _after_last_trigger(response)
    if answer is None:
        return None
    answer = answer.strip().rstrip(".。").strip()
    return answer or None


# ---------------------------------------------------------------- normalisation

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
_PUNCT = re.compile(r"[!\"#$%&'()*+,\-/:;<=>?@\[\\\]^_`{|}~“”‘’。，：？！]")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_text(text: str) -> str:
    """VQA normalisation: lower case, punctuation and articles gone, number words as digits.

    A period between digits is kept (``2.5`` stays ``2.5``); commas inside numbers go
    (``1,000`` -> ``1000``).
    """
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower().replace("*", ""))
    text = _PERIOD_NOT_DECIMAL.sub(" ", text)
    text = _PUNCT.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


_LETTER = re.compile(r"^\s*(?:option\s+|answer\s*(?:is)?\s*)?\(?\s*([A-N])\s*(?:[.):\]]|$|\s)", re.IGNORECASE)


def choice_letter(answer: str) -> str | None:
    """``B``, ``(B)``, ``B.``, ``B)``, ``**B**``, ``B. 3`` -> ``B``; ``2.5`` -> ``None``."""
    text = answer.replace("*", "").strip()
    match = _LETTER.match(text)
    if not match:
        return None
    letter = match.group(1)
    # A lone lower-case word like "a" or "i" is an article or pronoun, not an option.
    if letter.islower() and len(text) > 1:
        return None
    return letter.upper()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*-?\d+(?:\.\d+)?)?")


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (units, %, degrees ignored; ``3/10`` is a fraction)."""
    if not _NUMBER.search(text):
        text = normalize_text(text)  # "three" -> "3"
    matches = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    if not matches:
        return None
    token = matches[-1].replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return float(Fraction(numerator) / Fraction(denominator))
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_similarity(prediction: str, gold: str) -> float:
    """1 - normalised Levenshtein distance, on lower-cased, space-collapsed strings."""
    p, g = " ".join(prediction.lower().split()), " ".join(gold.lower().split())
    if not p and not g:
        return 1.0
    return 1.0 - levenshtein(p, g) / max(len(p), len(g))


# ---------------------------------------------------------------- verification


# A bare capital (B) or a letter in parentheses ((c)); a bare lower-case "a" is a word.
_LONE_LETTER = re.compile(r"^\s*(?:\(\s*[A-Na-n]\s*\)|[A-N])\s*\.?\s*$")
_LEADING_NUMBER = re.compile(r"^\s*[$€£]?\s*-?\d")


def auto_mode(gold: str) -> VerifyMode:
    """The verifier ``auto`` uses for one gold answer: ``choice`` for a lone option letter (``B``,
    ``(C)``), ``numeric`` for an answer that starts with a number (``12``, ``3/10``, ``45 degrees``,
    ``$5``), ``exact`` otherwise (``Route 66`` stays text)."""
    if _LONE_LETTER.match(gold):
        return VerifyMode.CHOICE
    if _LEADING_NUMBER.match(gold):
        return VerifyMode.NUMERIC
    return VerifyMode.EXACT


def is_correct(
    prediction: str,
    gold: str | list[str],
    mode: VerifyMode | str,
    rel_tol: float = 1e-4,
    anls_threshold: float = 0.5,
) -> bool:
    """Whether an extracted ``prediction`` matches ``gold`` (any of several golds)."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    mode = VerifyMode(mode)
    if mode is VerifyMode.AUTO:
        return any(is_correct(prediction, g, auto_mode(g), rel_tol, anls_threshold) for g in golds)
    if mode is VerifyMode.ANLS:
        return max(anls_similarity(prediction, g) for g in golds) >= anls_threshold
    if mode is VerifyMode.CHOICE:
        letter = choice_letter(prediction)
        for g in golds:
            gold_letter = choice_letter(g)
            if gold_letter is not None and letter is not None:
                if letter == gold_letter:
                    return True
            elif normalize_text(prediction) == normalize_text(g):
                return True
        return False
    if mode is VerifyMode.NUMERIC:
        value = parse_number(prediction)
        for g in golds:
            target = parse_number(g)
            if (
                value is not None
                and target is not None
                and math.isclose(value, target, rel_tol=rel_tol, abs_tol=1e-9)
            ):
                return True
            if target is None and normalize_text(prediction) == normalize_text(g):
                return True
        return False
    return any(normalize_text(prediction) == normalize_text(g) for g in golds)


def judge(
    response: str, gold: str | list[str], template: str, mode: VerifyMode | str
) -> tuple[Verdict, str | None]:
    """Extract and verify: ``(verdict, extracted answer or None)``."""
    answer = extract_answer(response, template)
    if answer is None:
        return Verdict.FORMAT_FAILURE, None
    return (Verdict.CORRECT if is_correct(answer, gold, mode) else Verdict.WRONG), answer
