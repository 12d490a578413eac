// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * sva-test: guest-side checks of the viommu_sva module (guest/sva/), built
 * statically by ci/provision.sh and run by ci/guest/sva-test.sh.
 *
 * Every check prints one "VDI-RESULT PASS|FAIL|SKIP <check> <detail>" line.
 *
 *   sva-test info                       negotiated features (sva-features)
 *   sva-test probe-ep EP                the endpoint's PROBE properties
 *   sva-test pasid [--hold FD]          PASID_ALLOC/PASID_FREE round trips;
 *                                       with --hold, prints the PASIDs held
 *                                       and waits for a line on FD first
 *   sva-test dmadev EP                  the DMA test device: bound by the
 *                                       module, idle, SUBMIT refused without
 *                                       a binding
 *   sva-test bind EP                    BIND: refused cleanly without
 *                                       F_ATTACH_TABLE, or bound (+UNBIND)
 *   sva-test sva EP [--ep2 EP2] [--fill-mib N] [--hold FD]
 *                                       the SVA checks of issue 14 through
 *                                       the DMA test device at endpoint EP
 *                                       (EP2: a second endpoint bound to
 *                                       the same mm); with --hold, in lock
 *                                       step with the host, which checks
 *                                       the daemon's side at each
 *                                       "VDI-WAIT <step> key=value..." line
 *                                       and answers on FD
 *   sva-test stall-probe EP --hold FD   a PROBE while the host has stopped
 *                                       the daemon: bounded wait
 *   sva-test broken EP --hold FD        an INVALIDATE the stopped daemon
 *                                       does not complete: device broken
 *   sva-test bench EP [--mib N] [--rounds N]
 *                                       fill throughput, resident and on
 *                                       demand, alternated; page-request
 *                                       handling time
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../guest/sva/viommu-sva.h"

#define DEV_PATH	"/dev/viommu-sva"
#define PAGE		4096UL
#define MIB		(1024UL * 1024)

static int nfail;

static void result(const char *verdict, const char *check, const char *fmt, ...)
{
	va_list ap;

	printf("VDI-RESULT %s %s ", verdict, check);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!strcmp(verdict, "FAIL"))
		nfail++;
}

#define PASS(c, ...)	result("PASS", c, __VA_ARGS__)
#define FAIL(c, ...)	result("FAIL", c, __VA_ARGS__)
#define SKIP(c, ...)	result("SKIP", c, __VA_ARGS__)

static int open_dev(void)
{
	int fd = open(DEV_PATH, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		fprintf(stderr, "sva-test: %s: %s\n", DEV_PATH, strerror(errno));
	return fd;
}

static int get_info(int fd, struct viommu_sva_info *info)
{
	memset(info, 0, sizeof(*info));
	return ioctl(fd, VIOMMU_SVA_IOC_INFO, info);
}

static int get_stats(int fd, struct viommu_sva_stats *st)
{
	memset(st, 0, sizeof(*st));
	return ioctl(fd, VIOMMU_SVA_IOC_STATS, st);
}

static int has(const struct viommu_sva_info *info, int bit)
{
	return !!(info->features & (1ULL << bit));
}

static uint64_t fnv1a(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t h = 0xcbf29ce484222325ULL;

	while (n--) {
		h ^= *b++;
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* Pages of [p, p + len) resident in memory */
static size_t resident(void *p, size_t len)
{
	size_t n = len / PAGE, i, r = 0;
	unsigned char *v = calloc(n, 1);

	if (!v || mincore(p, len, v)) {
		free(v);
		return (size_t)-1;
	}
	for (i = 0; i < n; i++)
		r += v[i] & 1;
	free(v);
	return r;
}

static uint64_t answered(const struct viommu_sva_stats *s)
{
	return s->resp_success + s->resp_invalid + s->resp_failure +
	       s->resp_stale + s->resp_errors;
}

/*
 * Counters after s0 once every page-request group raised since then (at
 * least @groups of them) has its PAGE_RESP completed: the device may act
 * on a response before the guest has seen its completion.  Waits 3 s at
 * most.
 */
static void settle(int fd, const struct viommu_sva_stats *s0,
		   struct viommu_sva_stats *s1, uint64_t groups)
{
	int i;

	for (i = 0; i < 300; i++) {
		get_stats(fd, s1);
		if (s1->page_groups - s0->page_groups >= groups &&
		    answered(s1) - answered(s0) >= s1->page_groups - s0->page_groups)
			return;
		usleep(10000);
	}
}

/* ------------------------------------------------------------ info --- */

static int cmd_info(void)
{
	struct viommu_sva_info info;
	int fd = open_dev();

	if (fd < 0) {
		FAIL("sva-features", "cannot open %s: %s", DEV_PATH, strerror(errno));
		return 1;
	}
	if (get_info(fd, &info)) {
		FAIL("sva-features", "INFO: %s", strerror(errno));
		return 1;
	}
	printf("VDI-INFO sva features=%#" PRIx64 " flags=%#x domains=[%u,%u] probe_size=%u evt_bufs=%u req_vq=%u\n",
	       (uint64_t)info.features, info.flags, info.domain_start,
	       info.domain_end, info.probe_size, info.evt_bufs,
	       info.req_vq_size);
	/* VERSION_1, and PASID_ALLOC: what today's daemon offers */
	if (!has(&info, 32) || !has(&info, VIOMMU_SVA_F_PASID_ALLOC) ||
	    !info.evt_bufs) {
		FAIL("sva-features", "features %#" PRIx64 " lack VERSION_1 or PASID_ALLOC, or no event buffers (%u)",
		     (uint64_t)info.features, info.evt_bufs);
		return 1;
	}
	PASS("sva-features", "features=%#" PRIx64 " VERSION_1 MAP_UNMAP=%d PROBE=%d ATTACH_TABLE=%d PAGE_REQUEST=%d PASID_ALLOC=%d can_bind=%d evt_bufs=%u",
	     (uint64_t)info.features, has(&info, VIOMMU_SVA_F_MAP_UNMAP),
	     has(&info, VIOMMU_SVA_F_PROBE),
	     has(&info, VIOMMU_SVA_F_ATTACH_TABLE),
	     has(&info, VIOMMU_SVA_F_PAGE_REQUEST),
	     has(&info, VIOMMU_SVA_F_PASID_ALLOC),
	     !!(info.flags & VIOMMU_SVA_INFO_CAN_BIND), info.evt_bufs);
	close(fd);
	return 0;
}

static int cmd_probe_ep(uint32_t ep)
{
	struct viommu_sva_ep_info e = { .endpoint = ep };
	int fd = open_dev();

	if (fd < 0 || ioctl(fd, VIOMMU_SVA_IOC_PROBE_EP, &e)) {
		FAIL("sva-probe-ep", "PROBE endpoint %#x: %s", ep, strerror(errno));
		return 1;
	}
	PASS("sva-probe-ep", "endpoint=%#x resv_mem=%u pasid_bits=%u output_bits=%u pgtf=%u pr_flags=%#x pr_groups=%u vtd_cap=%#llx",
	     ep, e.nr_resv_mem, e.pasid_bits, e.output_bits, e.pgtf,
	     e.pr_flags, e.pr_max_groups, (unsigned long long)e.vtd_cap);
	close(fd);
	return 0;
}

/* ----------------------------------------------------------- PASIDs --- */

#define NR_PASIDS 8

static int cmd_pasid(int hold_fd)
{
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_pasid p[NR_PASIDS], q;
	char line[64];
	int fd = open_dev(), i, j, ok = 1;

	if (fd < 0) {
		FAIL("pasid-alloc", "cannot open %s", DEV_PATH);
		return 1;
	}
	get_stats(fd, &s0);
	for (i = 0; i < NR_PASIDS; i++) {
		memset(&p[i], 0, sizeof(p[i]));
		if (ioctl(fd, VIOMMU_SVA_IOC_PASID_ALLOC, &p[i])) {
			FAIL("pasid-alloc", "PASID_ALLOC #%d: %s", i, strerror(errno));
			return 1;
		}
		if (p[i].pasid < 1 || p[i].pasid > 0xfffff)
			ok = 0;
		for (j = 0; j < i; j++)
			if (p[j].pasid == p[i].pasid)
				ok = 0;
	}
	printf("VDI-PASIDS");
	for (i = 0; i < NR_PASIDS; i++)
		printf(" %u", p[i].pasid);
	printf("\n");
	if (ok)
		PASS("pasid-alloc", "%d distinct PASIDs in [1, 2^20-1], first %u", NR_PASIDS, p[0].pasid);
	else
		FAIL("pasid-alloc", "PASIDs not distinct or out of range");

	/* A narrow range is honoured */
	memset(&q, 0, sizeof(q));
	q.min = 0x1000;
	q.max = 0x10ff;
	if (ioctl(fd, VIOMMU_SVA_IOC_PASID_ALLOC, &q) || q.pasid < q.min || q.pasid > q.max)
		FAIL("pasid-range", "PASID_ALLOC [0x1000, 0x10ff]: %s pasid %u",
		     strerror(errno), q.pasid);
	else
		PASS("pasid-range", "PASID_ALLOC [0x1000, 0x10ff] -> %#x", q.pasid);

	/* The device refuses a range beyond the host PASID width: S_RANGE */
	memset(&q, 0, sizeof(q));
	q.min = 1;
	q.max = 0xffffffff;
	errno = 0;
	if (!ioctl(fd, VIOMMU_SVA_IOC_PASID_ALLOC, &q))
		FAIL("pasid-errno", "PASID_ALLOC [1, 2^32-1] succeeded (%u)", q.pasid);
	else if (errno != ERANGE)
		FAIL("pasid-errno", "PASID_ALLOC [1, 2^32-1]: %s, expected ERANGE (S_RANGE)", strerror(errno));
	else
		PASS("pasid-errno", "PASID_ALLOC [1, 2^32-1] -> ERANGE (S_RANGE)");

	if (hold_fd >= 0) {
		printf("VDI-WAIT pasids\n");
		fflush(stdout);
		if (read(hold_fd, line, sizeof(line)) <= 0)
			fprintf(stderr, "sva-test: no go-ahead from the host\n");
	}

	for (i = 0; i < NR_PASIDS; i++) {
		if (ioctl(fd, VIOMMU_SVA_IOC_PASID_FREE, &p[i])) {
			FAIL("pasid-free", "PASID_FREE %u: %s", p[i].pasid, strerror(errno));
			return 1;
		}
	}
	/* Freed: freeing again is refused by the module (not ours any more) */
	if (!ioctl(fd, VIOMMU_SVA_IOC_PASID_FREE, &p[0]) || errno != ENOENT)
		FAIL("pasid-free", "second PASID_FREE %u: %s", p[0].pasid, strerror(errno));
	else
		PASS("pasid-free", "%d PASIDs freed; second free -> ENOENT", NR_PASIDS);

	/* The range PASID is still held: closing the file frees it */
	close(fd);
	fd = open_dev();
	get_stats(fd, &s1);
	if (s1.raw_pasids == 0 && s1.pasid_frees - s0.pasid_frees == NR_PASIDS + 1 &&
	    s1.pasid_allocs - s0.pasid_allocs == NR_PASIDS + 1)
		PASS("pasid-close", "close freed the PASID left allocated (allocs +%llu, frees +%llu)",
		     (unsigned long long)(s1.pasid_allocs - s0.pasid_allocs),
		     (unsigned long long)(s1.pasid_frees - s0.pasid_frees));
	else
		FAIL("pasid-close", "raw_pasids %u, allocs +%llu, frees +%llu",
		     s1.raw_pasids,
		     (unsigned long long)(s1.pasid_allocs - s0.pasid_allocs),
		     (unsigned long long)(s1.pasid_frees - s0.pasid_frees));
	close(fd);
	return 0;
}

/* ------------------------------------------------------------- BIND --- */

static int cmd_bind(uint32_t ep)
{
	struct viommu_sva_info info;
	struct viommu_sva_bind b = { .endpoint = ep };
	int fd = open_dev();

	if (fd < 0 || get_info(fd, &info)) {
		FAIL("bind", "cannot open %s", DEV_PATH);
		return 1;
	}
	if (!(info.flags & VIOMMU_SVA_INFO_CAN_BIND)) {
		errno = 0;
		if (!ioctl(fd, VIOMMU_SVA_IOC_BIND, &b))
			FAIL("bind-refused", "BIND succeeded without F_ATTACH_TABLE");
		else if (errno != EOPNOTSUPP)
			FAIL("bind-refused", "BIND: %s, expected EOPNOTSUPP", strerror(errno));
		else
			PASS("bind-refused", "BIND endpoint %#x -> EOPNOTSUPP: the device offers no F_ATTACH_TABLE (ATTACH_TABLE=%d PAGE_REQUEST=%d)",
			     ep, has(&info, VIOMMU_SVA_F_ATTACH_TABLE),
			     has(&info, VIOMMU_SVA_F_PAGE_REQUEST));
		close(fd);
		return 0;
	}
	if (ioctl(fd, VIOMMU_SVA_IOC_BIND, &b)) {
		FAIL("bind", "BIND endpoint %#x: %s", ep, strerror(errno));
		close(fd);
		return 1;
	}
	PASS("bind", "endpoint %#x pasid %u domain %u addr_width %u", ep,
	     b.pasid, b.domain, b.addr_width);
	if (ioctl(fd, VIOMMU_SVA_IOC_UNBIND, &b))
		FAIL("unbind", "UNBIND: %s", strerror(errno));
	else
		PASS("unbind", "endpoint %#x pasid %u", ep, b.pasid);
	close(fd);
	return 0;
}

/* ------------------------------------------------------- DMA device --- */

static int cmd_dmadev(uint32_t ep)
{
	struct viommu_sva_submit w = { .endpoint = ep, .timeout_ms = 100 };
	struct viommu_sva_submit s = { .endpoint = ep, .op = VIOMMU_SVA_OP_FILL, .len = 8 };
	int fd = open_dev();

	if (fd < 0) {
		FAIL("dma-device", "cannot open %s", DEV_PATH);
		return 1;
	}
	if (ioctl(fd, VIOMMU_SVA_IOC_WAIT, &w)) {
		if (errno == ENODEV)
			SKIP("dma-device", "no DMA test device (1234:d3a0) with endpoint %#x", ep);
		else
			FAIL("dma-device", "WAIT: %s", strerror(errno));
		close(fd);
		return 0;
	}
	errno = 0;
	if (w.status != VIOMMU_SVA_ST_IDLE || !ioctl(fd, VIOMMU_SVA_IOC_SUBMIT, &s) ||
	    errno != ENOTCONN)
		FAIL("dma-device", "status %u; SUBMIT without a binding: %s", w.status,
		     strerror(errno));
	else
		PASS("dma-device", "endpoint %#x: device idle, SUBMIT without a binding -> ENOTCONN",
		     ep);
	close(fd);
	return 0;
}

/* -------------------------------------------------------- SVA checks --- */

/* ------------------------------------------------------ host steps --- */

static int host_fd = -1;
static char host_reply[512];

/*
 * Announce a step ("VDI-WAIT <step> key=value ..."), wait for the host's
 * answer line (it checks the daemon's side meanwhile).  Without --hold,
 * a no-op.
 */
static const char *host(const char *fmt, ...)
{
	size_t n = 0;
	va_list ap;
	char c;

	host_reply[0] = 0;
	if (host_fd < 0)
		return host_reply;
	printf("VDI-WAIT ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	while (n + 1 < sizeof(host_reply) && read(host_fd, &c, 1) == 1 && c != '\n')
		host_reply[n++] = c;
	host_reply[n] = 0;
	printf("VDI-GO %s\n", host_reply);
	return host_reply;
}

#define D(f)	((unsigned long long)(s1.f - s0.f))

/* The module's page-request counters since s0, for the host to compare */
static void host_counts(const char *step, const struct viommu_sva_stats *a,
			const struct viommu_sva_stats *b)
{
	host("%s groups=%llu success=%llu invalid=%llu failure=%llu stale=%llu errors=%llu lost=%llu",
	     step, (unsigned long long)(b->page_groups - a->page_groups),
	     (unsigned long long)(b->resp_success - a->resp_success),
	     (unsigned long long)(b->resp_invalid - a->resp_invalid),
	     (unsigned long long)(b->resp_failure - a->resp_failure),
	     (unsigned long long)(b->resp_stale - a->resp_stale),
	     (unsigned long long)(b->resp_errors - a->resp_errors),
	     (unsigned long long)(b->events_lost - a->events_lost));
}

/* -------------------------------------------------------- SVA checks --- */

struct ctx {
	int fd;
	uint32_t ep;
	uint32_t ep2;		/* 0: none */
	uint32_t pasid;
	uint32_t domain;
};

static int submit(struct ctx *c, uint32_t op, void *src, void *dst,
		  size_t len, uint64_t pattern, struct viommu_sva_submit *s)
{
	memset(s, 0, sizeof(*s));
	s->endpoint = c->ep;
	s->op = op;
	s->src = (uintptr_t)src;
	s->dst = (uintptr_t)dst;
	s->len = len;
	s->pattern = pattern;
	s->timeout_ms = 120000;
	return ioctl(c->fd, VIOMMU_SVA_IOC_SUBMIT, s);
}

static const char *st_name(uint32_t st)
{
	static const char * const n[] = { "IDLE", "BUSY", "DONE", "FAULT", "ERROR" };

	return st < 5 ? n[st] : "?";
}

/*
 * Fresh anonymous memory in 4 KiB pages: without transparent huge pages,
 * "some pages resident" means what it says and every page the device
 * touches first is one page request.
 */
static void *map_prot(size_t len, int prot)
{
	void *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	madvise(p, len, MADV_NOHUGEPAGE);
	return p;
}

static void *map_anon(size_t len)
{
	return map_prot(len, PROT_READ | PROT_WRITE);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* Page-request handling times recorded since the last reset, sorted */
static uint32_t *latency(int fd, uint32_t *count)
{
	static uint32_t samples[32768];
	struct viommu_sva_latency lat = {
		.max = 32768, .reset = 1, .samples = (uintptr_t)samples,
	};

	*count = 0;
	if (ioctl(fd, VIOMMU_SVA_IOC_LATENCY, &lat))
		return samples;
	*count = lat.count;
	qsort(samples, lat.count, sizeof(*samples), cmp_u32);
	return samples;
}

static void latency_reset(int fd)
{
	struct viommu_sva_latency lat = { .reset = 1 };

	ioctl(fd, VIOMMU_SVA_IOC_LATENCY, &lat);
}

/* FILL of a never-touched buffer: every page comes from a page request */
static void check_fill(struct ctx *c, size_t mib)
{
	const uint64_t pat = 0x5aa5c33c0ff1ce00ULL | mib;
	size_t len = mib * MIB, pages = len / PAGE, i, bad = 0, res0, res1;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	uint32_t *lat, nlat;
	uint64_t *w;

	w = map_anon(len);
	if (!w) {
		FAIL("sva-fill", "mmap %zu MiB: %s", mib, strerror(errno));
		return;
	}
	res0 = resident(w, len);
	latency_reset(c->fd);
	get_stats(c->fd, &s0);
	host("fill-start");
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, w, len, pat, &s)) {
		FAIL("sva-fill", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	settle(c->fd, &s0, &s1, pages);
	host_counts("fill-done", &s0, &s1);
	lat = latency(c->fd, &nlat);
	for (i = 0; i < len / 8; i++)
		bad += w[i] != pat;
	res1 = resident(w, len);
	if (s.status != VIOMMU_SVA_ST_DONE || s.done_bytes != len || bad ||
	    res0 != 0 || res1 != pages || D(page_groups) != pages ||
	    D(resp_success) != pages || nlat != pages)
		FAIL("sva-fill", "%zu MiB: status %s done %llu/%zu, %zu bad words, %zu pages resident before and %zu after, %llu page requests and %llu SUCCESS for %zu pages (%llu INVALID), %u latency samples",
		     mib, st_name(s.status), (unsigned long long)s.done_bytes,
		     len, bad, res0, res1, D(page_groups), D(resp_success), pages,
		     D(resp_invalid), nlat);
	else
		PASS("sva-fill", "%zu MiB never touched: each of its %zu pages faulted in by one page request answered SUCCESS, every byte right, %.1f MiB/s, page request handled in p50 %.1f us / p99 %.1f us",
		     mib, pages, len / (double)MIB / (s.elapsed_ns / 1e9),
		     lat[nlat / 2] / 1e3, lat[(size_t)nlat * 99 / 100] / 1e3);
out:
	munmap(w, len);
}

/* COPY between buffers of which only some pages are resident */
static void check_copy(struct ctx *c)
{
	const size_t len = 8 * MIB, pages = len / PAGE;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *src, *dst;
	size_t i, bad = 0;

	src = map_anon(len);
	dst = map_anon(len);
	if (!src || !dst) {
		FAIL("sva-copy", "mmap: %s", strerror(errno));
		return;
	}
	for (i = 0; i < pages; i += 2)		/* every other source page */
		memset(src + i * PAGE, (int)(i & 0xff) | 1, PAGE);
	for (i = 0; i < pages / 2; i++)		/* first half of the target */
		memset(dst + i * PAGE, 0xee, PAGE);
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_COPY, src, dst, len, 0, &s)) {
		FAIL("sva-copy", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	/* Missing: the odd source pages (read) and the target's second half */
	settle(c->fd, &s0, &s1, pages);
	for (i = 0; i < pages; i++) {
		unsigned char want = i % 2 ? 0 : ((i & 0xff) | 1);
		size_t k;

		for (k = 0; k < PAGE; k++)
			bad += dst[i * PAGE + k] != want;
	}
	if (s.status != VIOMMU_SVA_ST_DONE || bad || D(page_groups) != pages ||
	    D(resp_success) != pages)
		FAIL("sva-copy", "status %s done %llu, %zu bad bytes, %llu page requests (%llu SUCCESS, %llu INVALID) for %zu missing pages",
		     st_name(s.status), (unsigned long long)s.done_bytes, bad,
		     D(page_groups), D(resp_success), D(resp_invalid), pages);
	else
		PASS("sva-copy", "8 MiB, half the source and half the target resident: copy exact; one page request per missing page (%llu), none for resident ones",
		     D(page_groups));
out:
	munmap(src, len);
	munmap(dst, len);
}

/* CHECKSUM over the caller's memory, against our own FNV-1a */
static void check_checksum(struct ctx *c)
{
	const size_t len = 1 * MIB;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *b = map_anon(len);
	size_t i;

	if (!b) {
		FAIL("sva-checksum", "mmap: %s", strerror(errno));
		return;
	}
	for (i = 0; i < len / 2; i++)		/* second half never touched */
		b[i] = (unsigned char)(i * 7 + 3);
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_CHECKSUM, b, NULL, len, 0, &s)) {
		FAIL("sva-checksum", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	settle(c->fd, &s0, &s1, len / 2 / PAGE);
	if (s.status != VIOMMU_SVA_ST_DONE || s.result != fnv1a(b, len) ||
	    D(page_groups) != len / 2 / PAGE)
		FAIL("sva-checksum", "status %s result %#llx, expected %#llx; %llu page requests",
		     st_name(s.status), (unsigned long long)s.result,
		     (unsigned long long)fnv1a(b, len), D(page_groups));
	else
		PASS("sva-checksum", "1 MiB (half resident): FNV-1a %#llx; %llu page requests (reads) for the untouched half",
		     (unsigned long long)s.result, D(page_groups));
out:
	munmap(b, len);
}

/* The device reads what is resident without asking */
static void check_resident(struct ctx *c)
{
	const size_t len = 4 * MIB;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *b = map_anon(len);
	size_t i;

	if (!b) {
		FAIL("sva-resident", "mmap: %s", strerror(errno));
		return;
	}
	for (i = 0; i < len; i++)
		b[i] = (unsigned char)(i * 13);
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_CHECKSUM, b, NULL, len, 0, &s)) {
		FAIL("sva-resident", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	get_stats(c->fd, &s1);
	if (s.status != VIOMMU_SVA_ST_DONE || s.result != fnv1a(b, len) ||
	    D(page_requests))
		FAIL("sva-resident", "status %s result %#llx (expected %#llx), %llu page requests",
		     st_name(s.status), (unsigned long long)s.result,
		     (unsigned long long)fnv1a(b, len), D(page_requests));
	else
		PASS("sva-resident", "device read of 4 MiB resident: checksum exact, no page request");
out:
	munmap(b, len);
}

/* A device write to memory the process may only read */
static void check_readonly(struct ctx *c)
{
	const size_t len = 4 * PAGE;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *b = map_prot(len, PROT_READ);
	size_t i, bad = 0;
	volatile unsigned char sink = 0;

	if (!b) {
		FAIL("sva-readonly", "mmap: %s", strerror(errno));
		return;
	}
	for (i = 0; i < len; i += 2 * PAGE)	/* half of it present (read) */
		sink += b[i];
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x77, &s)) {
		FAIL("sva-readonly", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	settle(c->fd, &s0, &s1, 1);
	for (i = 0; i < len; i++)
		bad += b[i] != 0;
	if (s.status != VIOMMU_SVA_ST_FAULT || s.fault_addr != (uintptr_t)b ||
	    s.done_bytes || (s.fault_info & 0x1ff) != 0x102 || bad ||
	    D(resp_invalid) != 1)
		FAIL("sva-readonly", "status %s fault_addr %#llx (buffer %p) info %#x done %llu, %zu bytes changed, %llu INVALID",
		     st_name(s.status), (unsigned long long)s.fault_addr, b,
		     s.fault_info, (unsigned long long)s.done_bytes, bad,
		     D(resp_invalid));
	else
		PASS("sva-readonly", "write to a PROT_READ mapping: page request answered INVALID, device FAULT at its first page (info %#x), memory unchanged",
		     s.fault_info);
out:
	munmap(b, len);
}

/* munmap part of a buffer, then make the device write all of it */
static void check_munmap(struct ctx *c)
{
	const size_t pages = 32, hole = 8, hole_len = 8;
	size_t len = pages * PAGE, i, wrong = 0, done;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *b = map_anon(len);

	if (!b) {
		FAIL("sva-munmap", "mmap: %s", strerror(errno));
		return;
	}
	memset(b, 0x11, len);
	munmap(b + hole * PAGE, hole_len * PAGE);
	/* The host finds the INVALIDATE of the hole in the daemon's events */
	host("munmap pasid=%u addr=%#lx len=%zu", c->pasid,
	     (unsigned long)(b + hole * PAGE), hole_len * PAGE);
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0xa5a5a5a5a5a5a5a5ULL, &s)) {
		FAIL("sva-munmap", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	settle(c->fd, &s0, &s1, 1);
	done = s.done_bytes;
	/* Before the hole: written up to done_bytes; after it: untouched */
	for (i = 0; i < hole * PAGE; i++)
		wrong += b[i] != (i < done ? 0xa5 : 0x11);
	for (i = (hole + hole_len) * PAGE; i < len; i++)
		wrong += b[i] != 0x11;
	if (s.status != VIOMMU_SVA_ST_FAULT ||
	    s.fault_addr != (uintptr_t)b + hole * PAGE ||
	    done != hole * PAGE || (s.fault_info & 0x1ff) != 0x102 || wrong ||
	    D(resp_invalid) != 1 || D(page_groups) != 1)
		FAIL("sva-munmap", "status %s fault_addr %#llx (hole %p+%#zx) info %#x done %zu, %zu wrong bytes, %llu page requests, %llu INVALID",
		     st_name(s.status), (unsigned long long)s.fault_addr,
		     b + hole * PAGE, hole_len * PAGE, s.fault_info, done,
		     wrong, D(page_groups), D(resp_invalid));
	else
		PASS("sva-munmap", "device FAULT at the hole (info %#x: page request refused, write), the %zu bytes before it written, nothing after; one page request, answered INVALID",
		     s.fault_info, done);
out:
	munmap(b, hole * PAGE);
	munmap(b + (hole + hole_len) * PAGE, len - (hole + hole_len) * PAGE);
}

/* Sets the module's prq_hold_ms test knob; false if it cannot */
static int set_prq_hold(unsigned int ms)
{
	FILE *f = fopen("/sys/module/viommu_sva/parameters/prq_hold_ms", "w");
	int ok;

	if (!f)
		return 0;
	ok = fprintf(f, "%u\n", ms) > 0;
	return !fclose(f) && ok;
}

/*
 * A child binds, starts a long fill and exits while the device works, with
 * a page request open: the module holds each request 300 ms before
 * handling it (prq_hold_ms), so the child's exit comes while the device
 * waits for an answer.
 */
static void check_child_exit(struct ctx *c)
{
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit w;
	int pipefd[2], status, k;
	uint32_t child_pasid = 0;
	pid_t pid;

	get_stats(c->fd, &s0);
	if (pipe(pipefd) || !set_prq_hold(300)) {
		FAIL("sva-child-exit", "pipe or prq_hold_ms: %s", strerror(errno));
		return;
	}
	pid = fork();
	if (pid == 0) {
		struct ctx cc = { .ep = c->ep };
		struct viommu_sva_bind b = { .endpoint = c->ep };
		struct viommu_sva_submit s;
		size_t len = 256 * MIB;
		void *buf;

		close(pipefd[0]);
		cc.fd = open_dev();
		buf = map_anon(len);
		if (cc.fd < 0 || !buf || ioctl(cc.fd, VIOMMU_SVA_IOC_BIND, &b))
			_exit(2);
		memset(&s, 0, sizeof(s));
		s.endpoint = cc.ep;
		s.op = VIOMMU_SVA_OP_FILL;
		s.flags = VIOMMU_SVA_SUBMIT_NOWAIT;
		s.dst = (uintptr_t)buf;
		s.len = len;
		s.pattern = 1;
		if (ioctl(cc.fd, VIOMMU_SVA_IOC_SUBMIT, &s))
			_exit(3);
		/* Let the first page requests arrive, then exit mid-operation */
		usleep(20000);
		if (write(pipefd[1], &b.pasid, sizeof(b.pasid)) != sizeof(b.pasid))
			_exit(4);
		_exit(0);
	}
	close(pipefd[1]);
	if (read(pipefd[0], &child_pasid, sizeof(child_pasid)) != sizeof(child_pasid))
		child_pasid = 0;
	close(pipefd[0]);
	waitpid(pid, &status, 0);
	/* Everything the device asked is answered once the device is idle */
	for (k = 0; k < 100; k++) {
		memset(&w, 0, sizeof(w));
		w.endpoint = c->ep;
		w.timeout_ms = 100;
		if (!ioctl(c->fd, VIOMMU_SVA_IOC_WAIT, &w))
			break;
	}
	settle(c->fd, &s0, &s1, 1);
	set_prq_hold(0);
	{
		unsigned long long groups = D(page_groups);
		unsigned long long answered = D(resp_success) + D(resp_invalid) +
			D(resp_failure) + D(resp_stale) + D(resp_errors);

		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || !child_pasid ||
		    answered != groups || !groups || s1.live_bonds != s0.live_bonds ||
		    s1.live_mms != s0.live_mms || D(mm_releases) != 1 ||
		    D(pasid_frees) != 1 || w.status != VIOMMU_SVA_ST_FAULT ||
		    !D(resp_stale))
			FAIL("sva-child-exit", "child status %#x pasid %u; %llu groups, %llu answered (%llu stale: answered by the device first); bonds %u->%u mms %u->%u; mm releases +%llu, PASIDs freed +%llu; device %s",
			     status, child_pasid, groups, answered, D(resp_stale),
			     s0.live_bonds, s1.live_bonds, s0.live_mms, s1.live_mms,
			     D(mm_releases), D(pasid_frees), st_name(w.status));
		else
			PASS("sva-child-exit", "child (pasid %u) exited with a 256 MiB fill in flight and its page request open: the device answered it (unbound) and stopped, FAULT after %llu bytes (info %#x); the module's late answer found no group (%llu stale); all %llu groups answered once, the mm released, binding and PASID gone",
			     child_pasid, (unsigned long long)w.done_bytes,
			     w.fault_info, D(resp_stale), groups);
	}
	/* The host checks the daemon: no binding, PASID or group left */
	host("child-gone pasid=%u parent=%u", child_pasid, c->pasid);
}

/*
 * The process changes its mappings under the device's cached translations:
 * every change must reach the device (INVALIDATE from the MMU notifier)
 * before the device's next access.
 */

/* After fork, the parent's pages are copy-on-write: a device write goes to
 * the parent's own copy (a page request breaks the COW), never to the page
 * the child still shares */
static void check_cow(struct ctx *c)
{
	const size_t len = 16 * PAGE;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *b = map_anon(len);
	int pipefd[2], back[2], status;
	size_t i, bad = 0, child_bad = 0;
	pid_t pid;

	if (!b || pipe(pipefd) || pipe(back)) {
		FAIL("sva-cow", "mmap/pipe: %s", strerror(errno));
		return;
	}
	memset(b, 0x31, len);
	/* The device caches writable translations of every page */
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x3232323232323232ULL, &s) ||
	    s.status != VIOMMU_SVA_ST_DONE) {
		FAIL("sva-cow", "first fill: %s status %s", strerror(errno), st_name(s.status));
		return;
	}
	pid = fork();
	if (pid == 0) {
		char x;

		/* Wait for the parent's device write, then look at our copy */
		if (read(pipefd[0], &x, 1) != 1)
			_exit(2);
		for (i = 0; i < len; i++)
			child_bad += b[i] != 0x32;
		_exit(child_bad ? 1 : 0);
	}
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x3333333333333333ULL, &s)) {
		FAIL("sva-cow", "SUBMIT: %s", strerror(errno));
		return;
	}
	settle(c->fd, &s0, &s1, len / PAGE);
	if (write(pipefd[1], "x", 1) != 1)
		status = -1;
	waitpid(pid, &status, 0);
	for (i = 0; i < len; i++)
		bad += b[i] != 0x33;
	if (s.status != VIOMMU_SVA_ST_DONE || bad || !WIFEXITED(status) ||
	    WEXITSTATUS(status) || D(page_groups) != len / PAGE ||
	    D(resp_success) != len / PAGE)
		FAIL("sva-cow", "status %s, %zu wrong bytes in the parent, child status %#x, %llu page requests (%llu SUCCESS) for %zu shared pages",
		     st_name(s.status), bad, status, D(page_groups),
		     D(resp_success), len / PAGE);
	else
		PASS("sva-cow", "after fork, a device write to %zu copy-on-write pages: one write page request each broke the sharing, the parent sees the new bytes, the child its old ones",
		     len / PAGE);
	munmap(b, len);
	close(pipefd[0]);
	close(pipefd[1]);
	close(back[0]);
	close(back[1]);
}

/* mprotect(PROT_READ) and MADV_DONTNEED under cached translations */
static void check_mprotect_dontneed(struct ctx *c)
{
	const size_t len = 8 * PAGE;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s, r;
	unsigned char *b = map_anon(len);
	size_t i, bad = 0;
	int ok;

	if (!b) {
		FAIL("sva-mprotect", "mmap: %s", strerror(errno));
		return;
	}
	memset(b, 0x41, len);
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x4242424242424242ULL, &s) ||
	    s.status != VIOMMU_SVA_ST_DONE) {
		FAIL("sva-mprotect", "first fill: %s status %s", strerror(errno), st_name(s.status));
		return;
	}
	mprotect(b, len, PROT_READ);
	get_stats(c->fd, &s0);
	submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x4343434343434343ULL, &s);
	settle(c->fd, &s0, &s1, 1);
	for (i = 0; i < len; i++)
		bad += b[i] != 0x42;
	if (s.status != VIOMMU_SVA_ST_FAULT || s.fault_addr != (uintptr_t)b ||
	    s.done_bytes || bad || D(resp_invalid) != 1)
		FAIL("sva-mprotect", "after mprotect(PROT_READ): status %s fault_addr %#llx (buffer %p) done %llu, %zu bytes changed, %llu INVALID",
		     st_name(s.status), (unsigned long long)s.fault_addr, b,
		     (unsigned long long)s.done_bytes, bad, D(resp_invalid));
	else
		PASS("sva-mprotect", "mprotect(PROT_READ) of pages the device had written: its next write refused at the first page (INVALID), memory unchanged");

	/* MADV_DONTNEED drops the pages: the device reads zeros, faulted in
	 * again by page requests, never the old frames */
	mprotect(b, len, PROT_READ | PROT_WRITE);
	madvise(b, len, MADV_DONTNEED);
	get_stats(c->fd, &s0);
	ok = !submit(c, VIOMMU_SVA_OP_CHECKSUM, b, NULL, len, 0, &r);
	settle(c->fd, &s0, &s1, len / PAGE);
	if (!ok || r.status != VIOMMU_SVA_ST_DONE || r.result != fnv1a(b, len) ||
	    D(page_groups) != len / PAGE)
		FAIL("sva-dontneed", "checksum after MADV_DONTNEED: %s status %s result %#llx (zeros: %#llx), %llu page requests for %zu pages",
		     strerror(errno), st_name(r.status), (unsigned long long)r.result,
		     (unsigned long long)fnv1a(b, len), D(page_groups), len / PAGE);
	else
		PASS("sva-dontneed", "MADV_DONTNEED of pages the device had cached: it read zeros, each page asked for again (%llu page requests)",
		     D(page_groups));
	munmap(b, len);
}

/* A hole punched into a transparent huge page the device has cached */
static void check_thp_munmap(struct ctx *c)
{
	const size_t huge = 2 * MIB, len = 2 * huge, hole_at = 0x40000, hole = 0x10000;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	unsigned char *raw, *b;
	size_t i, wrong = 0;

	raw = mmap(NULL, len + huge, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (raw == MAP_FAILED) {
		FAIL("sva-thp-munmap", "mmap: %s", strerror(errno));
		return;
	}
	b = (unsigned char *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
	madvise(b, len, MADV_HUGEPAGE);
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x5151515151515151ULL, &s) ||
	    s.status != VIOMMU_SVA_ST_DONE) {
		FAIL("sva-thp-munmap", "fill: %s status %s", strerror(errno), st_name(s.status));
		goto out;
	}
	settle(c->fd, &s0, &s1, 1);
	if (D(page_groups) > 2) {
		SKIP("sva-thp-munmap", "no transparent huge pages (%llu page requests for 4 MiB)",
		     D(page_groups));
		goto out;
	}
	/* Split the first huge page: 64 KiB out of its middle */
	munmap(b + hole_at, hole);
	get_stats(c->fd, &s0);
	submit(c, VIOMMU_SVA_OP_FILL, NULL, b, len, 0x5252525252525252ULL, &s);
	settle(c->fd, &s0, &s1, 1);
	for (i = 0; i < hole_at; i++)
		wrong += b[i] != 0x52;
	for (i = hole_at + hole; i < len; i++)
		wrong += b[i] != 0x51;
	if (s.status != VIOMMU_SVA_ST_FAULT || s.fault_addr != (uintptr_t)b + hole_at ||
	    s.done_bytes != hole_at || wrong || D(resp_invalid) != 1)
		FAIL("sva-thp-munmap", "status %s fault_addr %#llx (hole %p) done %llu, %zu wrong bytes, %llu page requests, %llu INVALID",
		     st_name(s.status), (unsigned long long)s.fault_addr, b + hole_at,
		     (unsigned long long)s.done_bytes, wrong, D(page_groups),
		     D(resp_invalid));
	else
		PASS("sva-thp-munmap", "64 KiB munmapped out of a 2 MiB page the device had cached: the device stopped at the hole (page request INVALID), wrote what precedes it, nothing after");
out:
	munmap(raw, len + huge);
}

/* The guest and the device still work after all of the above */
static void check_healthy(struct ctx *c)
{
	struct viommu_sva_submit s;
	uint64_t *w = map_anon(64 * PAGE);
	size_t i, bad = 0;

	if (!w || submit(c, VIOMMU_SVA_OP_FILL, NULL, w, 64 * PAGE, 42, &s)) {
		FAIL("sva-healthy", "SUBMIT: %s", strerror(errno));
		return;
	}
	for (i = 0; i < 64 * PAGE / 8; i++)
		bad += w[i] != 42;
	if (s.status != VIOMMU_SVA_ST_DONE || bad)
		FAIL("sva-healthy", "status %s, %zu bad words", st_name(s.status), bad);
	else
		PASS("sva-healthy", "a new fill after the faults and the child's exit is exact");
	munmap(w, 64 * PAGE);
}

static const char *const sva_checks[] = {
	"sva-bind", "sva-fill", "sva-copy", "sva-checksum", "sva-resident",
	"sva-readonly", "sva-munmap", "sva-cow", "sva-mprotect", "sva-dontneed",
	"sva-thp-munmap", "sva-child-exit", "sva-healthy", "sva-unbind",
};

static int skip_all(const char *why)
{
	size_t i;

	for (i = 0; i < sizeof(sva_checks) / sizeof(sva_checks[0]); i++)
		SKIP(sva_checks[i], "%s", why);
	return 0;
}

/* Bind (ep, and ep2 if given), or say why the SVA checks cannot run */
static int sva_setup(struct ctx *c, uint32_t ep, uint32_t ep2, const char **why,
		     int quiet)
{
	struct viommu_sva_info info;
	struct viommu_sva_bind b = { .endpoint = ep }, b2 = { .endpoint = ep2 };
	struct viommu_sva_submit s = { .endpoint = ep, .timeout_ms = 1 };
	static char buf[160];

	memset(c, 0, sizeof(*c));
	c->ep = ep;
	c->fd = open_dev();
	if (c->fd < 0 || get_info(c->fd, &info)) {
		*why = "no /dev/viommu-sva";
		return -1;
	}
	if (!(info.flags & VIOMMU_SVA_INFO_CAN_BIND)) {
		snprintf(buf, sizeof(buf),
			 "the daemon does not offer F_ATTACH_TABLE=%d/F_PAGE_REQUEST=%d (features %#llx)",
			 has(&info, VIOMMU_SVA_F_ATTACH_TABLE),
			 has(&info, VIOMMU_SVA_F_PAGE_REQUEST),
			 (unsigned long long)info.features);
		*why = buf;
		return -1;
	}
	if (ioctl(c->fd, VIOMMU_SVA_IOC_WAIT, &s) && errno == ENODEV) {
		snprintf(buf, sizeof(buf),
			 "no DMA test device (1234:d3a0) with endpoint %#x", ep);
		*why = buf;
		return -1;
	}
	if (ioctl(c->fd, VIOMMU_SVA_IOC_BIND, &b)) {
		FAIL("sva-bind", "BIND endpoint %#x: %s (see dmesg)", ep, strerror(errno));
		*why = "BIND failed";
		return -2;
	}
	c->pasid = b.pasid;
	c->domain = b.domain;
	if (ep2) {
		/* A second endpoint of the same mm: same PASID, same domain */
		if (ioctl(c->fd, VIOMMU_SVA_IOC_BIND, &b2) || b2.pasid != b.pasid ||
		    b2.domain != b.domain) {
			FAIL("sva-bind", "BIND endpoint %#x: %s; pasid %u/%u domain %u/%u",
			     ep2, strerror(errno), b.pasid, b2.pasid, b.domain, b2.domain);
			*why = "BIND failed";
			return -2;
		}
		c->ep2 = ep2;
	}
	if (!quiet)
		PASS("sva-bind", "endpoint %#x%s: pasid %u, domain %u (top of [%u, %u]), addr_width %u",
		     ep, ep2 ? " and its neighbour" : "", b.pasid, b.domain,
		     info.domain_start, info.domain_end, b.addr_width);
	host("bound pasid=%u domain=%u ep=%u ep2=%u addr_width=%u", b.pasid,
	     b.domain, ep, ep2, b.addr_width);
	return 0;
}

static int cmd_sva(uint32_t ep, uint32_t ep2, size_t fill_mib)
{
	struct viommu_sva_bind b = { .endpoint = ep }, b2 = { .endpoint = ep2 };
	struct viommu_sva_stats s0, s1;
	const char *why = "";
	struct ctx c;
	int ret = sva_setup(&c, ep, ep2, &why, 0);

	if (ret == -1)
		return skip_all(why);
	if (ret)
		return 1;
	memset(&s0, 0, sizeof(s0));
	check_fill(&c, fill_mib);
	check_copy(&c);
	check_checksum(&c);
	check_resident(&c);
	check_readonly(&c);
	check_munmap(&c);
	check_cow(&c);
	check_mprotect_dontneed(&c);
	check_thp_munmap(&c);
	check_child_exit(&c);
	check_healthy(&c);
	/* Every page request and response since the module loaded */
	get_stats(c.fd, &s1);
	host_counts("totals", &s0, &s1);
	if ((c.ep2 && ioctl(c.fd, VIOMMU_SVA_IOC_UNBIND, &b2)) ||
	    ioctl(c.fd, VIOMMU_SVA_IOC_UNBIND, &b))
		FAIL("sva-unbind", "UNBIND: %s", strerror(errno));
	else
		PASS("sva-unbind", "pasid %u unbound from %s", c.pasid,
		     c.ep2 ? "both endpoints" : "the endpoint");
	host("unbound pasid=%u ep=%u ep2=%u", c.pasid, ep, c.ep2);
	close(c.fd);
	return nfail != 0;
}

/* ---------------------------------------------------- bounded waits --- */

static double since(const struct timespec *t0)
{
	struct timespec t1;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (t1.tv_sec - t0->tv_sec) + (t1.tv_nsec - t0->tv_nsec) / 1e9;
}

/*
 * The host stops the daemon (SIGSTOP) for 2.5 s: a PROBE gives up after
 * req_timeout_ms (set to 1000 by the caller) and its late answer, once the
 * daemon runs again, is absorbed.
 */
static int cmd_stall_probe(uint32_t ep)
{
	struct viommu_sva_ep_info e = { .endpoint = ep };
	struct timespec t0;
	int fd = open_dev(), err;
	double secs;

	if (fd < 0) {
		FAIL("sva-timeout", "cannot open %s", DEV_PATH);
		return 1;
	}
	host("stall ms=2500");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	errno = 0;
	ioctl(fd, VIOMMU_SVA_IOC_PROBE_EP, &e);
	err = errno;
	secs = since(&t0);
	host("resume");
	errno = 0;
	ioctl(fd, VIOMMU_SVA_IOC_PROBE_EP, &e);
	if (err != ETIMEDOUT || secs > 1.9 || errno != ENOENT)
		FAIL("sva-timeout", "PROBE to a stopped daemon: %s after %.2f s; then %s",
		     strerror(err), secs, strerror(errno));
	else
		PASS("sva-timeout", "PROBE to a stopped daemon gave up after %.2f s (ETIMEDOUT); its late answer was absorbed, the next PROBE of the unknown endpoint %#x got S_NOENT -> ENOENT",
		     secs, ep);
	close(fd);
	return 0;
}

/*
 * The last step: an INVALIDATE the stopped daemon never completes in time
 * breaks the device (the MMU notifier must not wait without a bound).
 */
static int cmd_broken(uint32_t ep)
{
	struct viommu_sva_bind b = { .endpoint = ep };
	struct viommu_sva_pasid p = { 0 };
	unsigned char *buf = map_anon(4 * PAGE);
	struct timespec t0;
	int fd = open_dev();
	double secs;

	if (fd < 0 || !buf || ioctl(fd, VIOMMU_SVA_IOC_BIND, &b)) {
		FAIL("sva-broken", "BIND: %s", strerror(errno));
		return 1;
	}
	memset(buf, 1, 4 * PAGE);
	host("stall ms=4000");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	munmap(buf, PAGE);
	secs = since(&t0);
	errno = 0;
	if (!ioctl(fd, VIOMMU_SVA_IOC_PASID_ALLOC, &p) || errno != EIO || secs > 3)
		FAIL("sva-broken", "munmap took %.2f s; then PASID_ALLOC: %s", secs,
		     strerror(errno));
	else
		PASS("sva-broken", "an INVALIDATE the stopped daemon did not complete: munmap returned after %.2f s, the device is marked broken, requests fail with EIO",
		     secs);
	/* Its late completion comes back into a live ring: freed, no harm */
	host("resume");
	sleep(1);
	close(fd);
	return 0;
}

/* ------------------------------------------------------------ bench --- */

static double median(double *v, int n)
{
	int i, j;

	for (i = 1; i < n; i++)
		for (j = i; j > 0 && v[j - 1] > v[j]; j--) {
			double t = v[j];

			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/*
 * Fill throughput with resident pages and with pages faulted in on demand
 * (one page request each), alternated for @rounds rounds, and the handling
 * time of each page request as the guest sees it (record arrival to
 * PAGE_RESP completion).
 */
static int cmd_bench(uint32_t ep, size_t mib, int rounds)
{
	double res[16], dem[16], p50[16], p99[16];
	struct viommu_sva_submit s;
	size_t len = mib * MIB;
	const char *why = "";
	uint32_t *lat, n;
	struct ctx c;
	int r, ret;
	void *buf;

	rounds = rounds < 1 ? 1 : rounds > 16 ? 16 : rounds;
	ret = sva_setup(&c, ep, 0, &why, 1);
	if (ret == -1) {
		SKIP("sva-bench", "%s", why);
		return 0;
	}
	if (ret)
		return 1;
	for (r = 0; r < rounds; r++) {
		buf = map_anon(len);			/* resident */
		if (!buf)
			return 1;
		memset(buf, 0, len);
		if (submit(&c, VIOMMU_SVA_OP_FILL, NULL, buf, len, 7, &s) ||
		    s.status != VIOMMU_SVA_ST_DONE) {
			FAIL("sva-bench", "resident fill: %s status %s", strerror(errno), st_name(s.status));
			return 1;
		}
		res[r] = mib / (s.elapsed_ns / 1e9);
		munmap(buf, len);

		buf = map_anon(len);			/* on demand */
		latency_reset(c.fd);
		if (!buf || submit(&c, VIOMMU_SVA_OP_FILL, NULL, buf, len, 7, &s) ||
		    s.status != VIOMMU_SVA_ST_DONE) {
			FAIL("sva-bench", "on-demand fill: %s status %s", strerror(errno), st_name(s.status));
			return 1;
		}
		dem[r] = mib / (s.elapsed_ns / 1e9);
		usleep(10000);	/* the last PAGE_RESP completions */
		lat = latency(c.fd, &n);
		if (!n) {
			FAIL("sva-bench", "no page-request samples");
			return 1;
		}
		p50[r] = lat[n / 2] / 1e3;
		p99[r] = lat[(size_t)n * 99 / 100] / 1e3;
		printf("VDI-BENCH sva-round %d mib=%zu resident_mib_s=%.1f on_demand_mib_s=%.1f per_page_us=%.2f pr_samples=%u pr_p50_us=%.1f pr_p99_us=%.1f\n",
		       r, mib, res[r], dem[r], s.elapsed_ns / 1e3 / (len / PAGE), n,
		       p50[r], p99[r]);
		munmap(buf, len);
	}
	{
		double rmin = res[0], rmax = res[0], dmin = dem[0], dmax = dem[0];
		double a50 = p50[0], b50 = p50[0], a99 = p99[0], b99 = p99[0];

		for (r = 1; r < rounds; r++) {
			rmin = res[r] < rmin ? res[r] : rmin;
			rmax = res[r] > rmax ? res[r] : rmax;
			dmin = dem[r] < dmin ? dem[r] : dmin;
			dmax = dem[r] > dmax ? dem[r] : dmax;
			a50 = p50[r] < a50 ? p50[r] : a50;
			b50 = p50[r] > b50 ? p50[r] : b50;
			a99 = p99[r] < a99 ? p99[r] : a99;
			b99 = p99[r] > b99 ? p99[r] : b99;
		}
		printf("VDI-BENCH sva-fill rounds=%d mib=%zu resident_mib_s=%.1f [%.1f-%.1f] on_demand_mib_s=%.1f [%.1f-%.1f] pr_p50_us=%.1f [%.1f-%.1f] pr_p99_us=%.1f [%.1f-%.1f]\n",
		       rounds, mib, median(res, rounds), rmin, rmax,
		       median(dem, rounds), dmin, dmax, median(p50, rounds), a50,
		       b50, median(p99, rounds), a99, b99);
		PASS("sva-bench", "%d alternated rounds of %zu MiB fills: resident %.1f MiB/s, on demand %.1f MiB/s (medians); page request p50 %.1f us, p99 %.1f us",
		     rounds, mib, median(res, rounds), median(dem, rounds),
		     median(p50, rounds), median(p99, rounds));
	}
	close(c.fd);
	return 0;
}

/* ------------------------------------------------------------- main --- */

static void usage(void)
{
	fprintf(stderr,
		"usage: sva-test info | probe-ep EP | pasid [--hold FD] | dmadev EP | bind EP |\n"
		"                sva EP [--ep2 EP2] [--fill-mib N] [--hold FD] |\n"
		"                stall-probe EP --hold FD | broken EP --hold FD |\n"
		"                bench EP [--mib N] [--rounds N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	uint32_t ep = 0, ep2 = 0;
	size_t mib = 64;
	int hold = -1, rounds = 5, i;

	if (argc < 2)
		usage();
	if (argc >= 3 && argv[2][0] != '-')
		ep = strtoul(argv[2], NULL, 0);
	for (i = 2; i < argc; i++) {
		if ((!strcmp(argv[i], "--fill-mib") || !strcmp(argv[i], "--mib")) && i + 1 < argc)
			mib = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--hold") && i + 1 < argc)
			hold = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--ep2") && i + 1 < argc)
			ep2 = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--rounds") && i + 1 < argc)
			rounds = atoi(argv[++i]);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	host_fd = hold;

	if (!strcmp(argv[1], "info"))
		return cmd_info();
	if (!strcmp(argv[1], "probe-ep") && argc >= 3)
		return cmd_probe_ep(ep);
	if (!strcmp(argv[1], "pasid"))
		return cmd_pasid(hold);
	if (!strcmp(argv[1], "dmadev") && argc >= 3)
		return cmd_dmadev(ep);
	if (!strcmp(argv[1], "bind") && argc >= 3)
		return cmd_bind(ep);
	if (!strcmp(argv[1], "sva") && argc >= 3)
		return cmd_sva(ep, ep2, mib);
	if (!strcmp(argv[1], "stall-probe") && argc >= 3 && hold >= 0)
		return cmd_stall_probe(ep);
	if (!strcmp(argv[1], "broken") && argc >= 3 && hold >= 0)
		return cmd_broken(ep);
	if (!strcmp(argv[1], "bench") && argc >= 3)
		return cmd_bench(ep, mib, rounds);
	usage();
	return 2;
}
