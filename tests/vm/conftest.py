"""Fixtures for tests that boot the qemu VM (see :mod:`kproxy.testing.vm`)."""

from __future__ import annotations

import pytest

from kproxy.testing import vm


@pytest.fixture(scope="session")
def vm_kernel() -> str:
    """The kernel version the VM boots; skips the test when qemu or the kernel is missing."""
    try:
        return vm.check_available()
    except vm.VMUnavailable as e:
        pytest.skip(f"VM unavailable: {e}")
