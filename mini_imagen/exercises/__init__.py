"""Self-checks for the lessons' exercises: each says *right* or *not yet*, and why.

One module per lesson (``lesson00.py``, ``lesson01.py``, ...); this file holds the two helpers they share.

A check never raises on a wrong answer (a lesson must still run top to bottom); it prints one
line and returns ``True`` / ``False``. An unfinished exercise (a function that raises
``NotImplementedError`` or returns ``None``) is reported as "not yet attempted".
"""

from __future__ import annotations

from typing import Any, Callable



def _report(ok: bool, name: str, detail: str = "") -> bool:
    mark = "right" if ok else "not yet"
    print(f"[{mark}] {name}" + (f": {detail}" if detail else ""))
    return ok


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    try:
        result = fn(*args)
    except NotImplementedError:
        return None, "not attempted yet (the function raises NotImplementedError)"
    except Exception as error:  # a student's bug is feedback, not a crash
        return None, f"your function raised {type(error).__name__}: {error}"
    if result is None:
        return None, "not attempted yet (the function returns None)"
    return result, None


__all__ = ["_report", "_attempt"]
