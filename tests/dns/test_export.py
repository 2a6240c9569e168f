"""``kproxy dns export`` writes master files that named-checkzone accepts, with exactly the server's answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest
from kdns_testlib import MANIFESTS, Server

pytestmark = pytest.mark.skipif(shutil.which("named-checkzone") is None, reason="needs bind9-utils")


def _export(tmp: Path, manifests: Path) -> tuple[Path, Path]:
    out = tmp / "cluster.local.zone"
    rev = tmp / "reverse"
    subprocess.run([sys.executable, "-m", "kproxy", "dns", "export", "--manifests", str(manifests),
                    "-o", str(out), "--reverse-dir", str(rev)], check=True, timeout=60)
    return out, rev


def test_named_checkzone_accepts(tmp_path: Path) -> None:
    out, rev = _export(tmp_path, MANIFESTS)
    for origin, path in (("cluster.local", out), ("in-addr.arpa", rev / "in-addr.arpa.zone"),
                         ("ip6.arpa", rev / "ip6.arpa.zone")):
        res = subprocess.run(["named-checkzone", "-k", "fail", "-n", "fail", origin, str(path)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip().endswith("OK")


def test_export_equals_server_answers(tmp_path: Path, server: Server) -> None:
    out, rev = _export(tmp_path, server.manifests)
    checked = 0
    for origin, path in (("cluster.local.", out), ("in-addr.arpa.", rev / "in-addr.arpa.zone"),
                         ("ip6.arpa.", rev / "ip6.arpa.zone")):
        zone = dns.zone.from_file(str(path), origin=origin, relativize=False)
        for name, node in zone.nodes.items():
            for rds in node.rdatasets:
                want = {rd.to_text() for rd in rds}
                r = server.query(name.to_text(), dns.rdatatype.to_text(rds.rdtype), tcp=True)
                got = {rd.to_text() for rrset in r.answer if rrset.rdtype == rds.rdtype
                       and rrset.name == name for rd in rrset}
                if rds.rdtype == dns.rdatatype.SOA:  # the serial differs between the two processes
                    want = {" ".join(w.split()[:2] + w.split()[3:]) for w in want}
                    got = {" ".join(g.split()[:2] + g.split()[3:]) for g in got}
                assert got == want, f"{name} {dns.rdatatype.to_text(rds.rdtype)}"
                assert all(rrset.ttl == rds.ttl for rrset in r.answer if rrset.name == name)
                checked += 1
    assert checked > 40


def test_export_stdout_default(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "kproxy", "dns", "export", "--manifests", str(MANIFESTS),
                          "--zone", "example.internal", "--ttl", "30"], capture_output=True, text=True, check=True)
    assert "$ORIGIN example.internal." in res.stdout
    assert 'dns-version.example.internal. 30 IN TXT "1.1.0"' in res.stdout
    assert "web.default.svc.example.internal. 30 IN A 10.96.0.20" in res.stdout
    zf = tmp_path / "z"
    zf.write_text(res.stdout)
    chk = subprocess.run(["named-checkzone", "example.internal", str(zf)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout
