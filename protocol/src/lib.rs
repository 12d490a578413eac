// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `viommu-protocol`: the control protocol between vhost-device-iommu and
//! VMM-side clients (docs/control-protocol.md).
//!
//! It owns the messages and their byte encoding ([`messages`], declared
//! once through the macros of [`codec`]), framing over a stream
//! ([`frame`]), the client side of the handshake and a blocking
//! request/reply connection ([`conn`]), and the typed JSON documents of
//! the inspection queries ([`query`]). The device model (`viommu`) knows
//! nothing of it; the daemon and `viommu-client` both build on it.

#![warn(missing_docs)]

pub mod codec;
pub mod conn;
pub mod frame;
pub mod messages;
pub mod query;

pub use codec::DecodeError;
pub use conn::{handshake, ConnError, Connection};
pub use frame::{FrameBuffer, FrameReader, Polled, MAX_FRAME};
pub use messages::*;
