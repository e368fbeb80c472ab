"""The HumanEval sandbox against the escapes found by the adversarial review (issue 13): each must
fail. Where no sandbox works on this machine, the same tests check that running generated code is
refused instead (``test_refused_without_isolation`` simulates that case everywhere)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import pytest

from lata_peft.errors import LataError
from lata_peft.evaluate import evaluate, sandbox
from lata_peft.evaluate.data import data_root
from lata_peft.evaluate.humaneval import check_completion, evaluate_humaneval, load_problems
from lata_peft.evaluate.sandbox import FAILED, PASSED, TIMED_OUT, Execution, run_program

HUMANEVAL = data_root() / "humaneval" / "HumanEval.jsonl.gz"
ISOLATION = sandbox.isolation_problem()  # "" where the sandbox works
REFUSAL = "refusing to run generated code without an OS sandbox"


def attempt(program: str, timeout: float = 10.0) -> Execution | None:
    """``program``'s run in the sandbox; where there is none, check the refusal and return ``None``."""
    if ISOLATION:
        with pytest.raises(LataError, match=REFUSAL):
            run_program(program, timeout=timeout)
        return None
    return run_program(program, timeout=timeout)


@pytest.fixture(scope="module")
def problems() -> list[dict[str, Any]]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"no HumanEval data at {HUMANEVAL}")
    return load_problems(HUMANEVAL)


@pytest.fixture
def outside() -> Iterator[Path]:
    """A fresh name in the host's temporary folder (where the old sandbox's run folders lived)."""
    path = Path(tempfile.gettempdir()) / f"ESCAPE-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


def test_writing_and_deleting_outside_fail(outside: Path, tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("keep me")
    sibling = outside.with_name(outside.name + "-sibling")
    sibling.write_text("keep me")
    try:
        for program in (f"import _io\n_io.open({str(outside)!r}, 'w').write('x')\n",
                        f"import posix\nfd = posix.open({str(outside)!r}, posix.O_WRONLY | posix.O_CREAT)\n",
                        f"import posix\nposix.unlink({str(victim)!r})\n",
                        f"import posix\nposix.unlink('../{sibling.name}')\n",
                        f"import posix\nposix.unlink({str(sibling)!r})\n"):
            outcome = attempt(program)
            assert outcome is None or outcome.status == FAILED, (program, outcome)
        assert not outside.exists()
        assert victim.read_text() == "keep me" and sibling.read_text() == "keep me"
    finally:
        sibling.unlink(missing_ok=True)


def test_system_and_ctypes_system_do_nothing(outside: Path) -> None:
    for call in ("posix.system({command!r})", "ctypes.CDLL(None).system({command!r}.encode())"):
        command = f"touch {outside}"
        # Inside, no process can start at all: even the shell's "exit 0" does not succeed.
        program = f"import ctypes, posix\nassert {call.format(command='exit 0')} != 0\n{call.format(command=command)}\n"
        outcome = attempt(program)
        assert outcome is None or outcome.status == PASSED, (program, outcome)
    assert not outside.exists()


def host_addresses() -> list[str]:
    """Loopback and, where there is one, this machine's address on its default route."""
    addresses = ["127.0.0.1"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, suppress(OSError):
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        addresses.append(probe.getsockname()[0])
    return addresses


def test_no_network_even_to_a_listener_on_this_machine() -> None:
    with socket.create_server(("0.0.0.0", 0)) as listener:
        port = listener.getsockname()[1]
        outcome = attempt(f"import _socket\nfor address in {host_addresses()!r}:\n    s = _socket.socket()\n"
                          f"    try:\n        s.connect((address, {port}))\n        s.sendall(b'escaped')\n"
                          "    except OSError as error:\n        print(address, error)\n")
        assert outcome is None or outcome.passed, outcome
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_killing_the_evaluator_fails() -> None:
    outcome = attempt(f"import os, posix\ntry:\n    posix.kill({os.getpid()}, 0)\nexcept ProcessLookupError:\n"
                      "    pass\nelse:\n    raise SystemExit('the evaluator is visible')\n"
                      "posix.kill(os.getppid(), 9)\n")
    assert outcome is None or outcome.status == PASSED, outcome  # the program ran on: nothing was killed


def test_fifty_forks_are_refused_but_threads_work() -> None:
    outcome = attempt("import os, posix, threading\nforked = 0\nfor _ in range(50):\n    try:\n"
                      "        pid = posix.fork()\n    except OSError:\n        continue\n    if pid == 0:\n"
                      "        os._exit(0)\n    forked += 1\nassert forked == 0, forked\n"
                      "thread = threading.Thread(target=print)\nthread.start()\nthread.join()\n")
    assert outcome is None or outcome.status == PASSED, outcome


def test_nothing_outlives_the_timeout() -> None:
    # A fork + setsid child, and the program itself, become `sleep 20 0.<unique>`; after the timeout no
    # process on this machine may run that command line (checked in /proc for a second).
    argv = ["sleep", "20", f"0.{uuid.uuid4().int % 10**12:012d}"]
    program = (f"import os\nargv = {argv!r}\ntry:\n    child = os.fork()\nexcept OSError:\n    child = None\n"
               "if child == 0:\n    os.setsid()\n    os.execv('/bin/sleep', argv)\nos.execv('/bin/sleep', argv)\n")
    outcome = attempt(program, timeout=1)
    assert outcome is None or outcome.status == TIMED_OUT, outcome
    wanted = ("\0".join(argv) + "\0").encode()

    def survivors() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes() == wanted:
                    found.append(cmdline.parent.name)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 2  # the kernel tears the PID namespace down right after bwrap dies
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert not survivors(), "processes outlived the sandbox"


def test_limits_on_memory_and_file_size() -> None:
    for program in ("x = bytearray(4 << 30)\n", "open('big', 'wb').write(bytes(32 << 20))\n"):
        outcome = attempt(program)
        assert outcome is None or outcome.status == FAILED, (program, outcome)


def test_forging_a_pass_fails(problems: list[dict[str, Any]]) -> None:
    for program in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n",
                    "import glob, os\nfor name in glob.glob('*') + glob.glob('/sandbox/*'):\n"
                    "    print(open(name).read())\nos._exit(0)\n"):
        outcome = attempt(program)
        assert outcome is None or outcome.status == FAILED, (program, outcome)
    problem = problems[0]
    forgeries = ("    import os; os._exit(0)\n", "    import sys; sys.exit(0)\n",
                 "    return None\nimport os\nos._exit(0)\n",
                 "    import os\n    for fd in range(64):\n        try:\n            os.write(fd, b'1' * 8)\n"
                 "        except OSError:\n            pass\n    os._exit(0)\n",
                 "    import sys\n    sys._getframe(1).f_globals['check'] = lambda candidate: None\n    return None\n")
    for completion in forgeries:
        if ISOLATION:
            with pytest.raises(LataError, match=REFUSAL):
                check_completion(problem, completion)
            continue
        outcome = check_completion(problem, completion)
        assert outcome.status == FAILED, (completion, outcome)


def test_canonical_solutions_pass_and_errors_are_reported(problems: list[dict[str, Any]]) -> None:
    # Trusted code: runs unisolated (unsafe_exec) only where no sandbox works.
    def canonical(problem: dict[str, Any]) -> Execution:
        return check_completion(problem, problem["canonical_solution"], unsafe_exec=True)

    with pytest.warns(RuntimeWarning) if ISOLATION else nullcontext(), ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(canonical, problems))
    assert [(p["task_id"], o.error) for p, o in zip(problems, outcomes, strict=True) if not o.passed] == []
    problem = problems[0]
    for completion, status, error in (("    return None\n", FAILED, "AssertionError"),
                                      ("    raise ValueError('boom')\n", FAILED, "ValueError: boom"),
                                      ("    return object()\n", FAILED, "TypeError: only Python literals"),
                                      ("    while True:\n        pass\n", TIMED_OUT, "no exit within 1 s")):
        outcome = check_completion(problem, completion, timeout=1, unsafe_exec=True)
        assert outcome.status == status and outcome.error.startswith(error), (completion, outcome)


def test_refused_without_isolation(monkeypatch: pytest.MonkeyPatch, problems: list[dict[str, Any]]) -> None:
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "bubblewrap (bwrap) is not installed")
    problem = problems[0]
    for refused in (lambda: run_program("pass"), lambda: check_completion(problem, problem["canonical_solution"]),
                    lambda: evaluate_humaneval(None, None, HUMANEVAL),
                    lambda: evaluate("no-such-model", "humaneval", data=HUMANEVAL)):
        with pytest.raises(LataError, match=REFUSAL) as caught:
            refused()
        assert "\n" not in str(caught.value) and "unsafe_exec=True" in str(caught.value)
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        assert run_program("pass", unsafe_exec=True).status == PASSED
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        assert check_completion(problem, problem["canonical_solution"], unsafe_exec=True).status == PASSED
