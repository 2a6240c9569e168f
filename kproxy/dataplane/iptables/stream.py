"""Feeding iptables-restore while the rules are still being rendered, and iptables-save in the background.

A full sync at 10k Services writes ~25 MB of restore input. Rendering it first and handing it over
afterwards serialises two CPU-bound jobs; instead the restore process starts first and parses what
is written into its pipe on the other core while Python renders the rest. Nothing is committed
before iptables-restore reads a table's ``COMMIT`` line, so a stream that is abandoned before that
(a rendering error, a dead process) leaves the kernel's rules as they were: :meth:`RestoreStream.abort`
kills the process, and a restore that fails makes :meth:`RestoreStream.wait` raise :class:`SyncError`.
"""

from __future__ import annotations

import collections
import fcntl
import subprocess
import tempfile
import time

from .. import SyncError
from .backend import WAIT, Backend, failed_line

PIPE_SIZE = 1 << 20  # lets rendering run up to 1 MB ahead of the parser instead of the default 64 KB
TAIL_BYTES = 4 << 20  # restore input kept to quote the failing line (the parser is at most ~1 MB behind)


class RestoreStream:
    """One ``iptables-restore --noflush`` process fed incrementally; see the module docstring."""

    def __init__(self, backend: Backend, keep_text: bool = False) -> None:
        self.argv = [backend.restore_cmd, *WAIT, "--noflush"]
        # a file, not a pipe: nothing can block on diagnostics; closed in wait() or abort()
        self._out = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            # unbuffered: each chunk reaches the parser whole, not minus what a buffer holds back
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=self._out, stderr=self._out,
                                         bufsize=0)
        except OSError as e:
            self._out.close()
            raise SyncError(f"cannot run {self.argv[0]}: {e}") from None
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin
        try:
            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only costs overlap
        self._broken = False  # the process stopped reading (it exited, normally on an error)
        self._lines = 0  # lines written so far
        self._tail: collections.deque[tuple[int, str]] = collections.deque()  # (first line number, chunk)
        self._tail_bytes = 0
        self._kept: list[str] | None = [] if keep_text else None
        self.closed = False
        self.write_seconds = 0.0  # time spent blocked on a full pipe, i.e. waiting for the parser

    def write(self, chunk: str) -> None:
        """Append ``chunk`` (whole lines, each ending in a newline) to the process's input."""
        if self._kept is not None:
            self._kept.append(chunk)
        self._tail.append((self._lines + 1, chunk))
        self._tail_bytes += len(chunk)
        while self._tail_bytes > TAIL_BYTES and len(self._tail) > 1:
            self._tail_bytes -= len(self._tail.popleft()[1])
        self._lines += chunk.count("\n")
        if self._broken:
            return
        data = memoryview(chunk.encode())
        t0 = time.perf_counter()
        try:
            while data:
                data = data[self._stdin.write(data) or 0:]  # a signal can cut a pipe write short
        except BrokenPipeError:
            self._broken = True  # wait() reports why the process exited
        self.write_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """End the input: the process commits what it has not committed yet and exits."""
        if self.closed:
            return
        self.closed = True
        try:
            self._stdin.close()
        except BrokenPipeError:
            self._broken = True

    def done(self) -> bool:
        return self.proc.poll() is not None

    def wait(self) -> None:
        """Close the input, wait for the process; SyncError if it failed (then nothing of a table whose
        COMMIT it did not reach was applied)."""
        self.close()
        rc = self.proc.wait()
        self._out.seek(0)
        msg = self._out.read().decode(errors="replace").strip()
        self._out.close()
        if rc != 0 or self._broken:
            raise SyncError(f"{self.argv[0]} failed ({rc}): {msg or 'exited before reading all its input'}"
                            f"{failed_line(msg, self._line)}")

    def abort(self) -> None:
        """Kill the process before it reads another COMMIT; nothing more is applied."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.closed = True
        try:
            self._stdin.close()
        except BrokenPipeError:
            pass
        self._out.close()

    def chunks(self) -> list[str]:
        """Everything written, in pieces (only when constructed with ``keep_text``)."""
        return self._kept or []

    def _line(self, n: int) -> str | None:
        for first, chunk in reversed(self._tail):
            if first <= n:
                lines = chunk.split("\n")
                return lines[n - first] if n - first < len(lines) - 1 else None
        return None


class SaveReader:
    """``iptables-save`` started now and read later: which kproxy chains the kernel holds per table.

    iptables-save takes no xtables lock, so it runs alongside rendering; it must only finish before the
    restore that deletes the stale chains commits (it reads the state before that restore)."""

    def __init__(self, backend: Backend, tables: tuple[str, ...]) -> None:
        self.backend = backend
        self.tables = tables
        self.argv = [backend.save_cmd]
        try:
            self.proc: subprocess.Popen[str] | None = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            self.proc, self._error = None, str(e)
        self._result: dict[str, set[str]] | None = None

    def chains(self) -> dict[str, set[str]]:
        """Chain names per table (every table in ``tables``, empty if the kernel has not loaded it)."""
        if self._result is None:
            if self.proc is None:
                raise SyncError(f"cannot run {self.argv[0]}: {self._error}")
            out, err = self.proc.communicate()
            if self.proc.returncode != 0:
                raise SyncError(f"{self.argv[0]} failed: {err.strip()}")
            self._result = parse_save(out, self.tables)
        return self._result

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def parse_save(text: str, tables: tuple[str, ...]) -> dict[str, set[str]]:
    """Chain names per table from ``iptables-save`` output."""
    out: dict[str, set[str]] = {t: set() for t in tables}
    current: set[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = out.get(line[1:].strip())
        elif line.startswith(":") and current is not None:
            current.add(line[1:].split(" ", 1)[0])
    return out
