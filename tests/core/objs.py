"""Builders of API-shaped Service / EndpointSlice dicts for unit tests of the pure core."""

from __future__ import annotations

from typing import Any


def svc(name: str = "web", ns: str = "default", ips: tuple[str, ...] = ("10.96.0.10",), ports: Any = None,
        **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"clusterIP": ips[0] if ips else None, "clusterIPs": list(ips),
                         "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}]}
    s.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": s}


def ep(ip: str, node: str = "node-a", ready: bool = True, serving: bool | None = None, terminating: bool = False,
       zones: tuple[str, ...] = (), hostname: str = "") -> dict[str, Any]:
    cond: dict[str, Any] = {"ready": ready, "terminating": terminating}
    if serving is not None:
        cond["serving"] = serving
    e: dict[str, Any] = {"addresses": [ip], "conditions": cond, "nodeName": node}
    if zones:
        e["hints"] = {"forZones": [{"name": z} for z in zones]}
    if hostname:
        e["hostname"] = hostname
    return e


def eps(service: str, endpoints: list[dict[str, Any]], name: str | None = None, ns: str = "default",
        ports: Any = None, family: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service}-x", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": family,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}
