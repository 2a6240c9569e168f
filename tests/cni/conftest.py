"""Fixtures for the CNI plugin tests; helpers live in cnihelpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cnihelpers import IS_ROOT, REF_DIR, REPO, Netns, Plugins


@pytest.fixture(scope="session")
def cni_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """kproxy's plugins installed by deploy/cni/install-cni.sh (launchers + vendored code)."""
    d = tmp_path_factory.mktemp("cnibin")
    bindir = str(d / "bin")
    subprocess.run(
        [os.path.join(REPO, "deploy", "cni", "install-cni.sh"), "--bin-dir", bindir, "--no-conf"],
        check=True,
        env={**os.environ, "SRC_PYTHON": sys.executable},
        capture_output=True,
    )
    return bindir


@pytest.fixture(scope="session")
def cni_path(cni_bin: str) -> list[str]:
    return [cni_bin, REF_DIR]


@pytest.fixture
def plugins(cni_path: list[str]) -> Plugins:
    return Plugins(cni_path)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if not IS_ROOT:
        pytest.skip("needs root for network namespaces")
    ns = Netns()
    try:
        yield ns
    finally:
        ns.cleanup()


@pytest.fixture
def node(netns: Netns, cni_path: list[str]) -> tuple[str, Plugins]:
    """A node netns and a plugin runner that execs the plugins inside it."""
    name = netns.new("node")
    return name, Plugins(cni_path, node=name)


@pytest.fixture
def data_dir(tmp_path: Any) -> str:
    d = tmp_path / "ipam"
    d.mkdir()
    return str(d)
