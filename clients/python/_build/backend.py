"""A minimal PEP 517 backend (standard library only) for this pure-Python package, so that
`pip install clients/python` works without internet: pip's build isolation would otherwise download
setuptools. It reads the [project] table of pyproject.toml and packs src/telemetry_agent."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "telemetry_agent"
SDIST_FILES = ["pyproject.toml", "README.md", "requirements-dev.txt", "bench.py", "_build/backend.py"]
SDIST_DIRS = ["src", "tests"]


def _project() -> Dict[str, Any]:
    """The [project] table. Python 3.9/3.10 have no tomllib, so this reads the subset the file uses: string
    and string-array values (TOML's basic strings and arrays of them are Python literals too)."""
    try:
        import tomllib  # type: ignore[import-not-found]

        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            return dict(tomllib.load(f)["project"])
    except ImportError:
        pass
    table: Dict[str, Any] = {}
    section = None
    pending_key: Optional[str] = None
    pending_text = ""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if pending_key is not None:
                pending_text += " " + line
                if pending_text.count("[") == pending_text.count("]"):
                    table[pending_key] = ast.literal_eval(pending_text)
                    pending_key = None
                continue
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line.strip("[]").strip()
                continue
            if section != "project":
                continue
            key, _, value = (part.strip() for part in line.partition("="))
            if value.startswith("[") and value.count("[") != value.count("]"):
                pending_key, pending_text = key, value
            else:
                table[key] = ast.literal_eval(value)
    return table


def _names() -> Tuple[str, str, Dict[str, Any]]:
    project = _project()
    dist = re.sub(r"[-_.]+", "_", project["name"]).lower()
    return dist, project["version"], project


def _metadata(project: Dict[str, Any]) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
        f"Summary: {project.get('description', '')}",
        f"Requires-Python: {project.get('requires-python', '>=3.9')}",
    ]
    if project.get("license"):
        lines.append(f"License: {project['license']}")
    lines += [f"Classifier: {c}" for c in project.get("classifiers", [])]
    lines += [f"Requires-Dist: {d}" for d in project.get("dependencies", [])]
    readme = project.get("readme")
    body = ""
    if readme:
        lines.append("Description-Content-Type: text/markdown")
        with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
            body = f.read()
    return "\n".join(lines) + "\n\n" + body


def _package_files() -> List[Tuple[str, str]]:
    """(path on disk, path in the wheel) of every file of the package."""
    base = os.path.join(ROOT, "src")
    out = []
    for folder, dirs, files in os.walk(os.path.join(base, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(folder, name)
            out.append((path, os.path.relpath(path, base).replace(os.sep, "/")))
    return out


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _dist_info(dist: str, version: str, project: Dict[str, Any]) -> List[Tuple[str, bytes]]:
    info = f"{dist}-{version}.dist-info"
    wheel = "Wheel-Version: 1.0\nGenerator: telemetry-agent in-tree backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    return [(f"{info}/METADATA", _metadata(project).encode()), (f"{info}/WHEEL", wheel.encode())]


def _write_wheel(wheel_directory: str, contents: List[Tuple[str, bytes]], dist: str, version: str) -> str:
    name = f"{dist}-{version}-py3-none-any.whl"
    record_name = f"{dist}-{version}.dist-info/RECORD"
    records = [f"{path},{_record_hash(data)},{len(data)}" for path, data in contents] + [f"{record_name},,"]
    epoch = (1980, 1, 1, 0, 0, 0)  # reproducible
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in contents + [(record_name, ("\n".join(records) + "\n").encode())]:
            entry = zipfile.ZipInfo(path, epoch)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(entry, data)
    return name


def get_requires_for_build_wheel(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def get_requires_for_build_sdist(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def get_requires_for_build_editable(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def build_wheel(
    wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None
) -> str:
    dist, version, project = _names()
    contents = []
    for path, arcname in _package_files():
        with open(path, "rb") as f:
            contents.append((arcname, f.read()))
    return _write_wheel(wheel_directory, contents + _dist_info(dist, version, project), dist, version)


def build_editable(
    wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None
) -> str:
    """`pip install -e`: a .pth file pointing at src/."""
    dist, version, project = _names()
    pth = (os.path.join(ROOT, "src") + "\n").encode()
    return _write_wheel(wheel_directory, [(f"_{dist}.pth", pth)] + _dist_info(dist, version, project), dist, version)


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    dist, version, project = _names()
    base = f"{dist}-{version}"
    name = f"{base}.tar.gz"
    paths = [p for p in SDIST_FILES if os.path.exists(os.path.join(ROOT, p))]
    for folder in SDIST_DIRS:
        for here, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            paths += sorted(
                os.path.relpath(os.path.join(here, f), ROOT) for f in files if not f.endswith((".pyc", ".pyo"))
            )
    pkg_info = _metadata(project).encode()
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for rel in paths:
            with open(os.path.join(ROOT, rel), "rb") as f:
                _add(tar, f"{base}/{rel}", f.read())
        _add(tar, f"{base}/PKG-INFO", pkg_info)
    return name


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))
