"""Measuring converted models: ``bench.py`` (speed, original against converted in one process),
``support.py`` (the support matrix over the zoo of tiny models) and ``evaluations.py`` (named
quality evaluations a run performs, such as the digits demo's)."""
