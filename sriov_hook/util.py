"""Small helpers with no heavy imports."""
from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], Optional[T]], timeout: float, step: float = 0.02) -> Optional[T]:
    """Poll ``check`` until it returns non-None or ``timeout`` passes (every wait is bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None or time.monotonic() >= deadline:
            return got
        time.sleep(step)
