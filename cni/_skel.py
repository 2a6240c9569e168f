"""Shared CNI dispatch layer: environment, stdin config, version negotiation, errors, result formats.

Kept to the stdlib modules that a bare ``python3 -S`` already has loaded or loads in well under a
millisecond (``os``, ``sys``, ``json``): every plugin invocation pays for its imports.

Internally results use the CNI 1.x layout (``ips`` entries without ``version``); :func:`emit_result`
converts to whatever ``cniVersion`` the network configuration asked for.
"""

from __future__ import annotations

import os
import sys

from cni import _json as json  # not the json package: its import costs ~15 ms per plugin call

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~8 ms of import time per plugin call
    from collections.abc import Callable
    from typing import Any, NoReturn

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]

# Error codes from the CNI specification (SPEC.md, "Error").
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_INTERNAL = 999  # what the reference plugins use for everything else

VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"


class CNIError(Exception):
    """An error reported to the runtime as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def _vtuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


def version_at_least(v: str, minimum: str) -> bool:
    return _vtuple(v) >= _vtuple(minimum)


class Args:
    """One plugin invocation: the CNI_* environment plus the parsed stdin configuration."""

    __slots__ = ("args", "command", "conf", "container_id", "ifname", "netns", "path", "raw", "version")

    def __init__(self, command: str, env: dict[str, str], raw: bytes, conf: dict[str, Any]) -> None:
        self.command = command
        self.container_id = env.get("CNI_CONTAINERID", "")
        self.netns = env.get("CNI_NETNS", "")
        self.ifname = env.get("CNI_IFNAME", "")
        self.args = env.get("CNI_ARGS", "")
        self.path = env.get("CNI_PATH", "")
        self.raw = raw
        self.conf = conf
        self.version = str(conf.get("cniVersion", "0.1.0"))

    def cni_args(self) -> dict[str, str]:
        """``CNI_ARGS`` as a dict (``K1=V1;K2=V2``)."""
        out: dict[str, str] = {}
        for item in self.args.split(";"):
            if not item:
                continue
            k, sep, v = item.partition("=")
            if not sep:
                raise CNIError(ERR_INVALID_ENV, f"invalid CNI_ARGS pair {item!r}")
            out[k] = v
        return out


_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}
_MIN_VERSION = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def _valid_container_id(cid: str) -> bool:
    # Same rule as libcni/skel: alphanumerics first, then alphanumerics, '_', '.', '-'.
    if not cid or not cid[0].isascii() or not cid[0].isalnum():
        return False
    return all(c.isascii() and (c.isalnum() or c in "_.-") for c in cid)


def _valid_ifname(name: str) -> bool:
    return 0 < len(name) <= 15 and name not in (".", "..") and not any(c in "/:" or c.isspace() for c in name)


def parse_invocation(env: dict[str, str], raw: bytes) -> Args:
    """Validate the environment and decode stdin; raises :class:`CNIError` with the spec's codes."""
    command = env.get("CNI_COMMAND", "")
    if command not in _REQUIRED_ENV:
        raise CNIError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}" if command else "CNI_COMMAND is not set")
    if command == "VERSION":
        try:
            conf = json.loads(raw) if raw.strip() else {}
        except ValueError:
            conf = {}
        return Args(command, env, raw, conf if isinstance(conf, dict) else {})
    missing = [k for k in _REQUIRED_ENV[command] if not env.get(k)]
    if missing:
        raise CNIError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    if command != "GC" and command != "STATUS":
        if not _valid_container_id(env["CNI_CONTAINERID"]):
            raise CNIError(ERR_INVALID_ENV, f"invalid characters in container ID {env['CNI_CONTAINERID']!r}")
        if not _valid_ifname(env["CNI_IFNAME"]):
            raise CNIError(ERR_INVALID_ENV, f"invalid interface name {env['CNI_IFNAME']!r}")
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise CNIError(ERR_DECODE, "error unmarshaling network configuration", str(e)) from None
    if not isinstance(conf, dict):
        raise CNIError(ERR_DECODE, "network configuration is not a JSON object")
    args = Args(command, env, raw, conf)
    if args.version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f'incompatible CNI versions; config is "{args.version}", plugin supports {SUPPORTED_VERSIONS}',
        )
    minimum = _MIN_VERSION.get(command)
    if minimum and not version_at_least(args.version, minimum):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"config version {args.version} does not allow {command}")
    if not isinstance(conf.get("name", ""), str) or not conf.get("name"):
        raise CNIError(ERR_INVALID_CONFIG, "network configuration has no name")
    return args


# ---------------------------------------------------------------------------------------------
# results


def normalize_result(res: dict[str, Any]) -> dict[str, Any]:
    """Bring a result of any supported version (e.g. an IPAM result or a prevResult) into the 1.x layout."""
    out = dict(res)
    ips = []
    for ipc in res.get("ips") or []:
        ipc = dict(ipc)
        ipc.pop("version", None)
        ips.append(ipc)
    out["ips"] = ips
    return out


_ROUTE_11_FIELDS = ("mtu", "advmss", "priority", "table", "scope")


def convert_result(res: dict[str, Any], version: str) -> dict[str, Any]:
    """Render an internal (1.x) result in the layout of ``version``."""
    out: dict[str, Any] = {"cniVersion": version}
    legacy = not version_at_least(version, "1.0.0")
    old = not version_at_least(version, "1.1.0")
    if res.get("interfaces"):
        ifaces = []
        for itf in res["interfaces"]:
            itf = {k: v for k, v in itf.items() if v not in (None, "")}
            if old:
                for k in ("mtu", "socketPath", "pciID"):
                    itf.pop(k, None)
            ifaces.append(itf)
        out["interfaces"] = ifaces
    ips = []
    for ipc in res.get("ips") or []:
        ipc = {k: v for k, v in ipc.items() if v is not None and k != "version"}
        if legacy:
            ipc = {"version": "6" if ":" in ipc["address"] else "4", **ipc}
        ips.append(ipc)
    out["ips"] = ips
    if res.get("routes"):
        routes = []
        for r in res["routes"]:
            r = {k: v for k, v in r.items() if v is not None}
            if old:
                for k in _ROUTE_11_FIELDS:
                    r.pop(k, None)
            routes.append(r)
        out["routes"] = routes
    out["dns"] = res.get("dns") or {}
    return out


# ---------------------------------------------------------------------------------------------
# entry point


def _write(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj))
    sys.stdout.flush()


def emit_result(res: dict[str, Any], version: str) -> None:
    _write(convert_result(res, version))


def version_info(args: Args) -> dict[str, Any]:
    return {
        "cniVersion": args.conf.get("cniVersion") or SUPPORTED_VERSIONS[-1],
        "supportedVersions": SUPPORTED_VERSIONS,
    }


def run(
    handlers: dict[str, Callable[[Args], dict[str, Any] | None]],
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> int:
    """Dispatch one invocation to ``handlers[CNI_COMMAND]`` and write its result or the error JSON.

    A handler returns the result (internal 1.x layout) for ADD, or None for commands without output.
    """
    env = dict(os.environ) if env is None else env
    if stdin is None:
        stdin = sys.stdin.buffer.read()
    version = SUPPORTED_VERSIONS[-1]
    try:
        args = parse_invocation(env, stdin)
        if args.command == "VERSION":
            _write(version_info(args))
            return 0
        version = args.version
        res = handlers[args.command](args)
        if res is not None:
            emit_result(res, version)
        return 0
    except CNIError as e:
        err = e
    except OSError as e:
        err = CNIError(ERR_IO, f"{e.strerror or e}", str(e))
    except Exception as e:  # a plugin must always answer with the error JSON, never a traceback only
        err = CNIError(ERR_INTERNAL, f"{type(e).__name__}: {e}")
    _write(err.to_dict(version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]))
    return 1


def die(code: int, msg: str, details: str = "") -> NoReturn:
    raise CNIError(code, msg, details)


# ---------------------------------------------------------------------------------------------
# delegation (bridge -> IPAM plugin)


def find_plugin(name: str, cni_path: str) -> str:
    if not name or "/" in name:
        die(ERR_INVALID_CONFIG, f"invalid plugin type {name!r}")
    for d in cni_path.split(os.pathsep):
        if d:
            p = os.path.join(d, name)
            if os.access(p, os.X_OK) and not os.path.isdir(p):
                return p
    die(ERR_INVALID_CONFIG, f"failed to find plugin {name!r} in path {cni_path.split(os.pathsep)}")


class Child:
    """A spawned plugin/tool process whose stdout we collect when :meth:`wait` is called."""

    def __init__(
        self, path: str, env: dict[str, str], stdin: bytes, argv: list[str] | None = None, quiet: bool = False
    ) -> None:
        # posix_spawn and raw pipes rather than subprocess, whose import alone costs ~25 ms.
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            self.pid = os.posix_spawn(
                path,
                argv or [path],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_CLOSE, in_w),
                    (os.POSIX_SPAWN_CLOSE, out_r),
                    *([(os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)] if quiet else []),
                ],
            )
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(in_r)
        os.close(out_w)
        self.out_r = out_r
        try:
            view = memoryview(stdin)
            while view:  # configs are far below the pipe buffer; a blocking write is fine either way
                try:
                    n = os.write(in_w, view)
                except BrokenPipeError:
                    break
                view = view[n:]
        finally:
            os.close(in_w)
        self.result: tuple[int, bytes] | None = None

    def wait(self) -> tuple[int, bytes]:
        """(exit status, stdout); idempotent."""
        if self.result is None:
            chunks = []
            try:
                while True:
                    b = os.read(self.out_r, 65536)
                    if not b:
                        break
                    chunks.append(b)
            finally:
                os.close(self.out_r)
            _, status = os.waitpid(self.pid, 0)
            self.result = (os.waitstatus_to_exitcode(status), b"".join(chunks))
        return self.result


def exec_plugin(
    path: str, env: dict[str, str], stdin: bytes, argv: list[str] | None = None, quiet: bool = False
) -> tuple[int, bytes]:
    """Run a binary to completion: feed ``stdin``, return (exit status, stdout); ``quiet`` drops stderr."""
    return Child(path, env, stdin, argv, quiet).wait()


class Delegation:
    """A delegated plugin call (IPAM) running in the background, like libcni's invoke.DelegateX.

    The caller starts it as early as possible and does its own netlink work meanwhile: the IPAM
    process' interpreter start-up then overlaps with ours instead of adding to pod start latency.
    """

    def __init__(self, plugin_type: str, command: str, args: Args, stdin: bytes | None = None) -> None:
        self.plugin_type = plugin_type
        self.command = command
        path = find_plugin(plugin_type, args.path)
        env = dict(os.environ)
        env["CNI_COMMAND"] = command
        self.child = Child(path, env, args.raw if stdin is None else stdin)
        self.failed_cleanly = False  # the plugin answered with an error JSON (so it allocated nothing)

    def result(self) -> dict[str, Any] | None:
        """Wait for the plugin; return its (normalized) result for ADD, raise its error as ours."""
        rc, out = self.child.wait()
        if rc != 0:
            try:
                err = json.loads(out)
                code, msg, details = int(err.get("code", ERR_INTERNAL)), str(err.get("msg", "")), err.get("details")
            except (ValueError, AttributeError, TypeError):
                msg = f"plugin {self.plugin_type} failed with status {rc}"
                raise CNIError(ERR_INTERNAL, msg, out.decode(errors="replace")) from None
            self.failed_cleanly = True
            raise CNIError(code, msg, str(details or ""))
        if self.command != "ADD":
            return None
        try:
            res = json.loads(out)
        except ValueError as e:
            raise CNIError(ERR_DECODE, f"cannot decode result of {self.plugin_type}", str(e)) from None
        return normalize_result(res)


def delegate(plugin_type: str, command: str, args: Args, stdin: bytes | None = None) -> dict[str, Any] | None:
    """Invoke a delegated plugin and wait for it."""
    return Delegation(plugin_type, command, args, stdin).result()
