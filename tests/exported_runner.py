"""Run an export folder with torch alone and compare it with reference outputs (tests' helper).

    python tests/exported_runner.py EXPORT_DIR CASES.pt RESULT.json

Run as a script, ``import dynconvert`` is made to fail before anything else, so the check proves
the folder needs only torch (and onnxruntime for ONNX programs). CASES.pt holds
``[(kwargs, reference), ...]`` (torch.save); RESULT.json gets the largest difference, the load
time, the overflow count and how the loader answered a timestep outside the schedule (refused,
then run with nearest=True). ``check`` is the same comparison in the calling process (the
default suite's pt2 test: a fresh interpreter costs more than the export itself).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.modules["dynconvert"] = None  # import dynconvert now raises ImportError

import torch  # noqa: E402


def check(folder, cases) -> dict:
    """Load the folder's own run_exported.py, run every case; the result dict (see above)."""
    spec = importlib.util.spec_from_file_location("run_exported", Path(folder) / "run_exported.py")
    run_exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_exported)
    t0 = time.perf_counter()
    model = run_exported.load(folder)
    load_s = time.perf_counter() - t0
    diffs = []
    with torch.no_grad():
        for kwargs, ref in cases:
            diffs.append(float((model(**kwargs).float() - ref.float()).abs().max()))
    overflow = list(model.overflow())  # over the cases only
    kwargs = dict(cases[0][0])
    name = ".".join(map(str, model.manifest["inputs"]["timestep"]))
    off = max(model.timesteps) + 0.5
    kwargs[name] = torch.full_like(kwargs[name].float(), off)
    try:
        model(**kwargs)
        refused = ""
    except run_exported.ExportedModelError as e:
        refused = str(e)
    nearest = run_exported.load(folder, nearest=True, lazy=True)  # reads one program only
    with torch.no_grad():
        near = nearest(**kwargs)
    return {
        "max_diff": max(diffs),
        "diffs": diffs,
        "load_s": load_s,
        "overflow": overflow,
        "refused": refused,
        "nearest_shape": list(near.shape),
    }


def main(folder: str, cases_path: str, result_path: str) -> None:
    try:
        import dynconvert  # noqa: F401

        blocked = False
    except ImportError:
        blocked = True
    result = check(folder, torch.load(cases_path, weights_only=True))
    result["dynconvert_blocked"] = blocked
    result["modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] == "dynconvert" and sys.modules[m]
    )
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
