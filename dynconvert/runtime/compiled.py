"""The fast path under ``torch.compile``: its per-site host work runs eagerly.

On the fast path every site decides on the host (which heads, which channel groups, which
tokens) and keeps what it decided in the call, keyed by the site. Traced by dynamo, that Python
becomes guards on values that differ from site to site (the site's index in the call's
progress, its Linears' names, its head count), and blocks share their code: a model with more
sites of a kind than dynamo's recompile limit (8) recompiled each shared frame once per site
until the limit, then ran it uncompiled. So while dynamo traces a fast call, a routed Linear's
forward, an attention's hooks and its head-count attributes run eagerly (``run_eagerly``, a
``torch.compiler.disable``d call): what crosses into the traced code is tensors and ints only,
which dynamo's automatic dynamic shapes generalise after the first site that differs. A routing
pattern then compiles a few times on its first call and nothing on later calls.

The planned path keeps tracing them: its shapes are fixed per pattern, so it compiles whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def eager_now(bank: Any | None) -> bool:
    """Whether dynamo is tracing a call of ``bank`` (a RouterBank; None: no bank) whose
    execution mode runs the sites' routing eagerly under compile (``compiled_eagerly``: the
    fast path). In an eager call it is one flag read, and False.

    Example:
        >>> eager_now(None)  # not tracing, or nothing routed
        False
    """
    if not torch.compiler.is_compiling() or bank is None:
        return False
    return bank.current_call().execution.compiled_eagerly


@torch.compiler.disable  # the one place dynamo steps out: a graph break, then eager Python
def run_eagerly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` outside dynamo's trace (inside it, ``is_compiling()`` is False,
    so a method that called it through :func:`eager_now` runs its own body).

    Example:
        >>> run_eagerly(max, 2, 3)
        3
    """
    return fn(*args, **kwargs)
