"""Running generated programs in a separate, fenced Python process — never in-process.

Each program runs as ``python -I runner.py`` in a fresh temporary directory (also its ``HOME`` and
``TMPDIR``) with a minimal environment, in its own session (the whole process group is killed at
the time limit). ``runner.py`` first applies a guard in the child, in the spirit of human-eval's
``reliability_guard`` (Chen et al. 2021, https://github.com/openai/human-eval):

* ``resource.setrlimit``: address space (default 2 GiB), CPU seconds (time limit + 1), file size;
* networking off: ``socket.socket`` and friends raise;
* no writes outside the temporary directory: ``open``/``io.open``/``os.open`` refuse write modes
  for other paths; ``os.remove``/``unlink``/``rmdir``/``rename``/``system``/``kill``/``fork``/``exec*``,
  ``shutil.rmtree``/``move`` and ``subprocess.Popen`` raise ``PermissionError``;

then executes the program. It passes only if it exits with 0 *and* the runner reaches its end (a
per-run token printed after the program), so an early ``exit(0)`` is not a pass.

This guards against accidents of generated code, not against a determined attacker: run
untrusted models' code in a container or VM as well.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
MEMORY_BYTES = 2 << 30
FILE_BYTES = 16 << 20
TAIL = 4096

GUARD = r'''
def _lata_guard(memory, cpu, file_size):
    import builtins, io, os, shutil, socket, subprocess
    try:
        import resource
        for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                             (resource.RLIMIT_FSIZE, file_size)):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass
    except ImportError:
        pass
    root = os.path.realpath(os.getcwd())

    def inside(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
        return full == root or full.startswith(root + os.sep)

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(name + " is disabled in the evaluation sandbox")
        return refused

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("writing outside the sandbox directory is refused: " + repr(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError("writing outside the sandbox directory is refused: " + repr(path))
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "system", "popen", "kill", "killpg", "fork", "forkpty", "putenv", "unsetenv", "chmod", "chown",
                 "lchown", "fchmod", "fchown", "chroot", "chdir", "fchdir", "setuid", "symlink", "link",
                 "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, refuse("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refuse("shutil." + name))
    subprocess.Popen = refuse("subprocess.Popen")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, refuse("socket." + name))
'''

RUNNER = '''{guard}
with open("program.py", encoding="utf-8") as _handle:
    _source = _handle.read()
_lata_guard({memory}, {cpu}, {file_size})
del _lata_guard, _handle
exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__"}})
print({token!r}, flush=True)
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


def _tail(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL))
        return handle.read().decode("utf-8", "replace")


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_program(program: str, *, timeout: float = 10.0, memory_bytes: int = MEMORY_BYTES) -> Execution:
    """Run ``program`` in a separate guarded Python process (see the module docstring) and report
    whether it exited cleanly within ``timeout`` wall-clock seconds."""
    token = f"__lata_done_{secrets.token_hex(8)}__"
    with tempfile.TemporaryDirectory(prefix="lata-eval-") as temp:
        folder = Path(temp)
        (folder / "program.py").write_text(program, encoding="utf-8")
        runner = RUNNER.format(guard=GUARD, memory=memory_bytes, cpu=math.ceil(timeout) + 1, file_size=FILE_BYTES,
                               token=token)
        (folder / "runner.py").write_text(runner, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": temp, "TMPDIR": temp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        with (folder / "stdout").open("wb") as out, (folder / "stderr").open("wb") as err:
            process = subprocess.Popen([sys.executable, "-I", "runner.py"], cwd=temp, env=env, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=err, start_new_session=os.name == "posix")
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(process)
                return Execution(TIMED_OUT, time.perf_counter() - start, f"no exit within {timeout:g} s")
        seconds = time.perf_counter() - start
        if hasattr(signal, "SIGXCPU") and code == -signal.SIGXCPU:
            return Execution(TIMED_OUT, seconds, "CPU time limit")
        stderr = _tail(folder / "stderr").strip()
        if code == 0 and token in _tail(folder / "stdout"):
            return Execution(PASSED, seconds)
        error = stderr.splitlines()[-1] if stderr else (f"exit code {code}" if code else "exited before the tests ran")
        return Execution(FAILED, seconds, error)
