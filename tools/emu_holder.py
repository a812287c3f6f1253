"""One emulated EC2 instance: the init (PID 1) of its own PID and mount
namespaces, started by flotilla_devices.py as

    unshare --mount --pid --fork --propagation private python emu_holder.py HOME NS_DIR SCRATCH

It gives the instance a root of its own (an overlay of the host's `/`
whose writes land in NS_DIR/upper, so a mount script's `mkdir -p /data`
never touches the host), a /proc of its PID namespace, a /dev of its own
holding only the usual character devices and the instance's EBS volumes
under their Nitro names, and the emulator's scratch directory (SCRATCH,
holding the instance's home HOME, where the step guard keeps its state) at
the same path as on the host.

It reads requests from stdin, one JSON object per line, and answers each
on stdout with one line:

    {"op": "attach", "volume": "vol-…", "file": "/…/vol-…", "index": 1}
        a loop device over the volume's backing file (autoclear, held open
        here), shown as /dev/nvme<index>n1 and
        /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…
    {"op": "detach", "volume": "vol-…", "force": false}
        refused with {"mounted": true} while the filesystem is mounted in
        this instance, unless forced; the device disappears, and the loop
        device is freed when its last user closes it
    {"op": "mounted", "volume": "vol-…"}

Processes a command leaves running (even with setsid or nohup) stay in the
namespace and are reparented to this init, which reaps them. When stdin
closes (the moto server is gone) or this process is killed (the instance
stops or terminates), the kernel kills every process in the namespace, the
mounts go with the namespace, and the loop devices clear themselves.
"""

import ctypes
import errno
import fcntl
import json
import os
import signal
import stat
import struct
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
LOOP_CTL_GET_FREE, LOOP_CONFIGURE = 0x4C82, 0x4C0A
LO_FLAGS_AUTOCLEAR = 4


def mount(source, target, fstype, flags=0, data=None):
    if LIBC.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def host_mounts():
    """Mount points of the host's tree below `/` (the namespace's copy)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            points.append(point)
    return points


def build_root(home, ns_dir, scratch):
    root = os.path.join(ns_dir, "root")
    for d in ("root", "upper", "work"):
        os.makedirs(os.path.join(ns_dir, d), exist_ok=True)
    mount("overlay", root, "overlay", 0,
          f"lowerdir=/,upperdir={os.path.join(ns_dir, 'upper')},workdir={os.path.join(ns_dir, 'work')}")
    mount("proc", os.path.join(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("/sys", os.path.join(root, "sys"), None, MS_BIND | MS_REC)
    mount("none", os.path.join(root, "sys"), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    dev = os.path.join(root, "dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=16m")
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0)):
        os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(os.path.join(dev, name), 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, os.path.join(dev, name))
    for d in ("pts", "shm", "disk/by-id"):
        os.makedirs(os.path.join(dev, d))
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666")
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    # Other filesystems of the host (a separate /home or /tmp, say) stay
    # visible, as they were; the emulator's own scratch (the EBS store,
    # other instances) does not, except this instance's home.
    for point in host_mounts():
        if point == "/" or point.startswith(("/proc", "/sys", "/dev", root, scratch)) or point == scratch:
            continue
        if os.path.isdir(point) and "/" not in point[1:].rstrip("/"):  # top-level ones carry the rest
            try:  # read-only: the instance writes to its own root only
                mount(point, root + point, None, MS_BIND | MS_REC)
                mount("none", root + point, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            except OSError:
                pass
    # The emulator's scratch directory, as it is on the host (not its
    # mounts): this instance's home, where the step guard keeps its state,
    # and files tests leave for a step. Overlay would hide later changes.
    os.makedirs(home, exist_ok=True)
    mount(scratch, root + scratch, None, MS_BIND)
    # Not the emulator's own state: the EBS store's image and the other
    # instances' roots.
    for hidden in (".ebs", ".ns"):
        if os.path.isdir(os.path.join(scratch, hidden)):
            mount("tmpfs", os.path.join(root + scratch, hidden), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    return root


class Devices:
    def __init__(self, root):
        self.root = root
        self.attached = {}  # volume id -> (loop fd, loop minor, index)

    def node(self, index):
        return os.path.join(self.root, "dev", f"nvme{index}n1")

    def link(self, volume):
        return os.path.join(self.root, "dev", "disk", "by-id",
                            f"nvme-Amazon_Elastic_Block_Store_{volume.replace('-', '')}")

    def attach(self, volume, path, index):
        if volume in self.attached:
            return {"ok": True, "device": f"/dev/nvme{self.attached[volume][2]}n1"}
        backing = os.open(path, os.O_RDWR)
        try:
            control = os.open("/dev/loop-control", os.O_RDWR)
            try:
                for _ in range(100):
                    minor = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                    loop = os.open(f"/dev/loop{minor}", os.O_RDWR)
                    name = path.encode()[:63]
                    # struct loop_config: fd, block_size, loop_info64, reserved[8]
                    info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR,
                                       name, b"", b"", 0, 0)
                    config = struct.pack("=II", backing, 0) + info + b"\0" * 64
                    try:
                        fcntl.ioctl(loop, LOOP_CONFIGURE, config)
                        break
                    except OSError as err:
                        os.close(loop)
                        if err.errno != errno.EBUSY:  # another process took it first
                            raise
                else:
                    raise OSError(errno.EBUSY, "no free loop device")
            finally:
                os.close(control)
        finally:
            os.close(backing)
        try:
            os.mknod(self.node(index), 0o660 | stat.S_IFBLK, os.fstat(loop).st_rdev)
            os.symlink(f"../../nvme{index}n1", self.link(volume))
        except OSError:
            os.close(loop)  # autoclear frees it
            raise
        self.attached[volume] = (loop, minor, index)
        return {"ok": True, "device": f"/dev/nvme{index}n1", "loop": f"/dev/loop{minor}"}

    def mounted(self, volume):
        if volume not in self.attached:
            return False
        rdev = os.fstat(self.attached[volume][0]).st_rdev
        wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[2] == wanted for line in f)

    def detach(self, volume, force):
        if volume not in self.attached:
            return {"ok": True}
        if self.mounted(volume) and not force:
            return {"ok": False, "mounted": True}
        loop, _, index = self.attached.pop(volume)
        for path in (self.link(volume), self.node(index)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(loop)  # autoclear: freed once nothing else holds it
        return {"ok": True}


def reap(*_):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main():
    home, ns_dir, scratch = sys.argv[1:4]
    signal.signal(signal.SIGCHLD, reap)
    try:
        devices = Devices(build_root(home, ns_dir, scratch))
        answer = {"ok": True, "ready": True, "root": devices.root}
    except Exception as err:  # noqa: BLE001 - reported to the emulator, which says why
        print(json.dumps({"ok": False, "error": str(err)}), flush=True)
        return
    print(json.dumps(answer), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            op = request["op"]
            if op == "attach":
                answer = devices.attach(request["volume"], request["file"], int(request["index"]))
            elif op == "detach":
                answer = devices.detach(request["volume"], bool(request.get("force")))
            elif op == "mounted":
                answer = {"ok": True, "mounted": devices.mounted(request["volume"])}
            else:
                answer = {"ok": False, "error": f"unknown op {op}"}
        except Exception as err:  # noqa: BLE001
            answer = {"ok": False, "error": str(err)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
