// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `viommu`: the virtio-iommu device model as a pure state machine.
//!
//! This crate owns the guest-visible IOMMU state (endpoints, domains,
//! mappings, bypass), the wire formats of virtio-iommu 1.3 and of the
//! project's PASID / page-request extension profile, and the host PASID
//! allocator. It performs no I/O of its own: no sockets, no threads, no
//! global state. Transports (the vhost-user daemon, tests, benchmarks) feed
//! it request bytes and carry its answers back.
//!
//! The only `unsafe` in the crate is the `ByteValued` marker on the wire
//! structs (`wire.rs`), each preceded by compile-time proof that the struct
//! has no padding.

#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod device;
pub mod error;
pub mod mapping;
pub mod pasid;
pub mod pgtable;
pub mod translate;
pub mod wire;

pub use config::{DeviceConfig, EndpointSet, ReservedRegion};
pub use device::{Response, StateChange, Viommu};
pub use error::RequestError;
pub use mapping::{Mapping, MappingTree};
pub use translate::{Access, Fault, TranslateError, Translation};

#[cfg(test)]
mod spec_tests;
