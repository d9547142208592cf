"""The sandbox child's first program: isolate, limit, drop privileges, then exec the target.

Run as ``python -I -S _sandbox_boot.py '<json config>'`` by ``areal_agents.sandbox`` in a new
session (its own process group). Standard library only; it never imports areal_agents. On any
setup failure it prints ``sandbox setup failed: ...`` to stderr and exits with ``SETUP_FAILED``
(the target never runs). Keys of the config:

* ``cwd``: the work directory (also the only writable directory when isolated as root).
* ``isolate``: unshare a network and a mount namespace (plus a user namespace when not root),
  then mount a private tmpfs on each of ``hide`` (``/tmp``...), re-binding ``cwd`` inside it.
* ``uid`` / ``gid``: switch to these ids (root only) after isolating, before the limits.
* ``limits``: ``{"RLIMIT_CPU": [soft, hard], ...}`` applied last (after the uid switch, so
  ``RLIMIT_NPROC`` counts the sandbox uid's processes).
* ``argv``, ``env``: what to exec (``argv[0]`` looked up on ``env["PATH"]``).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import warnings  # noqa: F401  os.execvpe imports it late, when the stdlib may be unreadable

SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]),
           f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def isolate(cwd: str, hide: list[str]) -> None:
    """New network + mount namespaces; private tmpfs over ``hide``, ``cwd`` bound back in."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
    else:  # an unprivileged user namespace maps only our own ids
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "unshare")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    work = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY)
    for target in hide:
        if os.path.isdir(target) and not os.path.islink(target):
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    if any(cwd == h or cwd.startswith(h.rstrip("/") + "/") for h in hide):
        os.makedirs(cwd, exist_ok=True)
        _mount(f"/proc/self/fd/{work}", cwd, None, MS_BIND, None)
    os.close(work)


def main(config: dict) -> None:
    """Apply ``config`` to this process and exec its target (returns only by raising)."""
    if config["isolate"]:
        isolate(config["cwd"], config["hide"])
    if config.get("uid") is not None:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
    os.chdir(config["cwd"])
    for name, (soft, hard) in config["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.execvpe(config["argv"][0], config["argv"], config["env"])


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception as exc:  # report and stop: the target must not run half-isolated
        sys.stderr.write(f"sandbox setup failed: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
