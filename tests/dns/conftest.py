"""Fixtures for the DNS tests (helpers in kdns_testlib; no __init__.py here: a package named ``dns`` would
shadow dnspython)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kdns_testlib import Server, start_server, stop_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("dns"))
    yield srv
    alive = srv.alive()
    stop_server(srv)
    assert alive, f"server died: {srv.log.read_text()}"


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path)
    yield srv
    stop_server(srv)
