"""Run untrusted Python (model-written code) in a separate, locked-down process.

Layers, strongest first; `SandboxResult.isolation` names the ones that were in force for a run:
  - namespaces (root with util-linux `unshare`): a new network namespace (no interfaces but a downed loopback,
    so no connection anywhere, 127.0.0.1 included), a pid namespace (the program cannot see or signal other
    processes, and when the sandbox's init exits the kernel kills everything left in it), a mount namespace with a
    fresh size-capped tmpfs over the working directory and every world-writable directory (/tmp, /var/tmp,
    /dev/shm, /run/lock), and private IPC and hostname;
  - a throwaway uid (root): each concurrent run gets its own unprivileged uid from a pool, leased across threads
    and processes. Root ignores RLIMIT_NPROC; an unprivileged uid does not, and with one uid per run the
    process cap holds per run (a fork bomb stops at `max_processes`). The uid also cannot write to the repository
    or anything else it does not own, cannot signal our processes, and no_new_privs keeps setuid binaries inert;
  - resource limits: CPU seconds, address space, processes, file size, open files, no core dumps;
  - a wall-clock timeout and an output cap, enforced here: on either, the whole session is killed, then every
    process still running under the run's uid (this catches programs that left the session with setsid);
  - a scrubbed environment (no inherited variables, `python -I`) and a temporary working directory that is
    deleted afterwards.
Without namespaces (no root, no `unshare`, or a container without CAP_SYS_ADMIN) the network guard falls back to
a Python audit hook that refuses socket connect/bind/send; that is best effort only (ctypes or a child process
gets around it). Without root there is no throwaway uid and RLIMIT_NPROC counts all of the user's processes.

Thread-safe: the trainer grades a batch from a small thread pool. Nothing here uses preexec_fn (unsafe with
threads): privileged set-up happens in a separate first process, sandbox_init.py.
"""

import contextlib
import fcntl
import json
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
NAMESPACE_FLAGS = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable: covered by tmpfs or swept
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
UID_BASE, UID_COUNT = 60100, 64  # unassigned uids (Debian's on-demand range); ones in /etc/passwd are skipped
NET_GUARD = """\
import runpy, sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_no_network)
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it)."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    cpu_seconds: int | None = None  # default: the timeout rounded up, plus one
    memory_mb: int = 512  # address space
    max_processes: int = 16  # processes and threads of the run's uid
    max_output_bytes: int = 64_000  # per stream; more kills the program
    max_file_mb: int = 16
    max_open_files: int = 64
    tmpfs_mb: int = 32  # size of each private tmpfs (namespaces only)


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited with status 0, not killed
    returncode: int | None  # negative: killed by that signal; None: killed by us before it ended
    stdout: str
    stderr: str
    timed_out: bool
    killed: str | None  # "timeout", "output_limit", or the signal that ended it ("SIGKILL", "SIGXCPU", ...)
    duration: float  # seconds
    isolation: tuple[str, ...]


class _UidPool:
    """Hands out one uid per concurrent run: a free-list for threads plus an flock per uid for processes."""

    def __init__(self, base: int, count: int):
        self.uids = [u for u in range(base, base + count) if not _in_passwd(u)]
        self.free = list(self.uids)
        self.cond = threading.Condition()
        self.lock_dir = None

    def _try_lock(self, uid: int) -> int | None:
        if self.lock_dir is None:  # a fixed place, so that every process on the machine agrees (TMPDIR may differ)
            self.lock_dir = _private_dir(f"{'/run' if os.path.isdir('/run') else '/tmp'}/nanoseek-sandbox-uids")
        fd = os.open(os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None

    @contextlib.contextmanager
    def lease(self):
        if not self.uids:
            raise SandboxError(f"every uid from {UID_BASE} to {UID_BASE + UID_COUNT - 1} is a real user")
        while True:
            with self.cond:
                while not self.free:
                    self.cond.wait()
                for i, uid in enumerate(self.free):
                    fd = self._try_lock(uid)
                    if fd is not None:
                        del self.free[i]
                        break
            if fd is not None:
                break
            time.sleep(0.02)  # every free uid is leased by another process
        try:
            yield uid  # the holder kills every process of the uid before giving it back
        finally:
            os.close(fd)
            with self.cond:
                self.free.append(uid)
                self.cond.notify()


def _in_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _private_dir(path: str) -> str:
    """A directory only we can write to; refuses one that someone else (a sandboxed program) made first."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not (os.path.isdir(path) and not os.path.islink(path) and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0):
        raise SandboxError(f"{path} exists but is not a private directory of uid {os.geteuid()}")
    return path


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(("Z", "X")):
            pids.append(int(entry))
    return pids


def _task_count(uid: int) -> int:
    """Processes and threads of `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, KeyError, ValueError):
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(fields["Threads"]) if int(fields["Uid"].split()[0]) == uid else 0
    return total


def _kill_uid(uid: int) -> None:
    for _ in range(200):  # a fork bomb may still be forking: repeat until none is left (NPROC bounds it)
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    raise SandboxError(f"processes of uid {uid} survive SIGKILL")


def _remove_files_of(uid: int, dirs=SHARED_DIRS) -> None:
    """Without a private tmpfs, delete what the run's uid left in world-writable directories (the only places
    outside its working directory where it can create anything)."""
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            for name in list(subdirs) + files:
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    if st.st_uid == uid:
                        if name in subdirs:
                            subdirs.remove(name)
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            os.unlink(path)
                    elif name in subdirs and not st.st_mode & 0o002:
                        subdirs.remove(name)  # the uid cannot create anything in there


_UIDS = _UidPool(UID_BASE, UID_COUNT)


class Sandbox:
    def __init__(self, limits: Limits = Limits(), namespaces: bool = True, python: str | None = None):
        """`namespaces=False` forces the fallback; `python` picks the interpreter that runs the code (default: the
        first of ours and the system's that works under the throwaway uid)."""
        self.limits, self.namespaces, self.python = limits, namespaces, python
        self.unshare: str | None = None
        self.root = os.geteuid() == 0
        self._ready, self._lock = False, threading.Lock()

    def run(self, code: str, stdin: str = "", files: dict[str, str] | None = None, **limits) -> SandboxResult:
        """Run `code` as main.py in a fresh working directory, with `files` beside it; `limits` override fields of
        this sandbox's Limits (timeout=..., memory_mb=...)."""
        self._setup()
        return self._run(code, stdin, files or {}, replace(self.limits, **limits))

    @property
    def isolation(self) -> tuple[str, ...]:
        self._setup()
        return self._isolation()

    def _isolation(self) -> tuple[str, ...]:
        net = ("net-namespace", "pid-namespace", "private-tmpfs") if self.unshare else ("net-audit-hook",)
        return (*net, *(("throwaway-uid",) if self.root else ()), "rlimits", "timeout", "scrubbed-env")

    def _setup(self) -> None:
        with self._lock:
            if self._ready:
                return
            if self.namespaces and self.root and (unshare := shutil.which("unshare")):
                probe = subprocess.run([unshare, *NAMESPACE_FLAGS, "--", "true"], capture_output=True, env=ENV)
                self.unshare = unshare if probe.returncode == 0 else None
            candidates = [self.python] if self.python else [
                sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
            for python in dict.fromkeys(p for p in candidates if os.path.exists(p)):
                self.python = python  # the probe: can this interpreter run code under the sandbox's uid?
                with contextlib.suppress(SandboxError):
                    result = self._run("print('ok')", "", {}, Limits(timeout=10))
                    if result.ok and result.stdout == "ok\n":
                        self._ready = True
                        return
            raise SandboxError(f"no Python interpreter runs inside the sandbox (tried {candidates})")

    def _run(self, code: str, stdin: str, files: dict[str, str], limits: Limits) -> SandboxResult:
        with (_UIDS.lease() if self.root else contextlib.nullcontext()) as uid:
            workdir = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
            try:
                for name, text in {**files, "main.py": code}.items():
                    with open(os.path.join(workdir, os.path.basename(name)), "w") as f:
                        f.write(text)
                if uid is not None and not self.unshare:  # the program writes in place
                    for name in [".", *os.listdir(workdir)]:
                        os.chown(os.path.join(workdir, name), uid, uid)
                return self._launch(workdir, uid, stdin, limits)
            finally:
                if uid is not None:
                    _kill_uid(uid)  # nothing of this run outlives its lease, and nothing writes while we clean up
                shutil.rmtree(workdir, ignore_errors=True)
                if uid is not None and not self.unshare:
                    _remove_files_of(uid)

    def _launch(self, workdir: str, uid: int | None, stdin: str, limits: Limits) -> SandboxResult:
        cpu = limits.cpu_seconds or math.ceil(limits.timeout) + 1
        # Without our own uid, RLIMIT_NPROC counts every task of the user: allow what already runs, plus the cap.
        nproc = limits.max_processes + (0 if uid is not None else _task_count(os.getuid()))
        rlimits = {"RLIMIT_CPU": cpu, "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_NPROC": nproc,
                   "RLIMIT_FSIZE": limits.max_file_mb << 20, "RLIMIT_NOFILE": limits.max_open_files, "RLIMIT_CORE": 0}
        program = [self.python, "-I", "main.py"] if self.unshare else [self.python, "-I", "-c", NET_GUARD]
        status_r, status_w = os.pipe()  # our init reports the program's exit status here
        cfg = dict(workdir=workdir, uid=uid, status_fd=status_w, private_fs=bool(self.unshare),
                   tmpfs_mb=limits.tmpfs_mb, shared_dirs=SHARED_DIRS, rlimits=rlimits, argv=program,
                   env={**ENV, "HOME": workdir})
        argv = [sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg)]
        if self.unshare:
            argv = [self.unshare, *NAMESPACE_FLAGS, "--", *argv]
        start = time.monotonic()
        try:
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write(stdin.encode())
                stdin_file.seek(0)
                proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd="/", env=ENV, pass_fds=(status_w,), start_new_session=True)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        try:
            out, err, killed = _collect(proc, limits, start + limits.timeout)
            duration = time.monotonic() - start
            os.set_blocking(status_r, False)
            status = b""
            with contextlib.suppress(BlockingIOError):
                status = os.read(status_r, 32)
        finally:
            os.close(status_r)
            if proc.returncode is None:  # _collect failed: still end the session
                _kill_session(proc)
        returncode = int(status) if status else None  # written by our init, never by the program
        if returncode is None and killed is None:
            detail = err[-2000:].decode(errors="replace")
            raise SandboxError(f"sandbox failed to start (exit {proc.returncode}): {detail}")
        if killed is None and returncode is not None and returncode < 0:
            killed = _signal_name(-returncode)
        cap = limits.max_output_bytes
        return SandboxResult(
            ok=killed is None and returncode == 0, returncode=returncode,
            stdout=out[:cap].decode(errors="replace"), stderr=err[:cap].decode(errors="replace"),
            timed_out=killed == "timeout", killed=killed, duration=duration, isolation=self._isolation(),
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exited(proc: subprocess.Popen) -> bool:
    """Has the process exited? Without reaping it: a zombie leader keeps its process group id from being reused,
    so the killpg that follows cannot hit an unrelated group."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # unshare, our init, and whatever stayed in the session
    proc.wait()


def _collect(proc: subprocess.Popen, limits: Limits, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until both close, the process exits, the deadline passes or the output cap is hit;
    then end the session and take what is left in the pipes."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    killed = None
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map() and killed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                killed = "timeout"
                break
            exited = _exited(proc)  # then only leftover children could hold the pipes open
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.fileobj] += chunk
                if len(bufs[key.fileobj]) > limits.max_output_bytes:
                    killed = "output_limit"
            if exited:
                break
        _kill_session(proc)
        for key in list(sel.get_map().values()):  # the writers are gone: drain without blocking
            os.set_blocking(key.fd, False)
            with contextlib.suppress(BlockingIOError):
                while (chunk := os.read(key.fd, 1 << 16)) and len(bufs[key.fileobj]) <= limits.max_output_bytes:
                    bufs[key.fileobj] += chunk
    proc.stdout.close()
    proc.stderr.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), killed


_DEFAULT = Sandbox()


def default_sandbox() -> Sandbox:
    """The shared sandbox with default limits (its one-time set-up probe is paid once per process)."""
    return _DEFAULT


def run_python(code: str, stdin: str = "", files: dict[str, str] | None = None, **limits) -> SandboxResult:
    """Run `code` in the default sandbox (see Sandbox.run)."""
    return _DEFAULT.run(code, stdin, files, **limits)
