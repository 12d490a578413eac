// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the fuzz targets in `fuzz_targets/`.

pub mod walk;
