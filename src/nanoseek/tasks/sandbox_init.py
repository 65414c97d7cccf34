"""First process of a sandbox: runs as root (inside fresh namespaces when sandbox.py could make them), prepares
the filesystem, then forks the untrusted program under a throwaway uid and waits for it.

Run by sandbox.py as `python -I -S sandbox_init.py CONFIG_JSON`; never imported. It stays small and uses only
the standard library, since it runs with privileges. As pid 1 of a pid namespace it reaps orphans, and its
exit makes the kernel kill every process left in the namespace.
"""

import ctypes
import json
import os
import resource
import sys

MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
libc = ctypes.CDLL(None, use_errno=True)


def check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_tmpfs(path: str, size_mb: int) -> None:
    options = f"size={size_mb}m,nr_inodes=4096,mode=1777".encode()
    check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"mount tmpfs on {path}")


def private_filesystem(cfg: dict) -> None:
    """Only in a private mount namespace: a fresh, size-capped tmpfs over every world-writable directory and over
    the working directory itself, so whatever the program writes stays in memory and vanishes with it."""
    workdir = cfg["workdir"]
    files = {}
    for name in os.listdir(workdir):  # read the staged files before the mounts hide them
        with open(os.path.join(workdir, name), "rb") as f:
            files[name] = f.read()
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")  # nothing leaks out
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


def exec_program(cfg: dict) -> None:
    """In the forked child: limits, then the throwaway uid, then the program. Hard limits equal soft ones, and an
    unprivileged process cannot raise them again."""
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # setuid binaries cannot give root back
    check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "pdeathsig")  # dies with us (set after setuid: it resets)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the program must not be able to forge its own exit status
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
    while True:  # reap every child: as pid 1 of the namespace, orphans are ours too
        waited, status = os.wait()
        if waited == pid:
            break
    os.write(status_fd, str(os.waitstatus_to_exitcode(status)).encode())


if __name__ == "__main__":
    main()
