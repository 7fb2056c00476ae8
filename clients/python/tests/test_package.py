"""The package: lint-clean, installable without internet (the in-tree build backend), stdlib only."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile

from conftest import CLIENT_DIR


def test_ruff_check_and_format_are_clean():
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=CLIENT_DIR, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_pip_installs_it_without_an_index(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-index", "--no-cache-dir", str(CLIENT_DIR)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    probe = "import telemetry_agent as t, sys; print(t.__file__); print(sorted(sys.modules))"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    path, modules = out.stdout.splitlines()
    assert str(venv) in path, path
    foreign = [m for m in eval(modules) if m.split(".")[0] in ("setuptools", "pkg_resources", "mysql", "redis")]
    assert not foreign, foreign


def test_the_backend_builds_a_pure_wheel_and_an_sdist(tmp_path):
    sys.path.insert(0, str(CLIENT_DIR / "_build"))
    try:
        import backend
    finally:
        sys.path.pop(0)
    wheel = zipfile.ZipFile(tmp_path / backend.build_wheel(str(tmp_path)))
    names = set(wheel.namelist())
    assert "telemetry_agent/py.typed" in names and "telemetry_agent/client.py" in names
    assert "telemetry_agent_client-0.1.0.dist-info/RECORD" in names
    metadata = wheel.read("telemetry_agent_client-0.1.0.dist-info/METADATA").decode()
    assert "Name: telemetry-agent-client" in metadata and "Requires-Dist" not in metadata
    assert "Tag: py3-none-any" in wheel.read("telemetry_agent_client-0.1.0.dist-info/WHEEL").decode()
    sdist = tarfile.open(tmp_path / backend.build_sdist(str(tmp_path)))
    members = set(sdist.getnames())
    base = "telemetry_agent_client-0.1.0"
    for name in ("pyproject.toml", "PKG-INFO", "_build/backend.py", "src/telemetry_agent/__init__.py"):
        assert f"{base}/{name}" in members, name
