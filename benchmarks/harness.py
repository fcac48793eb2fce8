"""What every benchmark script shares: progress on stderr (:func:`log`), one JSON line per measurement on stdout
(:func:`emit`), and the machine's load when it was taken (:func:`loadavg`). Scripts run as ``python
benchmarks/NAME.py``, so ``from harness import ...`` finds this file."""

from __future__ import annotations

import json
import os
import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def loadavg() -> float | None:
    """1-minute load average: numbers taken on a busy machine (load above the threads used) are provisional."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
