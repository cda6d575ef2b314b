"""The relay under test as a real process: start, SIGKILL, restart on the same port and database,
SIGTERM at the end; memory and open files of each life read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class ProcStats:
    rss_kb: int  # VmRSS
    hwm_kb: int  # VmHWM: the peak resident set so far
    fds: int
    cpu_s: float  # user + system time so far


def proc_stats(pid: int | str = "self") -> ProcStats | None:
    """Memory and open file descriptors of a live process (Linux /proc), None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    cpu_s = ticks / os.sysconf("SC_CLK_TCK")
    return ProcStats(values.get("VmRSS", 0), values.get("VmHWM", 0), fds, cpu_s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(slots=True)
class Life:
    """One run of the relay process, from spawn to SIGKILL or exit."""

    index: int
    pid: int
    log_path: Path
    spawned_at: float
    startup_s: float = 0.0  # spawn to "relay listening" (recovery included)
    at_start: ProcStats | None = None
    at_end: ProcStats | None = None
    ended_by: str = ""  # "kill" or "term"
    exit_code: int | None = None
    error_lines: list[str] = field(default_factory=list)  # error-level log lines and tracebacks


class RelayStartFailed(Exception):
    pass


class RelayProcess:
    """`python -m relay.server` on 127.0.0.1:<port> with one database file, restartable."""

    def __init__(
        self,
        python: str,
        workdir: Path,
        *,
        port: int | None = None,
        journal_interval_ms: float = 250.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.python = python
        self.workdir = workdir
        self.port = port or free_port()
        self.db = workdir / "relay.sqlite3"
        self.journal_interval_ms = journal_interval_ms
        self.extra_args = extra_args
        self.lives: list[Life] = []
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, timeout: float = 30.0) -> Life:
        assert not self.running, "the relay is already running"
        index = len(self.lives)
        log_path = self.workdir / f"relay-{index}.log"
        self._log = log_path.open("wb")
        argv = [
            "-m",
            "relay.server",
            "--address",
            self.target,
            "--db",
            str(self.db),
            "--log-format",
            "json",
            "--retention-s",
            "3600",  # nothing the soak checks may be freed before the end
            "--journal-interval-ms",
            f"{self.journal_interval_ms:g}",
            "--shutdown-grace-s",
            "2",
            *self.extra_args,
        ]
        spawned = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            self.python,
            *argv,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log,
        )
        life = Life(index, self._process.pid, log_path, spawned)
        self.lives.append(life)
        deadline = spawned + timeout
        while not (_listening(log_path) or await _accepts(self.port)):
            if self._process.returncode is not None or time.monotonic() > deadline:
                await self._finish(life, "failed")
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RelayStartFailed(
                    f"relay life {index} did not start listening on {self.target} "
                    f"(exit code {self._process.returncode}):\n{tail}"
                )
            await asyncio.sleep(0.02)
        life.startup_s = time.monotonic() - spawned
        life.at_start = proc_stats(life.pid)
        return life

    async def kill(self) -> Life:
        """SIGKILL: the crash the journal window is documented for."""
        life = self.lives[-1]
        life.at_end = proc_stats(life.pid)
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGKILL)
        await self._finish(life, "kill")
        return life

    async def terminate(self, timeout: float = 20.0) -> Life:
        """SIGTERM and wait (a graceful stop journals everything); SIGKILL if it hangs."""
        life = self.lives[-1]
        life.at_end = proc_stats(life.pid)
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._process.wait(), timeout)
        except TimeoutError:
            life.error_lines.append(f"did not exit within {timeout:g} s of SIGTERM; killed")
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)
        await self._finish(life, "term")
        return life

    async def close(self) -> None:
        """Leaves no process behind, whatever happened before."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)
            await self._finish(self.lives[-1], self.lives[-1].ended_by or "kill")
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _finish(self, life: Life, how: str) -> None:
        assert self._process is not None
        if self._process.returncode is None and how == "failed":
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)
        life.exit_code = await self._process.wait()
        life.ended_by = life.ended_by or how
        if self._log is not None:
            self._log.close()
            self._log = None
        life.error_lines.extend(_error_lines(life.log_path))


async def _accepts(port: int) -> bool:
    """Whether the relay accepts connections (it listens only once recovery is done)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _listening(log_path: Path) -> bool:
    try:
        return b'"relay listening"' in log_path.read_bytes()
    except OSError:
        return False


def _error_lines(log_path: Path) -> list[str]:
    """The relay's error-level log lines (message and the exception's last line), and any
    output that is not a JSON log line (a traceback printed outside logging)."""
    found: list[str] = []
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            found.append(f"(not a log line) {line[:200]}")
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("error", "critical"):
            continue
        message = str(entry.get("message", ""))
        exception = str(entry.get("exception", "")).strip().splitlines()
        if exception:
            message += f": {exception[-1]}"
        found.append(message[:300])
    return found
