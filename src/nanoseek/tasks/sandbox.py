"""Run untrusted Python (model-written code) in a separate, locked-down process.

Layers, strongest first; `SandboxResult.isolation` names the ones that were in force for a run:
  - namespaces (root with util-linux `unshare`): a new network namespace (no interfaces but a downed
    loopback, so no connection anywhere, 127.0.0.1 included), a pid namespace (the program cannot
    see or signal other processes, and when the sandbox's init exits the kernel kills everything
    left in it), a mount namespace with a fresh size-capped tmpfs over the working directory and
    every world-writable directory (/tmp, /var/tmp, /dev/shm, /run/lock), and private IPC and
    hostname;
  - a throwaway uid (root): each concurrent run gets its own unprivileged uid from a pool, leased
    across threads and processes. Root ignores RLIMIT_NPROC; an unprivileged uid does not, and with
    one uid per run the process cap holds per run (a fork bomb stops at `max_processes`). The uid
    also cannot write to the repository or anything else it does not own, cannot signal our
    processes, and no_new_privs keeps setuid binaries inert;
  - resource limits: CPU seconds, address space, processes, file size, open files, no core dumps;
  - a wall-clock timeout and an output cap, enforced here: on either, the whole session is killed,
    then every process still running under the run's uid (this catches programs that left the
    session with setsid);
  - a scrubbed environment (no inherited variables, `python -I`) and a temporary working directory
    that is deleted afterwards.
  - a seccomp filter (libseccomp, when installed; see sandbox_init.py): no socket, no new namespace
    (so no user namespace in which the program would be root), no ptrace, io_uring, bpf or keyrings.
Without namespaces (no root, no `unshare`, or a container without CAP_SYS_ADMIN) the seccomp filter
still refuses every socket, and a Python audit hook refuses socket connect/bind/send as well.
Without root there is no throwaway uid and RLIMIT_NPROC counts all of the user's processes.

The fallback mode (no namespaces) cannot be made safe for reinforcement learning, and
`require_full_isolation` refuses it (the GRPO trainer calls it before it grades code): the program
sees the host's process table (every command line, secrets included), it can fill the disk
(RLIMIT_FSIZE caps one file, nothing caps their total, and there is no way to mount a size-capped
tmpfs without a mount namespace), and without root it runs as our own uid, so it can signal, read
and write our processes. RL optimises every such hole. Evaluation and tests may still run in the
fallback mode; NANOSEEK_UNSAFE_SANDBOX=1 accepts it for training too, on a machine you do not mind
losing.

A program can talk with the parent while it runs (`run(..., talk=...)`): a pair of pipes on its file
descriptors 3 (requests, read) and 4 (replies, write), served by the `talk` callback in a thread of
the parent. The code tasks use it to call the candidate's function from outside its process and
decide the verdict there.

Thread-safe: the trainer grades a batch from a small thread pool. Nothing here uses preexec_fn
(unsafe with threads): privileged set-up happens in a separate first process, sandbox_init.py.
"""

import contextlib
import ctypes
import fcntl
import json
import math
import os
import pwd
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
NAMESPACE_FLAGS = [
    "--net",
    "--pid",
    "--mount",
    "--ipc",
    "--uts",
    "--fork",
    "--kill-child",
    "--mount-proc",
]
# world-writable: covered by tmpfs or swept
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# unassigned uids (Debian's on-demand range); ones in /etc/passwd are skipped
UID_BASE, UID_COUNT = 60100, 64
SECCOMP_LIBRARY = "libseccomp.so.2"
TALK_GRACE = 1.0  # seconds the program has to exit once the conversation is over
MAX_LINE = 1 << 20  # bytes of one reply on the channel
UNSAFE_ENV = "NANOSEEK_UNSAFE_SANDBOX"
FULL_ISOLATION = ("net-namespace", "pid-namespace", "private-tmpfs", "throwaway-uid", "seccomp")
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
    """The sandbox failed (not the program in it), or is not safe enough for what was asked."""


class ChannelClosed(Exception):
    """The program closed its end of the channel, exited, sent too long a line, or time is up."""


class Channel:
    """The parent's end of a conversation with a running program: it writes requests on the
    program's fd 3 and reads replies, one line each, from its fd 4. Every wait ends at the run's
    deadline, or when the sandbox says that the program has ended (`stop`)."""

    def __init__(self, send_fd: int, recv_fd: int, deadline: float):
        self.send_fd = send_fd
        self.recv_fd = recv_fd
        self.deadline = deadline
        self.stop = threading.Event()  # set by the sandbox once the program has ended
        self._pending = bytearray()

    def _wait(self, fd: int, event: int) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, event)
            while not sel.select(0.05):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    raise ChannelClosed("the program ended or the time is up")

    def send(self, line: bytes) -> None:
        view = memoryview(line + b"\n")
        while view:  # a pipe that polls writable takes PIPE_BUF bytes without blocking
            self._wait(self.send_fd, selectors.EVENT_WRITE)
            try:
                view = view[os.write(self.send_fd, view[: select.PIPE_BUF]) :]
            except BrokenPipeError as e:
                raise ChannelClosed("the program closed its requests") from e

    def recv(self) -> bytes:
        while b"\n" not in self._pending:
            if len(self._pending) > MAX_LINE:
                raise ChannelClosed("a reply longer than the limit")
            self._wait(self.recv_fd, selectors.EVENT_READ)
            chunk = os.read(self.recv_fd, 1 << 16)
            if not chunk:
                raise ChannelClosed("the program closed its replies")
            self._pending += chunk
        line, _, rest = bytes(self._pending).partition(b"\n")
        self._pending = bytearray(rest)
        return line

    def ask(self, line: bytes) -> bytes:
        self.send(line)
        return self.recv()


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
    # "timeout", "output_limit", "talk_ended", "init_killed" (the program killed our init: possible
    # without root), or the signal that ended it ("SIGKILL", "SIGXCPU", ...)
    killed: str | None
    duration: float  # seconds
    isolation: tuple[str, ...]


class _Conversation:
    """The pipes and the thread of one run's `talk`."""

    def __init__(self, talk: Callable[[Channel], None], deadline: float):
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self.child_fds = [request_r, reply_w]  # the program's ends, handed over by our init
        self.channel = Channel(request_w, reply_r, deadline)
        self.talk = talk
        self.open_fds = {request_r, request_w, reply_r, reply_w}
        self.fd_lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _close(self, fd: int) -> None:
        with self.fd_lock:
            if fd in self.open_fds:
                self.open_fds.discard(fd)
                os.close(fd)

    def start(self) -> None:
        for fd in self.child_fds:
            self._close(fd)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.talk(self.channel)
        except BaseException as e:  # raised in the caller's thread by finish()
            self.error = e
        finally:
            self._close(self.channel.send_fd)  # the program reads end of file: time to exit
            self.done.set()

    def finish(self) -> None:
        """Once the program has ended: stop the talk, close the pipes, raise what it raised."""
        self.channel.stop.set()
        if self.thread.ident is not None:
            self.thread.join()
        for fd in list(self.open_fds):
            self._close(fd)
        if self.error is not None:
            raise self.error


class _UidPool:
    """Hands out one uid per concurrent run: a free-list for threads plus
    an flock per uid for processes."""

    def __init__(self, base: int, count: int):
        self.uids = [u for u in range(base, base + count) if not _in_passwd(u)]
        self.free = list(self.uids)
        self.cond = threading.Condition()
        self.lock_dir = None

    def _try_lock(self, uid: int) -> int | None:
        # a fixed place, so that every process on the machine agrees (TMPDIR may differ)
        if self.lock_dir is None:
            self.lock_dir = _private_dir(
                f"{'/run' if os.path.isdir('/run') else '/tmp'}/nanoseek-sandbox-uids"
            )
        fd = os.open(
            os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None

    @contextlib.contextmanager
    def lease(self):
        if not self.uids:
            raise SandboxError(
                f"every uid from {UID_BASE} to {UID_BASE + UID_COUNT - 1} is a real user"
            )
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
    """A directory only we can write to; refuses one that someone else (a
    sandboxed program) made first."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not (
        os.path.isdir(path)
        and not os.path.islink(path)
        and st.st_uid == os.geteuid()
        and st.st_mode & 0o077 == 0
    ):
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
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(
            ("Z", "X")
        ):
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
    # a fork bomb may still be forking: repeat until none is left (NPROC bounds it)
    for _ in range(200):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    raise SandboxError(f"processes of uid {uid} survive SIGKILL")


def _remove_files_of(uid: int, dirs=SHARED_DIRS) -> None:
    """Without a private tmpfs, delete what the run's uid left in world-writable directories (the
    only places outside its working directory where it can create anything)."""
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
    def __init__(
        self, limits: Limits = Limits(), namespaces: bool = True, python: str | None = None
    ):
        """`namespaces=False` forces the fallback; `python` picks the interpreter that runs the code
        (default: the first of ours and the system's that works under the throwaway uid)."""
        self.limits = limits
        self.namespaces = namespaces
        self.python = python
        self.unshare: str | None = None
        self.seccomp = _seccomp_library()
        self.root = os.geteuid() == 0
        self._ready = False
        self._lock = threading.Lock()

    def run(
        self,
        code: str,
        stdin: str = "",
        files: dict[str, str] | None = None,
        talk: Callable[[Channel], None] | None = None,
        **limits,
    ) -> SandboxResult:
        """Run `code` as main.py in a fresh working directory, with `files` beside it; `limits`
        override fields of this sandbox's Limits (timeout=..., memory_mb=...).

        With `talk`, the program gets a channel (fds 3 and 4) and `talk(channel)` runs in a thread
        of ours meanwhile; when it returns, the program's fd 3 reads end of file and the program has
        TALK_GRACE seconds to exit. An exception in `talk` is raised here."""
        self._setup()
        return self._run(code, stdin, files or {}, replace(self.limits, **limits), talk)

    @property
    def isolation(self) -> tuple[str, ...]:
        self._setup()
        return self._isolation()

    def _isolation(self) -> tuple[str, ...]:
        net = (
            ("net-namespace", "pid-namespace", "private-tmpfs")
            if self.unshare
            else ("net-audit-hook",)
        )
        uid = ("throwaway-uid",) if self.root else ()
        seccomp = ("seccomp",) if self.seccomp else ()
        return (*net, *uid, *seccomp, "rlimits", "timeout", "scrubbed-env")

    def require_full_isolation(self, purpose: str = "reinforcement learning on code tasks") -> None:
        """Refuse `purpose` unless every layer is in force (the module docstring says why the
        fallback mode cannot be made safe), or NANOSEEK_UNSAFE_SANDBOX=1 accepts the risk."""
        missing = [layer for layer in FULL_ISOLATION if layer not in self.isolation]
        if missing and os.environ.get(UNSAFE_ENV) != "1":
            raise SandboxError(
                f"refusing {purpose}: the code sandbox lacks {', '.join(missing)}. Without "
                "them a program can see every process on the host, fill the disk, or (without "
                "root) reach our own processes, and RL learns to exploit such holes. Run as root "
                f"with util-linux `unshare` and libseccomp, or set {UNSAFE_ENV}=1 to accept the "
                "risk on a machine you do not mind losing."
            )

    def _setup(self) -> None:
        with self._lock:
            if self._ready:
                return
            if self.namespaces and self.root and (unshare := shutil.which("unshare")):
                probe = subprocess.run(
                    [unshare, *NAMESPACE_FLAGS, "--", "true"], capture_output=True, env=ENV
                )
                self.unshare = unshare if probe.returncode == 0 else None
            candidates = (
                [self.python]
                if self.python
                else [
                    sys.executable,
                    os.path.realpath(sys.executable),
                    "/usr/bin/python3",
                    "/usr/local/bin/python3",
                ]
            )
            # A kernel that refuses the seccomp filter: run without it (RL then refuses the box).
            for seccomp in dict.fromkeys([self.seccomp, None]):
                self.seccomp = seccomp
                for python in dict.fromkeys(p for p in candidates if os.path.exists(p)):
                    self.python = python  # the probe: can it run code under the sandbox's uid?
                    with contextlib.suppress(SandboxError):
                        result = self._run("print('ok')", "", {}, Limits(timeout=10))
                        if result.ok and result.stdout == "ok\n":
                            self._ready = True
                            return
            raise SandboxError(
                f"no Python interpreter runs inside the sandbox (tried {candidates})"
            )

    def _run(
        self,
        code: str,
        stdin: str,
        files: dict[str, str],
        limits: Limits,
        talk: Callable[[Channel], None] | None = None,
    ) -> SandboxResult:
        with _UIDS.lease() if self.root else contextlib.nullcontext() as uid:
            workdir = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
            try:
                for name, text in {**files, "main.py": code}.items():
                    with open(os.path.join(workdir, os.path.basename(name)), "w") as f:
                        f.write(text)
                if uid is not None and not self.unshare:  # the program writes in place
                    for name in [".", *os.listdir(workdir)]:
                        os.chown(os.path.join(workdir, name), uid, uid)
                return self._launch(workdir, uid, stdin, limits, talk)
            finally:
                if uid is not None:
                    # nothing of this run outlives its lease, and nothing writes while we clean up
                    _kill_uid(uid)
                shutil.rmtree(workdir, ignore_errors=True)
                if uid is not None and not self.unshare:
                    _remove_files_of(uid)

    def _launch(
        self,
        workdir: str,
        uid: int | None,
        stdin: str,
        limits: Limits,
        talk: Callable[[Channel], None] | None,
    ) -> SandboxResult:
        cpu = limits.cpu_seconds or math.ceil(limits.timeout) + 1
        # Without our own uid, RLIMIT_NPROC counts every task of the user: allow
        # what already runs, plus the cap.
        nproc = limits.max_processes + (0 if uid is not None else _task_count(os.getuid()))
        rlimits = {
            "RLIMIT_CPU": cpu,
            "RLIMIT_AS": limits.memory_mb << 20,
            "RLIMIT_NPROC": nproc,
            "RLIMIT_FSIZE": limits.max_file_mb << 20,
            "RLIMIT_NOFILE": limits.max_open_files,
            "RLIMIT_CORE": 0,
        }
        program = (
            [self.python, "-I", "main.py"] if self.unshare else [self.python, "-I", "-c", NET_GUARD]
        )
        start = time.monotonic()
        conversation = _Conversation(talk, start + limits.timeout) if talk else None
        child_fds = conversation.child_fds if conversation else []
        status_r, status_w = os.pipe()  # our init reports the program's exit status here
        cfg = dict(
            workdir=workdir,
            uid=uid,
            status_fd=status_w,
            private_fs=bool(self.unshare),
            tmpfs_mb=limits.tmpfs_mb,
            shared_dirs=SHARED_DIRS,
            rlimits=rlimits,
            argv=program,
            env={**ENV, "HOME": workdir},
            channel=child_fds,
            seccomp=self.seccomp,
        )
        argv = [sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg)]
        if self.unshare:
            argv = [self.unshare, *NAMESPACE_FLAGS, "--", *argv]
        try:
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write(stdin.encode())
                stdin_file.seek(0)
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd="/",
                    env=ENV,
                    pass_fds=(status_w, *child_fds),
                    start_new_session=True,
                )
        except BaseException:
            os.close(status_r)
            if conversation:
                conversation.finish()
            raise
        finally:
            os.close(status_w)
        try:
            if conversation:
                conversation.start()
            done = conversation.done if conversation else None
            out, err, killed = _collect(proc, limits, start + limits.timeout, done)
            duration = time.monotonic() - start
            os.set_blocking(status_r, False)
            status = b""
            with contextlib.suppress(BlockingIOError):
                status = os.read(status_r, 32)
        finally:
            os.close(status_r)
            if proc.returncode is None:  # _collect failed: still end the session
                _kill_session(proc)
            if conversation:
                conversation.finish()
        returncode = int(status) if status else None  # written by our init, never by the program
        if returncode is None and killed is None and proc.returncode < 0:
            killed = "init_killed"  # by a signal not ours: without root, the program can do that
        if returncode is None and killed is None:
            detail = err[-2000:].decode(errors="replace")
            raise SandboxError(f"sandbox failed to start (exit {proc.returncode}): {detail}")
        if killed is None and returncode is not None and returncode < 0:
            killed = _signal_name(-returncode)
        cap = limits.max_output_bytes
        return SandboxResult(
            ok=killed is None and returncode == 0,
            returncode=returncode,
            stdout=out[:cap].decode(errors="replace"),
            stderr=err[:cap].decode(errors="replace"),
            timed_out=killed == "timeout",
            killed=killed,
            duration=duration,
            isolation=self._isolation(),
        )


def _seccomp_library() -> str | None:
    """libseccomp's file name if it loads here (Debian installs it with apt), else None."""
    try:
        ctypes.CDLL(SECCOMP_LIBRARY)
    except OSError:
        return None
    return SECCOMP_LIBRARY


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exited(proc: subprocess.Popen) -> bool:
    """Has the process exited? Without reaping it: a zombie leader keeps its process group id from
    being reused, so the killpg that follows cannot hit an unrelated group."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # unshare, our init, and whatever stayed in the session
    proc.wait()


def _collect(
    proc: subprocess.Popen,
    limits: Limits,
    deadline: float,
    talk_done: threading.Event | None = None,
) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until both close, the process exits, the deadline passes, the output
    cap is hit or the program outlives its conversation by TALK_GRACE; then end the session and
    take what is left in the pipes."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    killed = None
    reason = "timeout"
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map() and killed is None:
            grace_end = time.monotonic() + TALK_GRACE
            if talk_done is not None and talk_done.is_set() and grace_end < deadline:
                reason = "talk_ended"
                deadline = grace_end
            left = deadline - time.monotonic()
            if left <= 0:
                killed = reason
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
                while (chunk := os.read(key.fd, 1 << 16)) and len(
                    bufs[key.fileobj]
                ) <= limits.max_output_bytes:
                    bufs[key.fileobj] += chunk
    proc.stdout.close()
    proc.stderr.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), killed


_DEFAULT = Sandbox()


def default_sandbox() -> Sandbox:
    """The shared sandbox with default limits (its one-time set-up
    probe is paid once per process)."""
    return _DEFAULT


def run_python(
    code: str, stdin: str = "", files: dict[str, str] | None = None, **limits
) -> SandboxResult:
    """Run `code` in the default sandbox (see Sandbox.run)."""
    return _DEFAULT.run(code, stdin, files, **limits)
