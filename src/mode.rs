//! How a lock is held, shared by the pure core and the wire format (and so
//! by a client built without the server).

/// How a name is held: one exclusive holder, or any number of shared
/// holders (a lock); or permits of a counting semaphore, each holder a
/// weight out of the name's capacity. A name in use is a lock or a
/// semaphore, never both.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exclusive = 0,
    Shared = 1,
    Permits = 2,
}

impl Mode {
    /// The mode of its wire code, if it is one.
    pub fn from_u8(code: u8) -> Option<Mode> {
        match code {
            0 => Some(Mode::Exclusive),
            1 => Some(Mode::Shared),
            2 => Some(Mode::Permits),
            _ => None,
        }
    }
}
