"""The steps of ``load``: find the record, rebuild or check the base model, read the plan, and
refuse whatever does not fit, each with a ``RecordError`` that says what to do (the weights:
``weights.py``).

Nothing named by a file is imported. The base model is the caller's ``base_model``, a built-in
preset (rebuilt by its registered name), or a diffusers model class looked up as an attribute of
the installed ``diffusers`` package; a record's ``model_class`` is compared with that class
without importing anything it names (:func:`names_class`).

``save.load`` calls them in order; nothing here changes the base model, so a refused folder
leaves it unconverted.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from dynconvert.analysis.convmlp import routable_conv
from dynconvert.analysis.graph import linear_like, routable_linear
from dynconvert.config import ConvertConfig
from dynconvert.errors import RecordError
from dynconvert.fields import shown
from dynconvert.io.files import is_link, link_error
from dynconvert.io.limits import read_json
from dynconvert.io.record import RECORD, current_file
from dynconvert.plan import Plan
from dynconvert.runtime.state import is_converted


def record_folder(path: Path) -> Path:
    """The folder holding the record: ``path``, or the one component of a pipeline folder that
    has one (``pipe.save_pretrained`` writes each component into its own subfolder).

    Example:
        >>> record_folder(Path("out/pipeline"))  # doctest: +SKIP
        PosixPath('out/pipeline/transformer')
    """
    if os.path.lexists(path / RECORD) or not (path / "model_index.json").is_file():
        return path
    found = [sub for sub in sorted(path.iterdir()) if os.path.lexists(sub / RECORD)]
    if len(found) == 1:
        if is_link(found[0]):
            raise RecordError(str(link_error(found[0])))
        return found[0]
    if not found:
        raise RecordError(
            f"the pipeline folder {path} holds no converted component ({RECORD} in a subfolder)"
        )
    names = ", ".join(sub.name for sub in found)
    raise RecordError(
        f"the pipeline folder {path} holds several converted components ({names}); "
        "pass one subfolder"
    )


def rebuild_base(record: dict[str, Any], directory: Path) -> nn.Module:
    """A fresh original model from the record alone: its built-in preset, or a diffusers model
    from the folder's config.json.

    Raises:
        RecordError: Neither is possible; the message asks for ``base_model=``.

    Example:
        >>> base = rebuild_base(read_record("runs/digits"), Path("runs/digits"))  # doctest: +SKIP
    """
    if record.get("preset"):
        from dynconvert.models import build_model

        kwargs = record.get("preset_kwargs", {})
        try:
            return build_within(lambda: build_model(record["preset"], **kwargs), directory, record)
        except (TypeError, ValueError, RuntimeError) as e:  # kwargs the preset does not take
            raise RecordError(
                f"the record in {directory} cannot rebuild its model ({shown(str(e), 200)[1:-1]}"
                "); save the model again"
            ) from None
    if os.path.lexists(directory / current_file(directory, record["weights"], "config.json")):
        return _base_from_config(directory, record)
    raise RecordError(
        f"the record in {directory} is for {record['model_class']}, which is not a built-in "
        "preset; pass base_model= a freshly built original (e.g. from_pretrained)"
    )


def _base_from_config(directory: Path, record: dict[str, Any]) -> nn.Module:
    """A fresh diffusers model of the record's class built from the folder's config.json."""
    model_class = record["model_class"]
    cls = diffusers_class(model_class)
    if cls is None:
        raise RecordError(
            f"the record in {directory} names the class {shown(model_class, 100)}, which is not "
            "a model class of the installed diffusers; dynconvert imports no class a file names: "
            "pass base_model= a freshly built original (e.g. from_pretrained)"
        )
    name = current_file(directory, record["weights"], "config.json")
    config = read_json(directory / name, RecordError, root=directory)
    if not isinstance(config, dict):
        raise RecordError(f"{directory / name} is not a mapping; save the model again")
    try:
        return build_within(lambda: cls.from_config(config), directory, record)
    except RecordError:
        raise
    except Exception as e:  # diffusers checks a config in many ways
        raise RecordError(
            f"cannot build {cls.__name__} from {directory / name} ({shown(str(e), 120)}); pass "
            "base_model= a freshly built original (e.g. from_pretrained)"
        ) from None


class _TooLarge(Exception):
    """A model being built has more parameters than its weights files can hold."""


def build_within(build: Callable[[], nn.Module], directory: Path, record: dict) -> nn.Module:
    """``build()``, refused before it allocates more than the folder's weights could fill.

    A record's preset arguments or a config.json can ask for any size (``hidden_size=2**20``
    asks for terabytes, ``depth=10**6`` for minutes of building). Every weight the model has
    is in its weights files, so the parameters a file-described model may have are bounded
    by those files' sizes: bytes (in the record's dtype) and tensors (each has a header entry
    of more than 32 bytes). The model is first built on the meta device (nothing allocated),
    stopped at the first parameter past either bound, then built for real.

    Raises:
        RecordError: The model would be larger than its weights files.

    Example:
        >>> model = build_within(tiny_dit, Path("runs/digits"), record)  # doctest: +SKIP
    """
    info = record["weights"]
    limit = 0
    for name in [info["file"], *info.get("shards", [])]:
        try:  # lstat: a link counts its own few bytes (it is refused when read)
            limit += os.lstat(directory / current_file(directory, info, name)).st_size
        except OSError:
            pass
    dtype = getattr(torch, str(record.get("dtypes", {}).get("model")), None)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 1  # "mixed": the least
    owner, seen = threading.get_ident(), set()
    size = [0, 0]  # bytes, tensors of the parameters registered so far

    def count(module: nn.Module, name: str, param: Any) -> None:
        if param is None or threading.get_ident() != owner or id(param) in seen:
            return  # the hook is global: another thread's models are not counted
        seen.add(id(param))
        size[0] += param.numel() * itemsize
        size[1] += 1
        if size[0] > limit or size[1] * 32 > limit:
            raise _TooLarge

    handle = register_module_parameter_registration_hook(count)
    try:
        try:
            with torch.device("meta"):
                build()
        except _TooLarge:
            raise
        except Exception:  # noqa: S110 (a model that cannot be built on meta: counted for real)
            pass
        seen.clear()
        size[:] = [0, 0]
        return build()
    except _TooLarge:
        raise RecordError(
            f"the model the record in {directory} describes has more parameters than its "
            f"weights files hold ({limit} bytes); it is not a folder dynconvert wrote, or it is "
            "corrupt: save the model again"
        ) from None
    finally:
        handle.remove()


def diffusers_class(path: str) -> type | None:
    """The diffusers model class a dotted path names, looked up by its last part as an
    attribute of the installed ``diffusers`` package (never imported by its path), or None.

    Example:
        >>> diffusers_class("diffusers.models.x.DiTTransformer2DModel").__name__
        'DiTTransformer2DModel'
        >>> diffusers_class("payload.Model") is None
        True
    """
    module, _, name = path.rpartition(".")
    if module.split(".")[0] != "diffusers" or not name.isidentifier() or name.startswith("_"):
        return None
    try:
        import diffusers
    except ImportError:
        return None
    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # diffusers' lazy module imports the class's own module here
        return None
    ok = isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)
    return cls if ok else None


def check_base(base_model: nn.Module, record: dict[str, Any], directory: Path) -> None:
    """Refuse a base model that is converted already or of another class than the record's.

    The record's class path may be an older name of the same class (:func:`names_class`).

    Example:
        >>> folder = Path("runs/digits")
        >>> check_base(tiny_dit(), read_record(folder), folder)  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        dynconvert.errors.RecordError: the record in runs/digits is for ..., but base_model is ...
    """
    if is_converted(base_model):
        raise RecordError("base_model is already converted; pass a freshly built original model")
    cls = type(base_model)
    if not names_class(record["model_class"], cls):
        raise RecordError(
            f"the record in {directory} is for {shown(record['model_class'], 100)[1:-1]}, but "
            f"base_model is {cls.__module__}.{cls.__qualname__}; pass the model it was saved from"
        )


def names_class(path: str, cls: type) -> bool:
    """Whether the dotted ``path`` a record holds names ``cls``, importing nothing.

    It does when it is ``cls``'s own path; or when its module, mapped through dynconvert's
    table of moved modules (``dynconvert.MOVED``), is already imported and holds ``cls`` under
    that name (a module that moved, or a package that re-exports the class); or when it is a
    diffusers path whose class name is ``cls`` in the installed ``diffusers``.

    Example:
        >>> from dynconvert.models.dit import DiT
        >>> names_class("dynconvert.models.dit.DiT", DiT), names_class("payload.DiT", DiT)
        (True, False)
    """
    if path == f"{cls.__module__}.{cls.__qualname__}":
        return True
    module, _, name = path.rpartition(".")
    package = sys.modules.get("dynconvert")
    moved = vars(package).get("MOVED", {}) if package is not None else {}
    for old, new in moved.items():
        if module == old or module.startswith(old + "."):
            module = new + module[len(old) :]
            break
    held = sys.modules.get(module)
    if held is not None and vars(held).get(name) is cls:
        return True
    return diffusers_class(path) is cls


def plan_and_config(record: dict[str, Any], directory: Path) -> tuple[Plan, ConvertConfig]:
    """The record's plan (an older plan version is migrated by ``Plan.from_dict``) and its
    convert settings.

    Raises:
        RecordError: Either does not parse.

    Example:
        >>> plan, config = plan_and_config(record, Path("runs/digits"))  # doctest: +SKIP
    """
    try:
        plan = Plan.from_dict(record["plan"])
        cfg = dict(record["config"])
        from dynconvert.analysis.importance import IMPORTANCE

        if cfg.get("importance") not in IMPORTANCE:
            cfg["importance"] = "magnitude"  # the chosen units are in the record
        config = ConvertConfig.from_dict(cfg)
    except (TypeError, KeyError, ValueError) as e:
        raise RecordError(
            f"the record in {directory} is corrupt ({e}); save the model again"
        ) from e
    return plan, config


def check_plan_matches(plan: Plan, model: nn.Module) -> None:
    """Refuse a plan whose sites name Linears (or modules) this model lacks or has smaller,
    give a unit indices outside its Linear, or lower head-count attributes the module does
    not hold with the value the plan implies.

    Example:
        >>> check_plan_matches(plan, base_model)  # doctest: +SKIP
    """
    modules = dict(model.named_modules())
    other = "the record is from another model, or it is corrupt"
    for s in plan.sites:
        if s.name and s.name not in modules:
            raise RecordError(
                f"the record refers to module {shown(s.name, 100)}, missing here; {other}"
            )
        for m in s.maps():
            lin = modules.get(m.linear)
            if lin is None or not (routable_linear(lin) or linear_like(lin) or routable_conv(lin)):
                raise RecordError(
                    f"the record refers to {shown(m.linear, 100)}, which this model does not "
                    f"have as an nn.Linear; {other}"
                )
            if not _map_fits(m, lin.weight.shape[0 if m.axis == "rows" else 1]):
                raise RecordError(f"the record's units of {m.linear} do not fit it; {other}")
        for attr, per in getattr(s, "head_attrs", {}).items():
            if not _head_attr_fits(modules.get(s.name), attr, per, s.units):
                raise RecordError(
                    f"the record lowers {shown(attr, 60)} of {s.name}, which does not hold "
                    f"{s.units} units of {shown(per, 20)}; {other}"
                )


def _is_index(v: Any, size: int, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < size


def _map_fits(m: Any, size: int) -> bool:
    """Whether every index a unit map gives lies in ``[0, size)``, checked by arithmetic (a
    crafted map of 10**9 indices is never listed)."""
    if m.axis not in ("rows", "cols") or not _is_index(m.units, size + 1, 1):
        return False
    if not isinstance(m.keep, list) or not all(_is_index(i, size) for i in m.keep):
        return False
    if m.explicit is not None:
        parts = m.explicit if isinstance(m.explicit, list) else None
        return parts is not None and all(
            isinstance(p, list) and len(p) == m.units and all(
                isinstance(u, list) and all(_is_index(i, size) for i in u) for u in p
            )
            for p in parts
        )  # fmt: skip
    for part in m.parts:
        if len(part) != 3 or not all(_is_index(v, size + 1) for v in part):
            return False
        base, stride, width = part
        if base + (m.units - 1) * stride + width > size:
            return False
    return True


def _head_attr_fits(module: nn.Module | None, attr: Any, per: Any, units: int) -> bool:
    """Whether ``attr`` (``"heads"`` or ``"attn.heads"``) is an integer attribute of
    ``module`` equal to ``units * per``: the runtime sets it to (active units) x ``per`` per
    call, so a name the analysis would not give (``forward``, ``__class__``) is refused."""
    if module is None or not isinstance(attr, str) or not _is_index(per, 2**31, 1):
        return False
    owner: Any = module
    *path, name = attr.split(".")
    for part in path:
        owner = owner._modules.get(part) if part.isidentifier() else None
        if owner is None:
            return False
    if not name.isidentifier() or name.startswith("_"):
        return False
    value = getattr(owner, name, None)
    return isinstance(value, int) and not isinstance(value, bool) and value == units * per
