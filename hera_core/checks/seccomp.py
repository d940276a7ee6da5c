"""The seccomp filter of the sandbox: a classic-BPF program that bubblewrap installs (`--seccomp FD`)
before it starts the model's program.

Namespaces already hide the host's files, processes and network; the filter closes what they
leave open, the kernel's own attack surface: a socket of any family but AF_UNIX (so a raw
`syscall(SYS_socket, AF_INET, ...)` through ctypes fails too), new namespaces (no nested user
namespace, where the program would regain capabilities), mounts, ptrace and reading other
processes' memory, keyrings, BPF, perf, io_uring, userfaultfd, kernel modules, kexec, reboot,
swap; and new processes (fork, vfork, clone without CLONE_THREAD: threads pass). A denied call
fails with EPERM (EACCES for sockets), so the program sees an ordinary error; a call from another ABI than the one the filter was written for kills the process.

Written here rather than with libseccomp: the program is 100 instructions of a stable format, and
the sandbox then needs no system library beyond what bubblewrap brings.
"""

from __future__ import annotations

import errno
import platform
import struct

# Classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

# Offsets in struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64);
# the low 32 bits of args[0] sit at 16 on the little-endian machines below.
_NR, _ARCH, _ARG0_LO = 0, 4, 16

_AF_UNIX = 1
# CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}: a clone that asks for any new namespace.
_CLONE_THREAD = 0x00010000
_CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# The denied calls by name; numbers per ABI from the kernel's headers (asm/unistd_64.h for x86_64,
# asm-generic/unistd.h for aarch64).
DENIED = (
    "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "open_by_handle_at", "name_to_handle_at", "syslog", "quotactl", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr",
)

_ABIS = {
    # machine: (AUDIT_ARCH_*, {name: number}, lowest number of a foreign ABI sharing this arch or None)
    "x86_64": (0xC000003E, {
        "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168,
        "acct": 163, "open_by_handle_at": 304, "name_to_handle_at": 303, "syslog": 103, "quotactl": 179,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442,
    }, 0x40000000),  # x32 system calls carry this bit: refused whole
    "aarch64": (0xC00000B7, {
        "socket": 198, "clone": 220, "clone3": 435, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225,
        "acct": 89, "open_by_handle_at": 265, "name_to_handle_at": 264, "syslog": 116, "quotactl": 60,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429,
        "open_tree": 428, "mount_setattr": 442,
    }, None),
}


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in _ABIS


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def filter_program(machine: str | None = None) -> bytes:
    """The filter as bytes of `struct sock_filter[]`, for bubblewrap's --seccomp. ValueError for a
    machine whose system-call numbers are not in the table."""
    machine = machine or platform.machine()
    if machine not in _ABIS:
        raise ValueError(f"no seccomp table for {machine!r} (known: {', '.join(sorted(_ABIS))})")
    arch, nr, foreign_from = _ABIS[machine]
    eperm, eacces = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.EACCES
    prog = [
        _ins(_LD_W_ABS, _ARCH),
        _ins(_JEQ_K, arch, jt=1, jf=0),
        _ins(_RET_K, _RET_KILL_PROCESS),
        _ins(_LD_W_ABS, _NR),
    ]
    if foreign_from is not None:
        prog += [_ins(_JGE_K, foreign_from, jt=0, jf=1), _ins(_RET_K, eperm)]
    for name in (n for n in DENIED if n in nr):  # aarch64 has no fork or vfork call, only clone
        prog += [_ins(_JEQ_K, nr[name], jt=0, jf=1), _ins(_RET_K, eperm)]
    # clone3 passes its flags in a struct the filter cannot read: ENOSYS makes the C library fall
    # back to clone, whose flags it can.
    prog += [_ins(_JEQ_K, nr["clone3"], jt=0, jf=1), _ins(_RET_K, _RET_ERRNO | errno.ENOSYS)]
    # socket(domain, ...): AF_UNIX only (Python's multiprocessing uses socketpair).
    prog += [
        _ins(_JEQ_K, nr["socket"], jt=0, jf=4),
        _ins(_LD_W_ABS, _ARG0_LO),
        _ins(_JEQ_K, _AF_UNIX, jt=0, jf=1),
        _ins(_RET_K, _RET_ALLOW),
        _ins(_RET_K, eacces),
    ]
    # clone(flags, ...): threads only (CLONE_THREAD, no new namespace). No new process: a fork bomb
    # fails at its first fork, where RLIMIT_NPROC would not bind (the host's root is exempt from it).
    prog += [
        _ins(_JEQ_K, nr["clone"], jt=0, jf=5),
        _ins(_LD_W_ABS, _ARG0_LO),
        _ins(_JSET_K, _CLONE_NEW_ANY, jt=2, jf=0),
        _ins(_JSET_K, _CLONE_THREAD, jt=0, jf=1),
        _ins(_RET_K, _RET_ALLOW),
        _ins(_RET_K, eperm),
    ]
    prog.append(_ins(_RET_K, _RET_ALLOW))
    return b"".join(prog)
