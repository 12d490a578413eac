// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `viommu`: the virtio-iommu device model as a pure state machine.
//!
//! This crate owns the guest-visible IOMMU state (endpoints, domains,
//! mappings, bypass), the wire formats of virtio-iommu 1.3 and of the
//! project's PASID / page-request extension profile, and the host PASID
//! allocator. It performs no I/O of its own: no sockets, no threads, no
//! global state. Transports (the vhost-user daemon, tests, benchmarks) feed
//! it request bytes and carry its answers back.

#![deny(unsafe_code)]

pub mod pasid;
