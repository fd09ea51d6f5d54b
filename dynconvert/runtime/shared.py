"""What threads calling one converted model share safely: a lock for the caches they fill, and
a per-thread slot for what a shared runtime keeps between calls (a leaf module: the runtime
modules and the caches import it).

Example:
    >>> with SharedLock():
    ...     pass
"""

from __future__ import annotations

import threading
from typing import Any


class PerThread(threading.local):
    """Values a shared runtime keeps per thread across calls (each attribute None until set in
    that thread); a copy or a pickle starts empty.

    Example:
        >>> import copy
        >>> slot = PerThread()
        >>> slot.value = 3
        >>> slot.value, copy.deepcopy(slot).value
        (3, None)
    """

    value: Any = None
    fast: Any = None

    def __reduce__(self) -> tuple:
        return (type(self), ())


class SharedLock:
    """A re-entrant lock for state every thread shares (caches filled on a miss); a copy or a
    pickle of its owner gets a new, free lock."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def __reduce__(self) -> tuple:
        return (SharedLock, ())
