"""The sandbox against hostile programs, in both of its modes: with namespaces (root +
util-linux `unshare`) and the fallback without them. Every test also checks that
nothing the program started is still running."""

import errno
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek.tasks import get_task
from nanoseek.tasks.code import Code
from nanoseek.tasks.sandbox import SHARED_DIRS, UID_BASE, UID_COUNT, Limits, Sandbox, SandboxError

ROOT = os.geteuid() == 0
UNSAFE_ENV = "NANOSEEK_UNSAFE_SANDBOX"
REPO = pathlib.Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(not ROOT, reason="the throwaway uid needs root (CI runs as root)")

FORK_BOMB = (
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)
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
    """Live processes under the sandbox uids, or with a sandbox working
    directory on their command line."""
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
    r = sandbox.run(
        "import os, sys\nprint(sys.stdin.read().upper())\nprint(os.getuid())", stdin="hello"
    )
    assert r.ok and r.returncode == 0 and not r.timed_out and r.killed is None
    lines = r.stdout.splitlines()
    assert lines[0] == "HELLO"
    assert (int(lines[1]) != os.getuid()) == ROOT  # root drops to a throwaway uid
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
    # the CPU limit, not the clock
    assert not r.ok and r.killed in ("SIGXCPU", "SIGKILL") and not r.timed_out


def test_huge_allocation_fails(sandbox):
    r = sandbox.run(ALLOCATE, memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr
    r = sandbox.run("x = bytearray(16 << 30)")
    assert not r.ok and "MemoryError" in r.stderr
    # and it still works
    assert sandbox.run("print(len(bytearray(50 << 20)))").stdout == f"{50 << 20}\n"


def test_process_cap_holds(sandbox):
    """The count of processes a program can start stops at
    max_processes, even though we are root."""
    spawn = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, type(e).__name__)\n"
    )
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
    escape = (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
        "    os.execv(sys.executable, [sys.executable, '-c', "
        f"'import time; time.sleep(60)', '{marker}'])\n"
        "print('parent leaves')\n"
    )
    r = sandbox.run(escape)
    assert r.ok and r.stdout == "parent leaves\n"
    time.sleep(0.1)
    alive = [
        e
        for e in filter(str.isdigit, os.listdir("/proc"))
        if marker.encode() in pathlib.Path(f"/proc/{e}/cmdline").read_bytes()
    ]
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
    # else the checkout sits under a tmpfs
    if not str(REPO).startswith(tuple(d + "/" for d in SHARED_DIRS)):
        assert f"refused {REPO / name} PermissionError" in r.stdout
    workdir = r.stdout.splitlines()[-1]
    for path in targets + [workdir]:
        # refused, or written to a private tmpfs, or swept afterwards
        assert not os.path.exists(path), path


@needs_root
def test_cannot_read_private_files_or_signal_us(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    program = (
        "import os, signal\n"
        "try:\n"
        f"    print(open({str(secret)!r}).read())\n"
        "except OSError as e:\n"
        "    print('no read', type(e).__name__)\n"
        "try:\n"
        f"    os.kill({os.getpid()}, signal.SIGKILL)\n"
        "except OSError as e:\n"
        "    print('no kill', type(e).__name__)\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except OSError:\n"
        "    pass  # nothing else we may signal\n"
        "print('survived kill -1')\n"
    )
    r = sandbox.run(program)
    assert "hunter2" not in r.stdout and "no read" in r.stdout and "no kill" in r.stdout
    # kill(-1) reached only the sandbox's own processes
    assert r.stdout.endswith("survived kill -1\n")


def test_no_network(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        program = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\nexcept OSError as e:\n    print('refused', type(e).__name__)\n"
        )
        r = sandbox.run(program)
        assert r.stdout.startswith("refused")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached us


def test_output_is_capped(sandbox):
    r = sandbox.run(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n", max_output_bytes=10_000
    )
    assert r.killed == "output_limit" and not r.ok and len(r.stdout) <= 10_000


def test_concurrent_runs_beside_a_fork_bomb(sandbox):
    """The trainer grades from a thread pool; one run's fork bomb must not
    starve the others (one uid each)."""
    with ThreadPoolExecutor(6) as pool:
        bomb = pool.submit(sandbox.run, FORK_BOMB, timeout=1.5)
        results = list(pool.map(lambda i: sandbox.run(f"print({i} * {i})", timeout=10), range(16)))
        assert bomb.result().timed_out
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(16)]
    assert all(r.ok for r in results)


def test_limits_defaults():
    limits = Limits()
    assert limits.timeout > 0 and limits.memory_mb >= 256 and limits.max_processes >= 4


@pytest.mark.parametrize(
    "prologue",
    [
        FORK_BOMB,
        LOOP,
        ALLOCATE,
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import os\nos.kill(-1, 9)\nos._exit(0)\n",
    ],
)
def test_hostile_code_scores_zero(sandbox, prologue):
    """As a code-task answer, each hostile program scores 0 even with
    a correct function after it."""
    task = Code(sandbox=sandbox, timeout=1.0)
    problem = next(
        p for p in get_task("code").generate(20, seed=0) if p.key.startswith("reverse_string")
    )
    code = prologue + "def reverse_string(s):\n    return s[::-1]\n"
    reward = task.grade(problem, f"<think>t</think>\n<answer>```python\n{code}```</answer>")
    assert reward.accuracy == 0.0 and not reward.correct and reward.format == 1.0


# -- escapes found by hand (issue 18): each failed before the seccomp filter ---------------------


def program(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def filtered(sandbox):
    """The sandbox, where its seccomp filter is in force (libseccomp is installed)."""
    if "seccomp" not in sandbox.isolation:
        pytest.skip("libseccomp is not installed: no seccomp filter")
    return sandbox


def unix_server_dir() -> str:
    """A directory the sandboxed uid can reach and no private tmpfs covers (under root: /run)."""
    base = "/run" if ROOT and os.path.isdir("/run") else None
    path = tempfile.mkdtemp(prefix="nanoseek-test-", dir=base)
    os.chmod(path, 0o755)
    return path


def test_no_unix_socket_of_the_host(filtered):
    """A UNIX socket on the host's filesystem was reachable from the network namespace."""
    directory = unix_server_dir()
    path = os.path.join(directory, "s")
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            os.chmod(path, 0o777)
            server.listen()
            server.settimeout(0.3)
            r = filtered.run(
                program(f"""
                import socket
                try:
                    socket.socket(socket.AF_UNIX).connect({path!r})
                    print("connected")
                except OSError as e:
                    print("refused", type(e).__name__)
                """)
            )
            assert r.stdout.startswith("refused"), r.stdout + r.stderr
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_no_connection_through_ctypes(filtered):
    """Straight to libc, past the audit hook: the fallback mode reached 127.0.0.1 this way."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        r = filtered.run(
            program(f"""
            import ctypes, socket, struct
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
            address = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", {port})
                       + socket.inet_aton("127.0.0.1") + bytes(8))
            print("socket", fd, "connect", libc.connect(fd, address, 16) if fd >= 0 else None)
            pair = (ctypes.c_int * 2)()
            print("dgram pair", libc.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM, 0, pair))
            """)
        )
        assert r.ok, r.stderr
        assert r.stdout == "socket -1 connect None\ndgram pair -1\n"
        with pytest.raises(socket.timeout):
            server.accept()
    pipe = "import multiprocessing\na, b = multiprocessing.Pipe()\na.send(7)\nprint(b.recv())"
    r = filtered.run(pipe)
    assert r.stdout == "7\n", r.stderr  # stream socket pairs stay: they join the program to itself


def test_no_user_namespace(filtered):
    """The program could make a user namespace and be root in it; now unshare and clone with a
    CLONE_NEW* flag fail, and clone3 does not exist (the C library then falls back to clone)."""
    r = filtered.run(
        program("""
        import ctypes, os, shutil, subprocess
        libc = ctypes.CDLL(None, use_errno=True)
        for flag in (0x10000000, 0x20000, 0x40000000):  # CLONE_NEWUSER, NEWNS, NEWNET
            print("unshare", libc.unshare(flag), ctypes.get_errno())
        pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
        if pid == 0:
            os._exit(0)
        print("clone", -1 if pid < 0 else "made a child")
        print("clone3", libc.syscall(435, 0, 0), ctypes.get_errno())
        if shutil.which("unshare"):
            r = subprocess.run(["unshare", "--user", "--map-root-user", "id", "-u"],
                               capture_output=True, text=True)
            print("unshare tool refused", r.returncode != 0 and r.stdout == "")
        print("fork", subprocess.run(["true"]).returncode)
        """)
    )
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:5] == ["unshare -1 1"] * 3 + ["clone -1", "clone3 -1 38"]
    assert lines[-1] == "fork 0" and all(line.endswith("True") for line in lines[5:-1])


def test_no_ptrace(filtered):
    r = filtered.run(
        program("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.ptrace(0, 0, 0, 0), ctypes.get_errno())  # PTRACE_TRACEME
        """)
    )
    assert r.stdout == "-1 1\n"


def test_process_table_is_hidden():
    """Namespace mode: the program sees its own processes only, so no secret on our command line."""
    box = Sandbox()
    if "pid-namespace" not in box.isolation:
        pytest.skip("no namespaces on this machine (needs root and a working `unshare`)")
    secret = f"secret-{uuid.uuid4().hex}"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", secret]) as helper:
        try:
            r = box.run(
                program(f"""
                import os
                found = []
                for entry in filter(str.isdigit, os.listdir("/proc")):
                    try:
                        cmdline = open(f"/proc/{{entry}}/cmdline", "rb").read()
                        found.append({secret!r}.encode() in cmdline)
                    except OSError:
                        pass
                print(len(found), any(found))
                """)
            )
        finally:
            helper.kill()
    count, seen = r.stdout.split()
    assert int(count) <= 3 and seen == "False", r.stdout + r.stderr


def test_total_disk_is_capped():
    """Namespace mode: RLIMIT_FSIZE caps one file, the private tmpfs caps their total."""
    box = Sandbox()
    if "private-tmpfs" not in box.isolation:
        pytest.skip("no namespaces on this machine (needs root and a working `unshare`)")
    r = box.run(
        program("""
        total = 0
        try:
            for i in range(64):
                with open(f"f{i}", "wb") as f:
                    for _ in range(8):
                        f.write(bytes(1 << 20))
                        total += 1 << 20
        except OSError as e:
            print(type(e).__name__, e.errno)
        print(total >> 20)
        """),
        tmpfs_mb=16,
        max_file_mb=8,
    )
    lines = r.stdout.split()
    assert lines[:2] == ["OSError", str(errno.ENOSPC)] and int(lines[2]) <= 16, r.stdout + r.stderr


def test_fallback_mode_is_refused_for_reinforcement_learning(monkeypatch):
    """Without namespaces the process table is visible and the disk has no total cap: the GRPO
    trainer refuses to grade code there, and says why."""
    from nanoseek.train.rollout import PromptStream, TaskSpec  # imports torch: only here

    fallback = Sandbox(namespaces=False)
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxError, match="pid-namespace"):
        fallback.require_full_isolation()
    monkeypatch.setattr("nanoseek.tasks.code.default_sandbox", lambda: fallback)
    with pytest.raises(SandboxError, match="refusing reinforcement learning"):
        PromptStream([TaskSpec("code")])
    monkeypatch.setenv(UNSAFE_ENV, "1")
    fallback.require_full_isolation()  # accepted explicitly
    box = Sandbox()
    if "net-namespace" in box.isolation and box.root and box.seccomp:
        monkeypatch.delenv(UNSAFE_ENV)
        box.require_full_isolation()


# -- forged grades (issue 18): the verdict is decided outside the candidate's process -------------

ADD = {
    "entry_point": "add",
    "context": 'def add(a: int, b: int) -> int:\n    """Add."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    "    assert candidate(-1, 1) == 0\n",
}
WRONG_ADD = "def add(a, b):\n    return a - b\n"
RIGHT_ADD = "def add(a, b):\n    return a + b\n"
WRONG_REVERSE = "def reverse_string(s):\n    return s[::-1] + '!'\n"
NONCE = "getattr(sys.modules['__main__'], '_spec', {}).get('nonce', '')"  # the old harness's
FORGERIES = {
    # the forgery: print the harness's nonce, then leave before any test can fail
    "nonce_from_main_then_exit": f"import os, sys\nprint({NONCE}, flush=True)\nos._exit(0)\n",
    "nonce_from_memory": program("""
        import gc, os
        for o in gc.get_objects():
            if isinstance(o, dict) and "nonce" in o:
                print(o["nonce"], flush=True)
        os._exit(0)
        """),
    "sys_exit": "import sys\nsys.exit(0)\n",
    "excepthook": program(f"""
        import os, sys
        def hook(*args):
            print({NONCE}, flush=True)
            os._exit(0)
        sys.excepthook = hook
        """),
    "exit_in_del": program(f"""
        import os, sys
        class Bye:
            def __del__(self):
                print({NONCE}, flush=True)
                raise SystemExit(0)
        bye = Bye()
        """),
    "patch_builtins": program("""
        import builtins
        builtins.AssertionError = type("Quiet", (Exception,), {})
        builtins.print = lambda *args, **kwargs: None
        """),
    "raw_fds": program("""
        import os
        os.write(1, b"ok\\n")
        os.write(2, b"ok\\n")
        os.write(4, b'{"value": true}\\n')
        os.write(4, b"garbage\\n")
        """),
    "kill_parent": program("""
        import os, signal
        try:
            os.kill(os.getppid(), signal.SIGKILL)
        except OSError:
            pass
        """),
    "read_the_test": program("""
        import os
        for root, _, files in os.walk("."):
            for name in files:
                print(open(os.path.join(root, name)).read())
        """),
}
# an honest function still passes (without root, killing our init ends the run)
HARMLESS = ("patch_builtins", "read_the_test", *(("kill_parent",) if ROOT else ()))
EQUALS_EVERYTHING = [
    "class Yes:\n    def __eq__(self, other):\n        return True\n",
    "class Yes(int):\n    def __eq__(self, other):\n        return True\n",
    "class Yes(str):\n    def __eq__(self, other):\n        return True\n",
]


def humaneval_problem(task):
    return task.problem(
        key="HumanEval/add",
        lang="en",
        prompt="add",
        answer="",
        reasoning="",
        kind="humaneval",
        task_id="HumanEval/add",
        **ADD,
    )


def template_problem():
    problems = get_task("code").generate(20, seed=0)
    return next(p for p in problems if p.key.startswith("reverse_string"))


def grade(task, problem, code):
    return task.grade(problem, f"<think>t</think>\n<answer>```python\n{code}```</answer>")


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_humaneval_grades_score_zero(sandbox, name):
    task = Code(sandbox=sandbox, timeout=2.0)
    problem = humaneval_problem(task)
    assert grade(task, problem, FORGERIES[name] + WRONG_ADD).accuracy == 0.0
    if name in HARMLESS:
        assert grade(task, problem, FORGERIES[name] + RIGHT_ADD).correct


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_template_grades_score_zero(sandbox, name):
    task = Code(sandbox=sandbox, timeout=2.0)
    assert grade(task, template_problem(), FORGERIES[name] + WRONG_REVERSE).accuracy == 0.0


@pytest.mark.parametrize("returns", EQUALS_EVERYTHING, ids=["object", "int", "str"])
def test_objects_that_equal_everything_do_not_pass(sandbox, returns):
    task = Code(sandbox=sandbox, timeout=2.0)
    code = returns + "def add(a, b):\n    return Yes()\n"
    assert grade(task, humaneval_problem(task), code).accuracy == 0.0
    code = returns + "def reverse_string(s):\n    return Yes()\n"
    assert grade(task, template_problem(), code).accuracy == 0.0


def test_a_program_that_outlives_the_talk_is_ended(sandbox):
    """The program has TALK_GRACE seconds to exit once the conversation is over."""
    start = time.monotonic()
    code = "import os, time\nprint(os.read(3, 100).decode().strip(), flush=True)\ntime.sleep(30)\n"
    r = sandbox.run(code, talk=lambda channel: channel.send(b"hello"), timeout=10)
    assert r.stdout == "hello\n" and r.killed == "talk_ended" and not r.timed_out
    assert time.monotonic() - start < 5


def test_helpers_of_the_prompt_cannot_be_redefined(sandbox):
    """A HumanEval test may call a helper of the prompt (HumanEval/32 calls `poly`); the judge keeps
    the prompt's own, so a candidate that redefines the helper to make the test trivial fails."""
    task = Code(sandbox=sandbox, timeout=2.0)
    problem = task.problem(
        key="HumanEval/root",
        lang="en",
        prompt="root",
        answer="",
        reasoning="",
        kind="humaneval",
        task_id="HumanEval/root",
        entry_point="root",
        context='def poly(x):\n    return x * x - 4\n\n\ndef root():\n    """A root of poly."""\n',
        test="def check(candidate):\n    assert poly(candidate()) == 0\n",
    )
    assert grade(task, problem, "def root():\n    return 2\n").correct
    forged = "def poly(x):\n    return 0\n\n\ndef root():\n    return 7\n"
    assert grade(task, problem, forged).accuracy == 0.0


def test_no_new_session_and_no_signal_to_every_process(filtered):
    """Without root the program runs as our uid: kill(-1) would reach every process of ours, and a
    new session would take its processes out of the group we kill."""
    r = filtered.run(
        program("""
        import os, signal
        for call in (os.setsid, lambda: os.setpgid(0, 0), lambda: os.kill(-1, signal.SIGKILL),
                     lambda: os.kill(-2, 0)):  # a process group
            try:
                call()
                print("allowed")
            except OSError as e:
                print("refused", type(e).__name__)
        """)
    )
    assert r.stdout.splitlines() == ["refused PermissionError"] * 4, r.stdout + r.stderr
