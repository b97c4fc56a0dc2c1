"""This machine's own root filesystem inside a kit guest, so that xhcidbg runs there from its venv.

QEMU exports `/` read-only over virtio-9p (`virtfs_args`); the guest mounts it, lays a tmpfs-backed
overlayfs on top (so the tree is writable and keeps its paths: /work/main/.venv/bin/python is the
same file in the guest as here) and mounts its own proc, sys, dev and configfs inside.  Commands
then run chrooted into that tree (`HostRoot.run`, `HostRoot.python`), while the kit's busybox
shell outside it keeps the guest's own modules and tools (modprobe of the kit's kernel modules
works only there: the host's /lib/modules is for the host's kernel).

    vm = await Vm.start(host_root=True)
    result = await vm.host.python("import usb1; print(usb1.__version__)")

What the guest writes lands in its tmpfs and is gone with the VM; the host's files never change.
Files the host makes after boot show up in the guest (9p runs uncached) unless the guest looked
for that very name before.
"""
from __future__ import annotations

import itertools
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .initramfs import HOST_ROOT_MODULES
from .launch import CommandResult, SerialConsole

MOUNT_TAG = "xhcidbg-host"
# Where the chroot is, seen from the kit's shell; inside the chroot paths are the host's own.
ROOT = "/host"
# The 9p mount and the overlay's tmpfs, kept out of the chroot's view.
STAGING = "/run/hostroot"
# Larger 9p messages make reading files (Python's imports) fewer round trips.
MSIZE = 262144
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Shell(Protocol):
    """Something that runs a shell command in the guest: the kit's console or the chroot."""

    async def run(self, command: str, timeout: float = 60.0,
                  check: bool = False) -> CommandResult: ...


def virtfs_args(tag: str = MOUNT_TAG) -> list[str]:
    """QEMU options that export this machine's `/` to the guest under `tag`."""
    # security_model=none: files keep their owners and modes as they are, read as the user QEMU
    # runs as.  multidevs=remap: `/` spans several filesystems, whose inode numbers would collide.
    return ["-virtfs", f"local,path=/,mount_tag={tag},security_model=none,readonly=on,"
                       "multidevs=remap"]


def mount_script(tag: str = MOUNT_TAG, root: str = ROOT, staging: str = STAGING,
                 upper_mib: int | None = None) -> str:
    """The shell (for the kit's busybox) that mounts the host's tree at `root`, ready to chroot."""
    size = f",size={upper_mib}m" if upper_mib else ""
    tags = "/sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag"
    lines = [
        "set -e",
        f"modprobe -a {' '.join(HOST_ROOT_MODULES)}",
        # The PCI probe of the 9p device normally ends inside modprobe; wait in case it was put off.
        f"i=0; until grep -qs {tag} {tags}; do i=$((i+1)); [ $i -lt 100 ] ||"
        f" {{ echo 'no virtio-9p device tagged {tag}: start QEMU with virtfs_args()'; exit 1; }};"
        " usleep 50000; done",
        f"mkdir -p {staging}/lower {staging}/rw {root}",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize={MSIZE} {tag} {staging}/lower",
        f"mount -t tmpfs -o mode=755{size} hostroot-rw {staging}/rw",
        f"mkdir -p {staging}/rw/upper {staging}/rw/work",
        f"mount -t overlay -o lowerdir={staging}/lower,upperdir={staging}/rw/upper,"
        f"workdir={staging}/rw/work hostroot {root}",
        # The guest's own kernel filesystems, not the host's as 9p shows them.
        f"mount -t proc proc {root}/proc",
        f"mount -t sysfs sysfs {root}/sys",
        f"mount -t configfs configfs {root}/sys/kernel/config",
        f"mount -o bind /dev {root}/dev",
        f"mount -o bind /dev/pts {root}/dev/pts",
        # libusb refuses to start without a usbfs directory, even before any USB bus exists.
        f"mkdir -p {root}/dev/bus/usb {root}/dev/shm",
        f"mount -t tmpfs -o mode=1777 shm {root}/dev/shm",
        # The host's /run holds its own sockets and pid files, which mean nothing here.
        f"mount -t tmpfs -o mode=755 run {root}/run",
    ]
    return "\n".join(lines)


@dataclass
class HostRoot:
    """The host's tree mounted in a kit guest: run commands chrooted into it."""
    console: SerialConsole
    root: str = ROOT
    python_path: str = sys.executable     # the interpreter running this, venv and all

    @classmethod
    async def mount(cls, console: SerialConsole, tag: str = MOUNT_TAG, root: str = ROOT,
                    upper_mib: int | None = None, timeout: float = 120.0) -> HostRoot:
        """Mount the tree QEMU exports as `tag` (see `virtfs_args`) at `root` in the guest."""
        result = await console.run(mount_script(tag, root, upper_mib=upper_mib), timeout)
        if not result.ok:
            raise RuntimeError(f"mounting the host's root in the guest failed (status"
                               f" {result.status}):\n{result.output}")
        return cls(console, root)

    def command(self, command: str, cwd: str | None = None,
                env: Mapping[str, str] | None = None) -> str:
        """The kit-shell command that runs `command` with /bin/sh inside the chroot."""
        # A clean environment: the kit shell's PATH and PS1 describe busybox, not the host tree.
        variables = {"HOME": "/root", "PATH": PATH, "LANG": "C.UTF-8", **(env or {})}
        script = f"cd {shlex.quote(cwd)} && {command}" if cwd else command
        return shlex.join(["chroot", self.root, "/usr/bin/env", "-i",
                           *(f"{k}={v}" for k, v in variables.items()), "/bin/sh", "-c", script])

    async def run(self, command: str, timeout: float = 60.0, check: bool = False, *,
                  cwd: str | None = None, env: Mapping[str, str] | None = None) -> CommandResult:
        """Run `command` in the chroot (as root, with /bin/sh); its output and exit status."""
        result = await self.console.run(self.command(command, cwd, env), timeout)
        if check and not result.ok:
            raise RuntimeError(f"command {command!r} in the host's root failed with status"
                               f" {result.status}:\n{result.output}")
        return result

    async def python(self, code: str, *args: str, timeout: float = 120.0, check: bool = False,
                     cwd: str | None = None,
                     env: Mapping[str, str] | None = None) -> CommandResult:
        """Run Python `code` (with `args` as sys.argv[1:]) in the chroot with `python_path`."""
        return await self.run(shlex.join([self.python_path, "-c", code, *args]), timeout, check,
                              cwd=cwd, env=env)

    async def start(self, command: str, *, cwd: str | None = None,
                    env: Mapping[str, str] | None = None) -> Job:
        """Start `command` in the chroot in the background; its output goes to a file."""
        job = Job(self.console, f"{STAGING}/jobs/{next(_job_numbers)}")
        # setsid: the job leads its own process group, so that stop() ends all of it.
        inner = f"{self.command(command, cwd, env)}; echo $? > {job.folder}/status"
        started = await self.console.run(
            f"mkdir -p {job.folder} || exit; setsid sh -c {shlex.quote(inner)}"
            f" > {job.folder}/output 2>&1 < /dev/null & echo $!", check=True)
        job.pid = int(started.output)
        return job


_job_numbers = itertools.count(1)


@dataclass
class Job:
    """A command running in the background in the guest (see `HostRoot.start`)."""
    console: SerialConsole
    folder: str               # in the kit's tree: output, and status once it has ended
    pid: int = 0

    async def output(self) -> str:
        """What the job has written so far (stdout and stderr)."""
        return (await self.console.run(f"cat {self.folder}/output", check=True)).output

    async def wait_output(self, text: str, timeout: float = 60.0) -> str:
        """Wait (polling in the guest) until the job's output holds `text`; the output then."""
        tries = int(timeout / 0.05)
        found = await self.console.run(
            f"i=0; until grep -qF -- {shlex.quote(text)} {self.folder}/output; do"
            f" [ -e {self.folder}/status ] && break; i=$((i+1)); [ $i -lt {tries} ] || break;"
            " usleep 50000; done", timeout + 30)
        output = await self.output()
        if not found.ok or text not in output:
            raise TimeoutError(f"the guest job did not print {text!r} within {timeout:g} s;"
                               f" its output:\n{output}")
        return output

    async def wait(self, timeout: float = 60.0) -> CommandResult:
        """Wait for the job to end; its whole output and exit status (-1: ended by a signal,
        so that it could not write one)."""
        tries = int(timeout / 0.05)
        ended = await self.console.run(
            f"i=0; until [ -s {self.folder}/status ] || [ ! -d /proc/{self.pid} ]; do"
            f" i=$((i+1)); [ $i -lt {tries} ] || exit 1; usleep 50000; done;"
            f" cat {self.folder}/status 2>/dev/null || echo -1", timeout + 30)
        if not ended.ok:
            raise TimeoutError(f"the guest job {self.pid} did not end within {timeout:g} s;"
                               f" its output:\n{await self.output()}")
        return CommandResult(int(ended.output), await self.output())

    async def stop(self, signal: str = "TERM") -> None:
        """Signal the job's whole process group (nothing happens if it has ended)."""
        # ash's kill takes a negative pid as a process group, and no `--` before it.
        await self.console.run(f"kill -{signal} -{self.pid} 2>/dev/null; true")
