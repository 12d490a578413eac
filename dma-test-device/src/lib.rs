// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `dma-test-device`: a PCI DMA engine served over vfio-user (QEMU's
//! `vfio-user-pci`) whose every DMA address goes through an IOMMU: the
//! vhost-device-iommu daemon (through `viommu-client`), or, without the
//! daemon, the address space QEMU's DMA_MAP messages define.
//!
//! It is a test device for the guest suite and the reference for writing
//! a device model that obeys the IOMMU:
//!
//! - [`engine`]: translate each contiguous piece of a transfer with
//!   `translate_with` and access memory inside the closure (the guest's
//!   UNMAP cannot complete meanwhile); stop at the first fault, report it
//!   to the guest through the daemon, never touch the faulting address;
//! - [`ram`]: guest memory as QEMU lends it (DMA_MAP regions), with bounds
//!   and permission checks, and DMA_UNMAP waiting for accesses in flight;
//! - [`regs`], [`pci`], [`device`]: the register interface, configuration
//!   space and worker thread.
//!
//! # PCI function
//!
//! Vendor 0x1234, device 0xd3a0, class 0xff0000, revision 1; BAR0: 4 KiB,
//! 32-bit non-prefetchable memory; no capability, no interrupt (the driver
//! polls STATUS).
//!
//! # BAR0 registers (little-endian)
//!
//! 64-bit registers take 64-bit accesses and 32-bit accesses to either
//! half; 32-bit registers take 32-bit accesses. Other writes, and writes
//! to read-only registers, are ignored (and counted); other reads return
//! the bytes of the register file.
//!
//! | Off | Size | Name | Access | Meaning |
//! |---|---|---|---|---|
//! | 0x000 | 4 | ID | RO | 0x414d4456 ("VDMA") |
//! | 0x004 | 4 | VERSION | RO | 1 |
//! | 0x008 | 4 | CAPS | RO | bit0 COPY, bit1 FILL, bit2 CHECKSUM, bit3 PASID (operations at (PASID, virtual address); set when the device translates through the daemon) |
//! | 0x010 | 8 | SRC | RW | source IOVA (with USE_PASID: virtual address) |
//! | 0x018 | 8 | DST | RW | destination IOVA (with USE_PASID: virtual address) |
//! | 0x020 | 8 | LEN | RW | bytes, 1 .. 1 GiB (otherwise CMD gives ERROR) |
//! | 0x028 | 8 | PATTERN | RW | FILL writes this 8-byte value repeated (byte i of DST gets byte i % 8), the last copy truncated |
//! | 0x030 | 4 | PASID | RW | bits 19:0, PASID for CMD.USE_PASID |
//! | 0x038 | 4 | CMD | WO | starts an operation: bits 7:0 opcode 1 COPY (SRC->DST), 2 FILL (DST), 3 CHECKSUM (of SRC into RESULT); bit 8 USE_PASID: SRC and DST are virtual addresses of PASID (ERROR without CAPS.PASID or with PASID 0); other bits 0 (else ERROR). Ignored (and counted) while BUSY |
//! | 0x03c | 4 | STATUS | RO | 0 IDLE, 1 BUSY, 2 DONE, 3 FAULT, 4 ERROR (bad command or arguments) |
//! | 0x040 | 8 | RESULT | RO | CHECKSUM: 64-bit FNV-1a (basis 0xcbf29ce484222325, prime 0x100000001b3) over the DONE_BYTES bytes read |
//! | 0x048 | 8 | FAULT_ADDR | RO | first address (IOVA, or virtual address) that was not accessed |
//! | 0x050 | 4 | FAULT_INFO | RO | bits 7:0 reason: 1 translation fault (not mapped, not attached, permission, no table bound at the PASID, or no IOMMU reachable), 2 page request answered INVALID or FAILURE (by the guest: the process has no such page or may not access it so; or by the IOMMU for it: binding removed, timeout, reset), 3 memory access failed (translated GPA not memory QEMU gave the device), 4 a page request was not answered before the operation's deadline; bit 8 the faulting access was a write |
//! | 0x058 | 8 | DONE_BYTES | RO | bytes completed by the last operation |
//!
//! A CMD write clears RESULT, FAULT_ADDR, FAULT_INFO and DONE_BYTES and
//! sets STATUS to BUSY (or ERROR); the operation runs on the device's
//! worker thread and the write returns at once. A fault stops it at the
//! first faulting address: bytes before it were transferred, nothing at
//! or after it is read or written. A device reset (VFIO reset, QEMU
//! system reset) stops a running operation between two 64 KiB chunks (or
//! between two page requests).
//!
//! # PASID operations
//!
//! With `CMD.USE_PASID` the operation works on the address space the
//! guest bound to (endpoint, PASID) with ATTACH_TABLE, as a DSA/IAA
//! descriptor with a PASID does: SRC and DST are virtual addresses,
//! translated through the guest's page table (reads as user-mode reads,
//! writes as user-mode writes). A page that is not present, or lacks the
//! access, becomes a page request to the guest (its fault handler maps
//! the page and answers); after a SUCCESS the device translates again and
//! goes on. The whole operation has one deadline
//! (`--operation-timeout-ms` from the CMD write). It stops with STATUS
//! FAULT at the first address it could not access when the page request
//! is answered INVALID or FAILURE (FAULT_INFO reason 2: the process has no
//! such page, or may not access it that way; or the daemon answered for
//! the guest, for instance because the binding went while the request was
//! open), when the deadline passes first (reason 4), or when nothing is
//! bound at the PASID any more (reason 1: the process exited, or unbound);
//! DONE_BYTES bytes before FAULT_ADDR were transferred, nothing at or
//! after it.

pub mod device;
pub mod engine;
pub mod pci;
pub mod ram;
pub mod regs;
