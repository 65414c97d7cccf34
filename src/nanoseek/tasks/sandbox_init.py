"""First process of a sandbox: runs as root (inside fresh namespaces when
sandbox.py could make them), prepares the filesystem, then forks the untrusted
program under a throwaway uid and waits for it.

Run by sandbox.py as `python -I -S sandbox_init.py CONFIG_JSON`; never imported. It stays small and
uses only the standard library (plus libseccomp through ctypes), since it runs with privileges. As
pid 1 of a pid namespace it reaps orphans, and its exit makes the kernel kill every process left in
the namespace.

The seccomp filter (built with libseccomp, so no hand-written BPF) lets every system call through
except these, which fail with EPERM (clone3 with ENOSYS, so that the C library falls back to clone,
whose flags it can see):
  - socket(): no socket of any family, so no connection anywhere: not to 127.0.0.1, not to a UNIX
    socket on the host's filesystem, not to an abstract one. socketpair() stays for AF_UNIX stream
    pairs (multiprocessing's pipes), which are connected to each other only and refuse a destination
    address;
  - new namespaces: unshare, setns, and clone with any CLONE_NEW* flag (a user namespace would make
    the program root inside it);
  - leaving its process group (setsid, setpgid), so that all the program starts stays in the one
    group that we kill; signalling a whole group (kill with a negative pid, kill(-1) included);
  - reaching other processes or the kernel's extras: ptrace, process_vm_readv/writev, bpf,
    perf_event_open, userfaultfd, keyctl/add_key/request_key, io_uring (its requests would bypass
    this filter), mount, umount2, pivot_root, chroot, name_to_handle_at/open_by_handle_at.
System calls of another architecture (32-bit int 0x80 on x86-64) kill the process: libseccomp's
default.
"""

import ctypes
import fcntl
import json
import os
import resource
import sys

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
CHANNEL_FDS = (3, 4)  # the program's request (read) and reply (write) pipes, when it has them
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000  # | errno
SCMP_CMP_NE = 1
SCMP_CMP_MASKED_EQ = 7
EPERM = 1
ENOSYS = 38
AF_UNIX = 1
SOCK_STREAM = 1
SOCK_TYPE_MASK = 0xF  # the type without SOCK_CLOEXEC / SOCK_NONBLOCK
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NEW_FLAGS = (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
DENIED = (
    "socket",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "name_to_handle_at",
    "open_by_handle_at",
    "setsid",
    "setpgid",
)
PID_SIGN = 0x80000000  # kill() with a negative pid signals a process group, -1 every process we may
libc = ctypes.CDLL(None, use_errno=True)


class ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp: compare system call argument `arg` with `a` (or, under
    the mask `a`, with `b`)."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("a", ctypes.c_uint64),
        ("b", ctypes.c_uint64),
    ]


def check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_tmpfs(path: str, size_mb: int) -> None:
    options = f"size={size_mb}m,nr_inodes=4096,mode=1777".encode()
    check(
        libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
        f"mount tmpfs on {path}",
    )


def private_filesystem(cfg: dict) -> None:
    """Only in a private mount namespace: a fresh, size-capped tmpfs over every world-writable
    directory and over the working directory itself, so whatever the program writes stays in memory
    and vanishes with it."""
    workdir = cfg["workdir"]
    files = {}
    for name in os.listdir(workdir):  # read the staged files before the mounts hide them
        with open(os.path.join(workdir, name), "rb") as f:
            files[name] = f.read()
    # nothing leaks out
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    for d in cfg["shared_dirs"]:
        if os.path.isdir(d) and not os.path.islink(d):
            mount_tmpfs(d, cfg["tmpfs_mb"])
    os.makedirs(workdir, exist_ok=True)
    mount_tmpfs(workdir, cfg["tmpfs_mb"])
    for name, data in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        if cfg["uid"] is not None:
            os.chown(path, cfg["uid"], cfg["uid"])
    if cfg["uid"] is not None:
        os.chown(workdir, cfg["uid"], cfg["uid"])
        os.chmod(workdir, 0o700)


def seccomp_filter(library: str) -> None:
    """Load the filter of the module docstring into this process (and all that it will start)."""
    seccomp = ctypes.CDLL(library, use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = seccomp.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")

    def deny(name: str, *conditions: tuple[int, int, int, int], errno: int = EPERM) -> None:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call of this architecture
        cmps = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*c) for c in conditions])
        action = SCMP_ACT_ERRNO | errno
        rc = seccomp.seccomp_rule_add_array(ctx, action, number, len(conditions), cmps)
        if rc != 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    for name in DENIED:
        deny(name)
    deny("clone3", errno=ENOSYS)
    for flag in CLONE_NEW_FLAGS:
        deny("clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
    deny("kill", (0, SCMP_CMP_MASKED_EQ, PID_SIGN, PID_SIGN))
    deny("socketpair", (0, SCMP_CMP_NE, AF_UNIX, 0))
    for kind in range(SOCK_TYPE_MASK + 1):
        if kind != SOCK_STREAM:
            deny("socketpair", (1, SCMP_CMP_MASKED_EQ, SOCK_TYPE_MASK, kind))
    rc = seccomp.seccomp_load(ctx)
    if rc != 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def attach_channel(fds: list[int]) -> None:
    """Move the conversation's pipes to CHANNEL_FDS, inheritable (through temporary high numbers,
    since the two sets may overlap)."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    for fd, target in zip(high, CHANNEL_FDS):
        os.dup2(fd, target)
        os.close(fd)


def exec_program(cfg: dict) -> None:
    """In the forked child: limits, then the throwaway uid, then the program. Hard limits equal soft
    ones, and an unprivileged process cannot raise them again."""
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    # setuid binaries cannot give root back
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # dies with us (set after setuid: it resets)
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "pdeathsig")
    if cfg["channel"]:
        attach_channel(cfg["channel"])
    if cfg["seccomp"]:
        seccomp_filter(cfg["seccomp"])  # last before the program
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    # the program must not be able to forge its own exit status
    os.set_inheritable(status_fd, False)
    if cfg["private_fs"]:
        private_filesystem(cfg)
    os.chdir(cfg["workdir"])
    pid = os.fork()
    if pid == 0:
        try:
            exec_program(cfg)
        except BaseException as e:
            os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
        os._exit(127)
    for fd in cfg["channel"]:
        os.close(fd)  # only the program talks on the channel: its end closes when it exits
    while True:  # reap every child: as pid 1 of the namespace, orphans are ours too
        waited, status = os.wait()
        if waited == pid:
            break
    os.write(status_fd, str(os.waitstatus_to_exitcode(status)).encode())


if __name__ == "__main__":
    main()
