"""Synthetic cluster state for benchmarks: N Services × E endpoints as API-shaped dicts."""

from __future__ import annotations

from typing import Any

NODEPORT_RANGE = 2768  # 30000-32767, the API server's default --service-node-port-range


def service(i: int, nodeport: bool = False) -> dict[str, Any]:
    """Service ``svc-i``. Callers make every 10th one a NodePort: ``i // 10`` gives each its own port
    (unique up to 27,680 Services; beyond that the default range is exhausted and ports repeat)."""
    ip = f"10.96.{i // 250}.{i % 250 + 1}" if i < 250 * 250 else f"10.97.{(i - 62500) // 250}.{i % 250 + 1}"
    spec: dict[str, Any] = {
        "clusterIP": ip, "clusterIPs": [ip],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    if nodeport:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = 30000 + (i // 10) % NODEPORT_RANGE
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": "bench"},
            "spec": spec}


def endpoint_slice(i: int, endpoints: int, generation: int = 0) -> dict[str, Any]:
    eps = []
    for j in range(endpoints):
        n = i * endpoints + j + generation
        eps.append({"addresses": [f"10.{128 + (n >> 16) % 64}.{(n >> 8) & 255}.{n & 255}"],
                    "conditions": {"ready": True}, "nodeName": f"node-{n % 50}"})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-abcde", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps}
