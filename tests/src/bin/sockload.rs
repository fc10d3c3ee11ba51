//! Test helper: `sockload ADDR WRITES SENDTOS SIZE`.
//!
//! Connects to ADDR (`HOST:PORT` over TCP, or `unix:PATH` for a Unix stream socket), prints "connected", waits for a line on stdin, then makes exactly WRITES
//! `write()` and SENDTOS `sendto()` calls of SIZE bytes on the socket, prints "done", and waits
//! for stdin to close. Raw libc calls, so the count of system calls is exactly what we say.
use std::{
    io::{BufRead, Write},
    net::TcpStream,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, writes, sendtos, size] = args.as_slice() else {
        eprintln!("usage: sockload ADDR WRITES SENDTOS SIZE");
        std::process::exit(2);
    };
    let (writes, sendtos, size): (u32, u32, usize) =
        (writes.parse().unwrap(), sendtos.parse().unwrap(), size.parse().unwrap());
    let stream: OwnedFd = match addr.strip_prefix("unix:") {
        Some(path) => UnixStream::connect(path).expect("connect").into(),
        None => TcpStream::connect(addr).expect("connect").into(),
    };
    let fd = stream.as_raw_fd();
    let payload = vec![b'x'; size];
    let mut out = std::io::stdout();
    writeln!(out, "connected").unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    for _ in 0..writes {
        // SAFETY: valid fd and buffer for the duration of the call.
        let n = unsafe { libc::write(fd, payload.as_ptr().cast(), size) };
        assert_eq!(n, size as isize, "short or failed write");
    }
    for _ in 0..sendtos {
        // SAFETY: as above; a connected stream socket takes no address.
        let n = unsafe { libc::sendto(fd, payload.as_ptr().cast(), size, 0, std::ptr::null(), 0) };
        assert_eq!(n, size as isize, "short or failed sendto");
    }
    writeln!(out, "done").unwrap();
    out.flush().unwrap();
    line.clear();
    let _ = std::io::stdin().lock().read_line(&mut line);
}
