//! How a lock is held, shared by the pure core and the wire format (and so
//! by a client built without the server).

/// How a lock is held: one exclusive holder, or any number of shared holders.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exclusive = 0,
    Shared = 1,
}

impl Mode {
    /// The mode of its wire code, if it is one.
    pub fn from_u8(code: u8) -> Option<Mode> {
        match code {
            0 => Some(Mode::Exclusive),
            1 => Some(Mode::Shared),
            _ => None,
        }
    }
}
