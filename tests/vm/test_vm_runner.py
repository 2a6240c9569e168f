"""The VM runner boots Debian's kernel, runs a command and returns its output and exit code."""

from __future__ import annotations

import os

import pytest

from kproxy.testing import vm

pytestmark = [pytest.mark.vm]


def test_newc_archive_layout() -> None:
    data = vm._newc([("init", 0o100755, b"#!/bin/sh\n")])
    assert data.startswith(b"070701")
    assert b"TRAILER!!!" in data
    assert len(data) % 4 == 0


def test_vm_runs_ipvs_kernel(vm_kernel: str, tmp_path: os.PathLike[str]) -> None:
    script = (
        "set -e\n"
        "uname -r\n"
        "modprobe -a ip_vs ip_vs_rr dummy\n"
        "ip link add kube-ipvs0 type dummy\n"
        "ip addr add 10.96.0.1/32 dev kube-ipvs0\n"
        "ipvsadm -A -t 10.96.0.1:80 -s rr\n"
        "ipvsadm -Ln\n"
        "touch /work-should-not-leak\n"
        "echo out-of-band > result.txt\n"
        "echo to-stderr >&2\n"
        "exit 7\n"
    )
    r = vm.run_in_vm(script, timeout=180, job_dir=str(tmp_path))
    assert r.returncode == 7, r.describe()
    lines = r.stdout.splitlines()
    assert lines[0] == vm_kernel
    assert "TCP  10.96.0.1:80 rr" in r.stdout
    assert r.stderr.strip() == "to-stderr"
    assert (tmp_path / "result.txt").read_text() == "out-of-band\n"
    # the host's root stays untouched: writes land in the guest's tmpfs overlay
    assert not os.path.exists("/work-should-not-leak")


def test_vm_timeout_kills_qemu(vm_kernel: str) -> None:
    r = vm.run_in_vm("sleep 600", timeout=12)
    assert r.timed_out
    assert r.returncode == -1
