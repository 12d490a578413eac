// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-device-iommu`: a vhost-user daemon serving the `viommu` device
//! model to a VMM over a Unix socket.

pub mod args;
pub mod backend;
pub mod chain;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod eventq;
pub mod pasid_admin;
pub mod pasid_manager;
pub mod pasid_store;
pub mod viot;
