"""The sandbox against hostile programs, in both of its modes: with namespaces (root + util-linux `unshare`) and
the fallback without them. Every test also checks that nothing the program started is still running."""

import os
import pathlib
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek.tasks import get_task
from nanoseek.tasks.code import Code
from nanoseek.tasks.sandbox import SHARED_DIRS, UID_BASE, UID_COUNT, Limits, Sandbox

ROOT = os.geteuid() == 0
REPO = pathlib.Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(not ROOT, reason="the throwaway uid needs root (CI runs as root)")

FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
LOOP = "while True:\n    pass\n"
ALLOCATE = "chunks = []\nwhile True:\n    chunks.append(bytes(64 << 20))\n"


@pytest.fixture(scope="module", params=["namespaces", "fallback"])
def sandbox(request):
    box = Sandbox(namespaces=request.param == "namespaces")
    if request.param == "namespaces" and "net-namespace" not in box.isolation:
        pytest.skip("no namespaces on this machine (needs root and a working `unshare`)")
    return box


@pytest.fixture(autouse=True)
def no_strays():
    yield
    assert sandbox_processes() == []


def sandbox_processes() -> list[int]:
    """Live processes under the sandbox uids, or with a sandbox working directory on their command line."""
    uids = range(UID_BASE, UID_BASE + UID_COUNT)
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = pathlib.Path(f"/proc/{entry}/status").read_text()
            cmdline = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].split()[0] in "ZX":
            continue
        if int(fields["Uid"].split()[0]) in uids or b"nanoseek-sandbox-" in cmdline:
            pids.append(int(entry))
    return pids


def test_runs_code(sandbox):
    r = sandbox.run("import os, sys\nprint(sys.stdin.read().upper())\nprint(os.getuid())", stdin="hello")
    assert r.ok and r.returncode == 0 and not r.timed_out and r.killed is None
    lines = r.stdout.splitlines()
    assert lines[0] == "HELLO"
    assert (int(lines[1]) != 0) == ROOT  # root drops to a throwaway uid
    assert 0 < r.duration < 5
    assert "rlimits" in r.isolation and ("throwaway-uid" in r.isolation) == ROOT


def test_exit_status_and_errors(sandbox):
    assert sandbox.run("import sys\nsys.exit(3)").returncode == 3
    r = sandbox.run("1 / 0")
    assert not r.ok and r.returncode == 1 and "ZeroDivisionError" in r.stderr
    r = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert r.returncode == -signal.SIGTERM and r.killed == "SIGTERM"


def test_files_beside_the_program(sandbox):
    r = sandbox.run("print(open('data.txt').read())", files={"data.txt": "42"})
    assert r.stdout == "42\n"


def test_environment_is_scrubbed(sandbox, monkeypatch):
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "hunter2")
    r = sandbox.run("import os\nprint(sorted(os.environ))")
    assert "NANOSEEK_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    assert r.stdout == "['HOME', 'LANG', 'PATH']\n"


def test_infinite_loop_is_killed_at_the_timeout(sandbox):
    start = time.monotonic()
    r = sandbox.run(LOOP, timeout=1.0)
    assert r.timed_out and r.killed == "timeout" and not r.ok and r.returncode is None
    assert time.monotonic() - start < 3


def test_cpu_limit(sandbox):
    r = sandbox.run(LOOP, timeout=30, cpu_seconds=1)
    assert not r.ok and r.killed in ("SIGXCPU", "SIGKILL") and not r.timed_out  # the CPU limit, not the clock


def test_huge_allocation_fails(sandbox):
    r = sandbox.run(ALLOCATE, memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr
    r = sandbox.run("x = bytearray(16 << 30)")
    assert not r.ok and "MemoryError" in r.stderr
    assert sandbox.run("print(len(bytearray(50 << 20)))").stdout == f"{50 << 20}\n"  # and it still works


def test_process_cap_holds(sandbox):
    """The count of processes a program can start stops at max_processes, even though we are root."""
    spawn = ("import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
             "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
             "    print(n, type(e).__name__)\n")
    r = sandbox.run(spawn, max_processes=8)
    count, error = r.stdout.split()
    assert int(count) < 8 and error == "BlockingIOError"


def test_fork_bomb_is_contained(sandbox):
    start = time.monotonic()
    r = sandbox.run(FORK_BOMB, timeout=1.0)
    assert r.timed_out and not r.ok
    assert time.monotonic() - start < 5
    assert sandbox.run("print('still fine')").stdout == "still fine\n"


def test_processes_that_leave_the_session_are_killed(sandbox):
    marker = f"escapee-{uuid.uuid4().hex}"
    escape = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
              f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
              "print('parent leaves')\n")
    r = sandbox.run(escape)
    assert r.ok and r.stdout == "parent leaves\n"
    time.sleep(0.1)
    alive = [e for e in filter(str.isdigit, os.listdir("/proc"))
             if marker.encode() in pathlib.Path(f"/proc/{e}/cmdline").read_bytes()]
    assert alive == []


@needs_root
def test_writes_outside_the_working_directory_do_not_land(sandbox):
    name = f"nanoseek-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(REPO / name), f"/{name}"]
    program = f"""\
import os
for path in {targets!r}:
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
open("local.txt", "w").write("x")
print(os.getcwd())
"""
    r = sandbox.run(program)
    assert r.ok, r.stderr
    assert f"refused /{name}" in r.stdout
    if not str(REPO).startswith(tuple(d + "/" for d in SHARED_DIRS)):  # else the checkout sits under a tmpfs
        assert f"refused {REPO / name} PermissionError" in r.stdout
    workdir = r.stdout.splitlines()[-1]
    for path in targets + [workdir]:
        assert not os.path.exists(path), path  # refused, or written to a private tmpfs, or swept afterwards


@needs_root
def test_cannot_read_private_files_or_signal_us(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    program = (f"import os, signal\ntry:\n    print(open({str(secret)!r}).read())\nexcept OSError as e:\n"
               f"    print('no read', type(e).__name__)\ntry:\n    os.kill({os.getpid()}, signal.SIGKILL)\n"
               "except OSError as e:\n    print('no kill', type(e).__name__)\n"
               "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass  # nothing else we may signal\n"
               "print('survived kill -1')\n")
    r = sandbox.run(program)
    assert "hunter2" not in r.stdout and "no read" in r.stdout and "no kill" in r.stdout
    assert r.stdout.endswith("survived kill -1\n")  # kill(-1) reached only the sandbox's own processes


def test_no_network(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "    print('connected')\nexcept OSError as e:\n    print('refused', type(e).__name__)\n")
        r = sandbox.run(program)
        assert r.stdout.startswith("refused")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached us


def test_output_is_capped(sandbox):
    r = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n", max_output_bytes=10_000)
    assert r.killed == "output_limit" and not r.ok and len(r.stdout) <= 10_000


def test_concurrent_runs_beside_a_fork_bomb(sandbox):
    """The trainer grades from a thread pool; one run's fork bomb must not starve the others (one uid each)."""
    with ThreadPoolExecutor(6) as pool:
        bomb = pool.submit(sandbox.run, FORK_BOMB, timeout=1.5)
        results = list(pool.map(lambda i: sandbox.run(f"print({i} * {i})", timeout=10), range(16)))
        assert bomb.result().timed_out
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(16)]
    assert all(r.ok for r in results)


def test_limits_defaults():
    limits = Limits()
    assert limits.timeout > 0 and limits.memory_mb >= 256 and limits.max_processes >= 4


@pytest.mark.parametrize("prologue", [FORK_BOMB, LOOP, ALLOCATE,
                                      "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
                                      "import os\nos.kill(-1, 9)\nos._exit(0)\n"])
def test_hostile_code_scores_zero(sandbox, prologue):
    """As a code-task answer, each hostile program scores 0 even with a correct function after it."""
    task = Code(sandbox=sandbox, timeout=1.0)
    problem = next(p for p in get_task("code").generate(20, seed=0) if p.key.startswith("reverse_string"))
    code = prologue + "def reverse_string(s):\n    return s[::-1]\n"
    reward = task.grade(problem, f"<think>t</think>\n<answer>```python\n{code}```</answer>")
    assert reward.accuracy == 0.0 and not reward.correct and reward.format == 1.0
