"""Running generated programs isolated by the operating system — never in-process.

Each program runs in a bubblewrap (``bwrap``) sandbox: own user, PID, network, mount, IPC and UTS
namespaces; uid/gid 65534 without capabilities; read-only ``/usr`` and Python install, a 64 MiB tmpfs
``/sandbox`` as the one writable place; a seccomp filter refusing new processes; rlimits on CPU,
memory, file size, processes and open files; ``python -I -S`` (standard library only). At the time
limit bwrap is killed and with it the whole PID namespace. Details: ``docs/SECURITY.md``.

:func:`run_tests` takes a HumanEval verdict out of the generated code's reach: the untrusted module
and the trusted tests run in two sandboxes, the tests calling the entry point over a pipe.
:func:`run_program` runs one program and passes it if it returns normally and exits 0 (that stops
accidental early exits, not deliberate fakes). Without a working sandbox, running generated code
is refused unless ``unsafe_exec=True``: then the same runner is a plain subprocess, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import LataError

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
MEMORY_BYTES = 2 << 30
FILE_BYTES = 16 << 20
TMPFS_BYTES = 64 << 20
SANDBOX_UID = 65534
TAIL = 4096
# CPU name -> (seccomp audit architecture, clone, fork-like syscalls); clone3 is 435 everywhere.
SECCOMP_ARCH = {"x86_64": (0xC000003E, 56, (57, 58)), "aarch64": (0xC00000B7, 220, ())}

# The code that runs inside the sandbox (as ``python -I -S -c RUNNER mode entry cpu memory files fds...``).
RUNNER = r'''
import ast, builtins, os, resource, sys
from contextlib import suppress

def limit(cpu, memory, files):
    for name, soft, hard in (("CPU", cpu, cpu + 1), ("AS", memory, memory), ("FSIZE", files, files),
                             ("NPROC", 64, 64), ("NOFILE", 64, 64), ("CORE", 0, 0)):
        with suppress(ValueError, OSError):
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))

class Floats(ast.NodeTransformer):
    def visit_Name(self, node):
        return ast.Constant(float(node.id)) if node.id in ("inf", "nan") else node

def load(text):
    try:
        return ast.literal_eval(Floats().visit(ast.parse(text, mode="eval")))
    except (ValueError, SyntaxError):
        raise TypeError("only Python literals pass between the program and its tests") from None

def send(pipe, text):
    pipe.write(len(text.encode()).to_bytes(4, "big") + text.encode())
    pipe.flush()

def receive(pipe):
    size = int.from_bytes(pipe.read(4) or b"\xff" * 4, "big")
    data = pipe.read(size) if size <= 16 << 20 else b""
    if len(data) != size:
        raise EOFError("the candidate's process ended")
    return data.decode()

def serve(namespace, entry, inbox, outbox):
    while True:
        try:
            args, kwargs = load(receive(inbox))
        except EOFError:
            return
        try:
            reply = repr(("ok", namespace[entry](*args, **kwargs)))
            load(reply)
        except Exception as error:
            reply = repr(("error", type(error).__name__, str(error)[:500]))
        send(outbox, reply)

def check(namespace, entry, inbox, outbox):
    def candidate(*args, **kwargs):
        send(outbox, repr((args, kwargs)))
        reply = load(receive(inbox))
        if reply[0] == "ok":
            return reply[1]
        kind = getattr(builtins, str(reply[1]), None)
        raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(str(reply[2]))
    namespace[entry] = candidate
    namespace["check"](candidate)

mode, entry, cpu, memory, files, *fds = sys.argv[1:]
source = sys.stdin.buffer.read().decode()
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
limit(int(cpu), int(memory), int(files))
namespace = {"__name__": "__main__", "__builtins__": builtins}
exec(compile(source, "tests.py" if mode == "check" else "program.py", "exec"), namespace)
if mode == "serve":
    serve(namespace, entry, open(int(fds[0]), "rb"), open(int(fds[1]), "wb"))
else:
    if mode == "check":
        check(namespace, entry, open(int(fds[0]), "rb"), open(int(fds[1]), "wb"))
    sys.stdout.flush()
    os.write(int(fds[-1]), b"1")
'''


@dataclass
class Execution:
    """How a program ended: ``status`` is ``passed``, ``failed`` or ``timed out``; ``error`` the last
    line of its stderr (or the reason); ``seconds`` wall time."""

    status: str
    seconds: float
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _seccomp_filter() -> bytes:
    """A seccomp-BPF program: fork, vfork and clone without ``CLONE_THREAD`` fail with EPERM, clone3
    with ENOSYS (libc then falls back to clone, so threads work); other ABIs' syscalls kill."""
    arch, clone, forks = SECCOMP_ARCH[platform.machine()]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x50001, 0x50026
    code = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (load, 0, 0, 0)]
    if arch == 0xC000003E:  # x32 syscalls
        code += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]
    for number, action in [*((n, eperm) for n in forks), (435, enosys)]:
        code += [(jeq, 0, 1, number), (ret, 0, 0, action)]
    code += [(jeq, 1, 0, clone), (ret, 0, 0, allow), (load, 0, 0, 16), (jset, 1, 0, 0x10000), (ret, 0, 0, eperm),
             (ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *op) for op in code)


@functools.lru_cache(maxsize=1)
def _python() -> tuple[str, tuple[str, ...]]:
    """The base interpreter (not a virtualenv's) and the folders it needs outside ``/usr``."""
    executable = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(executable))}
    return executable, tuple(sorted(r for r in roots if r != "/usr" and not r.startswith("/usr/")))


def _bwrap(seccomp_fd: int) -> list[str]:
    """The bwrap command line up to the interpreter (see the module docstring)."""
    command = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
               "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for root in _python()[1]:
        command += ["--ro-bind", root, root]
    return [*command, "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/sandbox", "--remount-ro", "/dev",
            "--remount-ro", "/", "--chdir", "/sandbox", "--clearenv", "--setenv", "HOME", "/sandbox", "--setenv",
            "TMPDIR", "/sandbox", "--setenv", "LANG", "C.UTF-8", "--setenv", "PATH", "/usr/bin:/bin",
            "--add-seccomp-fd", str(seccomp_fd), "--"]


def _spawn(mode: str, entry: str, source: str, folder: Path, name: str, fds: list[int], *, isolated: bool,
           timeout: float, memory_bytes: int) -> subprocess.Popen[bytes]:
    """Start the runner in ``mode`` on ``source`` (its stdin); stdout/stderr go to ``folder/name.*``."""
    seccomp = None
    if isolated:
        seccomp, writer = os.pipe()
        os.write(writer, _seccomp_filter())
        os.close(writer)
    limits = [str(max(1, int(timeout) + 1)), str(memory_bytes), str(FILE_BYTES)]
    command = [*(_bwrap(seccomp) if seccomp is not None else []), _python()[0], "-I", "-S", "-c", RUNNER, mode, entry,
               *limits, *map(str, fds)]
    env = {"PATH": os.defpath, "HOME": str(folder), "TMPDIR": str(folder), "LANG": "C.UTF-8"}
    try:
        with tempfile.TemporaryFile() as stdin, (folder / f"{name}.out").open("wb") as out, \
                (folder / f"{name}.err").open("wb") as err:
            stdin.write(source.encode("utf-8", "replace"))
            stdin.seek(0)
            return subprocess.Popen(command, stdin=stdin, stdout=out, stderr=err, cwd=folder, env=env,
                                    pass_fds=[*fds, *([seccomp] if seccomp is not None else [])],
                                    start_new_session=True)
    finally:
        if seccomp is not None:
            os.close(seccomp)


def _wait(process: subprocess.Popen[bytes], timeout: float | None) -> int | None:
    """The exit code, or ``None`` after killing the process (its whole sandbox) at ``timeout``."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return None


def _signalled(fd: int) -> bool:
    """Whether the runner wrote its completion byte to the pipe read by ``fd`` (never blocks)."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        os.set_blocking(fd, False)
        return pipe.read(1) == b"1"  # None when nothing was written and a writer is still open


def _verdict(code: int | None, finished: bool, seconds: float, timeout: float, cpu_killed: bool,
             error: str) -> Execution:
    """An :class:`Execution` from the deciding process's exit ``code`` (``None``: killed at ``timeout``)
    and whether it signalled completion."""
    if code is None:
        return Execution(TIMED_OUT, seconds, f"no exit within {timeout:g} s")
    if code == 0 and finished:
        return Execution(PASSED, seconds)
    if cpu_killed or code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return Execution(TIMED_OUT, seconds, "CPU time limit")
    return Execution(FAILED, seconds, error or (f"exit code {code}" if code else "exited before the tests ran"))


def _last_line(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL))
        lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str:
    """Why generated code cannot run isolated here (``""`` when it can); probed once with a real run."""
    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux"
    if platform.machine() not in SECCOMP_ARCH:
        return f"no seccomp filter for the {platform.machine()} architecture"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = ("import os\nassert os.getuid() == 65534, 'uid'\ntry:\n    pid = os.fork()\nexcept OSError:\n"
             "    pid = None\nif pid == 0:\n    os._exit(0)\nassert pid is None, 'fork is not blocked'\n")
    try:
        outcome = _run_program(probe, timeout=30, memory_bytes=MEMORY_BYTES, isolated=True)
    except OSError as error:
        return f"bwrap does not start: {error}"
    return "" if outcome.passed else f"bwrap does not work here: {outcome.error}"


def check_isolation(unsafe_exec: bool = False) -> bool:
    """``True`` when generated code will run isolated. Without isolation: a :class:`LataError`, or
    with ``unsafe_exec`` a warning and ``False`` (programs then run as plain subprocesses)."""
    problem = isolation_problem()
    if not problem:
        return True
    if not unsafe_exec:
        raise LataError(f"refusing to run generated code without an OS sandbox ({problem}): install bubblewrap "
                        "(apt-get install bubblewrap) with user namespaces enabled, or pass unsafe_exec=True "
                        "(CLI: --unsafe-exec) to run it unisolated")
    warnings.warn(f"running generated code WITHOUT isolation (unsafe_exec): {problem}", RuntimeWarning, stacklevel=3)
    return False


def _run_program(program: str, *, timeout: float, memory_bytes: int, isolated: bool) -> Execution:
    with tempfile.TemporaryDirectory(prefix="lata-eval-") as temp:
        folder = Path(temp)
        done, writer = os.pipe()
        start = time.perf_counter()
        try:
            process = _spawn("run", "-", program, folder, "program", [writer], isolated=isolated, timeout=timeout,
                             memory_bytes=memory_bytes)
        except BaseException:
            os.close(done)
            raise
        finally:
            os.close(writer)
        code = _wait(process, timeout)
        seconds = time.perf_counter() - start
        return _verdict(code, _signalled(done), seconds, timeout, False, _last_line(folder / "program.err"))


def run_program(program: str, *, timeout: float = 10.0, memory_bytes: int = MEMORY_BYTES,
                unsafe_exec: bool = False) -> Execution:
    """Run ``program`` in the sandbox; it passes if it runs to its end and exits 0 within ``timeout``
    wall-clock seconds (a program bent on it can fake that; :func:`run_tests` cannot be faked)."""
    return _run_program(program, timeout=timeout, memory_bytes=memory_bytes, isolated=check_isolation(unsafe_exec))


def run_tests(module: str, tests: str, entry: str, *, timeout: float = 10.0, memory_bytes: int = MEMORY_BYTES,
              unsafe_exec: bool = False) -> Execution:
    """Run untrusted ``module`` and trusted ``tests`` (defining ``check(candidate)``) in two sandboxes:
    ``check`` and the global ``entry`` of ``tests`` call ``entry`` of ``module`` over a pipe, arguments
    and results passing as Python literals. Passes only if ``check`` returns within ``timeout``."""
    isolated = check_isolation(unsafe_exec)
    with tempfile.TemporaryDirectory(prefix="lata-eval-") as temp:
        folder = Path(temp)
        (ask, asked), (reply, replied), (done, writer) = os.pipe(), os.pipe(), os.pipe()
        options = {"isolated": isolated, "timeout": timeout, "memory_bytes": memory_bytes}
        start = time.perf_counter()
        try:
            server = _spawn("serve", entry, module, folder, "program", [ask, replied], **options)
            try:
                checker = _spawn("check", entry, tests, folder, "tests", [reply, asked, writer], **options)
            except BaseException:
                _wait(server, 0)
                raise
        except BaseException:
            os.close(done)
            raise
        finally:
            for fd in (ask, asked, reply, replied, writer):
                os.close(fd)
        code = _wait(checker, timeout)
        seconds = time.perf_counter() - start
        finished, served = _signalled(done), _wait(server, 0 if code is None else 1)
        error = _last_line(folder / "tests.err")
        if not error or error.startswith("EOFError: the candidate"):
            error = _last_line(folder / "program.err") or error
        return _verdict(code, finished, seconds, timeout, served in (-signal.SIGXCPU, 128 + signal.SIGXCPU), error)
