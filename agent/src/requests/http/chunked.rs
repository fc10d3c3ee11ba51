//! `Transfer-Encoding: chunked` decoding over a byte stream with gaps.

/// What a decoder step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Payload bytes, known.
    Data(&'a [u8]),
    /// Payload bytes of known length but unknown content.
    Gap(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line (hex digits, optional extensions, CRLF).
    Size {
        line: Vec<u8>,
    },
    /// Inside a chunk's payload.
    Data {
        remaining: u64,
    },
    /// After a chunk's payload: its CRLF (count of bytes still expected).
    DataEnd {
        remaining: u8,
    },
    /// After the last chunk: trailer lines until an empty line.
    Trailers {
        line_len: usize,
    },
    Done,
    /// Framing lost in a gap.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dechunker {
    state: State,
}

/// Longest chunk-size line we accept (hex size plus extensions).
const MAX_SIZE_LINE: usize = 256;

impl Default for Dechunker {
    fn default() -> Self {
        Self { state: State::Size { line: Vec::new() } }
    }
}

impl Dechunker {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn is_lost(&self) -> bool {
        self.state == State::Lost
    }

    /// Feeds known bytes; payload goes to `out`. Returns the bytes consumed (less than
    /// `data.len()` only once the body is done or framing is lost).
    pub fn feed(&mut self, data: &[u8], out: &mut impl FnMut(Piece<'_>)) -> usize {
        let mut pos = 0;
        while pos < data.len() {
            match &mut self.state {
                State::Size { line } => {
                    let byte = data[pos];
                    pos += 1;
                    if byte == b'\n' {
                        let text = line.strip_suffix(b"\r").unwrap_or(line);
                        let digits = text.split(|&b| b == b';').next().unwrap_or_default();
                        let digits = std::str::from_utf8(digits).unwrap_or("").trim();
                        match u64::from_str_radix(digits, 16) {
                            Ok(0) => self.state = State::Trailers { line_len: 0 },
                            Ok(n) => self.state = State::Data { remaining: n },
                            Err(_) => {
                                self.state = State::Lost;
                                return pos;
                            }
                        }
                    } else if line.len() >= MAX_SIZE_LINE {
                        self.state = State::Lost;
                        return pos;
                    } else {
                        line.push(byte);
                    }
                }
                State::Data { remaining } => {
                    let take = (*remaining).min((data.len() - pos) as u64) as usize;
                    out(Piece::Data(&data[pos..pos + take]));
                    pos += take;
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = State::DataEnd { remaining: 2 };
                    }
                }
                State::DataEnd { remaining } => {
                    let byte = data[pos];
                    pos += 1;
                    if *remaining == 2 && byte == b'\r' {
                        *remaining = 1;
                    } else if byte == b'\n' {
                        self.state = State::Size { line: Vec::new() };
                    } else {
                        self.state = State::Lost;
                        return pos;
                    }
                }
                State::Trailers { line_len } => {
                    let byte = data[pos];
                    pos += 1;
                    if byte == b'\n' {
                        if *line_len == 0 {
                            self.state = State::Done;
                            return pos;
                        }
                        *line_len = 0;
                    } else if byte != b'\r' {
                        *line_len += 1;
                    }
                }
                State::Done | State::Lost => return pos,
            }
        }
        pos
    }

    /// Skips `len` unknown bytes. Inside a payload this is exact; anywhere else the framing
    /// is lost. Returns the bytes consumed.
    pub fn gap(&mut self, len: usize, out: &mut impl FnMut(Piece<'_>)) -> usize {
        match &mut self.state {
            State::Data { remaining } => {
                let take = (*remaining).min(len as u64);
                out(Piece::Gap(take as usize));
                *remaining -= take;
                if *remaining == 0 {
                    self.state = State::DataEnd { remaining: 2 };
                }
                if (take as usize) < len {
                    // The rest of the gap covers framing we cannot see.
                    self.state = State::Lost;
                }
                take as usize
            }
            State::Done => 0,
            _ => {
                self.state = State::Lost;
                0
            }
        }
    }

    /// After framing was lost: a transfer that starts a chunk-size line can restart decoding
    /// (servers write whole chunks per call); true if it does.
    pub fn resync(&mut self, transfer_start: &[u8]) -> bool {
        if self.state != State::Lost {
            return false;
        }
        let hex_len = transfer_start.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if hex_len > 0 && transfer_start[hex_len..].starts_with(b"\r\n") {
            self.state = State::Size { line: Vec::new() };
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(parts: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut d = Dechunker::default();
        let mut out = Vec::new();
        for p in parts {
            d.feed(p, &mut |piece| {
                if let Piece::Data(b) = piece {
                    out.extend_from_slice(b)
                }
            });
        }
        (out, d.is_done())
    }

    #[test]
    fn decodes_whole_and_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(decode(&[body]), (b"hello, world".to_vec(), true));
        for cut in 0..body.len() {
            assert_eq!(decode(&[&body[..cut], &body[cut..]]), (b"hello, world".to_vec(), true), "cut {cut}");
        }
    }

    #[test]
    fn trailers_end_with_an_empty_line() {
        assert_eq!(decode(&[b"1\r\na\r\n0\r\nX-T: 1\r\n\r\n"]), (b"a".to_vec(), true));
        assert_eq!(decode(&[b"1\r\na\r\n0\r\nX-T: 1\r\n"]), (b"a".to_vec(), false));
    }

    #[test]
    fn gaps_inside_payload_are_exact() {
        let mut d = Dechunker::default();
        let mut gaps = 0;
        d.feed(b"a\r\nabc", &mut |_| {});
        assert_eq!(
            d.gap(7, &mut |p| if let Piece::Gap(n) = p {
                gaps += n
            }),
            7
        );
        d.feed(b"\r\n0\r\n\r\n", &mut |_| {});
        assert!(d.is_done());
        assert_eq!(gaps, 7);
    }

    #[test]
    fn gap_over_framing_is_lost_then_resyncs() {
        let mut d = Dechunker::default();
        d.feed(b"3\r\nabc", &mut |_| {});
        assert_eq!(d.gap(5, &mut |_| {}), 0);
        assert!(d.is_lost());
        assert!(!d.resync(b"data: x"));
        assert!(d.resync(b"1f\r\n"));
        assert!(!d.is_lost());
    }

    #[test]
    fn garbage_size_is_lost() {
        let mut d = Dechunker::default();
        d.feed(b"zz\r\n", &mut |_| {});
        assert!(d.is_lost());
    }
}
