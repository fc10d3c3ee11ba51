//! Benchmark helper for `cargo xtask bench`: `writeloop MODE N [SIZE]` prints the mean
//! nanoseconds per iteration of N iterations of
//!   devnull     one 1-byte `write()` to /dev/null (a non-socket call: the hooks must not fire)
//!   socketpair  one 1-byte `write()` then one `read()` on a Unix socket pair (socket I/O of an
//!               unwatched process: the hooks fire and must return after the watch-map lookup)
//!   tcp         one `write()` then one `read()` of SIZE bytes over a loopback TCP connection
//!               (TCP_NODELAY, the way vLLM's uvloop writes)
//!   pingpong    one round trip between two threads over two pipes: two context switches and
//!               two wakeups of an unwatched process (the scheduler hooks fire on every one)
use std::{fs::OpenOptions, os::fd::AsRawFd, time::Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "devnull".into());
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    // Bytes per socket write (socketpair mode): 256 is about one SSE event.
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let byte = vec![b'x'; size.max(1)];
    let mut sink = vec![0u8; size.max(1)];
    let ns = match mode.as_str() {
        "devnull" => {
            let null = OpenOptions::new().write(true).open("/dev/null").expect("open /dev/null");
            let fd = null.as_raw_fd();
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: valid fd and one-byte buffer.
                unsafe { libc::write(fd, byte.as_ptr().cast(), 1) };
            }
            start.elapsed()
        }
        "socketpair" => {
            let mut fds = [0i32; 2];
            // SAFETY: fds has room for the two descriptors.
            assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) }, 0);
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: valid fds and one-byte buffers.
                unsafe {
                    libc::write(fds[0], byte.as_ptr().cast(), byte.len());
                    libc::read(fds[1], sink.as_mut_ptr().cast(), sink.len());
                }
            }
            start.elapsed()
        }
        "tcp" => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            client.set_nodelay(true).unwrap();
            let (w, r) = (client.as_raw_fd(), server.as_raw_fd());
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: valid fds and buffers of `size` bytes; a loopback segment this small
                // arrives whole, so one read takes it.
                unsafe {
                    libc::write(w, byte.as_ptr().cast(), byte.len());
                    libc::read(r, sink.as_mut_ptr().cast(), sink.len());
                }
            }
            start.elapsed()
        }
        "pingpong" => {
            let (mut a, mut b) = ([0i32; 2], [0i32; 2]);
            // SAFETY: each array has room for the two descriptors.
            unsafe {
                assert_eq!(libc::pipe(a.as_mut_ptr()), 0);
                assert_eq!(libc::pipe(b.as_mut_ptr()), 0);
            }
            let (ping_r, ping_w, pong_r, pong_w) = (a[0], a[1], b[0], b[1]);
            let echo = std::thread::spawn(move || {
                let mut buf = [0u8; 1];
                for _ in 0..n {
                    // SAFETY: valid pipe fds and one-byte buffers.
                    unsafe {
                        libc::read(ping_r, buf.as_mut_ptr().cast(), 1);
                        libc::write(pong_w, buf.as_ptr().cast(), 1);
                    }
                }
            });
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: as above.
                unsafe {
                    libc::write(ping_w, byte.as_ptr().cast(), 1);
                    libc::read(pong_r, sink.as_mut_ptr().cast(), 1);
                }
            }
            let elapsed = start.elapsed();
            echo.join().unwrap();
            elapsed
        }
        other => {
            eprintln!("unknown mode {other}: devnull | socketpair | tcp | pingpong");
            std::process::exit(2);
        }
    };
    println!("{:.2}", ns.as_nanos() as f64 / n as f64);
}
