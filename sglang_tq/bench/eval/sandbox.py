"""Run untrusted generated Python in a child process that cannot do much harm.

Model-written code runs as its own program (``python -I prog.py``) with:

* its own empty temporary directory as the working directory, deleted afterwards;
* a stripped environment (PATH, LANG, HOME and TMPDIR pointing into that directory);
  ``-I`` (isolated mode) also ignores PYTHON* variables and the user site folder;
* resource limits set before exec: address space (default 2 GiB, so a memory bomb ends
  in MemoryError), CPU seconds, largest file it may write (stdout and stderr go to files
  too, so an output flood is cut), open files, and no core dumps;
* a wall-clock timeout, after which its whole process group (it starts a new session)
  is SIGKILLed; the group is also killed after a normal exit, so children it left behind
  die with it (a program that calls setsid itself can escape this kill);
* no network: ``unshare -rn`` (new user + network namespace: only a downed loopback
  device) where it works, else ``unshare -n`` (root), else a preamble that replaces
  ``socket.socket`` and friends with functions that raise. :func:`isolation` says which
  one this machine runs, and every result records it.

This is a guard against accidents of generated code (deleting files in the working
directory, runaway loops, huge allocations, stray connections), not a security boundary
against code written to escape.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache

# Disables networking in the child where no namespace can be had. The program's own
# line numbers shift by the preamble's length; tracebacks are for the audit log only.
SOCKET_PREAMBLE = """\
def _sandbox_no_network():
    import socket as _s

    def _refuse(*a, **k):
        raise OSError("network access is disabled in the sandbox")

    class _NoSocket:
        def __init__(self, *a, **k):
            _refuse()

    _s.socket = _NoSocket
    for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(_s, _name, _refuse)


_sandbox_no_network()
del _sandbox_no_network
"""

_UNSHARE_MODES = (
    ("unshare -rn", ["unshare", "-rn", "--"]),
    ("unshare -n", ["unshare", "-n", "--"]),
)
_PROBE = "import socket, sys; sys.exit(0 if len(socket.if_nameindex()) <= 1 else 3)"


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    address_space_bytes: int = 2 << 30
    file_size_bytes: int = 16 << 20
    open_files: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    status: str  # "passed" (exit 0), "failed" (non-zero exit or signal), "timeout"
    returncode: int | None
    wall_s: float
    isolation: str
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        return asdict(self)


def _limit_setter(limits: Limits):
    def apply() -> None:
        import resource

        def cap(what: int, value: int) -> None:
            soft, hard = resource.getrlimit(what)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(what, (value, value if hard == resource.RLIM_INFINITY else hard))

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cap(resource.RLIMIT_AS, limits.address_space_bytes)
        cap(resource.RLIMIT_CPU, limits.cpu_s)
        cap(resource.RLIMIT_FSIZE, limits.file_size_bytes)
        cap(resource.RLIMIT_NOFILE, limits.open_files)

    return apply


def _clean_env(workdir: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@cache
def isolation(python: str = sys.executable) -> str:
    """The network isolation this machine gives a child: "unshare -rn", "unshare -n" or
    "socket preamble". A namespace counts only if the child then sees nothing but one
    (loopback) interface."""
    if shutil.which("unshare") is None:
        return "socket preamble"
    for name, prefix in _UNSHARE_MODES:
        try:
            r = subprocess.run(
                [*prefix, python, "-I", "-c", _PROBE],
                capture_output=True,
                timeout=30,
                env=_clean_env(tempfile.gettempdir()),
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return name
    return "socket preamble"


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_python(
    source: str, limits: Limits = Limits(), python: str = sys.executable, mode: str | None = None
) -> Result:
    """Run ``source`` as a program in the sandbox; never raises for anything the program does.
    ``mode`` forces an isolation (one of :func:`isolation`'s names), default: the machine's best."""
    mode = mode or isolation(python)
    prefix = dict(_UNSHARE_MODES).get(mode, [])
    if mode == "socket preamble":
        source = SOCKET_PREAMBLE + "\n" + source
    elif not prefix:
        raise ValueError(f"unknown sandbox isolation {mode!r}")
    workdir = tempfile.mkdtemp(prefix="tq-sandbox-")
    try:
        prog = os.path.join(workdir, "prog.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        t0 = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [*prefix, python, "-I", "prog.py"],
                cwd=workdir,
                env=_clean_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limit_setter(limits),
                close_fds=True,
            )
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)
        proc.wait()
        wall = round(time.monotonic() - t0, 3)
        rc = proc.returncode
        status = "timeout" if timed_out else ("passed" if rc == 0 else "failed")
        return Result(
            status, None if timed_out else rc, wall, mode, _tail(out_path), _tail(err_path)
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
