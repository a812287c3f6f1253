"""Real block devices for the emulated instances (flotilla_moto.py, gap 21).

Every EBS volume has a sparse backing file; while it is attached to a
running instance it is a loop device, seen inside that instance only, under
the name a Nitro instance gives it. Every instance is a holder process
(tools/emu_holder.py): the init of its own PID and mount namespaces, which
each SSM command enters. So the real mount, mkfs, setup, run,
before_unmount and unmount scripts run against a real ext4 filesystem.

The store. Backing files live on an XFS filesystem (reflink=1) in a sparse
image under the scratch directory, loop-mounted with `discard` in the moto
server's own mount namespace (tools/moto_server.py enters one), so nothing
of it is seen or left behind on the host: when the server dies, its
namespace, the store's mount and its loop device go with it.

Snapshots are point in time and crash consistent, as EBS's are. CreateSnapshot
clones the volume's backing file with FICLONE: XFS takes the source file's
I/O and mmap locks, writes back the file's dirty pages (the writes the loop
device has completed) and shares the extents, all under those locks, so the
clone holds exactly the blocks the volume had when the call ran, while the
instance keeps writing. Nothing is flushed inside the instance (no fsfreeze):
what its filesystem had not yet written to the device is not in the
snapshot, as on EBS. The clone is instant and takes no space until either
side is written. CreateVolume from a snapshot clones the snapshot's file.

The budget. The store counts the bytes it really holds (XFS counts shared
extents once); past FLOTILLA_EMU_EBS_BUDGET_MIB (default 4096) CreateVolume
fails with VolumeLimitExceeded and CreateSnapshot with
SnapshotLimitExceeded, as EC2 does at an account's storage quota. Files go
with their volume or snapshot (DeleteVolume, DeleteSnapshot), so a leak
shows as bytes held.

Where this cannot run (not root, no loop devices, no mkfs.xfs), `reason()`
says why in one line and the emulator skips block-device scripts as before;
tools/moto_server.py refuses to start instead when CI=true.
"""

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

LIBC = ctypes.CDLL(None, use_errno=True)
FICLONE = 0x40049409
HOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emu_holder.py")
BUDGET_BYTES = int(os.environ.get("FLOTILLA_EMU_EBS_BUDGET_MIB", "4096")) * 1024 * 1024
# The store's own size bounds what writes past the budget can take of the
# host's disk (the budget is checked at create time; writes are not metered).
STORE_GIB = max(8, 4 * (BUDGET_BYTES >> 30))
TOOLS = ("unshare", "nsenter", "chroot", "mkfs.xfs", "mkfs.ext4", "blkid", "losetup", "mount")


def reason():
    """Why real devices cannot be had here, or None."""
    if os.environ.get("FLOTILLA_EMU_DEVICES", "on") == "off":
        return "FLOTILLA_EMU_DEVICES=off"
    if os.geteuid() != 0:
        return "not root (loop devices and mount namespaces need root)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (the loop module is not loaded)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (make installs xfsprogs when it can)"
    return None


def sweep(scratch):
    """At start-up: loop devices an emulator with this scratch directory
    made (their backing file is in its `.ebs` store) that are not set to
    clear themselves, so nothing would
    ever free them. Ours are all made with autoclear, by the holder's
    LOOP_CONFIGURE or by `mount -o loop`, so this finds only what a crash in
    between could leave; nothing of anyone else's is touched."""
    try:
        listed = json.loads(subprocess.run(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE,AUTOCLEAR"],
                                           capture_output=True, text=True, check=True).stdout or "{}")
    except (OSError, subprocess.CalledProcessError, ValueError):
        return
    for device in listed.get("loopdevices", []):
        backing = device.get("back-file") or ""
        mine = backing.startswith(os.path.join(os.path.abspath(scratch), ".ebs") + "/")
        if mine and str(device.get("autoclear")).lower() in ("0", "false"):
            subprocess.run(["losetup", "-d", device["name"]], capture_output=True)


class Store:
    def __init__(self, scratch):
        self.dir = os.path.join(scratch, ".ebs")
        self.mnt = os.path.join(self.dir, "mnt")
        image = os.path.join(self.dir, "store.img")
        os.makedirs(self.mnt, exist_ok=True)
        with open(image, "wb") as f:
            f.truncate(STORE_GIB << 30)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop,discard", image, self.mnt], check=True, capture_output=True)
        self.baseline = self._used()
        self.lock = threading.Lock()

    def _used(self):
        st = os.statvfs(self.mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def used(self):
        return max(0, self._used() - self.baseline)

    def over_budget(self):
        return self.used() >= BUDGET_BYTES

    def path(self, resource_id):
        return os.path.join(self.mnt, resource_id)

    def has(self, resource_id):
        return os.path.exists(self.path(resource_id))

    def blank(self, volume_id, size_gib):
        if not self.has(volume_id):
            with open(self.path(volume_id), "wb") as f:
                f.truncate(int(size_gib) << 30)

    def clone(self, source_id, target_id, size_gib=None):
        """FICLONE source's bytes into a new file: atomic, see the module doc."""
        if not self.has(source_id):
            return False
        src = os.open(self.path(source_id), os.O_RDONLY)
        try:
            dst = os.open(self.path(target_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                fcntl.ioctl(dst, FICLONE, src)
                if size_gib is not None and (int(size_gib) << 30) > os.fstat(dst).st_size:
                    os.ftruncate(dst, int(size_gib) << 30)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return True

    def clone_aside(self, source_id):
        """A clone of source's bytes under a temporary name, or None if it has
        none; `adopt` gives it its id once the snapshot exists, so a failed
        clone fails the call before any snapshot does."""
        if not self.has(source_id):
            return None
        aside = f".clone-{source_id}-{os.getpid()}-{threading.get_ident()}"
        self.clone(source_id, aside)
        return aside

    def adopt(self, aside, resource_id):
        os.rename(self.path(aside), self.path(resource_id))

    def sever(self, volume_id):
        """After a detach: whatever still has the old loop device open (a
        forced detach of a mounted volume, a process holding the device)
        keeps writing to a file that is no longer the volume's, as an
        instance gets I/O errors from a detached EBS volume. The volume's
        bytes are the ones it had at the detach."""
        if not self.has(volume_id):
            return
        orphan = f".severed-{volume_id}-{os.getpid()}-{threading.get_ident()}"
        os.rename(self.path(volume_id), self.path(orphan))
        self.clone(orphan, volume_id)
        self.remove(orphan)

    def remove(self, resource_id):
        try:
            os.unlink(self.path(resource_id))
        except FileNotFoundError:
            return
        # XFS frees an unlinked file's blocks in the background; a syncfs
        # pushes that through, so the budget sees them go.
        fd = os.open(self.mnt, os.O_RDONLY)
        try:
            LIBC.syncfs(fd)
        finally:
            os.close(fd)


class Holder:
    """One running emulated instance."""

    def __init__(self, instance_id, home, ns_dir, scratch):
        self.instance_id = instance_id
        self.lock = threading.Lock()
        os.makedirs(ns_dir, exist_ok=True)
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
             sys.executable, HOLDER, home, ns_dir, scratch],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True,
        )
        hello = json.loads(self.process.stdout.readline() or '{"ok": false, "error": "the holder exited"}')
        if not hello.get("ok"):
            self.kill()
            raise OSError(errno.EIO, f"instance {instance_id}: {hello.get('error')}")
        self.root = hello["root"]
        self.pid = self._init_pid()
        self.indexes = {}  # volume id -> NVMe index
        self.loops = {}  # volume id -> its loop device's name
        self.attaching = threading.Lock()

    def _init_pid(self):
        # unshare --fork: its child is the namespace's init, the one to enter.
        children = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        with open(children) as f:
            return int(f.read().split()[0])

    def ask(self, **request):
        with self.lock:
            if self.process.poll() is not None:
                raise OSError(errno.ESRCH, f"instance {self.instance_id} is not running")
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return json.loads(self.process.stdout.readline() or '{"ok": false, "error": "the holder exited"}')

    def attach(self, volume_id, path):
        with self.attaching:
            index = self.indexes.get(volume_id)
            if index is None:
                taken = set(self.indexes.values())
                index = next(i for i in range(1, 28) if i not in taken)  # nvme0n1 is the root volume
            answer = self.ask(op="attach", volume=volume_id, file=path, index=index)
            if not answer.get("ok"):
                raise OSError(errno.EIO, f"attach {volume_id}: {answer.get('error')}")
            self.indexes[volume_id] = index
            if answer.get("loop"):
                self.loops[volume_id] = (answer["loop"], path)
            return answer

    def detach(self, volume_id, force=False):
        with self.attaching:
            answer = self.ask(op="detach", volume=volume_id, force=force)
            if answer.get("ok"):
                self.indexes.pop(volume_id, None)
                self.loops.pop(volume_id, None)
            return answer

    def mounted(self, volume_id):
        return bool(self.ask(op="mounted", volume=volume_id).get("mounted"))

    def command(self, work, script):
        """argv that runs `script` inside the instance, from `work`."""
        return ["nsenter", "-t", str(self.pid), "--mount", "--pid", "--",
                "chroot", self.root, "env", "-C", work, "bash", "-c", script]

    def kill(self):
        """The instance stops: every process in it dies, its mounts and loop
        devices are released (the kernel kills a PID namespace with its init),
        and this returns once its loop devices are gone, so nothing of the
        instance still writes when the caller moves on (a snapshot, an attach
        elsewhere)."""
        if self.process.returncode is None:  # else its pids may be reused
            for kill in (lambda: os.killpg(self.process.pid, signal.SIGKILL),
                         lambda: os.kill(self.pid, signal.SIGKILL) if getattr(self, "pid", None) else None):
                try:
                    kill()
                except ProcessLookupError:
                    pass
            self.process.wait()
        deadline = time.monotonic() + 10
        for loop, path in self.loops.values():
            backing = f"/sys/block/{os.path.basename(loop)}/loop/backing_file"
            while time.monotonic() < deadline:
                try:
                    with open(backing) as f:
                        if not f.read().startswith(path):
                            break  # cleared, and taken by another volume
                except OSError:
                    break  # cleared
                time.sleep(0.05)
        self.loops.clear()
