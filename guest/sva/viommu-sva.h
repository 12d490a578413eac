/* SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause */
/*
 * viommu-sva.h - user interface of the viommu_sva guest module
 *
 * The module drives a virtio-iommu (virtio device 23) that implements the
 * vhost-device-iommu extension profile (docs/extension-spec.md, reference
 * virtio-iommu.md section 2.12) and lets a process share its address space
 * with a device: BIND attaches the process's page tables to (endpoint,
 * PASID), device page faults come back as page requests that the module
 * resolves in the process's mm, and SUBMIT runs an operation of the
 * project's DMA test device with the caller's PASID.
 *
 * Character device: /dev/viommu-sva (the first virtio-iommu; further ones
 * are /dev/viommu-sva1, ...).  Bindings belong to the file description and
 * to the mm of the process that made them; closing the last reference to
 * the file (or the process exiting) unbinds them.
 */
#ifndef VIOMMU_SVA_UAPI_H
#define VIOMMU_SVA_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VIOMMU_SVA_MAGIC		0xd3

/* Feature bits of the extension profile, as seen in info.features */
#define VIOMMU_SVA_F_MAP_UNMAP		2
#define VIOMMU_SVA_F_PROBE		4
#define VIOMMU_SVA_F_ATTACH_TABLE	8
#define VIOMMU_SVA_F_PAGE_REQUEST	10
#define VIOMMU_SVA_F_PASID_ALLOC	11

/* info.flags */
#define VIOMMU_SVA_INFO_BROKEN		(1U << 0)	/* device stopped answering */
#define VIOMMU_SVA_INFO_CAN_BIND	(1U << 1)	/* features 8, 10, 11 and PROBE */

struct viommu_sva_info {
	__u64 features;		/* negotiated feature bits */
	__u32 flags;		/* VIOMMU_SVA_INFO_* */
	__u32 domain_start;	/* domain_range (all of u32 without F_DOMAIN_RANGE) */
	__u32 domain_end;
	__u32 probe_size;
	__u32 evt_bufs;		/* event buffers posted */
	__u32 evt_buf_size;	/* bytes per event buffer */
	__u32 req_vq_size;
	__u32 reserved[7];
};

/* BIND: attach the caller's mm to @endpoint, return the mm's PASID. */
struct viommu_sva_bind {
	__u32 endpoint;		/* in */
	__u32 flags;		/* in: none defined, must be 0 */
	__u32 pasid;		/* out */
	__u32 domain;		/* out: the SVA domain of the caller's mm */
	__u32 addr_width;	/* out: 48 or 57 */
	__u32 reserved[3];
};

/* Endpoint properties read with PROBE (PROBE_EP). */
struct viommu_sva_ep_info {
	__u32 endpoint;		/* in */
	__u32 flags;		/* out: VIOMMU_SVA_EP_* */
	__u8 pasid_bits;	/* 0: no PASID_SIZE property */
	__u8 output_bits;	/* 0: no OUTPUT_SIZE property */
	__u16 pgtf;		/* first PAGE_TABLE_FMT format, 0 if none */
	__u32 pr_flags;		/* PAGE_REQUEST property flags */
	__u32 pr_max_groups;
	__u32 nr_resv_mem;	/* RESV_MEM properties */
	__u32 reserved;
	__u64 vtd_cap;		/* PGTF_VTD cap_reg / ecap_reg, 0 if absent */
	__u64 vtd_ecap;
};

#define VIOMMU_SVA_EP_PASID_SIZE	(1U << 0)
#define VIOMMU_SVA_EP_PGTF_VTD		(1U << 1)
#define VIOMMU_SVA_EP_PAGE_REQUEST	(1U << 2)

/* PASID_ALLOC / PASID_FREE round trip without a binding (diagnostics). */
struct viommu_sva_pasid {
	__u32 min;		/* in (ALLOC; 0 = 1) */
	__u32 max;		/* in (ALLOC; 0 = 2^20 - 1) */
	__u32 pasid;		/* out (ALLOC), in (FREE) */
	__u32 reserved;
};

/* DMA test device operations (SUBMIT / WAIT). */
#define VIOMMU_SVA_OP_COPY		1
#define VIOMMU_SVA_OP_FILL		2
#define VIOMMU_SVA_OP_CHECKSUM		3

#define VIOMMU_SVA_SUBMIT_NOWAIT	(1U << 0)

/* Device STATUS register values */
#define VIOMMU_SVA_ST_IDLE		0
#define VIOMMU_SVA_ST_BUSY		1
#define VIOMMU_SVA_ST_DONE		2
#define VIOMMU_SVA_ST_FAULT		3
#define VIOMMU_SVA_ST_ERROR		4

struct viommu_sva_submit {
	__u32 endpoint;		/* in: the DMA device's endpoint ID (its RID) */
	__u32 op;		/* in: VIOMMU_SVA_OP_* (SUBMIT) */
	__u32 flags;		/* in: VIOMMU_SVA_SUBMIT_* (SUBMIT) */
	__u32 timeout_ms;	/* in: 0 = the module's default */
	__u64 src;		/* in: VAs in the caller's address space */
	__u64 dst;
	__u64 len;
	__u64 pattern;		/* in: FILL value (8 bytes, repeated) */
	__u32 status;		/* out: VIOMMU_SVA_ST_* */
	__u32 fault_info;	/* out: FAULT_INFO register */
	__u64 result;		/* out: CHECKSUM result (FNV-1a 64) */
	__u64 fault_addr;	/* out */
	__u64 done_bytes;	/* out */
	__u64 elapsed_ns;	/* out: SUBMIT to the end of the wait */
};

struct viommu_sva_stats {
	__u64 page_requests;	/* PAGE_REQ records, stop markers included */
	__u64 stop_markers;
	__u64 page_groups;	/* LAST page requests: each needs a PAGE_RESP */
	__u64 resp_success;	/* PAGE_RESP sent, by code */
	__u64 resp_invalid;
	__u64 resp_failure;
	__u64 resp_stale;	/* PAGE_RESP answered S_NOENT (group gone) */
	__u64 resp_errors;	/* PAGE_RESP answered another error */
	__u64 faults;		/* unrecoverable fault records */
	__u64 bad_events;	/* malformed event records */
	__u64 events_lost;	/* records dropped: page-request ring full */
	__u64 invalidations;	/* INVALIDATE sent */
	__u64 inval_errors;	/* INVALIDATE failed or timed out */
	__u64 binds;		/* ATTACH_TABLE OK */
	__u64 unbinds;		/* DETACH_TABLE OK */
	__u64 mm_releases;	/* bound mms torn down by exit */
	__u64 pasid_allocs;
	__u64 pasid_frees;
	__u32 live_bonds;	/* (endpoint, PASID) bindings now */
	__u32 live_mms;		/* bound mms (= bound PASIDs) now */
	__u32 raw_pasids;	/* PASIDs from PASID_ALLOC ioctls now */
	__u32 reserved;
};

/* Page-request handling times: record arrival to PAGE_RESP completion. */
struct viommu_sva_latency {
	__u32 max;		/* in: room in samples[] */
	__u32 count;		/* out: samples copied (oldest first) */
	__u32 reset;		/* in: 1 = clear the record after copying */
	__u32 reserved;
	__u64 samples;		/* in: user pointer to __u32[max], ns */
};

#define VIOMMU_SVA_IOC_INFO	_IOR(VIOMMU_SVA_MAGIC, 0, struct viommu_sva_info)
#define VIOMMU_SVA_IOC_BIND	_IOWR(VIOMMU_SVA_MAGIC, 1, struct viommu_sva_bind)
#define VIOMMU_SVA_IOC_UNBIND	_IOW(VIOMMU_SVA_MAGIC, 2, struct viommu_sva_bind)
#define VIOMMU_SVA_IOC_PROBE_EP	_IOWR(VIOMMU_SVA_MAGIC, 3, struct viommu_sva_ep_info)
#define VIOMMU_SVA_IOC_PASID_ALLOC _IOWR(VIOMMU_SVA_MAGIC, 4, struct viommu_sva_pasid)
#define VIOMMU_SVA_IOC_PASID_FREE _IOW(VIOMMU_SVA_MAGIC, 5, struct viommu_sva_pasid)
#define VIOMMU_SVA_IOC_SUBMIT	_IOWR(VIOMMU_SVA_MAGIC, 6, struct viommu_sva_submit)
#define VIOMMU_SVA_IOC_WAIT	_IOWR(VIOMMU_SVA_MAGIC, 7, struct viommu_sva_submit)
#define VIOMMU_SVA_IOC_STATS	_IOR(VIOMMU_SVA_MAGIC, 8, struct viommu_sva_stats)
#define VIOMMU_SVA_IOC_LATENCY	_IOWR(VIOMMU_SVA_MAGIC, 9, struct viommu_sva_latency)

#endif /* VIOMMU_SVA_UAPI_H */
