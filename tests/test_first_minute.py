"""The first minute of a new user (issue 19): help without torch, every missing requirement of
``convert`` in one line, no hub retries without a network, and a sample grid that says which
side is which. No test here touches the network: HF_HUB_OFFLINE or a stubbed connect."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from dynconvert.cli import app
from dynconvert.errors import CheckpointError, ConfigError, DataError
from dynconvert.runs import RunRequest, hub, prepare_run, resolve_source, weights_problem

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def no_hub(monkeypatch):
    """A machine whose hub cache is empty and where the hub never answers; counts the connects."""
    calls: list[tuple[str, int]] = []

    def refused(host: str, port: int, timeout: float = hub.CONNECT_TIMEOUT_S) -> bool:
        calls.append((host, port))
        return False

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_ANSWERS", {})
    monkeypatch.setattr(hub, "in_cache", lambda repo, filename: False)
    monkeypatch.setattr(hub, "can_connect", refused)
    return calls


# Runs the command line's help and version in a fresh interpreter and names every heavy module
# they imported: the first minute of a new user must not wait for torch (issue 19).
NO_TORCH = """
import sys
from dynconvert.cli import main
for argv in ([], ["inspect"], ["convert"], ["sample"], ["bench"], ["recipes"], ["recipes", "show"]):
    sys.argv = ["dynconvert", *argv, "--help"]
    try:
        main()
    except SystemExit:
        pass
heavy = ("torch", "diffusers", "numpy", "dynconvert.analysis", "dynconvert.runs")
print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy)))
"""


def test_help_and_version_do_not_import_torch():
    """``python -m dynconvert --help`` / ``--version`` and every command's help skip torch."""
    for args in (["--help"], ["--version"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dynconvert", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
        assert "dynconvert.cli.app" in imported  # the check reads the real import list
        assert not {"torch", "diffusers", "numpy"} & imported, args
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_every_missing_requirement_of_convert_is_named_in_one_line(tmp_path):
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1"}
    line = one_line_error(invoke("convert", "--model", "dit-xl", "--out", out, env=env))
    assert "2 things are missing to convert dit-xl: (1) " in line and "; (2) " in line
    assert "--data synthetic" in line and "no network: pass --checkpoint" in line
    assert "--random-init" in line and "HF_HUB_OFFLINE" in line and "`" not in line
    assert "DiT-XL-2-256x256.pt" in line
    line = one_line_error(invoke("convert", "--model", "dit-s", "--out", out))
    assert "2 things are missing to convert dit-s" in line and "--data" in line
    assert "no weights to start from" in line
    assert not out.exists()


def test_one_missing_requirement_keeps_its_own_error_class(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(DataError, match="needs calibration data"):
        prepare_run(RunRequest(model="dit-s", random_init=True, out=out))
    with pytest.raises(CheckpointError, match="no weights to start from"):
        prepare_run(RunRequest(model="dit-s", data="synthetic", out=out))
    with pytest.raises(ConfigError, match=r"\(1\) .*; \(2\) "):
        prepare_run(RunRequest(model="dit-s", out=out))
    assert not Path(out).exists()


def test_an_unreachable_hub_is_found_once_without_a_download(no_hub, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing it would fail the test
    request = RunRequest(model="dit-xl", data="synthetic", target_flops=0.5,
                         out=str(tmp_path / "run"))  # fmt: skip
    for _ in range(2):
        with pytest.raises(CheckpointError, match="no network: pass `checkpoint`") as info:
            prepare_run(request)
        assert "huggingface.co:443 cannot be reached" in str(info.value)
    source = resolve_source("dit-xl")
    assert source.weights == "hub" and "no network" in weights_problem(source)
    with pytest.raises(CheckpointError, match="no network"):
        source.build()
    assert no_hub == [("huggingface.co", 443)]  # asked once, for the whole process
    assert weights_problem(resolve_source("dit-xl", random_init=True)) is None
    assert not (tmp_path / "run").exists()


def test_cached_hub_weights_load_from_the_cache_without_a_network(no_hub, monkeypatch):
    from dynconvert.testing import tiny_dit

    seen = {}

    class FromCache:
        @staticmethod
        def from_pretrained(repo, **kwargs):
            seen.update(kwargs, repo=repo)
            model = tiny_dit()
            model.config = {"sample_size": 8}  # as a diffusers model has
            return model

    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(DiTTransformer2DModel=FromCache))
    monkeypatch.setattr(hub, "in_cache", lambda repo, filename: True)
    source = resolve_source("dit-xl")
    assert weights_problem(source) is None
    source.build()
    assert seen["repo"] == "facebook/DiT-XL-2-256" and seen["local_files_only"] is True
    assert no_hub == [("huggingface.co", 443)]


def test_the_hub_check_follows_the_endpoint_and_the_proxy(no_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    assert hub.endpoint() == ("hub.example", 8443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub.endpoint() == ("proxy.example", 3128)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_problem("facebook/DiT-XL-2-256", "config.json") == "HF_HUB_OFFLINE is set"
    assert no_hub == []  # HF_HUB_OFFLINE: not even one connect


def test_a_connect_that_hangs_is_given_up_after_the_timeout(monkeypatch):
    release = threading.Event()

    def hang(address, timeout=None):
        release.wait(10)
        raise OSError("gave up")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    start = time.perf_counter()
    assert hub.can_connect("hub.example", 443, timeout=0.2) is False
    assert time.perf_counter() - start < 5  # the hanging lookup is left behind
    release.set()


def test_sample_names_every_missing_option_at_once():
    line = one_line_error(invoke("sample"))
    assert "--run DIR" in line and "--out FILE.png" in line
    line = one_line_error(invoke("sample", "--out", "grid.png"))
    assert "--run DIR" in line and "--out" not in line.split("needs", 1)[1]
    assert "--keep" in one_line_error(invoke("bench", "--model", "dit-tiny"))
