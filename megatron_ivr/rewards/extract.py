"""Pull the final answer out of a response: the *last* ``\\boxed{...}`` with balanced braces.

Linear in the response's length (one pass pairs every brace), so an adversarial response
(thousands of unclosed ``\\boxed{``) costs what reading it costs: 1 MB in well under a second
(tests/rewards/test_format_and_reward.py).
"""

from __future__ import annotations

import re
from typing import Optional

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_braces(text: str) -> dict[int, int]:
    """``{open index: matching close index}`` for every balanced brace pair (a stack, one pass);
    the pair of a ``{`` is the first ``}`` where the depth counted from it returns to 0."""
    pairs, stack = {}, []
    for match in re.finditer(r"[{}]", text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            pairs[stack.pop()] = match.start()
    return pairs


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces allowed) that is closed; None if
    there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    pairs = _closing_braces(text)
    for start in reversed(starts):
        close = pairs.get(start - 1)
        if close is not None:
            return text[start:close].strip()
    return None
