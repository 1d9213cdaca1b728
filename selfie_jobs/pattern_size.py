"""How many nodes a regular expression's counted repeats make the `regex` module build when it compiles it.

`regex.compile` expands a counted repeat into copies of what it repeats, for the lower bound (`a{1000000}` or
`((a{1000}){1000}){1000}` are a few bytes of pattern): memory grows about 260 bytes per copy, nested repeats
multiply, and `a{999999999}` took 18 GB before the kernel killed the API. Patterns come from clients (audit
detectors), so their expansion is measured from the text, without compiling, and bounded before `regex.compile`.
"""

from __future__ import annotations

import re

_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
#: A lower bound with more digits than this is past any budget (and past what int() should be asked to read).
_MAX_DIGITS = 9


def repeat_copies(pattern: str) -> int:
    """The atoms of `pattern` once each counted repeat is expanded to its lower bound, minus the atoms as written
    (0 for a pattern without counted repeats). A conservative count: it reads escapes, classes and groups, and
    treats every other character as an atom."""
    expanded: list[int] = [0]  # per open group: its size with repeats expanded
    last = 0  # expanded size of the atom or group a quantifier would apply to
    written = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i, last = i + 2, 1
        elif c == "[":
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"  # a leading ] is literal
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, last = j + 1, 1
        elif c == "(":
            expanded.append(0)
            i, last = i + 1, 0
            continue
        elif c == ")":
            last = max(expanded.pop(), 1) if len(expanded) > 1 else 1
            i += 1
        elif c == "{" and (m := _REPEAT.match(pattern, i)) and (m.group(1) or m.group(2)):
            low = m.group(1) or "0"
            copies = int(low) if len(low) <= _MAX_DIGITS else 10**_MAX_DIGITS
            expanded[-1] += last * (max(copies, 1) - 1)
            i, last = m.end(), 0
            continue
        else:
            i, last = i + 1, 1
        written += 1
        expanded[-1] += last
    while len(expanded) > 1:  # an unclosed group (compile refuses it): count what it holds
        inner = expanded.pop()
        expanded[-1] += inner
    return max(expanded[0] - written, 0)
