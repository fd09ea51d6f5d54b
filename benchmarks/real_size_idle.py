"""Issue 20's timing bar on an idle machine: build + analyse + convert one family on meta.

Run (one family per process, nothing else running):
    for n in sd3.5-large flux1-dev qwen-image wan2.1-t2v-14b; do
        PYTHONPATH=. python benchmarks/real_size_idle.py $n; done
Prints one JSON line per family (wall and CPU seconds, peak memory, routable share, minimum).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from dynconvert.measure.realsize import real_size_row

KEYS = ("seconds", "cpu_s", "peak_rss_gb", "routable", "min_ratio", "error")

if __name__ == "__main__":
    torch.set_num_threads(2)
    name = sys.argv[1]
    load = os.getloadavg()[0]  # the row says how quiet the machine was when it started
    row = real_size_row(name)
    print(json.dumps({"name": name, "load_before": round(load, 2), **{k: row[k] for k in KEYS}}))
