// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu`: a vhost-user daemon serving the `viommu` device
//! model to a VMM over a Unix socket, with a control socket for VMM-side
//! clients (docs/architecture.md has the map of the modules).

pub mod args;
pub mod backend;
pub mod chain;
pub(crate) mod control;
pub mod ctl;
pub mod daemon;
pub mod error;
pub(crate) mod eventq;
pub(crate) mod faults;
pub(crate) mod hub;
pub mod iommu;
pub mod pasid_admin;
pub mod pasid_manager;
pub mod pasid_store;
pub(crate) mod ratelimit;
pub(crate) mod replay;
pub(crate) mod transfer;
pub mod viot;
