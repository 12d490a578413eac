// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How fields go on the wire: the [`Wire`] trait for integers, text and
//! lists, the bounded [`Reader`], and the `record!` / `messages!` macros
//! that declare each layout once (the struct, its encoder and its decoder
//! come from the same field list, so they cannot disagree).
//!
//! A field may be followed by `[pad N]`: N reserved bytes, written as
//! zero and ignored when read.

use thiserror::Error;

/// A frame that cannot be decoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix announces more than the reader accepts.
    #[error("frame of {len} bytes is larger than the {limit}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Largest accepted frame.
        limit: usize,
    },
    /// A frame without a type byte.
    #[error("empty frame")]
    Empty,
    /// A type byte this version does not know.
    #[error("unknown message type {0:#x}")]
    UnknownType(u8),
    /// The payload ends before its fields do.
    #[error("message type {0:#x} is truncated")]
    Truncated(u8),
    /// A HELLO that does not start with the protocol's magic.
    #[error("bad HELLO magic")]
    BadMagic,
    /// A field with a value outside its enumeration.
    #[error("unknown {what} value {value}")]
    BadValue {
        /// The field.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// Text that is not UTF-8.
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// Reads fields off one frame body; every read is bounds-checked.
pub struct Reader<'a> {
    t: u8,
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over the payload of a message of type `t`.
    pub fn new(t: u8, b: &'a [u8]) -> Self {
        Reader { t, b }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated(self.t));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    /// Skips `n` reserved bytes.
    pub fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        self.take(n).map(drop)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.b.len()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// A value with a fixed or self-delimiting little-endian encoding.
pub trait Wire: Sized {
    /// Appends the encoding.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value.
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// A fixed-size [`Wire`] value, which lists can hold.
pub trait Record: Wire {
    /// Encoded size in bytes.
    const SIZE: usize;
}

macro_rules! int_wire {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
        }
        impl Record for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
        }
    )*};
}
int_wire!(u8, u16, u32, u64);

/// Text runs to the end of the frame (so it is a message's last field).
impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        String::from_utf8(r.rest().to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
}

/// A list is `le32 count`, then the records.
impl<T: Record> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        // Lists are bounded by the frame size, far below 2^32 entries.
        (self.len() as u32).put(out);
        for item in self {
            item.put(out);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = u32::get(r)? as usize;
        // A count the frame cannot hold is refused before allocating.
        if n > r.remaining() / T::SIZE.max(1) {
            return Err(DecodeError::Truncated(r.t));
        }
        (0..n).map(|_| T::get(r)).collect()
    }
}

/// Declares a fixed-size record once: the struct and its [`Wire`] and
/// [`Record`] implementations.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$fmeta:meta])* $field:ident : $ty:ty $([pad $pad:literal])?),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }
        impl $crate::codec::Wire for $name {
            fn put(&self, out: &mut Vec<u8>) {
                $(
                    $crate::codec::Wire::put(&self.$field, out);
                    $(out.extend_from_slice(&[0u8; $pad]);)?
                )*
            }
            fn get(r: &mut $crate::codec::Reader<'_>) -> Result<Self, $crate::codec::DecodeError> {
                $(
                    let $field = <$ty as $crate::codec::Wire>::get(r)?;
                    $(r.skip($pad)?;)?
                )*
                Ok($name { $($field),* })
            }
        }
        impl $crate::codec::Record for $name {
            const SIZE: usize = 0 $(+ <$ty as $crate::codec::Record>::SIZE $(+ $pad)?)*;
        }
    };
}

/// Declares every message once: one struct per message, the [`Message`]
/// enum over them, and the frame encoder and decoder.
///
/// [`Message`]: crate::messages::Message
macro_rules! messages {
    ($(
        $(#[$meta:meta])*
        $code:literal => $name:ident {
            $($(#[$fmeta:meta])* $field:ident : $ty:ty $([pad $pad:literal])?),* $(,)?
        }
    )*) => {
        $(
            $(#[$meta])*
            #[derive(Clone, Debug, PartialEq, Eq)]
            pub struct $name {
                $($(#[$fmeta])* pub $field: $ty,)*
            }
            impl $name {
                /// The message's type byte.
                pub const TYPE: u8 = $code;
            }
            impl From<$name> for Message {
                fn from(m: $name) -> Message {
                    Message::$name(m)
                }
            }
        )*

        /// Every message of the protocol.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Message {
            $($(#[$meta])* $name($name),)*
        }

        impl Message {
            /// Appends the whole frame, length prefix included.
            pub fn encode_into(&self, out: &mut Vec<u8>) {
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                match self {
                    $(Message::$name(_m) => {
                        out.push($code);
                        $(
                            $crate::codec::Wire::put(&_m.$field, out);
                            $(out.extend_from_slice(&[0u8; $pad]);)?
                        )*
                    })*
                }
                // Senders keep frames far below 4 GiB (MAX_FRAME).
                let len = (out.len() - at - 4) as u32;
                out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }

            /// Decodes one frame body (the bytes after the length
            /// prefix). Bytes after the last field are ignored, so a
            /// later version may append fields.
            pub fn decode(body: &[u8]) -> Result<Message, $crate::codec::DecodeError> {
                let (&t, payload) = body.split_first().ok_or($crate::codec::DecodeError::Empty)?;
                let mut r = $crate::codec::Reader::new(t, payload);
                Ok(match t {
                    $($code => {
                        $(
                            let $field = <$ty as $crate::codec::Wire>::get(&mut r)?;
                            $(r.skip($pad)?;)?
                        )*
                        Message::$name($name { $($field),* })
                    })*
                    other => return Err($crate::codec::DecodeError::UnknownType(other)),
                })
            }

            /// The message's type byte.
            pub fn type_code(&self) -> u8 {
                match self {
                    $(Message::$name(_) => $code,)*
                }
            }
        }
    };
}

pub(crate) use {messages, record};
