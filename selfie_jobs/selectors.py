"""Layer and token selections written as text, one grammar for the API, the Python client and the CLI.

    "all"            every index
    "0,4,-1"         these indices (negative tokens count from the end)
    "0:31:5", "-3:"  a range with Python-slice semantics: start inclusive (default 0), stop exclusive (default: to
                     the end), step (default 1)

`parse_selector` turns the text into the JSON form the job request takes ("all", a list, or
{"start", "stop", "step"}); the request schema (`selfie_jobs.specs.Targets`) then checks the bounds.
"""

from __future__ import annotations

import re

# ASCII digits only, as every number this API reads from text: int() also takes "１", "٣" and "1_0"
_INDEX = re.compile(r"[+-]?[0-9]+")

FORMS = 'use "all", a list "0,4,-1" or a range "start:stop:step" such as "0:31:5" or "-3:"'


def _index(text: str, whole: str) -> int:
    if _INDEX.fullmatch(text) and len(text) <= 20:  # 20 characters hold every index a model can have
        return int(text)
    where = "" if text == whole else f" in {whole!r}"
    raise ValueError(f"bad index {text!r}{where}: {FORMS}")


def parse_selector(text: str) -> str | list[int] | dict[str, int | None]:
    """"all", a list of indices or a {start, stop, step} range from its text form; ValueError says what is wrong."""
    if text.strip() == "all":
        return "all"
    if ":" in text:
        parts = [p.strip() for p in text.split(":")]
        if len(parts) > 3:
            raise ValueError(f"bad range {text!r}: use start:stop:step, e.g. \"0:31:5\" or \"-3:\"")
        start, stop, step = (_index(p, text) if p else None for p in (parts + ["", ""])[:3])
        if step is not None and step < 1:
            raise ValueError(f"bad range {text!r}: the step must be 1 or more (ranges run upward), e.g. \"0:31:5\"")
        return {"start": 0 if start is None else start, "stop": stop, "step": 1 if step is None else step}
    indices = [_index(v, text) for v in text.replace(" ", "").split(",") if v]
    if not indices:
        raise ValueError(f"bad selection {text!r}: {FORMS}")
    return indices
