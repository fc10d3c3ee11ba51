//! TCP states as the kernel numbers them (include/net/tcp_states.h).

#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// Whether state `new` ends a connection for HTTP purposes: the peer closed or reset it,
    /// or it is gone.
    pub fn ends_connection(new: i32) -> bool {
        new == Self::Close as i32 || new == Self::CloseWait as i32
    }
}
