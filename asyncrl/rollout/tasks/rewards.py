"""Text rewards for dataset tasks: the GSM8K final-number match and exact string match.

Pure functions from (response text, reference text) to a reward in {0.0, 1.0}. They must never
raise on what a model writes: any response, however malformed, gets a reward.
"""

from __future__ import annotations

import re
from typing import Optional

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FINAL_MARK = "####"


def _normalise(raw: str) -> str:
    """'1,234.50' -> '1234.5', '42.0' -> '42', '007' -> '7', '-0' -> '0' for a match of `_NUMBER`."""
    # Done on the string rather than through Decimal, whose context precision would round long
    # numbers and make different answers compare equal.
    digits = raw.replace(",", "")
    sign = "-" if digits.startswith("-") else ""
    whole, _, frac = digits.lstrip("-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    body = f"{whole}.{frac}" if frac else whole
    return body if body == "0" else sign + body


def extract_final_number(text: str) -> Optional[str]:
    """The final answer of a GSM8K-style text, normalised, or None when there is none.

    With a '####' mark, the answer is the first number after the last mark (and None if no number
    follows it); without one, the last number in the text. A number is digits with optional
    thousands commas and decimals, so '$' and a sentence's final '.' are not part of it; the value
    is normalised, so '$1,234.00' and '1234' give the same string.
    """
    if _FINAL_MARK in text:
        match = _NUMBER.search(text.rsplit(_FINAL_MARK, 1)[1])
        return _normalise(match.group()) if match else None
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def gsm8k_reward(response_text: str, reference: str) -> float:
    """1.0 when the response's final number equals the reference's, else 0.0 (also when either has none)."""
    answer = extract_final_number(response_text)
    expected = extract_final_number(reference)
    return 1.0 if answer is not None and answer == expected else 0.0


def exact_match_reward(response_text: str, reference: str) -> float:
    """1.0 when the response equals the reference, ignoring surrounding whitespace, else 0.0."""
    return 1.0 if response_text.strip() == reference.strip() else 0.0
