"""The IPVS mode with real packets in a VM booting Debian's kernel (IPVS and dummy as modules).

One VM boot runs every scenario of ``vm_scenarios.py`` (an inner pytest run; results come back as junit
XML through the shared job directory). Each inner scenario becomes a separate result here so a failure
names the scenario and shows its assertion message.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kproxy.testing import vm

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[2]
MODULES = "ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_mh nf_conntrack br_netfilter veth bridge dummy"

SCENARIOS = ["test_clusterip_tcp_and_udp", "test_iptables_rules_are_fixed", "test_nodeport_and_external_ip",
             "test_ipv6_dual_stack", "test_schedulers_per_service", "test_session_affinity",
             "test_local_traffic_policies", "test_graceful_termination", "test_udp_endpoint_removed_immediately",
             "test_timeouts_and_strict_arp", "test_status_reads_kernel", "test_restart_keeps_traffic_flowing",
             "test_cleanup_removes_everything"]


@pytest.fixture(scope="module")
def vm_results(vm_kernel: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    job = tmp_path_factory.mktemp("ipvs-vm")
    script = (
        f"modprobe -a {MODULES}\n"
        f"cd {ROOT}\n"
        f"{sys.executable} -m pytest -p no:cacheprovider -o addopts= -q -rA --timeout 600 "
        f"tests/ipvs/vm_scenarios.py --junitxml={job}/junit.xml\n"
    )
    r = vm.run_in_vm(script, timeout=2400, job_dir=str(job), memory_mb=1536)
    junit = job / "junit.xml"
    if not junit.exists():
        pytest.fail(f"no junit XML from the VM\n{r.describe()}")
    results: dict[str, str | None] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        problem = None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                problem = f"{tag}: {el.get('message', '')}\n{el.text or ''}"
        results[case.get("name", "")] = problem
    results["__output__"] = r.stdout[-6000:] + "\n" + r.stderr[-3000:]
    print(f"IPVS VM suite: {r.seconds:.0f}s (boot + {len(results) - 1} scenarios)")
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ipvs_scenario(vm_results: dict[str, str | None], scenario: str) -> None:
    if scenario not in vm_results:
        pytest.fail(f"{scenario} did not run in the VM\n{vm_results['__output__']}")
    problem = vm_results[scenario]
    assert problem is None, problem


def test_every_scenario_is_listed() -> None:
    text = (ROOT / "tests" / "ipvs" / "vm_scenarios.py").read_text()
    defined = [line.split("(")[0][4:] for line in text.splitlines() if line.startswith("def test_")]
    assert defined == SCENARIOS
    assert os.path.exists(ROOT / "tests" / "ipvs" / "vm_scenarios.py")
