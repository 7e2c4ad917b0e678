"""Packaging: the wheel carries the compiled hot path and installs cleanly."""

from __future__ import annotations

import email
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import BACKEND, ROOT, free_port, pid_alive, port_open, wait_for

import dynapm

PYTHON_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"

GENERATED = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    ".venv",
    "*.so",
    "proxy.c",
)


def clean_env() -> dict[str, str]:
    """The environment without anything that would leak the work tree in."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps`, built once for the module (about a minute).

    The build runs in a copy of the work tree without anything generated
    (no in-place extension, no build/ folder), as a fresh clone would be.
    """
    source = tmp_path_factory.mktemp("source") / "dynapm"
    shutil.copytree(ROOT, source, ignore=GENERATED)
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "-w", str(out), "--no-deps"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob("dynapm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with only the wheel (and its dependencies)."""
    home = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", str(home)],
        check=True,
        timeout=120,
        env=clean_env(),
    )
    result = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return home


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_contains_extension_and_pxd(wheel):
    assert wheel.name.startswith(f"dynapm-{dynapm.__version__}-{PYTHON_TAG}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(
            archive.read(f"dynapm-{dynapm.__version__}.dist-info/METADATA")
        )
        entry_points = archive.read(
            f"dynapm-{dynapm.__version__}.dist-info/entry_points.txt"
        ).decode()
    # Every Cython module of the hot path is compiled, every .pxd ships.
    fast = ROOT / "dynapm" / "_fast"
    modules = sorted(path.stem for path in fast.glob("*.pyx"))
    assert "proxy" in modules
    for module in modules:
        compiled = [
            name
            for name in names
            if name.startswith(f"dynapm/_fast/{module}.") and name.endswith(".so")
        ]
        assert len(compiled) == 1, (module, names)
        assert f"cpython-{PYTHON_TAG[2:]}" in compiled[0]
    for pxd in sorted(fast.glob("*.pxd")):
        assert f"dynapm/_fast/{pxd.name}" in names, names
    assert "dynapm/_fast/proxy.pxd" in names
    assert "dynapm/_fast/__init__.py" in names
    assert "dynapm/cli.py" in names
    assert not [name for name in names if name.startswith("tests/")]
    assert metadata["Name"] == "dynapm"
    assert metadata["Version"] == dynapm.__version__
    requires = " ".join(metadata.get_all("Requires-Dist") or [])
    for dependency in ("uvloop", "httptools", "pyyaml"):
        assert dependency in requires.lower()
    assert "dynapm = dynapm.cli:main" in entry_points


def run_in(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "dynapm"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clean_venv_runs_version_and_check(venv, tmp_path):
    version = run_in(venv, "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"dynapm {dynapm.__version__}"

    config = tmp_path / "conf.yaml"
    config.write_text(
        textwrap.dedent(
            """
            listen: 127.0.0.1:3000
            services:
              app:
                upstream: http://127.0.0.1:3101
                run: python3 app.py
                hosts: [app.example.com]
            """
        )
    )
    check = run_in(venv, "check", "-c", str(config), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "app.example.com" in check.stdout
    assert "http://127.0.0.1:3101" in check.stdout

    # The compiled module comes from the venv, not from the source tree.
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import dynapm._fast.proxy as p; print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert where.returncode == 0, where.stderr
    location = Path(where.stdout.strip())
    assert location.suffix == ".so"
    assert location.is_relative_to(venv)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clean_venv_gateway_cold_starts_a_service(venv, tmp_path):
    listen, backend = free_port(), free_port()
    config = tmp_path / "conf.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            listen: 127.0.0.1:{listen}
            services:
              app:
                upstream: http://127.0.0.1:{backend}
                run: exec {sys.executable} {BACKEND} {backend}
                idle_timeout: 30s
            """
        )
    )
    log = open(tmp_path / "gateway.log", "wb")
    gateway = subprocess.Popen(
        [str(venv / "bin" / "dynapm"), "-c", str(config)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        start_new_session=True,
        env=clean_env(),
    )
    try:
        wait_for(lambda: port_open(listen) or gateway.poll() is not None, timeout=20)
        assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=30)
        try:
            conn.request("GET", "/echo", headers={"Host": "app"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200, body
        pid = json.loads(body)["pid"]
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(20) == 0
        wait_for(lambda: not pid_alive(pid), timeout=5)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        log.close()


def expected_identifiers() -> set[str]:
    return {
        f"cp3{minor}-{libc}_{arch}"
        for minor in (10, 11, 12, 13)
        for libc in ("manylinux", "musllinux")
        for arch in ("x86_64", "aarch64")
    }


def test_cibuildwheel_build_identifiers():
    cibuildwheel = shutil.which("cibuildwheel")
    if cibuildwheel is None:
        pytest.skip("cibuildwheel is not installed")
    config = ROOT / "cibuildwheel.toml"
    assert config.exists(), "cibuildwheel.toml is missing from the repository"
    result = subprocess.run(
        [
            cibuildwheel,
            "--print-build-identifiers",
            "--platform",
            "linux",
            "--config-file",
            str(config),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    identifiers = {line.strip() for line in result.stdout.splitlines() if line.strip()}
    assert identifiers == expected_identifiers(), sorted(identifiers)
