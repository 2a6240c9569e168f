import pytest

from kproxy.model import InvalidObject, parse_endpoint_slice, parse_service

from .objs import ep, eps, svc


def test_service_fields() -> None:
    s = parse_service(svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080,
                                                    "targetPort": "web"}],
                          externalIPs=["203.0.113.9"], sessionAffinity="ClientIP",
                          sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
                          externalTrafficPolicy="Local", healthCheckNodePort=31000))
    assert s.cluster_ips == ("10.96.0.10",)
    assert s.ports[0].node_port == 30080 and s.ports[0].target_port == "web" and s.ports[0].protocol == "TCP"
    assert s.external_ips == ("203.0.113.9",)
    assert s.affinity_timeout == 60
    assert s.external_local and s.health_check_node_port == 31000
    assert s.proxied


def test_ipv6_is_canonicalised_and_headless_is_not_proxied() -> None:
    s = parse_service(svc(ips=("fd00:10:96:0:0:0:0:10",)))
    assert s.cluster_ips == ("fd00:10:96::10",)
    h = parse_service(svc(ips=("None",), ports=[]))
    assert h.headless and not h.proxied


def test_affinity_defaults_to_three_hours() -> None:
    assert parse_service(svc(sessionAffinity="ClientIP")).affinity_timeout == 10800


@pytest.mark.parametrize(("spec", "reason"), [
    ({"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"]}, "invalid IP"),
    ({"ports": []}, "no ports"),
    ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, "duplicate port name"),
    ({"ports": [{"name": "a", "port": 80, "protocol": "ICMP"}]}, "unknown protocol"),
    ({"ports": [{"name": "a", "port": 70000}]}, "out of range"),
    ({"ports": [{"port": 80}, {"port": 81}]}, "needs a name"),
    ({"externalIPs": ["not-an-ip"]}, "invalid IP"),
    ({"type": "Weird"}, "unknown type"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}, "timeoutSeconds"),
])
def test_invalid_services_name_the_reason(spec: dict, reason: str) -> None:
    obj = svc()
    obj["spec"].update(spec)
    with pytest.raises(InvalidObject, match=reason):
        parse_service(obj)


def test_endpoint_conditions_follow_api_defaults() -> None:
    sl = parse_endpoint_slice(eps("web", [{"addresses": ["10.244.1.10"]},
                                          ep("10.244.1.11", ready=False, serving=True, terminating=True)]))
    a, b = sl.endpoints
    assert (a.ready, a.serving, a.terminating) == (True, True, False)
    assert (b.ready, b.serving, b.terminating) == (False, True, True)


def test_slice_family_mismatch_and_missing_label() -> None:
    with pytest.raises(InvalidObject, match="family"):
        parse_endpoint_slice(eps("web", [ep("fd00::1")], family="IPv4"))
    bad = eps("web", [ep("10.0.0.1")])
    del bad["metadata"]["labels"]
    with pytest.raises(InvalidObject, match="service-name"):
        parse_endpoint_slice(bad)
