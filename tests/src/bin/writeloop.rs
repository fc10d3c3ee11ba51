//! Benchmark helper: `writeloop N` makes N one-byte `write()`s to /dev/null and prints the
//! mean nanoseconds per call. Used by `cargo xtask bench devnull`.
use std::{fs::OpenOptions, os::fd::AsRawFd, time::Instant};

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let null = OpenOptions::new().write(true).open("/dev/null").expect("open /dev/null");
    let fd = null.as_raw_fd();
    let byte = [0u8; 1];
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: valid fd and one-byte buffer.
        unsafe { libc::write(fd, byte.as_ptr().cast(), 1) };
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{ns:.2}");
}
