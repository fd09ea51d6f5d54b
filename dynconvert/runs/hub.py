"""Whether a model's weights can come from the Hugging Face hub, found out once and fast.

Without a network, loading from the hub retries for about 30 s and then blames a missing
``config.json``. Before any such load, :func:`hub_problem` answers from what is on this machine
(the local hub cache, ``HF_HUB_OFFLINE``) and, failing that, from one TCP connect to the hub (or
to the configured HTTPS proxy) bounded by :data:`CONNECT_TIMEOUT_S`, DNS lookup included. The
answer is kept for the rest of the process.

Example:
    >>> import os
    >>> os.environ["HF_HUB_OFFLINE"] = "1"
    >>> hub_problem("facebook/DiT-XL-2-256", "transformer/config.json")  # doctest: +SKIP
    'HF_HUB_OFFLINE is set'
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request

CONNECT_TIMEOUT_S = 3.0
"""Longest wait for the one connect that tells whether the hub can be reached."""

DEFAULT_ENDPOINT = "https://huggingface.co"

_ANSWERS: dict[tuple[str, int], bool] = {}  # (host, port) -> reachable, once per process


def offline_requested() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks huggingface_hub to stay off the network.

    Example:
        >>> isinstance(offline_requested(), bool)
        True
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def in_cache(repo: str, filename: str) -> bool:
    """Whether ``filename`` of ``repo`` is in the local hub cache (no network).

    Example:
        >>> in_cache("no-such/repository", "config.json")
        False
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return False
    return isinstance(try_to_load_from_cache(repo, filename), str)


def endpoint() -> tuple[str, int]:
    """(host, port) a hub download first connects to: the HTTPS proxy when one is set.

    Example:
        >>> isinstance(endpoint()[1], int)
        True
    """
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            return proxy_url.hostname, proxy_url.port or 8080
    return host, url.port or (443 if url.scheme == "https" else 80)


def can_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether one TCP connect to ``host:port`` succeeds within ``timeout`` seconds in all.

    The DNS lookup has no timeout of its own, so the connect runs in a daemon thread that is
    left behind when it takes too long.

    Example:
        >>> can_connect("localhost", 9, timeout=0.5)  # doctest: +SKIP
        False
    """
    answer: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=attempt, name="dynconvert-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    """Whether a download from the hub can start now: no ``HF_HUB_OFFLINE`` and it answers.

    Example:
        >>> isinstance(hub_reachable(), bool)  # doctest: +SKIP
        True
    """
    if offline_requested():
        return False
    where = endpoint()
    if where not in _ANSWERS:
        _ANSWERS[where] = can_connect(*where)
    return _ANSWERS[where]


def hub_problem(repo: str, filename: str) -> str | None:
    """Why ``filename`` of ``repo`` cannot be loaded now, or None when it can.

    None when the file is in the local cache or the hub answers; otherwise a short reason
    (``HF_HUB_OFFLINE is set``, ``huggingface.co:443 cannot be reached``).

    Example:
        >>> hub_problem("facebook/DiT-XL-2-256", "transformer/config.json")  # doctest: +SKIP
        'huggingface.co:443 cannot be reached'
    """
    if in_cache(repo, filename):
        return None
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    if hub_reachable():
        return None
    host, port = endpoint()
    return f"{host}:{port} cannot be reached"
