"""Run a command inside a throw-away qemu VM booting Debian's kernel (for IPVS and other kernel features).

The development and CI machines run a kernel without IPVS and without the ``dummy`` link type. Debian's
``linux-image-amd64`` has both as modules, so tests that need them boot that kernel under qemu:

* The guest's root file system is the host's ``/``, shared read-only over virtio-9p, with a tmpfs overlay
  on top: the guest sees the same project, venv and tools at the same paths, and writes nothing back.
* A per-run *job directory* (on the host) is shared read-write at the same path inside the guest; it holds
  the command (``cmd``), its ``stdout``, ``stderr``, exit code (``rc``) and anything the command leaves
  for the caller (junit XML, benchmark JSON).
* The initramfs holds only busybox and the modules needed to reach the 9p shares; its ``/init`` mounts the
  overlay and ``switch_root``\\ s into it (a chroot breaks kernel module auto-loading: iptables-nft then
  fails with "Protocol not supported"). Stage two mounts proc/sys/dev/..., runs ``bash JOB/cmd`` and powers
  the VM off. The initramfs is built once per kernel version and cached under ``.cache/vm/``.
* Software emulation (``-accel tcg``): ``/dev/kvm`` on these machines is a PVM backend that cannot run
  Debian's kernel. Expect Python to run ~6x slower than on the host and ~5 s for boot + power-off.
* No network device is attached: every packet a test sends stays inside the guest.

Usage::

    from kproxy.testing.vm import run_in_vm
    r = run_in_vm("modprobe ip_vs && ipvsadm -Ln")
    assert r.returncode == 0, r.describe()
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("KPROXY_VM_CACHE", PROJECT_ROOT / ".cache" / "vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
INITRD_MODULES = ("virtio_pci", "virtio_mmio", "9pnet_virtio", "9p", "overlay")
REQUIRED_MODULE = "ip_vs"
INSTALL_HINT = "apt-get install qemu-system-x86 linux-image-amd64 busybox-static ipvsadm ipset"
INITRD_FORMAT = 2  # bump when the /init script changes so cached images are rebuilt


class VMUnavailable(RuntimeError):
    """qemu, a suitable kernel or busybox is missing on this machine (the message says how to fix it)."""


@dataclass
class VMResult:
    returncode: int  # the command's exit code; -1 if the VM died or timed out before writing one
    stdout: str
    stderr: str
    console: str  # the guest's serial console (kernel messages, init errors)
    seconds: float  # wall time including boot and power-off
    job_dir: str = ""  # kept only when the caller passed job_dir
    timed_out: bool = False

    def describe(self, limit: int = 4000) -> str:
        """A failure message with the tail of everything the VM produced."""
        return (f"VM command exited {self.returncode} after {self.seconds:.1f}s"
                f"{' (timed out)' if self.timed_out else ''}\n"
                f"--- stdout\n{self.stdout[-limit:]}\n--- stderr\n{self.stderr[-limit:]}\n"
                f"--- console\n{self.console[-limit:]}")


# ---- kernel and initramfs ------------------------------------------------------------------------------

def _module_files(kver: str, name: str) -> list[str]:
    return glob.glob(f"/lib/modules/{kver}/kernel/**/{name}.ko*", recursive=True)


def find_kernel() -> tuple[str, str]:
    """The newest ``/boot/vmlinuz-*`` whose modules include IPVS: ``(version, vmlinuz path)``."""
    found = []
    for path in glob.glob("/boot/vmlinuz-*"):
        kver = path[len("/boot/vmlinuz-"):]
        if _module_files(kver, REQUIRED_MODULE):
            found.append((_version_key(kver), kver, path))
    if not found:
        raise VMUnavailable(f"no kernel with {REQUIRED_MODULE}.ko under /boot and /lib/modules; {INSTALL_HINT}")
    found.sort()
    _, kver, path = found[-1]
    if not os.access(path, os.R_OK):
        raise VMUnavailable(f"{path} is not readable (run as root)")
    return kver, path


def _version_key(kver: str) -> tuple[int | str, ...]:
    parts: list[int | str] = []
    for chunk in kver.replace("-", ".").split("."):
        parts.append(int(chunk) if chunk.isdigit() else -1)
    return tuple(parts)


def _busybox() -> str:
    for p in BUSYBOX_CANDIDATES:
        if os.path.exists(p):
            # the initramfs has no libc: a dynamically linked busybox would not start
            out = subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout if shutil.which("file") \
                else "statically linked"
            if "dynamically linked" not in out:
                return p
    raise VMUnavailable(f"busybox-static not found; {INSTALL_HINT}")


def _initrd_module_paths(kver: str) -> list[str]:
    """The .ko files (dependencies first, no duplicates) needed to mount the 9p shares and the overlay."""
    out: list[str] = []
    for mod in INITRD_MODULES:
        p = subprocess.run(["modprobe", "-S", kver, "--show-depends", mod], capture_output=True, text=True)
        if p.returncode != 0:
            raise VMUnavailable(f"modprobe --show-depends {mod} for {kver} failed: {p.stderr.strip()}")
        for line in p.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod" and words[1] not in out:
                out.append(words[1])  # builtin modules print "builtin X" and need nothing
    return out


INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules/order); do insmod /modules/$m 2>/dev/null; done
JOB=$(sed -n 's/.*vm\.job=\([^ ]*\).*/\1/p' /proc/cmdline)
fail() { echo "vm-init: $*"; echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger; sleep 5; }
mkdir -p /lower /rw /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower || fail "mount hostroot"
mount -t tmpfs -o mode=755 tmpfs /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "mount overlay"
mkdir -p /newroot$JOB
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 job /newroot$JOB || fail "mount job"
umount /proc
exec switch_root /newroot /bin/bash $JOB/stage2
fail "switch_root"
"""

STAGE2_SCRIPT = r"""#!/bin/bash
# Stage two of the kproxy test VM: runs in the overlay root after switch_root.
JOB=$(dirname "$(readlink -f "$0")")
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run

mkdir -p /run/netns /run/lock
mount -t bpf bpffs /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
hostname kproxy-vm
ip link set lo up
export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 KPROXY_IN_VM=1
export PYTHONDONTWRITEBYTECODE=1
cd "$JOB"
bash "$JOB/cmd" > "$JOB/stdout" 2> "$JOB/stderr" < /dev/null
echo $? > "$JOB/rc.tmp" && mv "$JOB/rc.tmp" "$JOB/rc"
sync
echo 1 > /proc/sys/kernel/sysrq
echo o > /proc/sysrq-trigger
sleep 10
"""


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's "newc" format from ``(name, mode, data)`` entries."""
    out = bytearray()
    ino = 1

    def pad4(b: bytearray) -> None:
        b.extend(b"\0" * (-len(b) % 4))

    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.extend(hdr.encode())
        out.extend(nb)
        pad4(out)
        out.extend(data)
        pad4(out)
        ino += 1
    return bytes(out)


def build_initrd(kver: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Build (or reuse) the initramfs for ``kver``; returns its path."""
    path = cache_dir / f"initrd-{kver}-v{INITRD_FORMAT}.cpio"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries: list[tuple[str, int, bytes]] = [(n, d, b"") for n in (
        "bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot")]
    entries.append(("bin/busybox", x, Path(_busybox()).read_bytes()))
    entries.append(("init", x, INIT_SCRIPT.encode()))
    order = []
    for ko in _initrd_module_paths(kver):
        data = Path(ko).read_bytes()
        name = os.path.basename(ko)
        if name.endswith(".xz") or name.endswith(".zst"):
            raise VMUnavailable(f"compressed module {ko}: busybox insmod cannot load it")
        entries.append((f"modules/{name}", f, data))
        order.append(name)
    entries.append(("modules/order", f, ("\n".join(order) + "\n").encode()))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(_newc(entries))
    tmp.rename(path)
    return path


def check_available() -> str:
    """Raise VMUnavailable unless a VM can boot here; returns the kernel version that would boot."""
    if not shutil.which(QEMU):
        raise VMUnavailable(f"{QEMU} not found; {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise VMUnavailable("the VM runner shares / over 9p and needs root")
    kver, _ = find_kernel()
    _busybox()
    return kver


# ---- running ---------------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run_in_vm(cmd: str | list[str], timeout: float = 300, job_dir: str | None = None, memory_mb: int = 1024,
              cpus: int = 2, files: dict[str, str] | None = None, boot_retries: int = 2) -> VMResult:
    """Boot the VM, run ``cmd`` (a bash script, or an argv list) inside, power off, return its output.

    ``job_dir``: a directory to use (and keep) as the shared job directory, e.g. to read back files the
    command writes; by default a temporary one is created and removed. ``files``: extra files (name →
    content) written into the job directory before boot. The VM is killed after ``timeout`` seconds.
    """
    kver = check_available()
    _, vmlinuz = find_kernel()
    initrd = build_initrd(kver)
    keep = job_dir is not None
    job = os.path.abspath(job_dir) if job_dir else tempfile.mkdtemp(prefix="kproxy-vm-", dir="/tmp")
    os.makedirs(job, exist_ok=True)
    if any(c.isspace() for c in job):
        raise ValueError(f"job dir {job!r} must not contain whitespace (it travels on the kernel command line)")
    for name in ("stdout", "stderr", "rc", "console.log"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(job, name))
    script = cmd if isinstance(cmd, str) else shlex.join(cmd)
    Path(job, "cmd").write_text(script if script.endswith("\n") else script + "\n")
    Path(job, "stage2").write_text(STAGE2_SCRIPT)
    for name, content in (files or {}).items():
        Path(job, name).write_text(content)
    argv = [
        QEMU, "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus),
        "-m", f"{memory_mb}M", "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-no-reboot", "-serial", f"file:{job}/console.log",
        "-kernel", vmlinuz, "-initrd", str(initrd),
        "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 reboot=t no_timer_check vm.job={job}",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=job,path={job},security_model=none",
        "-device", "virtio-9p-pci,fsdev=job,mount_tag=job",
    ]
    t0 = time.monotonic()
    for attempt in range(boot_retries + 1):
        timed_out = False
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            qemu_out, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            qemu_out, _ = proc.communicate()
        except BaseException:
            _kill(proc)
            raise
        # On a heavily loaded host the emulated kernel occasionally panics during early boot (timer checks);
        # the command never started (no stdout file yet), so booting again is safe.
        started = os.path.exists(os.path.join(job, "stdout"))
        if started or timed_out or attempt == boot_retries:
            break
    seconds = time.monotonic() - t0
    rc_text = _read(os.path.join(job, "rc")).strip()
    console = _read(os.path.join(job, "console.log"))
    if qemu_out:
        console += "\n--- qemu\n" + qemu_out.decode(errors="replace")
    result = VMResult(
        returncode=int(rc_text) if rc_text.lstrip("-").isdigit() else -1,
        stdout=_read(os.path.join(job, "stdout")),
        stderr=_read(os.path.join(job, "stderr")),
        console=console,
        seconds=seconds,
        job_dir=job if keep else "",
        timed_out=timed_out,
    )
    if not keep:
        shutil.rmtree(job, ignore_errors=True)
    return result


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the qemu process we started (by its PID / process group, never by name)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    """``python -m kproxy.testing.vm -- CMD...``: run a command in the VM and relay its output."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m kproxy.testing.vm", description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    ap.add_argument("--job-dir", default=None, help="keep the job directory here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="command (run by bash inside the VM)")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command")
    try:
        r = run_in_vm(" ".join(cmd) if len(cmd) == 1 else cmd, timeout=a.timeout, job_dir=a.job_dir,
                      memory_mb=a.memory)
    except VMUnavailable as e:
        print(f"VM unavailable: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.returncode < 0:
        sys.stderr.write(r.describe())
    print(f"[vm] exit {r.returncode} in {r.seconds:.1f}s", file=sys.stderr)
    return r.returncode if r.returncode >= 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
