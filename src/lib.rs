// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `viommu`: the virtio-iommu device model as a pure state machine.
//!
//! This crate owns the guest-visible IOMMU state (endpoints, domains,
//! mappings, bypass), the wire formats of virtio-iommu 1.3 and of the
//! project's extension profile (docs/extension-spec.md), the in-memory
//! host PASID allocator, the life of page-request groups, and the
//! versioned format in which the device state is saved and restored
//! (`state`). It performs no I/O of its own: no sockets, no threads, no
//! global state, no clock. Transports (the vhost-user daemon, tests,
//! benchmarks) feed it request bytes and carry its answers back; the
//! control protocol that serves VMM-side clients is a crate of its own
//! (`viommu-protocol`) built on these types.
//!
//! The only `unsafe` in the crate is the `ByteValued` marker on the wire
//! structs (`wire.rs`), each preceded by compile-time proof that the struct
//! has no padding.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod change;
pub mod config;
pub mod device;
pub mod error;
pub mod host;
pub mod iotlb;
pub mod mapping;
pub mod parse;
pub mod pasid;
pub mod pgtable;
pub mod prq;
pub mod state;
pub mod table;
pub mod translate;
pub mod wire;

pub use change::{Invalidation, StateChange};
pub use config::{DeviceConfig, EndpointSet, ReservedRegion, TableFormats};
pub use device::{PasidOp, Response, Viommu};
pub use error::RequestError;
pub use host::{HostConstraintError, HostConstraints};
pub use mapping::{Mapping, MappingTree};
pub use state::{DeviceState, LoadedState, StateError};
pub use translate::{Access, Fault, TranslateError, Translation};

#[cfg(test)]
mod host_tests;
#[cfg(test)]
mod page_request_tests;
#[cfg(test)]
mod spec_tests;
#[cfg(test)]
mod table_tests;
