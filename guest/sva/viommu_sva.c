// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * viommu_sva - Shared Virtual Addressing through a virtio-iommu that
 * implements the vhost-device-iommu extension profile.
 *
 * A minimal virtio driver for device 23.  It does not register an IOMMU
 * with the kernel (PASID-less DMA is left to the device's bypass); it only
 * speaks the per-PASID part of the profile:
 *
 *   PASID_ALLOC/PASID_FREE  one PASID per bound mm, like Linux SVA
 *   ATTACH_TABLE (PGTF_VTD) the mm's page tables bound to (endpoint, PASID)
 *   INVALIDATE              from the mm's MMU notifier
 *   page requests           resolved in the mm from a workqueue, answered
 *                           with one PAGE_RESP per group
 *   DETACH_TABLE            on unbind, close and mm teardown
 *
 * User space binds through /dev/viommu-sva (viommu-sva.h) and runs the
 * operations of the project's DMA test device (PCI 1234:d3a0) with its
 * PASID through the SUBMIT ioctl, so that a process can only make the
 * device use its own address space.
 *
 * Wire formats: docs/extension-spec.md and the reference virtio-iommu.md
 * (sections 1 and 2.12).  All fields are little-endian.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/delay.h>
#include <linux/idr.h>
#include <linux/ktime.h>
#include <linux/mempool.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/workqueue.h>
#include <linux/xarray.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
#include <linux/unaligned.h>
#else
#include <asm/unaligned.h>
#endif

#include "viommu-sva.h"

/* ------------------------------------------------------------ wire ---- */

/* Feature bits (released spec and the project's extension profile) */
#define VIRTIO_IOMMU_F_INPUT_RANGE	0
#define VIRTIO_IOMMU_F_DOMAIN_RANGE	1
#define VIRTIO_IOMMU_F_MAP_UNMAP	2
#define VIRTIO_IOMMU_F_PROBE		4
#define VIRTIO_IOMMU_F_ATTACH_TABLE	8
#define VIRTIO_IOMMU_F_PAGE_REQUEST	10
#define VIRTIO_IOMMU_F_PASID_ALLOC	11

/* Request types */
#define VIRTIO_IOMMU_T_PROBE		5
#define VIRTIO_IOMMU_T_ATTACH_TABLE	6
#define VIRTIO_IOMMU_T_INVALIDATE	7
#define VIRTIO_IOMMU_T_PAGE_RESP	8
#define VIRTIO_IOMMU_T_DETACH_TABLE	9
#define VIRTIO_IOMMU_T_PASID_ALLOC	10
#define VIRTIO_IOMMU_T_PASID_FREE	11

/* Statuses */
#define VIRTIO_IOMMU_S_OK		0
#define VIRTIO_IOMMU_S_IOERR		1
#define VIRTIO_IOMMU_S_UNSUPP		2
#define VIRTIO_IOMMU_S_DEVERR		3
#define VIRTIO_IOMMU_S_INVAL		4
#define VIRTIO_IOMMU_S_RANGE		5
#define VIRTIO_IOMMU_S_NOENT		6
#define VIRTIO_IOMMU_S_FAULT		7
#define VIRTIO_IOMMU_S_NOMEM		8
/* Never written by a device: the tail was not written at all */
#define SVA_S_UNWRITTEN			0xff

/* PROBE properties */
#define VIRTIO_IOMMU_PROBE_T_NONE		0
#define VIRTIO_IOMMU_PROBE_T_RESV_MEM		1
#define VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE	4
#define VIRTIO_IOMMU_PROBE_T_PASID_SIZE		5
#define VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT	6
#define VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST	8
#define VIRTIO_IOMMU_PROBE_T_MASK		0xfff

#define VIRTIO_IOMMU_PGTF_VTD		4

/* INVALIDATE */
#define VIRTIO_IOMMU_INVAL_G_DOMAIN	(1 << 0)
#define VIRTIO_IOMMU_INVAL_G_PASID	(1 << 1)
#define VIRTIO_IOMMU_INVAL_G_VA		(1 << 2)
#define VIRTIO_IOMMU_INV_T_IOTLB	(1 << 0)
#define VIRTIO_IOMMU_INV_T_DEV_IOTLB	(1 << 1)
#define VIRTIO_IOMMU_INV_T_PASID	(1 << 2)
#define VIRTIO_IOMMU_INVAL_F_PASID	(1 << 0)
#define VIRTIO_IOMMU_INVAL_F_ARCHID	(1 << 1)
#define VIRTIO_IOMMU_INVAL_F_LEAF	(1 << 2)

/* PAGE_RESP */
#define VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID	(1 << 0)
#define VIRTIO_IOMMU_PAGE_RESP_SUCCESS	0
#define VIRTIO_IOMMU_PAGE_RESP_INVALID	1
#define VIRTIO_IOMMU_PAGE_RESP_FAILURE	2

/* Event records */
#define VIRTIO_IOMMU_FAULT_R_UNKNOWN	0
#define VIRTIO_IOMMU_FAULT_R_DOMAIN	1
#define VIRTIO_IOMMU_FAULT_R_MAPPING	2
#define VIRTIO_IOMMU_FAULT_F_READ	(1 << 0)
#define VIRTIO_IOMMU_FAULT_F_WRITE	(1 << 1)
#define VIRTIO_IOMMU_FAULT_F_EXEC	(1 << 2)
#define VIRTIO_IOMMU_FAULT_F_PRIVILEGED	(1 << 3)
#define VIRTIO_IOMMU_FAULT_F_LAST	(1 << 4)
#define VIRTIO_IOMMU_FAULT_F_PAGE_REQ	(1 << 5)
#define VIRTIO_IOMMU_FAULT_F_ADDRESS	(1 << 8)
#define VIRTIO_IOMMU_FAULT_F_PASID	(1 << 9)
#define VIRTIO_IOMMU_FAULT_F_GROUP_ID	(1 << 10)
#define VIRTIO_IOMMU_FAULT_F_PRIV_DATA	(1 << 11)

/* struct virtio_iommu_config, for the virtio_cread helpers */
struct sva_config {
	__le64	page_size_mask;
	__le64	input_start;
	__le64	input_end;
	__le32	domain_start;
	__le32	domain_end;
	__le32	probe_size;
	u8	bypass;
	u8	reserved[3];
};

struct virtio_iommu_req_head {
	u8	type;
	u8	reserved[3];
} __packed;

struct virtio_iommu_req_tail {
	u8	status;
	u8	reserved[3];
} __packed;

struct virtio_iommu_req_probe {
	struct virtio_iommu_req_head	head;
	__le32				endpoint;
	u8				reserved[64];
	/* followed by u8 properties[probe_size] and the tail */
} __packed;

struct virtio_iommu_probe_property {
	__le16	type;
	__le16	length;
} __packed;

struct virtio_iommu_req_attach_table_vtd {
	struct virtio_iommu_req_head	head;
	__le32				domain;
	__le32				endpoint;
	__le32				flags;
	__le16				format;
	u8				reserved[2];
	__le32				pasid;
	__le64				pgd;
	__le64				fl_flags;
	__le32				addr_width;
	u8				reserved2[36];
	struct virtio_iommu_req_tail	tail;
} __packed;

struct virtio_iommu_req_invalidate {
	struct virtio_iommu_req_head	head;
	__le16				inv_gran;
	__le16				inv_type;
	__le16				flags;
	u8				reserved1[2];
	__le32				domain;
	__le32				pasid;
	u8				reserved2[4];
	__le64				archid;
	__le64				virt_start;
	__le64				nr_pages;
	u8				granule;
	u8				reserved3[11];
	struct virtio_iommu_req_tail	tail;
} __packed;

struct virtio_iommu_req_page_resp {
	struct virtio_iommu_req_head	head;
	__le32				endpoint;
	__le32				pasid;
	__le32				flags;
	__le16				group_id;
	__le16				code;
	u8				reserved[8];
	struct virtio_iommu_req_tail	tail;
} __packed;

struct virtio_iommu_req_detach_table {
	struct virtio_iommu_req_head	head;
	__le32				domain;
	__le32				endpoint;
	__le32				pasid;
	__le32				flags;
	u8				reserved[8];
	struct virtio_iommu_req_tail	tail;
} __packed;

struct virtio_iommu_req_pasid_alloc {
	struct virtio_iommu_req_head	head;
	__le32				min;
	__le32				max;
	__le32				flags;
	u8				reserved[4];
	/* device-writable part */
	__le32				pasid;
	u8				reserved2[4];
	struct virtio_iommu_req_tail	tail;
} __packed;

struct virtio_iommu_req_pasid_free {
	struct virtio_iommu_req_head	head;
	__le32				pasid;
	__le32				flags;
	u8				reserved[8];
	struct virtio_iommu_req_tail	tail;
} __packed;

/* Brucker's extended fault record (48 bytes) */
struct virtio_iommu_fault_ext {
	u8				reason;
	u8				reserved[3];
	__le32				flags;
	__le32				endpoint;
	__le32				pasid;
	__le64				address;
	__le16				group_id;
	u8				reserved1[6];
	__le64				private_data[2];
} __packed;

#define SVA_FAULT_BASE_SIZE		24
#define SVA_FAULT_EXT_SIZE		sizeof(struct virtio_iommu_fault_ext)
#define SVA_EVT_BUF_SIZE		64

/* ------------------------------------------------------ DMA device ---- */

#define SVA_DMADEV_VENDOR		0x1234
#define SVA_DMADEV_DEVICE		0xd3a0
#define SVA_DMADEV_ID_VALUE		0x414d4456

#define DMADEV_ID			0x000
#define DMADEV_VERSION			0x004
#define DMADEV_CAPS			0x008
#define DMADEV_SRC			0x010
#define DMADEV_DST			0x018
#define DMADEV_LEN			0x020
#define DMADEV_PATTERN			0x028
#define DMADEV_PASID			0x030
#define DMADEV_CMD			0x038
#define DMADEV_STATUS			0x03c
#define DMADEV_RESULT			0x040
#define DMADEV_FAULT_ADDR		0x048
#define DMADEV_FAULT_INFO		0x050
#define DMADEV_DONE_BYTES		0x058
#define DMADEV_BAR_SIZE			0x1000

#define DMADEV_CAP_PASID		(1U << 3)
#define DMADEV_CMD_USE_PASID		(1U << 8)
#define DMADEV_PASID_MASK		0xfffff

/* -------------------------------------------------------- tunables ---- */

static unsigned int req_timeout_ms = 5000;
module_param(req_timeout_ms, uint, 0644);
MODULE_PARM_DESC(req_timeout_ms,
		 "Longest wait for a request in process context (ms)");

static unsigned int inval_timeout_ms = 1000;
module_param(inval_timeout_ms, uint, 0644);
MODULE_PARM_DESC(inval_timeout_ms,
		 "Longest spin for an INVALIDATE from the MMU notifier (ms)");

static unsigned int dma_timeout_ms = 30000;
module_param(dma_timeout_ms, uint, 0644);
MODULE_PARM_DESC(dma_timeout_ms,
		 "Default wait for a DMA test device operation (ms)");

static unsigned int prq_hold_ms;
module_param(prq_hold_ms, uint, 0644);
MODULE_PARM_DESC(prq_hold_ms,
		 "Test knob: wait this long before handling each page request (ms), to keep requests open");

/* Ranges at least this large are invalidated as a whole PASID */
#define SVA_INVAL_PASID_THRESHOLD	(1UL << 30)
/* Small requests come from a mempool, so that INVALIDATE works in atomic context */
#define SVA_SMALL_REQ			256
#define SVA_MIN_SMALL_REQS		16
/* Page-request groups that saw a failure and still await their LAST */
#define SVA_MAX_FAILED_GROUPS		256
#define SVA_LAT_SAMPLES			32768
#define SVA_MAX_PROBE_SIZE		SZ_64K
#define SVA_PASID_BITS_MAX		20

/* ---------------------------------------------------------- state ----- */

struct sva_dev;

/* One request in flight on the request queue. */
struct sva_req {
	struct sva_dev		*sdev;
	struct completion	done_wait;
	u64			t0;		/* PAGE_RESP: record arrival */
	unsigned int		len;		/* whole buffer */
	unsigned int		wlen;		/* device-writable part */
	unsigned int		used;		/* used length from the device */
	u8			type;
	bool			from_pool;
	bool			async;		/* freed by the queue drain */
	bool			done;
	bool			abandoned;	/* waiter gave up: drain frees */
	u8			code;		/* PAGE_RESP code, for stats */
	u8			buf[] __aligned(8);
};

/* Endpoint properties from PROBE */
struct sva_ep {
	u32	endpoint;
	u32	flags;			/* VIOMMU_SVA_EP_* */
	u8	pasid_bits;
	u8	output_bits;
	u16	pgtf;
	u32	pr_flags;
	u32	pr_max_groups;
	u32	nr_resv_mem;
	u64	vtd_cap;
	u64	vtd_ecap;
};

/* A bound mm: one PASID and one SVA domain, shared by its endpoints */
struct sva_mm {
	struct kref		ref;
	struct list_head	node;		/* sdev->mms */
	struct sva_dev		*sdev;
	struct mm_struct	*mm;		/* mmgrab()ed */
	struct mmu_notifier	mn;
	bool			notifier;	/* mn registered */
	u32			pasid;
	u32			domain;
	u32			domain_idx;
	/* Protects the fields below and the device-side bindings */
	struct mutex		lock;
	struct list_head	bonds;
	bool			pasid_live;	/* not yet PASID_FREEd */
	/* Read locklessly by the notifier and the page-request worker */
	int			nr_attached;	/* bonds the device may use */
	bool			dead;		/* mm released: answer INVALID */
};

/* (mm, endpoint) */
struct sva_bond {
	struct list_head	mm_node;	/* smm->bonds */
	struct list_head	live_node;	/* sdev->live (when attached) */
	struct sva_mm		*smm;
	u32			endpoint;
	unsigned int		users;		/* file references */
	bool			attached;
};

/* A file's reference to a bond */
struct sva_fbond {
	struct list_head	node;
	struct sva_bond		*bond;
};

struct sva_file {
	struct sva_dev		*sdev;
	struct list_head	node;		/* sdev->files */
	struct list_head	bonds;		/* sva_fbond */
	struct xarray		pasids;		/* raw PASID_ALLOCs */
};

struct sva_prq_entry {
	u8	rec[SVA_FAULT_EXT_SIZE];
	u32	len;
	u64	t0;
};

struct sva_failed_group {
	u32	endpoint;
	u32	pasid;
	u16	group;
	bool	used;
};

struct sva_dev {
	struct kref		ref;
	struct virtio_device	*vdev;
	struct device		*dev;
	struct virtqueue	*req_vq;
	struct virtqueue	*evt_vq;
	int			index;
	char			name[24];
	struct miscdevice	misc;
	bool			misc_registered;

	u32			first_domain;
	u32			last_domain;
	u32			probe_size;
	unsigned int		nr_evts;
	void			*evts;
	mempool_t		*req_pool;

	/* Protects the request queue and the requests' done/abandoned */
	spinlock_t		vq_lock;
	bool			broken;
	atomic_t		async_inflight;

	/* Serialises bind/unbind and protects mms, files, eps, domain_ids */
	struct mutex		lock;
	bool			removed;
	struct list_head	mms;
	struct list_head	files;
	struct xarray		eps;
	struct xarray		domain_ids;

	/* Protects live (bonds the device may use) for the worker */
	spinlock_t		bind_lock;
	struct list_head	live;

	/* Page requests: filled by the event callback, drained by prq_work */
	spinlock_t		prq_lock;
	struct sva_prq_entry	*prq;
	unsigned int		prq_size;
	unsigned int		prq_head;	/* next to read */
	unsigned int		prq_count;
	struct workqueue_struct	*wq;
	struct work_struct	prq_work;
	spinlock_t		grp_lock;
	struct sva_failed_group	failed[SVA_MAX_FAILED_GROUPS];

	/* Handling times of page requests */
	spinlock_t		lat_lock;
	u32			*lat;
	unsigned int		lat_next;
	unsigned int		lat_count;

	struct {
		atomic64_t page_requests, stop_markers, page_groups;
		atomic64_t resp[3], resp_stale, resp_errors;
		atomic64_t faults, bad_events, events_lost;
		atomic64_t invalidations, inval_errors;
		atomic64_t binds, unbinds, mm_releases;
		atomic64_t pasid_allocs, pasid_frees;
	} stats;
	atomic_t		live_bonds;
	atomic_t		live_mms;
	atomic_t		raw_pasids;
};

/* A DMA test device, found by its endpoint ID */
struct sva_dmadev {
	struct list_head	node;
	struct pci_dev		*pdev;
	void __iomem		*regs;
	u32			endpoint;
	u32			caps;
	/* Serialises operations; protects the in-flight fields */
	struct mutex		lock;
	bool			inflight;
	u32			inflight_pasid;
};

static DEFINE_IDA(sva_index_ida);
static DEFINE_MUTEX(sva_dmadevs_lock);
static LIST_HEAD(sva_dmadevs);

static void sva_dev_free(struct kref *ref)
{
	struct sva_dev *sdev = container_of(ref, struct sva_dev, ref);
	struct sva_ep *ep;
	unsigned long i;

	xa_for_each(&sdev->eps, i, ep)
		kfree(ep);
	mempool_destroy(sdev->req_pool);
	kfree(sdev->prq);
	kvfree(sdev->lat);
	kfree(sdev->evts);
	xa_destroy(&sdev->eps);
	xa_destroy(&sdev->domain_ids);
	ida_free(&sva_index_ida, sdev->index);
	kfree(sdev);
}

static void sva_dev_put(struct sva_dev *sdev)
{
	kref_put(&sdev->ref, sva_dev_free);
}

/* -------------------------------------------------------- requests ---- */

static const char *sva_status_name(u8 status)
{
	static const char * const names[] = {
		"OK", "IOERR", "UNSUPP", "DEVERR", "INVAL", "RANGE", "NOENT",
		"FAULT", "NOMEM",
	};

	if (status < ARRAY_SIZE(names))
		return names[status];
	return status == SVA_S_UNWRITTEN ? "unwritten" : "unknown";
}

/* Status to errno, as the Linux virtio-iommu driver maps them */
static int sva_status_errno(u8 status)
{
	switch (status) {
	case VIRTIO_IOMMU_S_OK:
		return 0;
	case VIRTIO_IOMMU_S_UNSUPP:
		return -ENOSYS;
	case VIRTIO_IOMMU_S_INVAL:
		return -EINVAL;
	case VIRTIO_IOMMU_S_RANGE:
		return -ERANGE;
	case VIRTIO_IOMMU_S_NOENT:
		return -ENOENT;
	case VIRTIO_IOMMU_S_FAULT:
		return -EFAULT;
	case VIRTIO_IOMMU_S_NOMEM:
		return -ENOMEM;
	default:
		return -EIO;
	}
}

static u8 sva_req_status(struct sva_req *req)
{
	/* A used length of 0 is a failed request */
	if (!req->used)
		return VIRTIO_IOMMU_S_IOERR;
	return req->buf[req->len - sizeof(struct virtio_iommu_req_tail)];
}

static struct sva_req *sva_req_alloc(struct sva_dev *sdev, const void *buf,
				     size_t len, size_t wlen, gfp_t gfp)
{
	struct sva_req *req;
	bool pool = sizeof(*req) + len <= SVA_SMALL_REQ;

	if (pool)
		req = mempool_alloc(sdev->req_pool, gfp);
	else
		req = kmalloc(sizeof(*req) + len, gfp);
	if (!req)
		return NULL;

	memset(req, 0, sizeof(*req));
	req->sdev = sdev;
	req->from_pool = pool;
	req->len = len;
	req->wlen = wlen;
	req->type = ((const struct virtio_iommu_req_head *)buf)->type;
	init_completion(&req->done_wait);
	memcpy(req->buf, buf, len - wlen);
	memset(req->buf + len - wlen, 0, wlen);
	/* Tell an unwritten tail from a written S_OK */
	req->buf[len - sizeof(struct virtio_iommu_req_tail)] = SVA_S_UNWRITTEN;
	return req;
}

static void sva_req_free(struct sva_req *req)
{
	if (req->from_pool)
		mempool_free(req, req->sdev->req_pool);
	else
		kfree(req);
}

static void sva_lat_record(struct sva_dev *sdev, u64 ns)
{
	unsigned long flags;

	spin_lock_irqsave(&sdev->lat_lock, flags);
	sdev->lat[sdev->lat_next] = min_t(u64, ns, U32_MAX);
	sdev->lat_next = (sdev->lat_next + 1) % SVA_LAT_SAMPLES;
	if (sdev->lat_count < SVA_LAT_SAMPLES)
		sdev->lat_count++;
	spin_unlock_irqrestore(&sdev->lat_lock, flags);
}

/* A fire-and-forget request (PAGE_RESP) came back */
static void sva_async_done(struct sva_dev *sdev, struct sva_req *req)
{
	u8 status = sva_req_status(req);

	if (status == VIRTIO_IOMMU_S_OK) {
		/* Sample first: a reader who sees the count finds the sample */
		sva_lat_record(sdev, ktime_get_ns() - req->t0);
		atomic64_inc(&sdev->stats.resp[req->code]);
	} else if (status == VIRTIO_IOMMU_S_NOENT) {
		/* The group was answered for us (DETACH_TABLE, reset) */
		atomic64_inc(&sdev->stats.resp_stale);
	} else {
		atomic64_inc(&sdev->stats.resp_errors);
		dev_err_ratelimited(sdev->dev, "PAGE_RESP failed: %s\n",
				    sva_status_name(status));
	}
	atomic_dec(&sdev->async_inflight);
	sva_req_free(req);
}

/* Collect every completed request.  Called with vq_lock held. */
static void sva_drain_locked(struct sva_dev *sdev)
{
	struct sva_req *req;
	unsigned int len;

	lockdep_assert_held(&sdev->vq_lock);

	while ((req = virtqueue_get_buf(sdev->req_vq, &len))) {
		req->used = min(len, req->wlen);
		if (len > req->wlen)
			dev_warn_ratelimited(sdev->dev,
					     "request %u: used length %u > %u\n",
					     req->type, len, req->wlen);
		if (req->async) {
			sva_async_done(sdev, req);
		} else if (req->abandoned) {
			sva_req_free(req);
		} else {
			req->done = true;
			complete(&req->done_wait);
		}
	}
}

static void sva_req_vq_done(struct virtqueue *vq)
{
	struct sva_dev *sdev = vq->vdev->priv;
	unsigned long flags;

	if (!sdev)
		return;
	spin_lock_irqsave(&sdev->vq_lock, flags);
	sva_drain_locked(sdev);
	spin_unlock_irqrestore(&sdev->vq_lock, flags);
}

/*
 * Add @req to the request queue and kick.  If the queue is full, wait for
 * room until @deadline: spinning when @atomic, sleeping otherwise.
 */
static int sva_req_add(struct sva_dev *sdev, struct sva_req *req, bool atomic,
		       ktime_t deadline)
{
	struct scatterlist out_sg, in_sg, *sgs[2] = { &out_sg, &in_sg };
	unsigned long flags;
	int ret;

	sg_init_one(&out_sg, req->buf, req->len - req->wlen);
	sg_init_one(&in_sg, req->buf + req->len - req->wlen, req->wlen);

	for (;;) {
		spin_lock_irqsave(&sdev->vq_lock, flags);
		if (sdev->broken) {
			spin_unlock_irqrestore(&sdev->vq_lock, flags);
			return -EIO;
		}
		ret = virtqueue_add_sgs(sdev->req_vq, sgs, 1, 1, req,
					GFP_ATOMIC);
		if (ret == -ENOSPC) {
			sva_drain_locked(sdev);
			ret = virtqueue_add_sgs(sdev->req_vq, sgs, 1, 1, req,
						GFP_ATOMIC);
		}
		if (!ret) {
			if (req->async)
				atomic_inc(&sdev->async_inflight);
			virtqueue_kick(sdev->req_vq);
		}
		spin_unlock_irqrestore(&sdev->vq_lock, flags);

		if (ret != -ENOSPC)
			return ret;
		if (ktime_after(ktime_get(), deadline))
			return -ETIMEDOUT;
		if (atomic)
			cpu_relax();
		else
			usleep_range(10, 50);
	}
}

/*
 * Wait for @req until @deadline.  Returns 0 when the device returned it;
 * on timeout the request is left to the queue (freed when it comes back).
 */
static int sva_req_wait(struct sva_dev *sdev, struct sva_req *req,
			bool atomic, ktime_t deadline)
{
	unsigned long flags;
	bool done, expired;

	for (;;) {
		if (!atomic &&
		    wait_for_completion_timeout(&req->done_wait,
						msecs_to_jiffies(1)))
			return 0;

		/* Also poll: the device need not interrupt */
		spin_lock_irqsave(&sdev->vq_lock, flags);
		sva_drain_locked(sdev);
		done = req->done;
		expired = !done && ktime_after(ktime_get(), deadline);
		if (expired)
			req->abandoned = true;
		spin_unlock_irqrestore(&sdev->vq_lock, flags);

		if (done)
			return 0;
		if (expired)
			return -ETIMEDOUT;
		if (atomic)
			cpu_relax();
	}
}

/*
 * Send a request and wait for it.  @buf holds the whole request (readable
 * part, then the @wlen bytes of the writable part ending with the tail);
 * the writable part is copied back into @buf when the device wrote all of
 * it.  @atomic requests (INVALIDATE from the MMU notifier) spin and never
 * sleep, like viommu_sync_req(), but with a bound.
 */
static int sva_send(struct sva_dev *sdev, void *buf, size_t len, size_t wlen,
		    bool atomic)
{
	unsigned int ms = atomic ? inval_timeout_ms : req_timeout_ms;
	ktime_t deadline = ktime_add_ms(ktime_get(), ms);
	gfp_t gfp = atomic ? GFP_ATOMIC | __GFP_NOWARN : GFP_KERNEL;
	u8 type = ((struct virtio_iommu_req_head *)buf)->type;
	struct sva_req *req;
	u8 status;
	int ret;

	for (;;) {
		req = sva_req_alloc(sdev, buf, len, wlen, gfp);
		if (req)
			break;
		if (!atomic)
			return -ENOMEM;
		/* The pool refills as other requests complete */
		if (ktime_after(ktime_get(), deadline))
			return -ENOMEM;
		cpu_relax();
	}

	ret = sva_req_add(sdev, req, atomic, deadline);
	if (ret) {
		sva_req_free(req);
		return ret;
	}

	ret = sva_req_wait(sdev, req, atomic, deadline);
	if (ret) {
		dev_err_ratelimited(sdev->dev,
				    "request type %u: no answer within %u ms\n",
				    type, ms);
		return ret;
	}

	status = sva_req_status(req);
	if (req->used == wlen)
		memcpy(buf + len - wlen, req->buf + len - wlen, wlen);
	else if (req->used)
		status = VIRTIO_IOMMU_S_IOERR;	/* partly written */
	sva_req_free(req);

	if (status != VIRTIO_IOMMU_S_OK)
		dev_dbg(sdev->dev, "request type %u: %s\n", type,
			sva_status_name(status));
	return sva_status_errno(status);
}

#define sva_send_req(sdev, r, atomic) \
	sva_send(sdev, r, sizeof(*(r)), sizeof((r)->tail), atomic)

/* Give up on a device that no longer completes invalidations */
static void sva_mark_broken(struct sva_dev *sdev, const char *why)
{
	unsigned long flags;

	spin_lock_irqsave(&sdev->vq_lock, flags);
	if (!sdev->broken)
		dev_err(sdev->dev, "%s: device marked broken\n", why);
	sdev->broken = true;
	spin_unlock_irqrestore(&sdev->vq_lock, flags);
}

/* Wait until every fire-and-forget request came back */
static void sva_wait_async(struct sva_dev *sdev)
{
	ktime_t deadline = ktime_add_ms(ktime_get(), req_timeout_ms);
	unsigned long flags;

	while (atomic_read(&sdev->async_inflight)) {
		spin_lock_irqsave(&sdev->vq_lock, flags);
		sva_drain_locked(sdev);
		spin_unlock_irqrestore(&sdev->vq_lock, flags);
		if (ktime_after(ktime_get(), deadline)) {
			dev_warn(sdev->dev, "%d PAGE_RESP still unanswered\n",
				 atomic_read(&sdev->async_inflight));
			return;
		}
		usleep_range(20, 100);
	}
}

/* ------------------------------------------------ wire operations ---- */

static bool sva_has(struct sva_dev *sdev, unsigned int bit)
{
	return virtio_has_feature(sdev->vdev, bit);
}

static bool sva_can_bind(struct sva_dev *sdev)
{
	return sva_has(sdev, VIRTIO_IOMMU_F_ATTACH_TABLE) &&
	       sva_has(sdev, VIRTIO_IOMMU_F_PAGE_REQUEST) &&
	       sva_has(sdev, VIRTIO_IOMMU_F_PASID_ALLOC) &&
	       sva_has(sdev, VIRTIO_IOMMU_F_PROBE) && sdev->probe_size;
}

static int sva_pasid_alloc(struct sva_dev *sdev, u32 min, u32 max, u32 *pasid)
{
	struct virtio_iommu_req_pasid_alloc req = {
		.head.type	= VIRTIO_IOMMU_T_PASID_ALLOC,
		.min		= cpu_to_le32(min),
		.max		= cpu_to_le32(max),
	};
	int ret;

	if (!sva_has(sdev, VIRTIO_IOMMU_F_PASID_ALLOC))
		return -EOPNOTSUPP;
	ret = sva_send(sdev, &req, sizeof(req), 12, false);
	if (ret)
		return ret;
	*pasid = le32_to_cpu(req.pasid);
	if (*pasid < min || *pasid > max) {
		/* Keep it (it is ours) but do not use it */
		dev_err(sdev->dev, "PASID_ALLOC returned %u outside [%u, %u]\n",
			*pasid, min, max);
		return -EIO;
	}
	atomic64_inc(&sdev->stats.pasid_allocs);
	return 0;
}

static int sva_pasid_free(struct sva_dev *sdev, u32 pasid)
{
	struct virtio_iommu_req_pasid_free req = {
		.head.type	= VIRTIO_IOMMU_T_PASID_FREE,
		.pasid		= cpu_to_le32(pasid),
	};
	int ret;

	ret = sva_send_req(sdev, &req, false);
	if (ret)
		dev_warn(sdev->dev, "PASID_FREE %u: %d\n", pasid, ret);
	else
		atomic64_inc(&sdev->stats.pasid_frees);
	return ret;
}

static unsigned int sva_addr_width(void)
{
	return pgtable_l5_enabled() ? 57 : 48;
}

static int sva_attach_table(struct sva_dev *sdev, struct sva_mm *smm,
			    u32 endpoint)
{
	struct virtio_iommu_req_attach_table_vtd req = {
		.head.type	= VIRTIO_IOMMU_T_ATTACH_TABLE,
		.domain		= cpu_to_le32(smm->domain),
		.endpoint	= cpu_to_le32(endpoint),
		.format		= cpu_to_le16(VIRTIO_IOMMU_PGTF_VTD),
		.pasid		= cpu_to_le32(smm->pasid),
		.pgd		= cpu_to_le64(__pa(smm->mm->pgd)),
		.fl_flags	= 0,	/* user-only: no supervisor requests */
		.addr_width	= cpu_to_le32(sva_addr_width()),
	};

	return sva_send_req(sdev, &req, false);
}

static int sva_detach_table(struct sva_dev *sdev, struct sva_mm *smm,
			    u32 endpoint)
{
	struct virtio_iommu_req_detach_table req = {
		.head.type	= VIRTIO_IOMMU_T_DETACH_TABLE,
		.domain		= cpu_to_le32(smm->domain),
		.endpoint	= cpu_to_le32(endpoint),
		.pasid		= cpu_to_le32(smm->pasid),
	};

	return sva_send_req(sdev, &req, false);
}

static int sva_invalidate(struct sva_dev *sdev, struct sva_mm *smm,
			  unsigned long start, unsigned long end, bool atomic)
{
	struct virtio_iommu_req_invalidate req = {
		.head.type	= VIRTIO_IOMMU_T_INVALIDATE,
		.inv_type	= cpu_to_le16(VIRTIO_IOMMU_INV_T_IOTLB |
					      VIRTIO_IOMMU_INV_T_DEV_IOTLB),
		.flags		= cpu_to_le16(VIRTIO_IOMMU_INVAL_F_PASID),
		.domain		= cpu_to_le32(smm->domain),
		.pasid		= cpu_to_le32(smm->pasid),
		.granule	= PAGE_SHIFT,
	};
	int ret;

	/* @end is exclusive, like vm_end; ULONG_MAX means everything */
	if (end <= start || end - start >= SVA_INVAL_PASID_THRESHOLD ||
	    end > TASK_SIZE_MAX) {
		req.inv_gran = cpu_to_le16(VIRTIO_IOMMU_INVAL_G_PASID);
	} else {
		start = round_down(start, PAGE_SIZE);
		end = round_up(end, PAGE_SIZE);
		req.inv_gran = cpu_to_le16(VIRTIO_IOMMU_INVAL_G_VA);
		req.virt_start = cpu_to_le64(start);
		req.nr_pages = cpu_to_le64((end - start) >> PAGE_SHIFT);
	}

	atomic64_inc(&sdev->stats.invalidations);
	ret = sva_send_req(sdev, &req, atomic);
	if (ret) {
		atomic64_inc(&sdev->stats.inval_errors);
		/* A binding removed meanwhile makes the domain unknown */
		if (READ_ONCE(smm->nr_attached) > 0)
			dev_err_ratelimited(sdev->dev,
					    "INVALIDATE pasid %u [%#lx, %#lx): %d\n",
					    smm->pasid, start, end, ret);
		else
			ret = 0;
	}
	if (ret == -ETIMEDOUT)
		sva_mark_broken(sdev, "INVALIDATE timed out");
	return ret;
}

static void sva_page_resp(struct sva_dev *sdev, u32 endpoint, u32 pasid,
			  bool pasid_valid, u16 group, u8 code, u64 t0)
{
	struct virtio_iommu_req_page_resp resp = {
		.head.type	= VIRTIO_IOMMU_T_PAGE_RESP,
		.endpoint	= cpu_to_le32(endpoint),
		.pasid		= cpu_to_le32(pasid_valid ? pasid : 0),
		.flags		= cpu_to_le32(pasid_valid ?
				      VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID : 0),
		.group_id	= cpu_to_le16(group),
		.code		= cpu_to_le16(code),
	};
	ktime_t deadline = ktime_add_ms(ktime_get(), req_timeout_ms);
	struct sva_req *req;
	int ret;

	req = sva_req_alloc(sdev, &resp, sizeof(resp), sizeof(resp.tail),
			    GFP_KERNEL);
	if (!req) {
		atomic64_inc(&sdev->stats.resp_errors);
		return;
	}
	req->async = true;
	req->code = code;
	req->t0 = t0;
	/* Not waited for: sva_async_done() accounts for it */
	ret = sva_req_add(sdev, req, false, deadline);
	if (ret) {
		atomic64_inc(&sdev->stats.resp_errors);
		dev_err_ratelimited(sdev->dev,
				    "PAGE_RESP ep %u group %u: %d\n",
				    endpoint, group, ret);
		sva_req_free(req);
	}
}

/* Read the endpoint's properties, cached after the first success */
static struct sva_ep *sva_probe_ep(struct sva_dev *sdev, u32 endpoint)
{
	struct virtio_iommu_req_probe *probe;
	struct virtio_iommu_probe_property *prop;
	size_t wlen = sdev->probe_size + sizeof(struct virtio_iommu_req_tail);
	size_t len = sizeof(*probe) + wlen;
	struct sva_ep *ep;
	size_t cur = 0;
	u8 *props;
	int ret;

	lockdep_assert_held(&sdev->lock);

	ep = xa_load(&sdev->eps, endpoint);
	if (ep)
		return ep;
	if (!sva_has(sdev, VIRTIO_IOMMU_F_PROBE) || !sdev->probe_size)
		return ERR_PTR(-EOPNOTSUPP);

	probe = kzalloc(len, GFP_KERNEL);
	ep = kzalloc(sizeof(*ep), GFP_KERNEL);
	if (!probe || !ep) {
		ret = -ENOMEM;
		goto out_free;
	}
	probe->head.type = VIRTIO_IOMMU_T_PROBE;
	probe->endpoint = cpu_to_le32(endpoint);
	ret = sva_send(sdev, probe, len, wlen, false);
	if (ret) {
		dev_info(sdev->dev, "PROBE endpoint %u: %d\n", endpoint, ret);
		goto out_free;
	}

	ep->endpoint = endpoint;
	props = (u8 *)(probe + 1);
	while (cur + sizeof(*prop) <= sdev->probe_size) {
		u16 raw, type, plen;
		u8 *val;

		prop = (void *)(props + cur);
		raw = le16_to_cpu(prop->type);
		type = raw & VIRTIO_IOMMU_PROBE_T_MASK;
		plen = le16_to_cpu(prop->length);
		if (type == VIRTIO_IOMMU_PROBE_T_NONE)
			break;
		if (cur + sizeof(*prop) + plen > sdev->probe_size) {
			dev_warn(sdev->dev,
				 "PROBE endpoint %u: property %u overruns\n",
				 endpoint, type);
			break;
		}
		val = props + cur + sizeof(*prop);
		cur += sizeof(*prop) + plen;
		/* The reserved type bits must be 0, or the property is ignored */
		if (raw & ~VIRTIO_IOMMU_PROBE_T_MASK)
			continue;

		switch (type) {
		case VIRTIO_IOMMU_PROBE_T_RESV_MEM:
			ep->nr_resv_mem++;
			break;
		case VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE:
			if (plen >= 4)
				ep->output_bits = val[0];
			break;
		case VIRTIO_IOMMU_PROBE_T_PASID_SIZE:
			if (plen >= 4 && val[0]) {
				ep->pasid_bits = min_t(u8, val[0],
						       SVA_PASID_BITS_MAX);
				ep->flags |= VIOMMU_SVA_EP_PASID_SIZE;
			}
			break;
		case VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT:
			if (plen < 4)
				break;
			if (!ep->pgtf)
				ep->pgtf = get_unaligned_le16(val);
			if (get_unaligned_le16(val) == VIRTIO_IOMMU_PGTF_VTD) {
				ep->flags |= VIOMMU_SVA_EP_PGTF_VTD;
				if (plen >= 20) {
					ep->vtd_cap = get_unaligned_le64(val + 4);
					ep->vtd_ecap = get_unaligned_le64(val + 12);
				}
			}
			break;
		case VIRTIO_IOMMU_PROBE_T_PAGE_REQUEST:
			if (plen >= 8) {
				ep->flags |= VIOMMU_SVA_EP_PAGE_REQUEST;
				ep->pr_flags = get_unaligned_le32(val);
				ep->pr_max_groups = get_unaligned_le32(val + 4);
			}
			break;
		default:
			break;
		}
	}

	ret = xa_err(xa_store(&sdev->eps, endpoint, ep, GFP_KERNEL));
	if (ret)
		goto out_free;
	dev_info(sdev->dev,
		 "endpoint %u: pasid %u bits, output %u bits, pgtf %u, page requests %#x (%u groups), %u RESV_MEM\n",
		 endpoint, ep->pasid_bits, ep->output_bits, ep->pgtf,
		 ep->pr_flags, ep->pr_max_groups, ep->nr_resv_mem);
	kfree(probe);
	return ep;

out_free:
	kfree(ep);
	kfree(probe);
	return ERR_PTR(ret);
}

/* ------------------------------------------------------ bindings ------ */

static void sva_mm_free(struct kref *ref)
{
	struct sva_mm *smm = container_of(ref, struct sva_mm, ref);

	mmdrop(smm->mm);
	kfree(smm);
}

static void sva_mm_put(struct sva_mm *smm)
{
	kref_put(&smm->ref, sva_mm_free);
}

/* Make @bond usable by the worker.  smm->lock held. */
static void sva_bond_set_live(struct sva_dev *sdev, struct sva_bond *bond,
			      bool live)
{
	spin_lock(&sdev->bind_lock);
	if (live)
		list_add_tail(&bond->live_node, &sdev->live);
	else
		list_del_init(&bond->live_node);
	spin_unlock(&sdev->bind_lock);
}

/* Stop the device using (endpoint, PASID).  smm->lock held. */
static void sva_bond_detach(struct sva_dev *sdev, struct sva_bond *bond)
{
	struct sva_mm *smm = bond->smm;
	int ret;

	lockdep_assert_held(&smm->lock);
	if (!bond->attached)
		return;

	/* From now on its page requests are answered INVALID */
	sva_bond_set_live(sdev, bond, false);
	ret = sva_detach_table(sdev, smm, bond->endpoint);
	if (ret)
		dev_warn(sdev->dev, "DETACH_TABLE ep %u pasid %u: %d\n",
			 bond->endpoint, smm->pasid, ret);
	else
		atomic64_inc(&sdev->stats.unbinds);
	bond->attached = false;
	WRITE_ONCE(smm->nr_attached, smm->nr_attached - 1);
	atomic_dec(&sdev->live_bonds);
}

static struct sva_mm *sva_mm_of_notifier(struct mmu_notifier *mn)
{
	return container_of(mn, struct sva_mm, mn);
}

static void sva_mn_invalidate(struct mmu_notifier *mn, struct mm_struct *mm,
			      unsigned long start, unsigned long end)
{
	struct sva_mm *smm = sva_mm_of_notifier(mn);

	/* May run in atomic context: sva_invalidate() only spins */
	if (READ_ONCE(smm->nr_attached) <= 0)
		return;
	sva_invalidate(smm->sdev, smm, start, end, true);
}

/*
 * The mm is going away (exit_mmap(), or our own unregister).  Its page
 * tables are about to be freed without further notification, so the
 * device must stop walking them now: flush the PASID and remove the
 * bindings, as intel_mm_release() tears down its PASID entries.  The
 * PASID itself is freed when the file lets go of the binding.
 */
static void sva_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct sva_mm *smm = sva_mm_of_notifier(mn);
	struct sva_dev *sdev = smm->sdev;
	struct sva_bond *bond;

	mutex_lock(&smm->lock);
	WRITE_ONCE(smm->dead, true);
	if (smm->nr_attached > 0) {
		atomic64_inc(&sdev->stats.mm_releases);
		sva_invalidate(sdev, smm, 0, ULONG_MAX, false);
		list_for_each_entry(bond, &smm->bonds, mm_node)
			sva_bond_detach(sdev, bond);
	}
	mutex_unlock(&smm->lock);
}

static const struct mmu_notifier_ops sva_mn_ops = {
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0)
	.arch_invalidate_secondary_tlbs	= sva_mn_invalidate,
#else
	.invalidate_range		= sva_mn_invalidate,
#endif
	.release			= sva_mn_release,
};

/* The DMA test device must be done with @pasid before it goes away */
static void sva_dmadev_quiesce(u32 endpoint, u32 pasid)
{
	struct sva_dmadev *dd;
	ktime_t deadline;

	mutex_lock(&sva_dmadevs_lock);
	list_for_each_entry(dd, &sva_dmadevs, node) {
		if (dd->endpoint != endpoint)
			continue;
		mutex_lock(&dd->lock);
		deadline = ktime_add_ms(ktime_get(), req_timeout_ms);
		while (dd->inflight && dd->inflight_pasid == pasid &&
		       readl(dd->regs + DMADEV_STATUS) == VIOMMU_SVA_ST_BUSY &&
		       !ktime_after(ktime_get(), deadline))
			usleep_range(50, 200);
		if (dd->inflight_pasid == pasid)
			dd->inflight = false;
		mutex_unlock(&dd->lock);
	}
	mutex_unlock(&sva_dmadevs_lock);
}

/* Forget what the worker remembers of the groups of (endpoint, PASID) */
static void sva_forget_groups(struct sva_dev *sdev, u32 endpoint, u32 pasid)
{
	int i;

	spin_lock(&sdev->grp_lock);
	for (i = 0; i < SVA_MAX_FAILED_GROUPS; i++) {
		struct sva_failed_group *g = &sdev->failed[i];

		if (g->used && g->endpoint == endpoint && g->pasid == pasid)
			g->used = false;
	}
	spin_unlock(&sdev->grp_lock);
}

/* Tear down an mm without bonds left.  sdev->lock held. */
static void sva_mm_destroy(struct sva_dev *sdev, struct sva_mm *smm)
{
	lockdep_assert_held(&sdev->lock);

	mutex_lock(&smm->lock);
	if (smm->pasid_live) {
		sva_pasid_free(sdev, smm->pasid);
		smm->pasid_live = false;
	}
	mutex_unlock(&smm->lock);

	list_del(&smm->node);
	/* Calls ->release if exit_mmap() did not: nothing is attached */
	if (smm->notifier)
		mmu_notifier_unregister(&smm->mn, smm->mm);
	xa_erase(&sdev->domain_ids, smm->domain_idx);
	atomic_dec(&sdev->live_mms);
	sva_mm_put(smm);
}

/*
 * Drop one file reference to @bond.  The last one unbinds it as Linux SVA
 * unbinds: stop DMA (the test device finishes, DETACH_TABLE makes the
 * device answer the PASID's outstanding page requests), drain what we
 * still process for it, and free the PASID with the last bond of the mm.
 */
static void sva_bond_put(struct sva_dev *sdev, struct sva_bond *bond)
{
	struct sva_mm *smm = bond->smm;

	lockdep_assert_held(&sdev->lock);
	if (--bond->users)
		return;

	sva_dmadev_quiesce(bond->endpoint, smm->pasid);

	mutex_lock(&smm->lock);
	sva_bond_detach(sdev, bond);
	list_del(&bond->mm_node);
	mutex_unlock(&smm->lock);

	/* No page request of this bond is being handled after this */
	flush_workqueue(sdev->wq);
	sva_wait_async(sdev);
	sva_forget_groups(sdev, bond->endpoint, smm->pasid);
	kfree(bond);

	if (list_empty(&smm->bonds))
		sva_mm_destroy(sdev, smm);
}

static struct sva_mm *sva_mm_find(struct sva_dev *sdev, struct mm_struct *mm)
{
	struct sva_mm *smm;

	list_for_each_entry(smm, &sdev->mms, node)
		if (smm->mm == mm && !smm->dead)
			return smm;
	return NULL;
}

static struct sva_mm *sva_mm_create(struct sva_dev *sdev,
				    struct mm_struct *mm, struct sva_ep *ep)
{
	u32 span = sdev->last_domain - sdev->first_domain;
	struct sva_mm *smm;
	int ret;

	smm = kzalloc(sizeof(*smm), GFP_KERNEL);
	if (!smm)
		return ERR_PTR(-ENOMEM);
	kref_init(&smm->ref);
	mutex_init(&smm->lock);
	INIT_LIST_HEAD(&smm->bonds);
	smm->sdev = sdev;
	smm->mm = mm;
	mmgrab(mm);

	/* Domain IDs from the top of domain_range: index i is last - i */
	ret = xa_alloc(&sdev->domain_ids, &smm->domain_idx, smm,
		       XA_LIMIT(0, span), GFP_KERNEL);
	if (ret) {
		ret = ret == -EBUSY ? -ENOSPC : ret;
		goto err_put;
	}
	smm->domain = sdev->last_domain - smm->domain_idx;

	ret = sva_pasid_alloc(sdev, 1, (1U << ep->pasid_bits) - 1,
			      &smm->pasid);
	if (ret)
		goto err_domain;
	smm->pasid_live = true;

	smm->mn.ops = &sva_mn_ops;
	ret = mmu_notifier_register(&smm->mn, mm);
	if (ret)
		goto err_pasid;
	smm->notifier = true;

	list_add_tail(&smm->node, &sdev->mms);
	atomic_inc(&sdev->live_mms);
	return smm;

err_pasid:
	sva_pasid_free(sdev, smm->pasid);
err_domain:
	xa_erase(&sdev->domain_ids, smm->domain_idx);
err_put:
	sva_mm_put(smm);
	return ERR_PTR(ret);
}

static int sva_check_bind(struct sva_dev *sdev, struct sva_ep *ep)
{
	static const struct {
		unsigned int bit;
		const char *name;
	} need[] = {
		{ VIRTIO_IOMMU_F_ATTACH_TABLE, "F_ATTACH_TABLE (bit 8)" },
		{ VIRTIO_IOMMU_F_PAGE_REQUEST, "F_PAGE_REQUEST (bit 10)" },
		{ VIRTIO_IOMMU_F_PASID_ALLOC, "F_PASID_ALLOC (bit 11)" },
		{ VIRTIO_IOMMU_F_PROBE, "F_PROBE (bit 4)" },
	};
	int i;

	for (i = 0; i < ARRAY_SIZE(need); i++) {
		if (!sva_has(sdev, need[i].bit)) {
			dev_info_ratelimited(sdev->dev,
					     "BIND refused: the device does not offer %s\n",
					     need[i].name);
			return -EOPNOTSUPP;
		}
	}
	if (!ep)
		return 0;
	if (!ep->pasid_bits) {
		dev_info_ratelimited(sdev->dev,
				     "BIND refused: endpoint %u reports no PASID_SIZE\n",
				     ep->endpoint);
		return -EOPNOTSUPP;
	}
	if (ep->pgtf && !(ep->flags & VIOMMU_SVA_EP_PGTF_VTD)) {
		dev_info_ratelimited(sdev->dev,
				     "BIND refused: endpoint %u has no PGTF_VTD page-table format\n",
				     ep->endpoint);
		return -EOPNOTSUPP;
	}
	/* VT-d CAP_REG bit 60: first-stage 5-level paging */
	if (sva_addr_width() == 57 && ep->vtd_cap &&
	    !(ep->vtd_cap & BIT_ULL(60))) {
		dev_info_ratelimited(sdev->dev,
				     "BIND refused: endpoint %u cannot walk 5-level page tables\n",
				     ep->endpoint);
		return -EOPNOTSUPP;
	}
	return 0;
}

static struct sva_fbond *sva_file_find(struct sva_file *sfile,
				       struct mm_struct *mm, u32 endpoint)
{
	struct sva_fbond *fb;

	list_for_each_entry(fb, &sfile->bonds, node)
		if (fb->bond->smm->mm == mm && fb->bond->endpoint == endpoint)
			return fb;
	return NULL;
}

static int sva_bind(struct sva_file *sfile, struct viommu_sva_bind *arg)
{
	struct sva_dev *sdev = sfile->sdev;
	struct mm_struct *mm = current->mm;
	struct sva_bond *bond = NULL, *b;
	struct sva_fbond *fb;
	struct sva_mm *smm;
	struct sva_ep *ep;
	bool new_bond = false;
	int ret;

	if (arg->flags)
		return -EINVAL;
	if (!mm)
		return -EINVAL;

	ret = sva_check_bind(sdev, NULL);
	if (ret)
		return ret;

	mutex_lock(&sdev->lock);
	ret = -ENODEV;
	if (sdev->removed)
		goto out_unlock;

	fb = sva_file_find(sfile, mm, arg->endpoint);
	if (fb) {
		/* Bound already through this file: same answer */
		smm = fb->bond->smm;
		ret = 0;
		goto out_fill;
	}

	ep = sva_probe_ep(sdev, arg->endpoint);
	if (IS_ERR(ep)) {
		ret = PTR_ERR(ep);
		goto out_unlock;
	}
	ret = sva_check_bind(sdev, ep);
	if (ret)
		goto out_unlock;

	fb = kzalloc(sizeof(*fb), GFP_KERNEL);
	if (!fb) {
		ret = -ENOMEM;
		goto out_unlock;
	}

	smm = sva_mm_find(sdev, mm);
	if (smm) {
		if (smm->pasid >> ep->pasid_bits) {
			ret = -EOVERFLOW;
			goto out_free_fb;
		}
	} else {
		smm = sva_mm_create(sdev, mm, ep);
		if (IS_ERR(smm)) {
			ret = PTR_ERR(smm);
			goto out_free_fb;
		}
	}

	mutex_lock(&smm->lock);
	list_for_each_entry(b, &smm->bonds, mm_node) {
		if (b->endpoint == arg->endpoint) {
			bond = b;
			break;
		}
	}
	if (!bond) {
		bond = kzalloc(sizeof(*bond), GFP_KERNEL);
		if (!bond) {
			ret = -ENOMEM;
			goto out_unlock_mm;
		}
		bond->smm = smm;
		bond->endpoint = arg->endpoint;
		INIT_LIST_HEAD(&bond->live_node);
		/*
		 * Count it before the device may walk the tables, so that no
		 * invalidation is skipped while ATTACH_TABLE is in flight.
		 */
		WRITE_ONCE(smm->nr_attached, smm->nr_attached + 1);
		ret = sva_attach_table(sdev, smm, arg->endpoint);
		if (ret) {
			WRITE_ONCE(smm->nr_attached, smm->nr_attached - 1);
			dev_info(sdev->dev, "ATTACH_TABLE ep %u pasid %u: %d\n",
				 arg->endpoint, smm->pasid, ret);
			kfree(bond);
			goto out_unlock_mm;
		}
		bond->attached = true;
		list_add_tail(&bond->mm_node, &smm->bonds);
		sva_bond_set_live(sdev, bond, true);
		atomic_inc(&sdev->live_bonds);
		atomic64_inc(&sdev->stats.binds);
		new_bond = true;
	}
	bond->users++;
	mutex_unlock(&smm->lock);

	fb->bond = bond;
	list_add_tail(&fb->node, &sfile->bonds);
	if (new_bond)
		dev_dbg(sdev->dev, "bound ep %u pasid %u domain %u\n",
			arg->endpoint, smm->pasid, smm->domain);
	ret = 0;
	goto out_fill;

out_unlock_mm:
	mutex_unlock(&smm->lock);
	if (list_empty(&smm->bonds))
		sva_mm_destroy(sdev, smm);
out_free_fb:
	kfree(fb);
	goto out_unlock;
out_fill:
	arg->pasid = smm->pasid;
	arg->domain = smm->domain;
	arg->addr_width = sva_addr_width();
out_unlock:
	mutex_unlock(&sdev->lock);
	return ret;
}

static int sva_unbind(struct sva_file *sfile, struct viommu_sva_bind *arg)
{
	struct sva_dev *sdev = sfile->sdev;
	struct sva_fbond *fb;
	int ret = -ENOENT;

	mutex_lock(&sdev->lock);
	fb = sva_file_find(sfile, current->mm, arg->endpoint);
	if (fb) {
		list_del(&fb->node);
		sva_bond_put(sdev, fb->bond);
		kfree(fb);
		ret = 0;
	}
	mutex_unlock(&sdev->lock);
	return ret;
}

/* Release everything a file holds.  sdev->lock held. */
static void sva_file_release_locked(struct sva_file *sfile)
{
	struct sva_dev *sdev = sfile->sdev;
	struct sva_fbond *fb, *next;
	unsigned long pasid;
	void *entry;

	list_for_each_entry_safe(fb, next, &sfile->bonds, node) {
		list_del(&fb->node);
		sva_bond_put(sdev, fb->bond);
		kfree(fb);
	}
	xa_for_each(&sfile->pasids, pasid, entry) {
		xa_erase(&sfile->pasids, pasid);
		sva_pasid_free(sdev, pasid);
		atomic_dec(&sdev->raw_pasids);
	}
}

/* ------------------------------------------------ page requests ------ */

/* The bound mm of (endpoint, PASID), with a reference */
static struct sva_mm *sva_lookup(struct sva_dev *sdev, u32 endpoint, u32 pasid)
{
	struct sva_mm *smm = NULL;
	struct sva_bond *bond;

	spin_lock(&sdev->bind_lock);
	list_for_each_entry(bond, &sdev->live, live_node) {
		if (bond->endpoint == endpoint && bond->smm->pasid == pasid) {
			smm = bond->smm;
			kref_get(&smm->ref);
			break;
		}
	}
	spin_unlock(&sdev->bind_lock);
	return smm;
}

/* Fault one page in, as iommu_sva_handle_iopf() does */
static u8 sva_fault_page(struct sva_dev *sdev, u32 flags, u32 endpoint,
			 u32 pasid, u64 addr)
{
	unsigned int fault_flags = FAULT_FLAG_USER | FAULT_FLAG_REMOTE;
	u8 code = VIRTIO_IOMMU_PAGE_RESP_INVALID;
	unsigned long access = 0;
	struct vm_area_struct *vma;
	struct mm_struct *mm;
	struct sva_mm *smm;
	vm_fault_t ret;

	if (!(flags & VIRTIO_IOMMU_FAULT_F_PASID) ||
	    !(flags & VIRTIO_IOMMU_FAULT_F_ADDRESS))
		return code;
	/* Bindings are user-only (fl_flags without SRE) */
	if (flags & VIRTIO_IOMMU_FAULT_F_PRIVILEGED)
		return code;

	smm = sva_lookup(sdev, endpoint, pasid);
	if (!smm)
		return code;
	if (READ_ONCE(smm->dead))
		goto out_put;
	mm = smm->mm;
	if (!mmget_not_zero(mm))
		goto out_put;

	mmap_read_lock(mm);
	vma = vma_lookup(mm, addr);
	if (!vma)
		goto out_unlock;	/* unmapped */

	if (flags & VIRTIO_IOMMU_FAULT_F_READ)
		access |= VM_READ;
	if (flags & VIRTIO_IOMMU_FAULT_F_WRITE) {
		access |= VM_WRITE;
		fault_flags |= FAULT_FLAG_WRITE;
	}
	if (flags & VIRTIO_IOMMU_FAULT_F_EXEC) {
		access |= VM_EXEC;
		fault_flags |= FAULT_FLAG_INSTRUCTION;
	}
	if (access & ~vma->vm_flags)
		goto out_unlock;	/* access fault */

	ret = handle_mm_fault(vma, addr, fault_flags, NULL);
	if (!(ret & VM_FAULT_ERROR))
		code = VIRTIO_IOMMU_PAGE_RESP_SUCCESS;

out_unlock:
	mmap_read_unlock(mm);
	mmput(mm);
out_put:
	sva_mm_put(smm);
	return code;
}

/* Remember that a page of a group failed; true if it was remembered */
static bool sva_group_fail(struct sva_dev *sdev, u32 endpoint, u32 pasid,
			   u16 group)
{
	struct sva_failed_group *g, *free = NULL;
	int i;

	spin_lock(&sdev->grp_lock);
	for (i = 0; i < SVA_MAX_FAILED_GROUPS; i++) {
		g = &sdev->failed[i];
		if (!g->used) {
			free = free ?: g;
		} else if (g->endpoint == endpoint && g->pasid == pasid &&
			   g->group == group) {
			spin_unlock(&sdev->grp_lock);
			return true;
		}
	}
	if (free)
		*free = (struct sva_failed_group){ endpoint, pasid, group, true };
	spin_unlock(&sdev->grp_lock);
	return free;
}

/* Whether a page of the group failed; forgets the group */
static bool sva_group_take(struct sva_dev *sdev, u32 endpoint, u32 pasid,
			   u16 group)
{
	bool failed = false;
	int i;

	spin_lock(&sdev->grp_lock);
	for (i = 0; i < SVA_MAX_FAILED_GROUPS; i++) {
		struct sva_failed_group *g = &sdev->failed[i];

		if (g->used && g->endpoint == endpoint && g->pasid == pasid &&
		    g->group == group) {
			g->used = false;
			failed = true;
			break;
		}
	}
	spin_unlock(&sdev->grp_lock);
	return failed;
}

static void sva_log_fault(struct sva_dev *sdev,
			  const struct virtio_iommu_fault_ext *evt, u32 len)
{
	static const char * const reasons[] = { "unknown", "domain", "page" };
	u32 flags = le32_to_cpu(evt->flags);
	const char *reason = evt->reason < ARRAY_SIZE(reasons) ?
			     reasons[evt->reason] : "unknown";

	atomic64_inc(&sdev->stats.faults);
	dev_err_ratelimited(sdev->dev,
			    "%s fault from EP %u pasid %d at %#llx [%s%s%s%s]\n",
			    reason, le32_to_cpu(evt->endpoint),
			    len >= SVA_FAULT_EXT_SIZE &&
			    (flags & VIRTIO_IOMMU_FAULT_F_PASID) ?
			    (int)le32_to_cpu(evt->pasid) : -1,
			    flags & VIRTIO_IOMMU_FAULT_F_ADDRESS ?
			    le64_to_cpu(evt->address) : 0ULL,
			    flags & VIRTIO_IOMMU_FAULT_F_READ ? "R" : "",
			    flags & VIRTIO_IOMMU_FAULT_F_WRITE ? "W" : "",
			    flags & VIRTIO_IOMMU_FAULT_F_EXEC ? "X" : "",
			    flags & VIRTIO_IOMMU_FAULT_F_PRIVILEGED ? "P" : "");
}

static void sva_handle_event(struct sva_dev *sdev, struct sva_prq_entry *ent)
{
	const struct virtio_iommu_fault_ext *evt = (void *)ent->rec;
	u32 flags, endpoint, pasid;
	bool last, pasid_valid;
	u16 group;
	u64 addr;
	u8 code;

	if (ent->len < SVA_FAULT_BASE_SIZE ||
	    evt->reserved[0] || evt->reserved[1] || evt->reserved[2]) {
		atomic64_inc(&sdev->stats.bad_events);
		dev_warn_ratelimited(sdev->dev,
				     "invalid event record (%u bytes)\n",
				     ent->len);
		return;
	}
	flags = le32_to_cpu(evt->flags);
	if (!(flags & VIRTIO_IOMMU_FAULT_F_PAGE_REQ)) {
		sva_log_fault(sdev, evt, ent->len);
		return;
	}
	if (ent->len < SVA_FAULT_EXT_SIZE ||
	    !sva_has(sdev, VIRTIO_IOMMU_F_PAGE_REQUEST)) {
		/* Cannot be answered: no group, or not negotiated */
		atomic64_inc(&sdev->stats.bad_events);
		dev_warn_ratelimited(sdev->dev,
				     "page request in a %u-byte record dropped\n",
				     ent->len);
		return;
	}

	endpoint = le32_to_cpu(evt->endpoint);
	pasid_valid = flags & VIRTIO_IOMMU_FAULT_F_PASID;
	pasid = pasid_valid ? le32_to_cpu(evt->pasid) : 0;
	addr = le64_to_cpu(evt->address);
	group = le16_to_cpu(evt->group_id);
	last = flags & VIRTIO_IOMMU_FAULT_F_LAST;
	atomic64_inc(&sdev->stats.page_requests);

	/* Stop marker: the device is done with the PASID, nothing to answer */
	if (last && !(flags & (VIRTIO_IOMMU_FAULT_F_READ |
			       VIRTIO_IOMMU_FAULT_F_WRITE))) {
		atomic64_inc(&sdev->stats.stop_markers);
		sva_group_take(sdev, endpoint, pasid, group);
		return;
	}

	code = sva_fault_page(sdev, flags, endpoint, pasid, addr);
	if (!last) {
		if (code != VIRTIO_IOMMU_PAGE_RESP_SUCCESS &&
		    !sva_group_fail(sdev, endpoint, pasid, group))
			dev_warn_ratelimited(sdev->dev,
					     "too many failed groups pending\n");
		return;
	}
	atomic64_inc(&sdev->stats.page_groups);
	if (sva_group_take(sdev, endpoint, pasid, group))
		code = VIRTIO_IOMMU_PAGE_RESP_INVALID;
	sva_page_resp(sdev, endpoint, pasid, pasid_valid, group, code,
		      ent->t0);
}

static void sva_prq_work(struct work_struct *work)
{
	struct sva_dev *sdev = container_of(work, struct sva_dev, prq_work);
	struct sva_prq_entry ent;
	unsigned long flags;

	for (;;) {
		spin_lock_irqsave(&sdev->prq_lock, flags);
		if (!sdev->prq_count) {
			spin_unlock_irqrestore(&sdev->prq_lock, flags);
			return;
		}
		ent = sdev->prq[sdev->prq_head];
		sdev->prq_head = (sdev->prq_head + 1) % sdev->prq_size;
		sdev->prq_count--;
		spin_unlock_irqrestore(&sdev->prq_lock, flags);

		if (READ_ONCE(prq_hold_ms))
			msleep(READ_ONCE(prq_hold_ms));
		sva_handle_event(sdev, &ent);
		cond_resched();
	}
}

/* Event queue callback (interrupt context): queue records, re-post buffers */
static void sva_event_vq_done(struct virtqueue *vq)
{
	struct sva_dev *sdev = vq->vdev->priv;
	struct scatterlist sg;
	unsigned int len;
	bool queued = false;
	void *buf;
	u64 now = ktime_get_ns();

	if (!sdev)
		return;

	while ((buf = virtqueue_get_buf(vq, &len))) {
		spin_lock(&sdev->prq_lock);
		if (len > SVA_EVT_BUF_SIZE) {
			atomic64_inc(&sdev->stats.bad_events);
			dev_warn_ratelimited(sdev->dev,
					     "invalid event buffer (len %u)\n",
					     len);
		} else if (sdev->prq_count == sdev->prq_size) {
			atomic64_inc(&sdev->stats.events_lost);
			dev_err_ratelimited(sdev->dev,
					    "page-request queue full: event lost\n");
		} else {
			struct sva_prq_entry *ent;

			ent = &sdev->prq[(sdev->prq_head + sdev->prq_count) %
					 sdev->prq_size];
			memset(ent->rec, 0, sizeof(ent->rec));
			memcpy(ent->rec, buf, min_t(u32, len, sizeof(ent->rec)));
			ent->len = len;
			ent->t0 = now;
			sdev->prq_count++;
			queued = true;
		}
		spin_unlock(&sdev->prq_lock);

		sg_init_one(&sg, buf, SVA_EVT_BUF_SIZE);
		if (virtqueue_add_inbuf(vq, &sg, 1, buf, GFP_ATOMIC))
			dev_err_ratelimited(sdev->dev,
					    "could not re-post an event buffer\n");
	}
	virtqueue_kick(vq);
	if (queued)
		queue_work(sdev->wq, &sdev->prq_work);
}

/* ------------------------------------------------- DMA test device ---- */

static struct sva_dmadev *sva_dmadev_get(u32 endpoint)
{
	struct sva_dmadev *dd;

	lockdep_assert_held(&sva_dmadevs_lock);
	list_for_each_entry(dd, &sva_dmadevs, node)
		if (dd->endpoint == endpoint)
			return dd;
	return NULL;
}

static void sva_dmadev_read(struct sva_dmadev *dd,
			    struct viommu_sva_submit *op)
{
	op->status = readl(dd->regs + DMADEV_STATUS);
	op->fault_info = readl(dd->regs + DMADEV_FAULT_INFO);
	op->result = readq(dd->regs + DMADEV_RESULT);
	op->fault_addr = readq(dd->regs + DMADEV_FAULT_ADDR);
	op->done_bytes = readq(dd->regs + DMADEV_DONE_BYTES);
}

/* Poll until the device leaves BUSY.  dd->lock held. */
static int sva_dmadev_poll(struct sva_dmadev *dd, struct viommu_sva_submit *op,
			   ktime_t t0)
{
	unsigned int ms = op->timeout_ms ?: dma_timeout_ms;
	ktime_t deadline = ktime_add_ms(t0, ms);
	unsigned long delay_us = 20;
	u32 status;

	for (;;) {
		status = readl(dd->regs + DMADEV_STATUS);
		if (status != VIOMMU_SVA_ST_BUSY &&
		    status != VIOMMU_SVA_ST_IDLE)
			break;
		if (!dd->inflight && status == VIOMMU_SVA_ST_IDLE)
			break;
		if (ktime_after(ktime_get(), deadline))
			return -ETIMEDOUT;
		if (fatal_signal_pending(current))
			return -EINTR;
		/* Short operations answer in microseconds, long ones take seconds */
		usleep_range(delay_us, 2 * delay_us);
		delay_us = min(2 * delay_us, 1000UL);
	}
	dd->inflight = false;
	sva_dmadev_read(dd, op);
	op->elapsed_ns = ktime_to_ns(ktime_sub(ktime_get(), t0));
	return 0;
}

static int sva_submit(struct sva_file *sfile, struct viommu_sva_submit *op,
		      bool submit)
{
	struct sva_dev *sdev = sfile->sdev;
	struct sva_dmadev *dd;
	struct sva_fbond *fb;
	ktime_t t0 = ktime_get();
	u32 pasid = 0;
	int ret;

	if (submit) {
		if (op->op < VIOMMU_SVA_OP_COPY ||
		    op->op > VIOMMU_SVA_OP_CHECKSUM ||
		    op->flags & ~VIOMMU_SVA_SUBMIT_NOWAIT)
			return -EINVAL;

		/* The device only ever gets the caller's own PASID */
		mutex_lock(&sdev->lock);
		fb = sva_file_find(sfile, current->mm, op->endpoint);
		if (fb && fb->bond->attached && !fb->bond->smm->dead)
			pasid = fb->bond->smm->pasid;
		mutex_unlock(&sdev->lock);
		if (!pasid)
			return -ENOTCONN;
	}

	mutex_lock(&sva_dmadevs_lock);
	dd = sva_dmadev_get(op->endpoint);
	if (!dd) {
		mutex_unlock(&sva_dmadevs_lock);
		return -ENODEV;
	}
	mutex_lock(&dd->lock);
	mutex_unlock(&sva_dmadevs_lock);

	if (!submit) {
		ret = sva_dmadev_poll(dd, op, t0);
		goto out;
	}

	ret = -EOPNOTSUPP;
	if (!(dd->caps & DMADEV_CAP_PASID) || !(dd->caps & BIT(op->op - 1)))
		goto out;
	ret = -EBUSY;
	if (readl(dd->regs + DMADEV_STATUS) == VIOMMU_SVA_ST_BUSY)
		goto out;

	writeq(op->src, dd->regs + DMADEV_SRC);
	writeq(op->dst, dd->regs + DMADEV_DST);
	writeq(op->len, dd->regs + DMADEV_LEN);
	writeq(op->pattern, dd->regs + DMADEV_PATTERN);
	writel(pasid & DMADEV_PASID_MASK, dd->regs + DMADEV_PASID);
	writel(op->op | DMADEV_CMD_USE_PASID, dd->regs + DMADEV_CMD);
	dd->inflight = true;
	dd->inflight_pasid = pasid;

	if (op->flags & VIOMMU_SVA_SUBMIT_NOWAIT) {
		sva_dmadev_read(dd, op);
		ret = 0;
	} else {
		ret = sva_dmadev_poll(dd, op, t0);
	}
out:
	mutex_unlock(&dd->lock);
	return ret;
}

static int sva_dmadev_probe(struct pci_dev *pdev,
			    const struct pci_device_id *id)
{
	struct sva_dmadev *dd;
	u32 ident;
	int ret;

	ret = pci_enable_device(pdev);
	if (ret)
		return ret;
	ret = -ENODEV;
	if (pci_resource_len(pdev, 0) < DMADEV_BAR_SIZE)
		goto err_disable;
	ret = pci_request_region(pdev, 0, KBUILD_MODNAME);
	if (ret)
		goto err_disable;

	dd = devm_kzalloc(&pdev->dev, sizeof(*dd), GFP_KERNEL);
	if (!dd) {
		ret = -ENOMEM;
		goto err_release;
	}
	dd->regs = pci_iomap(pdev, 0, DMADEV_BAR_SIZE);
	if (!dd->regs) {
		ret = -ENOMEM;
		goto err_release;
	}
	ident = readl(dd->regs + DMADEV_ID);
	if (ident != SVA_DMADEV_ID_VALUE) {
		dev_err(&pdev->dev, "unexpected ID register %#x\n", ident);
		ret = -ENODEV;
		goto err_unmap;
	}
	pci_set_master(pdev);
	mutex_init(&dd->lock);
	dd->pdev = pdev;
	dd->caps = readl(dd->regs + DMADEV_CAPS);
	/* Endpoint ID = requester ID, as in QEMU's and the daemon's VIOT */
	dd->endpoint = pci_dev_id(pdev);
	pci_set_drvdata(pdev, dd);

	mutex_lock(&sva_dmadevs_lock);
	list_add_tail(&dd->node, &sva_dmadevs);
	mutex_unlock(&sva_dmadevs_lock);
	dev_info(&pdev->dev, "DMA test device v%u, caps %#x, endpoint %#x\n",
		 readl(dd->regs + DMADEV_VERSION), dd->caps, dd->endpoint);
	return 0;

err_unmap:
	pci_iounmap(pdev, dd->regs);
err_release:
	pci_release_region(pdev, 0);
err_disable:
	pci_disable_device(pdev);
	return ret;
}

static void sva_dmadev_remove(struct pci_dev *pdev)
{
	struct sva_dmadev *dd = pci_get_drvdata(pdev);

	/*
	 * Whoever found @dd in the list holds dd->lock already (it is taken
	 * before the list lock is dropped): wait for them, then nobody can.
	 */
	mutex_lock(&sva_dmadevs_lock);
	list_del(&dd->node);
	mutex_lock(&dd->lock);
	mutex_unlock(&sva_dmadevs_lock);
	pci_clear_master(pdev);
	pci_iounmap(pdev, dd->regs);
	dd->regs = NULL;
	mutex_unlock(&dd->lock);
	pci_release_region(pdev, 0);
	pci_disable_device(pdev);
}

static const struct pci_device_id sva_dmadev_ids[] = {
	{ PCI_DEVICE(SVA_DMADEV_VENDOR, SVA_DMADEV_DEVICE) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, sva_dmadev_ids);

static struct pci_driver sva_dmadev_driver = {
	.name		= "viommu_sva_dma",
	.id_table	= sva_dmadev_ids,
	.probe		= sva_dmadev_probe,
	.remove		= sva_dmadev_remove,
};

/* ------------------------------------------------- character device --- */

static int sva_open(struct inode *inode, struct file *file)
{
	struct miscdevice *misc = file->private_data;
	struct sva_dev *sdev = container_of(misc, struct sva_dev, misc);
	struct sva_file *sfile;

	sfile = kzalloc(sizeof(*sfile), GFP_KERNEL);
	if (!sfile)
		return -ENOMEM;
	INIT_LIST_HEAD(&sfile->bonds);
	xa_init(&sfile->pasids);

	mutex_lock(&sdev->lock);
	if (sdev->removed) {
		mutex_unlock(&sdev->lock);
		kfree(sfile);
		return -ENODEV;
	}
	kref_get(&sdev->ref);
	sfile->sdev = sdev;
	list_add_tail(&sfile->node, &sdev->files);
	mutex_unlock(&sdev->lock);

	file->private_data = sfile;
	return nonseekable_open(inode, file);
}

static int sva_release(struct inode *inode, struct file *file)
{
	struct sva_file *sfile = file->private_data;
	struct sva_dev *sdev = sfile->sdev;

	mutex_lock(&sdev->lock);
	if (!sdev->removed)
		sva_file_release_locked(sfile);
	list_del(&sfile->node);
	mutex_unlock(&sdev->lock);
	xa_destroy(&sfile->pasids);
	kfree(sfile);
	sva_dev_put(sdev);
	return 0;
}

static void sva_fill_info(struct sva_dev *sdev, struct viommu_sva_info *info)
{
	memset(info, 0, sizeof(*info));
	info->features = sdev->vdev->features;
	info->flags = (READ_ONCE(sdev->broken) ? VIOMMU_SVA_INFO_BROKEN : 0) |
		      (sva_can_bind(sdev) ? VIOMMU_SVA_INFO_CAN_BIND : 0);
	info->domain_start = sdev->first_domain;
	info->domain_end = sdev->last_domain;
	info->probe_size = sdev->probe_size;
	info->evt_bufs = sdev->nr_evts;
	info->evt_buf_size = SVA_EVT_BUF_SIZE;
	info->req_vq_size = virtqueue_get_vring_size(sdev->req_vq);
}

static void sva_fill_stats(struct sva_dev *sdev, struct viommu_sva_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->page_requests = atomic64_read(&sdev->stats.page_requests);
	st->stop_markers = atomic64_read(&sdev->stats.stop_markers);
	st->page_groups = atomic64_read(&sdev->stats.page_groups);
	st->resp_success = atomic64_read(&sdev->stats.resp[0]);
	st->resp_invalid = atomic64_read(&sdev->stats.resp[1]);
	st->resp_failure = atomic64_read(&sdev->stats.resp[2]);
	st->resp_stale = atomic64_read(&sdev->stats.resp_stale);
	st->resp_errors = atomic64_read(&sdev->stats.resp_errors);
	st->faults = atomic64_read(&sdev->stats.faults);
	st->bad_events = atomic64_read(&sdev->stats.bad_events);
	st->events_lost = atomic64_read(&sdev->stats.events_lost);
	st->invalidations = atomic64_read(&sdev->stats.invalidations);
	st->inval_errors = atomic64_read(&sdev->stats.inval_errors);
	st->binds = atomic64_read(&sdev->stats.binds);
	st->unbinds = atomic64_read(&sdev->stats.unbinds);
	st->mm_releases = atomic64_read(&sdev->stats.mm_releases);
	st->pasid_allocs = atomic64_read(&sdev->stats.pasid_allocs);
	st->pasid_frees = atomic64_read(&sdev->stats.pasid_frees);
	st->live_bonds = atomic_read(&sdev->live_bonds);
	st->live_mms = atomic_read(&sdev->live_mms);
	st->raw_pasids = atomic_read(&sdev->raw_pasids);
}

static int sva_latency(struct sva_dev *sdev, struct viommu_sva_latency *arg)
{
	unsigned int n, first, i;
	unsigned long flags;
	u32 *copy;
	int ret = 0;

	n = min_t(u32, arg->max, SVA_LAT_SAMPLES);
	copy = kvmalloc_array(max(n, 1U), sizeof(*copy), GFP_KERNEL);
	if (!copy)
		return -ENOMEM;

	spin_lock_irqsave(&sdev->lat_lock, flags);
	n = min(n, sdev->lat_count);
	first = (sdev->lat_next + SVA_LAT_SAMPLES - sdev->lat_count) %
		SVA_LAT_SAMPLES;
	for (i = 0; i < n; i++)
		copy[i] = sdev->lat[(first + i) % SVA_LAT_SAMPLES];
	if (arg->reset) {
		sdev->lat_count = 0;
		sdev->lat_next = 0;
	}
	spin_unlock_irqrestore(&sdev->lat_lock, flags);

	arg->count = n;
	if (n && copy_to_user(u64_to_user_ptr(arg->samples), copy,
			      n * sizeof(*copy)))
		ret = -EFAULT;
	kvfree(copy);
	return ret;
}

static int sva_ioctl_pasid(struct sva_file *sfile, unsigned int cmd,
			   struct viommu_sva_pasid *arg)
{
	struct sva_dev *sdev = sfile->sdev;
	int ret;

	mutex_lock(&sdev->lock);
	if (sdev->removed) {
		ret = -ENODEV;
	} else if (cmd == VIOMMU_SVA_IOC_PASID_ALLOC) {
		u32 min = arg->min ?: 1;
		u32 max = arg->max ?: (1U << SVA_PASID_BITS_MAX) - 1;

		ret = sva_pasid_alloc(sdev, min, max, &arg->pasid);
		if (!ret) {
			ret = xa_err(xa_store(&sfile->pasids, arg->pasid,
					      xa_mk_value(1), GFP_KERNEL));
			if (ret)
				sva_pasid_free(sdev, arg->pasid);
			else
				atomic_inc(&sdev->raw_pasids);
		}
	} else if (!xa_load(&sfile->pasids, arg->pasid)) {
		/* Only PASIDs this file allocated, never a bound one */
		ret = -ENOENT;
	} else {
		ret = sva_pasid_free(sdev, arg->pasid);
		/* Freed or not, the device no longer lets us use it */
		xa_erase(&sfile->pasids, arg->pasid);
		atomic_dec(&sdev->raw_pasids);
	}
	mutex_unlock(&sdev->lock);
	return ret;
}

static long sva_ioctl(struct file *file, unsigned int cmd, unsigned long uarg)
{
	struct sva_file *sfile = file->private_data;
	struct sva_dev *sdev = sfile->sdev;
	void __user *argp = (void __user *)uarg;
	union {
		struct viommu_sva_info info;
		struct viommu_sva_bind bind;
		struct viommu_sva_ep_info ep;
		struct viommu_sva_pasid pasid;
		struct viommu_sva_submit submit;
		struct viommu_sva_stats stats;
		struct viommu_sva_latency lat;
	} arg;
	unsigned int size = _IOC_SIZE(cmd);
	struct sva_ep *ep;
	int ret;

	if (_IOC_TYPE(cmd) != VIOMMU_SVA_MAGIC || size > sizeof(arg))
		return -ENOTTY;
	if ((_IOC_DIR(cmd) & _IOC_WRITE) && copy_from_user(&arg, argp, size))
		return -EFAULT;
	if (READ_ONCE(sdev->removed))
		return -ENODEV;

	switch (cmd) {
	case VIOMMU_SVA_IOC_INFO:
		mutex_lock(&sdev->lock);
		ret = sdev->removed ? -ENODEV : 0;
		if (!ret)
			sva_fill_info(sdev, &arg.info);
		mutex_unlock(&sdev->lock);
		break;
	case VIOMMU_SVA_IOC_BIND:
		ret = sva_bind(sfile, &arg.bind);
		break;
	case VIOMMU_SVA_IOC_UNBIND:
		ret = sva_unbind(sfile, &arg.bind);
		break;
	case VIOMMU_SVA_IOC_PROBE_EP:
		mutex_lock(&sdev->lock);
		ep = sdev->removed ? ERR_PTR(-ENODEV) :
		     sva_probe_ep(sdev, arg.ep.endpoint);
		ret = PTR_ERR_OR_ZERO(ep);
		if (!ret) {
			arg.ep = (struct viommu_sva_ep_info){
				.endpoint	= ep->endpoint,
				.flags		= ep->flags,
				.pasid_bits	= ep->pasid_bits,
				.output_bits	= ep->output_bits,
				.pgtf		= ep->pgtf,
				.pr_flags	= ep->pr_flags,
				.pr_max_groups	= ep->pr_max_groups,
				.nr_resv_mem	= ep->nr_resv_mem,
				.vtd_cap	= ep->vtd_cap,
				.vtd_ecap	= ep->vtd_ecap,
			};
		}
		mutex_unlock(&sdev->lock);
		break;
	case VIOMMU_SVA_IOC_PASID_ALLOC:
	case VIOMMU_SVA_IOC_PASID_FREE:
		ret = sva_ioctl_pasid(sfile, cmd, &arg.pasid);
		break;
	case VIOMMU_SVA_IOC_SUBMIT:
	case VIOMMU_SVA_IOC_WAIT:
		ret = sva_submit(sfile, &arg.submit,
				 cmd == VIOMMU_SVA_IOC_SUBMIT);
		break;
	case VIOMMU_SVA_IOC_STATS:
		sva_fill_stats(sdev, &arg.stats);
		ret = 0;
		break;
	case VIOMMU_SVA_IOC_LATENCY:
		ret = sva_latency(sdev, &arg.lat);
		break;
	default:
		return -ENOTTY;
	}

	if (!ret && (_IOC_DIR(cmd) & _IOC_READ) &&
	    copy_to_user(argp, &arg, size))
		ret = -EFAULT;
	return ret;
}

static const struct file_operations sva_fops = {
	.owner		= THIS_MODULE,
	.open		= sva_open,
	.release	= sva_release,
	.unlocked_ioctl	= sva_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
};

/* ---------------------------------------------------- virtio driver --- */

static int sva_init_vqs(struct sva_dev *sdev)
{
	struct virtqueue *vqs[2];
	int ret;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	struct virtqueue_info vqs_info[] = {
		{ "request", sva_req_vq_done },
		{ "event", sva_event_vq_done },
	};

	ret = virtio_find_vqs(sdev->vdev, 2, vqs, vqs_info, NULL);
#else
	vq_callback_t *callbacks[] = { sva_req_vq_done, sva_event_vq_done };
	const char * const names[] = { "request", "event" };

	ret = virtio_find_vqs(sdev->vdev, 2, vqs, callbacks, names, NULL);
#endif
	if (ret)
		return ret;
	sdev->req_vq = vqs[0];
	sdev->evt_vq = vqs[1];
	return 0;
}

static int sva_fill_evtq(struct sva_dev *sdev)
{
	struct virtqueue *vq = sdev->evt_vq;
	struct scatterlist sg;
	unsigned int i;
	int ret;

	sdev->nr_evts = vq->num_free;
	sdev->evts = kcalloc(sdev->nr_evts, SVA_EVT_BUF_SIZE, GFP_KERNEL);
	if (!sdev->evts)
		return -ENOMEM;
	for (i = 0; i < sdev->nr_evts; i++) {
		void *buf = sdev->evts + i * SVA_EVT_BUF_SIZE;

		sg_init_one(&sg, buf, SVA_EVT_BUF_SIZE);
		ret = virtqueue_add_inbuf(vq, &sg, 1, buf, GFP_KERNEL);
		if (ret)
			return ret;
	}
	virtqueue_kick(vq);
	return 0;
}

/* F_PAGE_REQUEST requires F_ATTACH_TABLE (reference section 2.12) */
static int sva_validate(struct virtio_device *vdev)
{
	if (!virtio_has_feature(vdev, VIRTIO_IOMMU_F_ATTACH_TABLE))
		__virtio_clear_bit(vdev, VIRTIO_IOMMU_F_PAGE_REQUEST);
	return 0;
}

static int sva_probe(struct virtio_device *vdev)
{
	struct sva_dev *sdev;
	int ret;

	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_attach_table_vtd) != 84);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_req_attach_table_vtd, pgd) != 24);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_req_attach_table_vtd, addr_width) != 40);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_invalidate) != 64);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_req_invalidate, domain) != 12);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_req_invalidate, virt_start) != 32);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_req_invalidate, granule) != 48);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_page_resp) != 32);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_req_page_resp, group_id) != 16);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_detach_table) != 32);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_pasid_alloc) != 32);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_pasid_free) != 24);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_req_probe) != 72);
	BUILD_BUG_ON(sizeof(struct virtio_iommu_fault_ext) != 48);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_fault_ext, group_id) != 24);
	BUILD_BUG_ON(offsetof(struct virtio_iommu_fault_ext, private_data) != 32);
	BUILD_BUG_ON(sizeof(struct sva_req) +
		     sizeof(struct virtio_iommu_req_attach_table_vtd) >
		     SVA_SMALL_REQ);

	if (!virtio_has_feature(vdev, VIRTIO_F_VERSION_1)) {
		dev_err(&vdev->dev, "device is not VERSION_1\n");
		return -ENODEV;
	}

	sdev = kzalloc(sizeof(*sdev), GFP_KERNEL);
	if (!sdev)
		return -ENOMEM;
	kref_init(&sdev->ref);
	sdev->vdev = vdev;
	sdev->dev = &vdev->dev;
	spin_lock_init(&sdev->vq_lock);
	spin_lock_init(&sdev->bind_lock);
	spin_lock_init(&sdev->prq_lock);
	spin_lock_init(&sdev->grp_lock);
	spin_lock_init(&sdev->lat_lock);
	mutex_init(&sdev->lock);
	INIT_LIST_HEAD(&sdev->mms);
	INIT_LIST_HEAD(&sdev->files);
	INIT_LIST_HEAD(&sdev->live);
	xa_init(&sdev->eps);
	xa_init_flags(&sdev->domain_ids, XA_FLAGS_ALLOC);
	INIT_WORK(&sdev->prq_work, sva_prq_work);

	ret = ida_alloc(&sva_index_ida, GFP_KERNEL);
	if (ret < 0) {
		kfree(sdev);
		return ret;
	}
	sdev->index = ret;

	ret = -ENOMEM;
	sdev->req_pool = mempool_create_kmalloc_pool(SVA_MIN_SMALL_REQS,
						     SVA_SMALL_REQ);
	sdev->lat = kvcalloc(SVA_LAT_SAMPLES, sizeof(u32), GFP_KERNEL);
	if (!sdev->req_pool || !sdev->lat)
		goto err_put;
	sdev->wq = alloc_ordered_workqueue("viommu-sva%d", WQ_MEM_RECLAIM,
					   sdev->index);
	if (!sdev->wq)
		goto err_put;

	sdev->last_domain = ~0U;
	virtio_cread_le_feature(vdev, VIRTIO_IOMMU_F_DOMAIN_RANGE,
				struct sva_config, domain_start,
				&sdev->first_domain);
	virtio_cread_le_feature(vdev, VIRTIO_IOMMU_F_DOMAIN_RANGE,
				struct sva_config, domain_end,
				&sdev->last_domain);
	virtio_cread_le_feature(vdev, VIRTIO_IOMMU_F_PROBE,
				struct sva_config, probe_size,
				&sdev->probe_size);
	if (sdev->first_domain > sdev->last_domain) {
		dev_err(&vdev->dev, "empty domain range [%u, %u]\n",
			sdev->first_domain, sdev->last_domain);
		ret = -EINVAL;
		goto err_wq;
	}
	if (sdev->probe_size > SVA_MAX_PROBE_SIZE) {
		dev_warn(&vdev->dev, "probe_size %u too large: PROBE unused\n",
			 sdev->probe_size);
		sdev->probe_size = 0;
	}

	ret = sva_init_vqs(sdev);
	if (ret)
		goto err_wq;
	sdev->prq_size = max(4 * sdev->evt_vq->num_free, 512U);
	sdev->prq = kcalloc(sdev->prq_size, sizeof(*sdev->prq), GFP_KERNEL);
	if (!sdev->prq) {
		ret = -ENOMEM;
		goto err_vqs;
	}

	vdev->priv = sdev;
	virtio_device_ready(vdev);
	ret = sva_fill_evtq(sdev);
	if (ret)
		goto err_reset;

	if (sdev->index)
		snprintf(sdev->name, sizeof(sdev->name), "viommu-sva%d",
			 sdev->index);
	else
		strscpy(sdev->name, "viommu-sva", sizeof(sdev->name));
	sdev->misc.minor = MISC_DYNAMIC_MINOR;
	sdev->misc.name = sdev->name;
	sdev->misc.fops = &sva_fops;
	sdev->misc.parent = &vdev->dev;
	ret = misc_register(&sdev->misc);
	if (ret)
		goto err_reset;
	sdev->misc_registered = true;

	dev_info(&vdev->dev,
		 "/dev/%s: features %#llx (ATTACH_TABLE %s, PAGE_REQUEST %s, PASID_ALLOC %s), domains [%u, %u], probe_size %u, %u event buffers\n",
		 sdev->name, vdev->features,
		 sva_has(sdev, VIRTIO_IOMMU_F_ATTACH_TABLE) ? "yes" : "no",
		 sva_has(sdev, VIRTIO_IOMMU_F_PAGE_REQUEST) ? "yes" : "no",
		 sva_has(sdev, VIRTIO_IOMMU_F_PASID_ALLOC) ? "yes" : "no",
		 sdev->first_domain, sdev->last_domain, sdev->probe_size,
		 sdev->nr_evts);
	if (!sva_can_bind(sdev))
		dev_info(&vdev->dev,
			 "SVA unavailable: BIND needs F_ATTACH_TABLE, F_PAGE_REQUEST, F_PASID_ALLOC and PROBE\n");
	return 0;

err_reset:
	virtio_reset_device(vdev);
	vdev->priv = NULL;
err_vqs:
	vdev->config->del_vqs(vdev);
err_wq:
	destroy_workqueue(sdev->wq);
err_put:
	sva_dev_put(sdev);
	return ret;
}

static void sva_remove(struct virtio_device *vdev)
{
	struct sva_dev *sdev = vdev->priv;
	struct sva_file *sfile, *next;
	unsigned long flags;
	struct sva_req *req;
	void *buf;

	if (sdev->misc_registered)
		misc_deregister(&sdev->misc);

	/* Unbind everything while the device still answers */
	mutex_lock(&sdev->lock);
	list_for_each_entry_safe(sfile, next, &sdev->files, node) {
		sva_file_release_locked(sfile);
		list_del_init(&sfile->node);
	}
	WRITE_ONCE(sdev->removed, true);
	mutex_unlock(&sdev->lock);

	/* Late page requests fail fast from here on, and touch no queue */
	sva_wait_async(sdev);
	spin_lock_irqsave(&sdev->vq_lock, flags);
	sdev->broken = true;
	spin_unlock_irqrestore(&sdev->vq_lock, flags);
	flush_workqueue(sdev->wq);
	virtio_reset_device(vdev);
	vdev->priv = NULL;
	destroy_workqueue(sdev->wq);

	/* Requests the device never returned */
	while ((req = virtqueue_detach_unused_buf(sdev->req_vq)))
		sva_req_free(req);
	while ((buf = virtqueue_detach_unused_buf(sdev->evt_vq)))
		;
	vdev->config->del_vqs(vdev);
	dev_info(&vdev->dev, "device removed\n");
	sva_dev_put(sdev);
}

static void sva_config_changed(struct virtio_device *vdev)
{
	dev_warn(&vdev->dev, "config changed\n");
}

static unsigned int sva_features[] = {
	VIRTIO_IOMMU_F_INPUT_RANGE,
	VIRTIO_IOMMU_F_DOMAIN_RANGE,
	VIRTIO_IOMMU_F_MAP_UNMAP,
	VIRTIO_IOMMU_F_PROBE,
	VIRTIO_IOMMU_F_ATTACH_TABLE,
	VIRTIO_IOMMU_F_PAGE_REQUEST,
	VIRTIO_IOMMU_F_PASID_ALLOC,
};

static const struct virtio_device_id sva_id_table[] = {
	{ VIRTIO_ID_IOMMU, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, sva_id_table);

static struct virtio_driver sva_virtio_driver = {
	.driver.name		= KBUILD_MODNAME,
	.id_table		= sva_id_table,
	.feature_table		= sva_features,
	.feature_table_size	= ARRAY_SIZE(sva_features),
	.validate		= sva_validate,
	.probe			= sva_probe,
	.remove			= sva_remove,
	.config_changed		= sva_config_changed,
};

static int __init sva_init(void)
{
	int ret;

	ret = pci_register_driver(&sva_dmadev_driver);
	if (ret)
		return ret;
	ret = register_virtio_driver(&sva_virtio_driver);
	if (ret)
		pci_unregister_driver(&sva_dmadev_driver);
	return ret;
}

static void __exit sva_exit(void)
{
	unregister_virtio_driver(&sva_virtio_driver);
	pci_unregister_driver(&sva_dmadev_driver);
}

module_init(sva_init);
module_exit(sva_exit);

MODULE_DESCRIPTION("SVA through a virtio-iommu with the vhost-device-iommu extension profile");
MODULE_AUTHOR("vhost-device-iommu developers");
/* GPL-only symbols: handle_mm_fault(), mmu_notifier_register(), ... */
MODULE_LICENSE("Dual BSD/GPL");
