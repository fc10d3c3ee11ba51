//! System call numbers the programs and the agent look at, per architecture: the kernel reads
//! the number and arguments of the call behind a socket operation from the task's saved
//! registers, whose layout and numbering differ between x86-64 and arm64.

/// arch/x86/entry/syscalls/syscall_64.tbl
pub mod x86_64 {
    pub const READ: i32 = 0;
    pub const WRITE: i32 = 1;
    pub const READV: i32 = 19;
    pub const WRITEV: i32 = 20;
    pub const NANOSLEEP: i32 = 35;
    pub const SENDFILE: i32 = 40;
    pub const SENDTO: i32 = 44;
    pub const RECVFROM: i32 = 45;
    pub const SENDMSG: i32 = 46;
    pub const RECVMSG: i32 = 47;
    pub const FUTEX: i32 = 202;
    pub const CLOCK_NANOSLEEP: i32 = 230;
    pub const SPLICE: i32 = 275;
    pub const RECVMMSG: i32 = 299;
    pub const SENDMMSG: i32 = 307;
    pub const IO_URING_ENTER: i32 = 426;
    pub const FUTEX_WAITV: i32 = 449;
}

/// include/uapi/asm-generic/unistd.h (arm64 uses the generic table)
pub mod aarch64 {
    pub const READ: i32 = 63;
    pub const WRITE: i32 = 64;
    pub const READV: i32 = 65;
    pub const WRITEV: i32 = 66;
    pub const NANOSLEEP: i32 = 101;
    pub const SENDFILE: i32 = 71;
    pub const SENDTO: i32 = 206;
    pub const RECVFROM: i32 = 207;
    pub const SENDMSG: i32 = 211;
    pub const RECVMSG: i32 = 212;
    pub const FUTEX: i32 = 98;
    pub const CLOCK_NANOSLEEP: i32 = 115;
    pub const SPLICE: i32 = 76;
    pub const RECVMMSG: i32 = 243;
    pub const SENDMMSG: i32 = 269;
    pub const IO_URING_ENTER: i32 = 426;
    pub const FUTEX_WAITV: i32 = 449;
}
