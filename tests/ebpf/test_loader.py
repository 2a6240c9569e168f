"""Compiling with bcc, the precompiled-object path (no bcc, no headers) and load-failure messages."""

from __future__ import annotations

import json
import os
import sys

import pytest

from kproxy.config import ProxyConfig
from kproxy.dataplane import SetupError
from kproxy.dataplane.ebpf import EbpfDataPlane, loader, objfile

from .conftest import requires_bpf

pytestmark = [pytest.mark.netns, requires_bpf]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("obj") / "kproxy_lb.json")
    loader.compile_object(path)
    return path


def test_compiled_object_records_map_relocations(compiled):
    obj = objfile.read(compiled)
    assert obj is not None
    assert set(obj["programs"]) == {*loader.SOCK_PROGS, *loader.TC_PROGS}
    relocated = {name for p in obj["programs"].values() for _, name in p["relocs"]}
    assert {"kp_svc", "kp_be", "kp_revsk", "kp_ct_fwd", "kp_ct_rev"} <= relocated


def test_precompiled_object_loads_without_bcc(compiled, bpf_env, tmp_path, monkeypatch):
    monkeypatch.setenv("KPROXY_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("KPROXY_BPF_OBJECT", compiled)
    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc now fails
    progs = loader.compile_and_load(bpf_env.pin)
    try:
        assert progs.source == "object" and set(progs.fds) == {*loader.SOCK_PROGS, *loader.TC_PROGS}
        assert sorted(os.listdir(bpf_env.pin)) == sorted(objfile.MAP_SPECS)
    finally:
        progs.close()


def test_mismatched_object_and_missing_bcc_give_clear_errors(compiled, bpf_env, tmp_path, monkeypatch):
    monkeypatch.setenv("KPROXY_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(sys.modules, "bcc", None)
    other = tmp_path / "other.json"
    with open(compiled) as f:
        obj = json.load(f)
    obj["key"] = "0" * 16
    other.write_text(json.dumps(obj))
    monkeypatch.setenv("KPROXY_BPF_OBJECT", str(other))
    with pytest.raises(loader.LoadError, match=r"another bpf/kproxy_lb\.c"):
        loader.compile_and_load(bpf_env.pin)
    monkeypatch.delenv("KPROXY_BPF_OBJECT")
    with pytest.raises(loader.LoadError, match="python3-bpfcc"):
        loader.compile_and_load(bpf_env.pin)


def test_setup_names_the_missing_piece(bpf_env, tmp_path):
    no_bpffs = EbpfDataPlane(ProxyConfig(bpf_pin_path=str(tmp_path / "x" / "kproxy"), bpf_cgroup_path=bpf_env.cgroup))
    with pytest.raises(SetupError, match="not a BPF filesystem"):
        no_bpffs.setup()
    no_cg = EbpfDataPlane(ProxyConfig(bpf_pin_path=bpf_env.pin, bpf_cgroup_path=str(tmp_path)))
    with pytest.raises(SetupError, match="not on a cgroup v2 filesystem"):
        no_cg.setup()
