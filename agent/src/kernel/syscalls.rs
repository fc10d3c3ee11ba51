//! Names of the system calls that reach the socket layer, for the `syscall` label.
//!
//! Only calls that can move socket data get a name; anything else is `other` so the label's
//! cardinality stays bounded whatever a process does. The numbers are the architecture's own
//! (`inferwatch_common::syscalls`): the kernel reports them from the saved registers.

use inferwatch_common::sock::NO_SYSCALL;
#[cfg(target_arch = "aarch64")]
use inferwatch_common::syscalls::aarch64 as nr;
#[cfg(not(target_arch = "aarch64"))]
use inferwatch_common::syscalls::x86_64 as nr;

const NAMES: [(i32, &str); 13] = [
    (nr::READ, "read"),
    (nr::WRITE, "write"),
    (nr::READV, "readv"),
    (nr::WRITEV, "writev"),
    (nr::SENDFILE, "sendfile"),
    (nr::SENDTO, "sendto"),
    (nr::RECVFROM, "recvfrom"),
    (nr::SENDMSG, "sendmsg"),
    (nr::RECVMSG, "recvmsg"),
    (nr::SPLICE, "splice"),
    (nr::RECVMMSG, "recvmmsg"),
    (nr::SENDMMSG, "sendmmsg"),
    (nr::IO_URING_ENTER, "io_uring_enter"),
];

/// Every value the `syscall` label can take.
pub(crate) const LABELS: [&str; 15] = [
    "read",
    "write",
    "readv",
    "writev",
    "sendfile",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "splice",
    "recvmmsg",
    "sendmmsg",
    "io_uring_enter",
    "none",
    "other",
];

/// The label value for a system call number seen in the saved registers.
pub(crate) fn name(number: i32) -> &'static str {
    if number == NO_SYSCALL {
        return "none";
    }
    NAMES.iter().find(|(n, _)| *n == number).map_or("other", |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_calls_are_named() {
        assert_eq!(name(nr::WRITE), "write");
        assert_eq!(name(nr::SENDTO), "sendto");
        assert_eq!(name(nr::RECVFROM), "recvfrom");
        assert_eq!(name(nr::WRITEV), "writev");
    }

    #[test]
    fn unknown_and_missing_calls_stay_bounded() {
        assert_eq!(name(NO_SYSCALL), "none");
        assert_eq!(name(nr::FUTEX), "other");
        assert_eq!(name(i32::MAX), "other");
    }

    #[test]
    fn labels_list_every_name() {
        for (_, name) in NAMES {
            assert!(LABELS.contains(&name), "{name}");
        }
        assert_eq!(LABELS.len(), NAMES.len() + 2);
    }

    #[test]
    fn table_has_no_duplicates() {
        for (i, (n, _)) in NAMES.iter().enumerate() {
            assert!(NAMES[i + 1..].iter().all(|(m, _)| m != n), "duplicate {n}");
        }
    }
}
