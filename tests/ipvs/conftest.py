"""Shared fixtures for the IPVS tests (the VM ones boot qemu; see kproxy.testing.vm)."""

from __future__ import annotations

import pytest

from kproxy.testing import vm


@pytest.fixture(scope="session")
def vm_kernel() -> str:
    try:
        return vm.check_available()
    except vm.VMUnavailable as e:
        pytest.skip(f"VM unavailable: {e}")
