//! Types shared by the kernel programs (`inferwatch-ebpf`) and the agent, grouped by concern.
//!
//! Everything that crosses the kernel/user boundary is `#[repr(C)]` with explicit padding (or a
//! `#[repr]` enum), and its size is asserted at compile time here, so any drift between the two
//! builds fails the build instead of corrupting events. Each constant is defined once, here.
#![no_std]

pub mod kernel;
pub mod maps;
pub mod sched;
pub mod sock;
pub mod syscalls;
pub mod tcp;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no padding left implicit.
    unsafe impl aya::Pod for super::sock::SockEvent {}
    unsafe impl aya::Pod for super::sock::TrackedSock {}
    unsafe impl aya::Pod for super::sched::SchedStats {}
    unsafe impl aya::Pod for super::kernel::KernelLayout {}
}
