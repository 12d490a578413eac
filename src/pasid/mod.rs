// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host global-PASID allocator (see issue "Host global-PASID allocator").
