"""json.loads for text a container's owner wrote: nesting bounded before parsing.

The C decoder recurses once per ``[`` or ``{``: fed ``'[' * 10000`` it raises
RecursionError, which is no JSON error and would surface as a crash. So the
depth is measured first, without parsing, in time linear in the size and at
C speed: escaped backslashes and escaped quotes are cut out (so every quote
left opens or closes a string), the string bodies go, the brackets left become
+1/-1 steps and the deepest running sum is the depth. Where the text is not
valid JSON the measure may be too high, never too low before the first place
the decoder would stop at, so ``json.loads`` never meets a deeper nesting than
allowed.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import Any, Dict

_STEP: Dict[int, int] = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# No field the hook reads needs more digits; Python would parse up to 4300
# of them (and then fail with advice about sys.set_int_max_str_digits).
MAX_DIGITS = 40
_LONG_NUMBER = re.compile(r"\d{%d}" % (MAX_DIGITS + 1))
_CHUNK = 1 << 16


class TooDeep(ValueError):
    """The text nests deeper than allowed, or holds an absurdly long number;
    it was not parsed."""


def _outside_strings(text: str) -> str:
    """``text`` with the bodies of its JSON strings cut out."""
    plain = text.replace("\\\\", "").replace('\\"', "")
    return "".join(plain.split('"')[0::2])


def depth(text: str, stop_above: int = -1) -> int:
    """How deep ``text`` nests arrays and objects. With ``stop_above`` >= 0 the
    count stops early once it passes that depth (the result is then just
    above it)."""
    return _depth(_outside_strings(text), stop_above)


def _depth(outside: str, stop_above: int) -> int:
    steps = _NOT_BRACKET.sub("", outside).encode("ascii")
    deepest, level = 0, 0
    for start in range(0, len(steps), _CHUNK):
        sums = list(itertools.accumulate(map(_STEP.__getitem__, steps[start:start + _CHUNK]),
                                         initial=level))
        deepest = max(deepest, max(sums))
        level = sums[-1]
        if 0 <= stop_above < deepest:
            break
    return deepest


def loads(text: str, max_depth: int) -> Any:
    """``json.loads(text)`` once its nesting is known to be at most ``max_depth``;
    TooDeep (a ValueError) otherwise, ValueError for text that is not JSON."""
    outside = _outside_strings(text)
    if _depth(outside, max_depth) > max_depth:
        raise TooDeep(f"nests deeper than {max_depth} levels")
    if _LONG_NUMBER.search(outside):
        raise TooDeep(f"holds a number of more than {MAX_DIGITS} digits")
    return json.loads(text)
