"""Test and demo support: network topologies in namespaces, backends, traffic probes, a VM runner."""
