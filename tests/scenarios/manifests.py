"""Builders for the Service / EndpointSlice objects the scenario tests write into kproxy's watched directory.

The dicts are what the API server would return (v1 Service, discovery.k8s.io/v1 EndpointSlice), so the
daemon parses them through the same code path as objects from a real cluster. :func:`write` replaces a
file atomically (temporary dot-file + rename): the manifests source never sees a half-written file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def port(port: int, target_port: int | str | None = None, *, name: str = "", protocol: str = "TCP",
         node_port: int | None = None) -> dict[str, Any]:
    """One entry of a Service's spec.ports."""
    out: dict[str, Any] = {"port": port, "protocol": protocol, "targetPort": port if target_port is None
                           else target_port}
    if name:
        out["name"] = name
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def service(name: str, cluster_ips: str | Sequence[str], ports: Sequence[dict[str, Any]], *,
            namespace: str = "default", type: str | None = None, external_ips: Sequence[str] = (),
            lb_ips: Sequence[str] = (), affinity_timeout: int | None = None,
            external_traffic_policy: str | None = None, internal_traffic_policy: str | None = None,
            health_check_node_port: int | None = None, lb_source_ranges: Sequence[str] = (),
            extra_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A v1 Service. ``cluster_ips`` may hold one IP per family (dual-stack); ``affinity_timeout`` turns on
    sessionAffinity ClientIP with that timeout. ``type`` defaults to NodePort when a port has a nodePort,
    LoadBalancer when ``lb_ips`` are given, else ClusterIP."""
    ips = [cluster_ips] if isinstance(cluster_ips, str) else list(cluster_ips)
    if type is None:
        type = "LoadBalancer" if lb_ips else ("NodePort" if any("nodePort" in p for p in ports) else "ClusterIP")
    families = ["IPv6" if ":" in ip else "IPv4" for ip in ips if ip != "None"]
    spec: dict[str, Any] = {
        "type": type,
        "clusterIP": ips[0] if ips else "",
        "clusterIPs": ips,
        "ipFamilies": families,
        "ipFamilyPolicy": "RequireDualStack" if len(families) > 1 else "SingleStack",
        "ports": list(ports),
        "sessionAffinity": "ClientIP" if affinity_timeout else "None",
    }
    if affinity_timeout:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if external_traffic_policy:
        spec["externalTrafficPolicy"] = external_traffic_policy
    if internal_traffic_policy:
        spec["internalTrafficPolicy"] = internal_traffic_policy
    if health_check_node_port is not None:
        spec["healthCheckNodePort"] = health_check_node_port
    if lb_source_ranges:
        spec["loadBalancerSourceRanges"] = list(lb_source_ranges)
    spec.update(extra_spec or {})
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def endpoint(ip: str, *, ready: bool = True, serving: bool | None = None, terminating: bool | None = None,
             node: str | None = "node-a", zone: str | None = None, hints: Sequence[str] = (),
             hostname: str | None = None) -> dict[str, Any]:
    """One EndpointSlice endpoint. ``serving``/``terminating`` are left out when None (API defaults apply)."""
    cond: dict[str, Any] = {"ready": ready}
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    out: dict[str, Any] = {"addresses": [ip], "conditions": cond}
    if node:
        out["nodeName"] = node
    if zone:
        out["zone"] = zone
    if hints:
        out["hints"] = {"forZones": [{"name": z} for z in hints]}
    if hostname:
        out["hostname"] = hostname
    return out


def terminating(ip: str, *, serving: bool = True, node: str | None = "node-a") -> dict[str, Any]:
    """An endpoint of a pod being deleted: not ready, still serving (or not), terminating."""
    return endpoint(ip, ready=False, serving=serving, terminating=True, node=node)


def slice_port(port: int, *, name: str = "", protocol: str = "TCP") -> dict[str, Any]:
    out: dict[str, Any] = {"port": port, "protocol": protocol}
    if name:
        out["name"] = name
    return out


def endpoint_slice(service_name: str, endpoints: Iterable[dict[str, Any]], ports: Sequence[dict[str, Any]], *,
                   name: str | None = None, namespace: str = "default", address_type: str | None = None
                   ) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice for ``service_name``; the address type is taken from the first
    endpoint's address unless given (an empty slice defaults to IPv4)."""
    eps = list(endpoints)
    if address_type is None:
        first = eps[0]["addresses"][0] if eps else "0.0.0.0"
        address_type = "IPv6" if ":" in first else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-{address_type.lower()}", "namespace": namespace,
                     "labels": {SERVICE_NAME_LABEL: service_name}},
        "addressType": address_type,
        "ports": list(ports),
        "endpoints": eps,
    }


def node(name: str, *, zone: str | None = None, addresses: Sequence[str] = (), pod_cidrs: Sequence[str] = (),
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A v1 Node (kproxy reads its zone label for topology hints, its addresses and podCIDRs)."""
    lab = dict(labels or {})
    if zone:
        lab["topology.kubernetes.io/zone"] = zone
    spec: dict[str, Any] = {}
    if pod_cidrs:
        spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": lab}, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def ipv6_of(ipv4: str) -> str:
    """The topology's pod IPv6 address mirroring a pod IPv4 address (10.244.1.N → fd00:10:244:1::N hex)."""
    last = int(ipv4.rsplit(".", 1)[1])
    return str(ipaddress.ip_address(f"fd00:10:244:1::{last:x}"))


def write(directory: str, filename: str, objects: Sequence[dict[str, Any]]) -> str:
    """Atomically (re)place ``directory/filename`` with ``objects`` as one JSON ``kind: List``."""
    if not filename.endswith((".json", ".yaml", ".yml")):
        filename += ".json"
    path = os.path.join(directory, filename)
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)  # dot-files are ignored by the source
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_raw(directory: str, filename: str, text: str) -> str:
    """Atomically write arbitrary text (for malformed-input tests)."""
    path = os.path.join(directory, filename)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def remove(directory: str, filename: str) -> bool:
    if not filename.endswith((".json", ".yaml", ".yml")):
        filename += ".json"
    try:
        os.unlink(os.path.join(directory, filename))
        return True
    except FileNotFoundError:
        return False
