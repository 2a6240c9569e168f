"""Kernel headers for bcc: find them, or build a merged tree from Debian's linux-headers packages.

bcc compiles the BPF C source at load time and needs a kernel header tree. On a node whose running
kernel has no ``/lib/modules/$(uname -r)/build`` (a custom or newer kernel), Debian's headers of another
version are safe for our programs because they only use stable UAPI contexts (``bpf_sock_addr``,
``__sk_buff``). Neither Debian header directory works alone (``-common`` lacks the generated files,
``-<arch>`` the sources), so we build a symlink tree that overlays the arch directory on the common one
and point ``BCC_KERNEL_SOURCE`` at it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile


class HeadersError(RuntimeError):
    pass


def cache_dir() -> str:
    if os.environ.get("KPROXY_CACHE_DIR"):
        return os.environ["KPROXY_CACHE_DIR"]
    if os.geteuid() == 0 and os.access("/var/cache", os.W_OK):
        return "/var/cache/kproxy"
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kproxy")


def _version_key(path: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", os.path.basename(path))]


def find_debian_headers(src_root: str = "/usr/src") -> tuple[str, str] | None:
    """(common dir, arch dir) of the newest installed Debian linux-headers pair, or None."""
    pairs = []
    for arch_dir in glob.glob(os.path.join(src_root, "linux-headers-*")):
        if arch_dir.endswith("-common") or not os.path.isdir(arch_dir):
            continue
        base = os.path.basename(arch_dir)[len("linux-headers-"):]
        version = base.rsplit("-", 1)[0]  # 6.1.0-56-amd64 -> 6.1.0-56
        common = os.path.join(src_root, f"linux-headers-{version}-common")
        if os.path.isdir(common):
            pairs.append((common, arch_dir))
    if not pairs:
        return None
    return max(pairs, key=lambda p: _version_key(p[1]))


def merged_tree(common: str, arch: str, cache: str | None = None) -> str:
    """Build (once) the merged symlink tree of ``common`` overlaid with ``arch``; return its path."""
    cache = cache or cache_dir()
    dest = os.path.join(cache, "ksrc-" + os.path.basename(arch)[len("linux-headers-"):])
    if os.path.isfile(os.path.join(dest, ".complete")):
        return dest
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ksrc-", dir=cache)
    try:
        for src, extra in ((common, []), (arch, ["--remove-destination"])):
            p = subprocess.run(["cp", "-as", *extra, f"{src}/.", tmp], capture_output=True, text=True)
            if p.returncode != 0:
                raise HeadersError(f"building the merged kernel header tree failed: {p.stderr.strip()}")
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_kernel_source() -> str:
    """Make sure bcc will find kernel headers; return the tree used (sets BCC_KERNEL_SOURCE if needed)."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if not os.path.isdir(env):
            raise HeadersError(f"BCC_KERNEL_SOURCE={env} does not exist")
        return env
    build = f"/lib/modules/{os.uname().release}/build"
    # Debian's build link points at the -<arch> directory, which lacks the common sources: only a
    # complete tree (one with include/linux) is usable as is.
    if os.path.isfile(os.path.join(build, "include", "linux", "kconfig.h")):
        return build
    pair = find_debian_headers()
    if pair is None:
        raise HeadersError(
            f"no kernel headers: {build} is missing and no Debian linux-headers-*-common / -<arch> pair is "
            "installed under /usr/src (apt-get install linux-headers-amd64), and BCC_KERNEL_SOURCE is unset")
    tree = merged_tree(*pair)
    os.environ["BCC_KERNEL_SOURCE"] = tree
    return tree
