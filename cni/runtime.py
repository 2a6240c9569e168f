"""Run CNI plugins the way a container runtime (containerd, CRI-O via libcni) does.

Used by ``kproxy demo`` to give its pods networking through the real plugins, and by the tests and
benchmark. Every call execs the plugin binary with the ``CNI_*`` environment and the network
configuration on stdin -- nothing is called in-process.

API (``conf`` is a network configuration *or* a configuration list, as a dict or JSON text)::

    from cni import runtime

    result = runtime.add(conf, container_id, "/var/run/netns/pod1", "eth0")     # -> result dict
    runtime.check(conf, container_id, netns_path, "eth0", prev_result=result)   # raises on failure
    runtime.delete(conf, container_id, netns_path, "eth0", prev_result=result)  # idempotent
    runtime.status(conf)                                                        # raises if not ready
    runtime.gc(conf, [{"containerID": cid, "ifname": "eth0"}, ...])             # frees the rest
    runtime.version("kproxy-bridge")                                            # VERSION answer

Keyword arguments common to these: ``cni_path`` (list of plugin directories, default
:data:`DEFAULT_CNI_PATH`), ``args`` (``CNI_ARGS`` as a dict), ``runtime_config`` (capability args such as
``{"portMappings": [...]}`` or ``{"ips": [...]}``: each plugin gets the keys it declares in
``capabilities``), ``env`` (extra environment), ``netns_exec`` (name of a netns under /var/run/netns in
which the plugin itself runs, as ``ip netns exec`` would do -- lets tests keep the "node" side of the
network in a namespace too).

For a configuration list, ADD runs the plugins in order passing each one's result as the next
``prevResult``; DEL runs them in reverse. Failures raise :class:`PluginError` with the spec's ``code``,
``msg`` and ``details``.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

DEFAULT_CNI_PATH = ["/opt/cni/bin", "/usr/lib/cni"]


class PluginError(RuntimeError):
    """A plugin answered with the CNI error JSON (or crashed)."""

    def __init__(self, plugin: str, code: int, msg: str, details: str = "", stdout: str = "") -> None:
        super().__init__(f"{plugin}: [{code}] {msg}" + (f" ({details})" if details else ""))
        self.plugin = plugin
        self.code = code
        self.msg = msg
        self.details = details
        self.stdout = stdout


def _load(conf: dict[str, Any] | str | bytes) -> dict[str, Any]:
    return json.loads(conf) if isinstance(conf, (str, bytes)) else conf


def _plugins(conf: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    if "plugins" in conf:
        return conf["name"], conf.get("cniVersion", ""), list(conf["plugins"])
    return conf["name"], conf.get("cniVersion", ""), [conf]


def find(plugin: str, cni_path: list[str] | None = None) -> str:
    for d in cni_path or DEFAULT_CNI_PATH:
        p = os.path.join(d, plugin)
        if os.access(p, os.X_OK):
            return p
    raise PluginError(plugin, 50, f"plugin {plugin!r} not found in {cni_path or DEFAULT_CNI_PATH}")


def invoke(
    plugin_conf: dict[str, Any],
    command: str,
    *,
    container_id: str = "",
    netns: str = "",
    ifname: str = "",
    cni_path: list[str] | None = None,
    args: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    netns_exec: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any] | None:
    """Exec one plugin once; returns the parsed stdout (None when empty), raises :class:`PluginError`."""
    path = find(plugin_conf["type"], cni_path)
    e = dict(os.environ if env is None else env)
    e.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": ";".join(f"{k}={v}" for k, v in (args or {}).items()),
            "CNI_PATH": os.pathsep.join(cni_path or DEFAULT_CNI_PATH),
        }
    )
    for k in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"):
        if not e[k]:
            del e[k]
    argv = ["ip", "netns", "exec", netns_exec, path] if netns_exec else [path]
    p = subprocess.run(argv, input=json.dumps(plugin_conf).encode(), env=e, capture_output=True, timeout=timeout)
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        try:
            err = json.loads(out)
            raise PluginError(plugin_conf["type"], int(err["code"]), err.get("msg", ""), err.get("details", ""), out)
        except (ValueError, KeyError, TypeError):
            raise PluginError(
                plugin_conf["type"], -1, f"exit status {p.returncode}", p.stderr.decode(errors="replace"), out
            ) from None
    return json.loads(out) if out.strip() else None


def _plugin_conf(
    name: str, version: str, plugin: dict[str, Any], runtime_config: dict[str, Any] | None, prev: Any
) -> dict[str, Any]:
    pc = dict(plugin)
    pc["name"] = name
    if version:
        pc["cniVersion"] = version
    caps = plugin.get("capabilities") or {}
    rc = {k: v for k, v in (runtime_config or {}).items() if caps.get(k)}
    if rc:
        pc["runtimeConfig"] = rc
    if prev is not None:
        pc["prevResult"] = prev
    return pc


def add(
    conf: dict[str, Any] | str | bytes,
    container_id: str,
    netns: str,
    ifname: str = "eth0",
    *,
    runtime_config: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    name, version, plugins = _plugins(_load(conf))
    prev: dict[str, Any] | None = None
    for plugin in plugins:
        pc = _plugin_conf(name, version, plugin, runtime_config, prev)
        prev = invoke(pc, "ADD", container_id=container_id, netns=netns, ifname=ifname, **kw) or prev
    return prev or {}


def delete(
    conf: dict[str, Any] | str | bytes,
    container_id: str,
    netns: str = "",
    ifname: str = "eth0",
    *,
    prev_result: dict[str, Any] | None = None,
    runtime_config: dict[str, Any] | None = None,
    **kw: Any,
) -> None:
    name, version, plugins = _plugins(_load(conf))
    for plugin in reversed(plugins):
        pc = _plugin_conf(name, version, plugin, runtime_config, prev_result)
        invoke(pc, "DEL", container_id=container_id, netns=netns, ifname=ifname, **kw)


def check(
    conf: dict[str, Any] | str | bytes,
    container_id: str,
    netns: str,
    ifname: str = "eth0",
    *,
    prev_result: dict[str, Any],
    runtime_config: dict[str, Any] | None = None,
    **kw: Any,
) -> None:
    name, version, plugins = _plugins(_load(conf))
    for plugin in plugins:
        pc = _plugin_conf(name, version, plugin, runtime_config, prev_result)
        invoke(pc, "CHECK", container_id=container_id, netns=netns, ifname=ifname, **kw)


def status(conf: dict[str, Any] | str | bytes, **kw: Any) -> None:
    name, version, plugins = _plugins(_load(conf))
    for plugin in plugins:
        invoke(_plugin_conf(name, version, plugin, None, None), "STATUS", **kw)


def gc(conf: dict[str, Any] | str | bytes, valid_attachments: list[dict[str, str]], **kw: Any) -> None:
    name, version, plugins = _plugins(_load(conf))
    for plugin in plugins:
        pc = _plugin_conf(name, version, plugin, None, None)
        pc["cni.dev/valid-attachments"] = valid_attachments
        invoke(pc, "GC", **kw)


def version(plugin: str, cni_version: str = "1.1.0", **kw: Any) -> dict[str, Any]:
    return invoke({"type": plugin, "cniVersion": cni_version}, "VERSION", **kw) or {}
