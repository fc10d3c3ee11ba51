//! Names of the system calls that reach the socket layer, for the `syscall` label.
//!
//! Only calls that can move socket data get a name; anything else is `other` so the label's
//! cardinality stays bounded whatever a process does.

use inferwatch_common::NO_SYSCALL;

/// x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
const X86_64: &[(i32, &str)] = &[
    (0, "read"),
    (1, "write"),
    (19, "readv"),
    (20, "writev"),
    (40, "sendfile"),
    (44, "sendto"),
    (45, "recvfrom"),
    (46, "sendmsg"),
    (47, "recvmsg"),
    (275, "splice"),
    (299, "recvmmsg"),
    (307, "sendmmsg"),
    (426, "io_uring_enter"),
];

/// Every value the `syscall` label can take.
pub const LABELS: [&str; 15] = [
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
pub fn name(nr: i32) -> &'static str {
    if nr == NO_SYSCALL {
        return "none";
    }
    X86_64.iter().find(|(n, _)| *n == nr).map_or("other", |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_calls_are_named() {
        assert_eq!(name(1), "write");
        assert_eq!(name(44), "sendto");
        assert_eq!(name(45), "recvfrom");
        assert_eq!(name(20), "writev");
    }

    #[test]
    fn unknown_and_missing_calls_stay_bounded() {
        assert_eq!(name(NO_SYSCALL), "none");
        assert_eq!(name(59), "other"); // execve
        assert_eq!(name(i32::MAX), "other");
    }

    #[test]
    fn labels_list_every_name() {
        for (_, name) in X86_64 {
            assert!(LABELS.contains(name), "{name}");
        }
        assert_eq!(LABELS.len(), X86_64.len() + 2);
    }

    #[test]
    fn table_has_no_duplicates() {
        for (i, (n, _)) in X86_64.iter().enumerate() {
            assert!(X86_64[i + 1..].iter().all(|(m, _)| m != n), "duplicate {n}");
        }
    }
}
