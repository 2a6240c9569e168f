"""Shared fixtures for the IPVS tests (the VM ones boot qemu; see kproxy.testing.vm)."""

from __future__ import annotations

from vm.conftest import vm_kernel  # the one definition, shared with tests/vm (tests/ is on sys.path)

__all__ = ["vm_kernel"]
