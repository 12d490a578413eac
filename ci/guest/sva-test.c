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
 *   sva-test sva EP [--fill-mib N]      the SVA checks of issue 14 through
 *                                       the DMA test device at endpoint EP
 *   sva-test bench EP [--mib N]         fill throughput, resident and on
 *                                       demand; page-request handling time
 *   sva-test fake EP EP2 --hold FD      the SVA path against
 *                                       ci/fake-sva-device.py, in lock step
 *                                       with its driver (VDI-WAIT steps, the
 *                                       host's answers read from FD)
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

struct ctx {
	int fd;
	uint32_t ep;
	uint32_t pasid;
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

static void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

/* FILL of a never-touched buffer: every page comes from a page request */
static void check_fill(struct ctx *c, size_t mib)
{
	const uint64_t pat = 0x5aa5c33c0ff1ce00ULL | mib;
	size_t len = mib * MIB, i, bad = 0;
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit s;
	uint64_t *w;
	size_t res0;

	w = map_anon(len);
	if (!w) {
		FAIL("sva-fill", "mmap %zu MiB: %s", mib, strerror(errno));
		return;
	}
	res0 = resident(w, len);
	get_stats(c->fd, &s0);
	if (submit(c, VIOMMU_SVA_OP_FILL, NULL, w, len, pat, &s)) {
		FAIL("sva-fill", "SUBMIT: %s", strerror(errno));
		goto out;
	}
	settle(c->fd, &s0, &s1, 0);
	for (i = 0; i < len / 8; i++)
		bad += w[i] != pat;
	if (s.status != VIOMMU_SVA_ST_DONE || s.done_bytes != len || bad ||
	    res0 != 0 || s1.page_groups - s0.page_groups < len / PAGE ||
	    s1.resp_invalid != s0.resp_invalid)
		FAIL("sva-fill", "%zu MiB: status %s done %llu/%zu, %zu bad words, %zu pages resident before, %llu page requests for %zu pages, %llu INVALID",
		     mib, st_name(s.status), (unsigned long long)s.done_bytes,
		     len, bad, res0,
		     (unsigned long long)(s1.page_groups - s0.page_groups),
		     len / PAGE,
		     (unsigned long long)(s1.resp_invalid - s0.resp_invalid));
	else
		PASS("sva-fill", "%zu MiB never touched: all %zu pages via page requests (%llu), every byte right, %.1f MiB/s",
		     mib, len / PAGE,
		     (unsigned long long)(s1.page_groups - s0.page_groups),
		     len / (double)MIB / (s.elapsed_ns / 1e9));
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
	settle(c->fd, &s0, &s1, 0);
	for (i = 0; i < pages; i++) {
		unsigned char want = i % 2 ? 0 : ((i & 0xff) | 1);
		size_t k;

		for (k = 0; k < PAGE; k++)
			bad += dst[i * PAGE + k] != want;
	}
	if (s.status != VIOMMU_SVA_ST_DONE || bad ||
	    s1.resp_invalid != s0.resp_invalid)
		FAIL("sva-copy", "status %s done %llu, %zu bad bytes, %llu INVALID",
		     st_name(s.status), (unsigned long long)s.done_bytes, bad,
		     (unsigned long long)(s1.resp_invalid - s0.resp_invalid));
	else
		PASS("sva-copy", "8 MiB, half the source and half the target resident: copy exact, %llu page requests",
		     (unsigned long long)(s1.page_groups - s0.page_groups));
out:
	munmap(src, len);
	munmap(dst, len);
}

/* CHECKSUM over the caller's memory, against our own FNV-1a */
static void check_checksum(struct ctx *c)
{
	const size_t len = 1 * MIB;
	struct viommu_sva_submit s;
	unsigned char *b = map_anon(len);
	size_t i;

	if (!b) {
		FAIL("sva-checksum", "mmap: %s", strerror(errno));
		return;
	}
	for (i = 0; i < len / 2; i++)		/* second half never touched */
		b[i] = (unsigned char)(i * 7 + 3);
	if (submit(c, VIOMMU_SVA_OP_CHECKSUM, b, NULL, len, 0, &s))
		FAIL("sva-checksum", "SUBMIT: %s", strerror(errno));
	else if (s.status != VIOMMU_SVA_ST_DONE || s.result != fnv1a(b, len))
		FAIL("sva-checksum", "status %s result %#llx, expected %#llx",
		     st_name(s.status), (unsigned long long)s.result,
		     (unsigned long long)fnv1a(b, len));
	else
		PASS("sva-checksum", "1 MiB (half resident): FNV-1a %#llx", (unsigned long long)s.result);
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
	    s.fault_addr < (uintptr_t)b + hole * PAGE ||
	    s.fault_addr >= (uintptr_t)b + (hole + hole_len) * PAGE ||
	    done > hole * PAGE || wrong || s1.resp_invalid == s0.resp_invalid)
		FAIL("sva-munmap", "status %s fault_addr %#llx (hole %p+%#zx) info %#x done %zu, %zu wrong bytes, %llu INVALID",
		     st_name(s.status), (unsigned long long)s.fault_addr,
		     b + hole * PAGE, hole_len * PAGE, s.fault_info, done,
		     wrong, (unsigned long long)(s1.resp_invalid - s0.resp_invalid));
	else
		PASS("sva-munmap", "device FAULT at the hole (+%#llx, info %#x), %zu bytes before it written, nothing after, %llu page request(s) answered INVALID",
		     (unsigned long long)(s.fault_addr - (uintptr_t)b), s.fault_info, done,
		     (unsigned long long)(s1.resp_invalid - s0.resp_invalid));
out:
	munmap(b, hole * PAGE);
	munmap(b + (hole + hole_len) * PAGE, len - (hole + hole_len) * PAGE);
}

/* A child binds, starts a long fill and exits while the device works */
static void check_child_exit(struct ctx *c)
{
	struct viommu_sva_stats s0, s1;
	struct viommu_sva_submit w;
	int pipefd[2], status, k;
	uint32_t child_pasid = 0;
	pid_t pid;

	get_stats(c->fd, &s0);
	if (pipe(pipefd)) {
		FAIL("sva-child-exit", "pipe: %s", strerror(errno));
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
	settle(c->fd, &s0, &s1, 0);
	{
		unsigned long long groups = s1.page_groups - s0.page_groups;
		unsigned long long answered =
			(s1.resp_success - s0.resp_success) +
			(s1.resp_invalid - s0.resp_invalid) +
			(s1.resp_failure - s0.resp_failure) +
			(s1.resp_stale - s0.resp_stale) +
			(s1.resp_errors - s0.resp_errors);

		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || !child_pasid ||
		    answered != groups || s1.live_bonds != s0.live_bonds ||
		    s1.live_mms != s0.live_mms ||
		    s1.pasid_frees - s0.pasid_frees != 1 ||
		    w.status == VIOMMU_SVA_ST_BUSY)
			FAIL("sva-child-exit", "child status %#x pasid %u; %llu groups, %llu answered; bonds %u->%u mms %u->%u; PASIDs freed +%llu; device %s",
			     status, child_pasid, groups, answered, s0.live_bonds,
			     s1.live_bonds, s0.live_mms, s1.live_mms,
			     (unsigned long long)(s1.pasid_frees - s0.pasid_frees),
			     st_name(w.status));
		else
			PASS("sva-child-exit", "child (pasid %u) exited with a 256 MiB fill in flight: device %s after %llu bytes, %llu page-request groups all answered (%llu stale), binding and PASID gone, mm releases +%llu",
			     child_pasid, st_name(w.status),
			     (unsigned long long)w.done_bytes, groups,
			     (unsigned long long)(s1.resp_stale - s0.resp_stale),
			     (unsigned long long)(s1.mm_releases - s0.mm_releases));
	}
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
	"sva-bind", "sva-fill", "sva-copy", "sva-checksum", "sva-munmap",
	"sva-child-exit", "sva-healthy", "sva-unbind",
};

static int skip_all(const char *why)
{
	size_t i;

	for (i = 0; i < sizeof(sva_checks) / sizeof(sva_checks[0]); i++)
		SKIP(sva_checks[i], "%s", why);
	return 0;
}

/* Bind, or say why the SVA checks cannot run */
static int sva_setup(struct ctx *c, uint32_t ep, const char **why, int quiet)
{
	struct viommu_sva_info info;
	struct viommu_sva_bind b = { .endpoint = ep };
	struct viommu_sva_submit s = { .endpoint = ep, .timeout_ms = 1 };
	static char buf[160];

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
	if (!quiet)
		PASS("sva-bind", "endpoint %#x pasid %u domain %u addr_width %u",
		     ep, b.pasid, b.domain, b.addr_width);
	return 0;
}

static int cmd_sva(uint32_t ep, size_t fill_mib)
{
	struct viommu_sva_bind b = { .endpoint = ep };
	const char *why = "";
	struct ctx c;
	int ret = sva_setup(&c, ep, &why, 0);

	if (ret == -1)
		return skip_all(why);
	if (ret)
		return 1;
	check_fill(&c, fill_mib);
	check_copy(&c);
	check_checksum(&c);
	check_munmap(&c);
	check_child_exit(&c);
	check_healthy(&c);
	if (ioctl(c.fd, VIOMMU_SVA_IOC_UNBIND, &b))
		FAIL("sva-unbind", "UNBIND: %s", strerror(errno));
	else
		PASS("sva-unbind", "pasid %u unbound", c.pasid);
	close(c.fd);
	return nfail != 0;
}

/* ------------------------------------------------------------ bench --- */

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static int cmd_bench(uint32_t ep, size_t mib)
{
	struct viommu_sva_latency lat = { .reset = 1 };
	struct viommu_sva_submit s;
	size_t len = mib * MIB;
	const char *why = "";
	double res_mibs, dem_mibs;
	uint32_t *samples;
	struct ctx c;
	void *buf;
	int ret = sva_setup(&c, ep, &why, 1);

	if (ret == -1) {
		SKIP("sva-bench", "%s", why);
		return 0;
	}
	if (ret)
		return 1;
	samples = calloc(32768, sizeof(*samples));
	buf = map_anon(len);
	if (!samples || !buf)
		return 1;

	memset(buf, 0, len);			/* resident */
	if (submit(&c, VIOMMU_SVA_OP_FILL, NULL, buf, len, 7, &s) ||
	    s.status != VIOMMU_SVA_ST_DONE) {
		FAIL("sva-bench", "resident fill: %s status %s", strerror(errno), st_name(s.status));
		return 1;
	}
	res_mibs = mib / (s.elapsed_ns / 1e9);
	munmap(buf, len);

	buf = map_anon(len);			/* on demand */
	lat.max = 0;
	ioctl(c.fd, VIOMMU_SVA_IOC_LATENCY, &lat);	/* reset */
	if (!buf || submit(&c, VIOMMU_SVA_OP_FILL, NULL, buf, len, 7, &s) ||
	    s.status != VIOMMU_SVA_ST_DONE) {
		FAIL("sva-bench", "on-demand fill: %s status %s", strerror(errno), st_name(s.status));
		return 1;
	}
	dem_mibs = mib / (s.elapsed_ns / 1e9);
	lat.max = 32768;
	lat.reset = 1;
	lat.samples = (uintptr_t)samples;
	if (ioctl(c.fd, VIOMMU_SVA_IOC_LATENCY, &lat) || !lat.count) {
		FAIL("sva-bench", "no page-request samples: %s", strerror(errno));
		return 1;
	}
	qsort(samples, lat.count, sizeof(*samples), cmp_u32);
	printf("VDI-BENCH sva-fill mib=%zu resident_mib_s=%.1f on_demand_mib_s=%.1f per_page_us=%.2f pr_samples=%u pr_p50_us=%.1f pr_p99_us=%.1f\n",
	       mib, res_mibs, dem_mibs, s.elapsed_ns / 1e3 / (len / PAGE),
	       lat.count, samples[lat.count / 2] / 1e3,
	       samples[(size_t)lat.count * 99 / 100] / 1e3);
	PASS("sva-bench", "fill %zu MiB: resident %.1f MiB/s, on demand %.1f MiB/s (%.2f us/page); page request to PAGE_RESP completion p50 %.1f us, p99 %.1f us (%u samples)",
	     mib, res_mibs, dem_mibs, s.elapsed_ns / 1e3 / (len / PAGE),
	     samples[lat.count / 2] / 1e3,
	     samples[(size_t)lat.count * 99 / 100] / 1e3, lat.count);
	close(c.fd);
	return 0;
}

/* ------------------------------------------------- fake device ----- */

static int host_fd = -1;
static char host_reply[512];

/* Announce a step, wait for the host's "go key=value ..." answer */
static const char *host(const char *fmt, ...)
{
	size_t n = 0;
	va_list ap;
	char c;

	printf("VDI-WAIT ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	host_reply[0] = 0;
	while (n + 1 < sizeof(host_reply) && read(host_fd, &c, 1) == 1 && c != '\n')
		host_reply[n++] = c;
	host_reply[n] = 0;
	printf("VDI-GO %s\n", host_reply);
	return host_reply;
}

static long long kv(const char *reply, const char *key)
{
	char pat[32];
	const char *p;

	snprintf(pat, sizeof(pat), " %s=", key);
	p = strstr(reply, pat);
	return p ? strtoll(p + strlen(pat), NULL, 0) : -1;
}

static int kv_is(const char *reply, const char *key, const char *val)
{
	char pat[64];

	snprintf(pat, sizeof(pat), " %s=%s", key, val);
	return strstr(reply, pat) != NULL;
}

#define D(f)	((unsigned long long)(s1.f - s0.f))

static void fake_dma_fill(struct ctx *c, int pasid)
{
	const size_t len = 4 * MIB, pages = len / PAGE;
	struct viommu_sva_stats s0, s1;
	unsigned char *b = map_anon(len);
	const char *r;
	size_t i, bad = 0;
	unsigned int sum = 0;

	struct viommu_sva_latency lat = { .reset = 1 };
	static uint32_t samples[2048];

	ioctl(c->fd, VIOMMU_SVA_IOC_LATENCY, &lat);	/* clear */
	get_stats(c->fd, &s0);
	r = host("dma ep=%u pasid=%d addr=%#lx len=%zu write=1 byte=0x5a",
		 c->ep, pasid, (unsigned long)b, len);
	settle(c->fd, &s0, &s1, pages);
	lat.max = 2048;
	lat.samples = (uintptr_t)samples;
	if (ioctl(c->fd, VIOMMU_SVA_IOC_LATENCY, &lat) || lat.count != pages) {
		FAIL("fake-latency", "%u samples for %zu page requests: %s", lat.count, pages,
		     strerror(errno));
	} else {
		qsort(samples, lat.count, sizeof(*samples), cmp_u32);
		PASS("fake-latency", "%u page requests, record arrival to PAGE_RESP completion p50 %.1f us, p99 %.1f us (Python device: not a benchmark)",
		     lat.count, samples[lat.count / 2] / 1e3,
		     samples[(size_t)lat.count * 99 / 100] / 1e3);
	}
	for (i = 0; i < len; i++)
		bad += b[i] != 0x5a;
	if (!kv_is(r, "status", "done") || bad || kv(r, "requests") != (long long)pages ||
	    D(page_groups) != pages || D(resp_success) != pages || resident(b, len) != pages)
		FAIL("fake-dma-fill", "'%s': %zu bad bytes, %llu groups, %llu SUCCESS, %zu resident",
		     r, bad, D(page_groups), D(resp_success), resident(b, len));
	else
		PASS("fake-dma-fill", "4 MiB never touched: %zu page requests, each faulted in and answered SUCCESS, every byte written through the walked tables",
		     pages);

	/* The device reads what is resident without asking */
	for (i = 0; i < len; i++)
		b[i] = (unsigned char)(i * 13);
	for (i = 0; i < len; i++)
		sum += b[i];
	r = host("dma ep=%u pasid=%d addr=%#lx len=%zu write=0", c->ep, pasid,
		 (unsigned long)b, len);
	if (!kv_is(r, "status", "done") || kv(r, "requests") != 0 ||
	    (unsigned int)kv(r, "sum") != sum)
		FAIL("fake-dma-read", "'%s', expected sum=%u requests=0", r, sum);
	else
		PASS("fake-dma-read", "device read of 4 MiB resident: sum %u, no page request", sum);
	munmap(b, len);
}

static void fake_readonly(struct ctx *c, int pasid)
{
	struct viommu_sva_stats s0, s1;
	size_t len = 4 * PAGE, i, bad = 0;
	unsigned char *b = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	const char *r;

	get_stats(c->fd, &s0);
	r = host("dma ep=%u pasid=%d addr=%#lx len=%zu write=1 byte=0x77",
		 c->ep, pasid, (unsigned long)b, len);
	settle(c->fd, &s0, &s1, 1);
	for (i = 0; i < len; i++)
		bad += b[i] != 0;
	if (!kv_is(r, "status", "fault") || kv(r, "fault_addr") != (long long)(uintptr_t)b ||
	    kv(r, "code") != 1 || bad || D(resp_invalid) != 1)
		FAIL("fake-readonly", "'%s', %zu bytes changed, %llu INVALID", r, bad, D(resp_invalid));
	else
		PASS("fake-readonly", "write to a PROT_READ mapping: page request answered INVALID, device fault at its first page, memory unchanged");
	munmap(b, len);
}

static void fake_munmap(struct ctx *c, int pasid, unsigned char **keep, unsigned long *hole_out)
{
	const size_t pages = 32, hole = 8, hole_len = 8;
	size_t len = pages * PAGE, i, wrong = 0;
	unsigned char *b = map_anon(len);
	unsigned long h = (unsigned long)b + hole * PAGE;
	const char *r;

	memset(b, 0x11, len);
	munmap(b + hole * PAGE, hole_len * PAGE);
	host("invalidate pasid=%d addr=%#lx len=%zu", pasid, h, hole_len * PAGE);
	r = host("dma ep=%u pasid=%d addr=%#lx len=%zu write=1 byte=0xa5",
		 c->ep, pasid, (unsigned long)b, len);
	for (i = 0; i < hole * PAGE; i++)
		wrong += b[i] != 0xa5;
	for (i = (hole + hole_len) * PAGE; i < len; i++)
		wrong += b[i] != 0x11;
	if (!kv_is(r, "status", "fault") || kv(r, "fault_addr") != (long long)h ||
	    kv(r, "done") != (long long)(hole * PAGE) || wrong)
		FAIL("fake-munmap", "'%s', %zu wrong bytes", r, wrong);
	else
		PASS("fake-munmap", "munmap sent INVALIDATE; device write over the hole: fault at the hole, %zu bytes before it written, nothing after",
		     hole * PAGE);
	*keep = b + (hole + hole_len) * PAGE;	/* 16 resident pages */
	*hole_out = h;
}

static void fake_events(struct ctx *c, int pasid, unsigned char *mapped, unsigned long hole)
{
	struct viommu_sva_stats s0, s1;
	const char *r;

	get_stats(c->fd, &s0);
	r = host("events ep=%u pasid=%d addr=%#lx hole=%#lx", c->ep, pasid,
		 (unsigned long)mapped, hole);
	/* The stop marker, the fault and the bad records follow the groups */
	for (int i = 0; i < 300; i++) {
		settle(c->fd, &s0, &s1, 3);
		if (D(bad_events) >= 4 && D(faults) >= 1 && D(stop_markers) >= 1)
			break;
		usleep(10000);
	}
	/* 3 groups (3 + 3 + 1 records), a stop marker, a fault, 4 bad records */
	if (D(page_requests) != 8 || D(page_groups) != 3 || D(stop_markers) != 1 ||
	    D(resp_success) != 1 || D(resp_invalid) != 2 || D(faults) != 1 ||
	    D(bad_events) != 4)
		FAIL("fake-events", "'%s': requests +%llu groups +%llu stop +%llu SUCCESS +%llu INVALID +%llu faults +%llu bad +%llu",
		     r, D(page_requests), D(page_groups), D(stop_markers),
		     D(resp_success), D(resp_invalid), D(faults), D(bad_events));
	else
		PASS("fake-events", "8 page requests in 3 groups answered SUCCESS, INVALID (a page unmapped), INVALID (PASID not bound); stop marker consumed; fault logged; 4 malformed records dropped");
}

static void fake_child(struct ctx *c)
{
	struct viommu_sva_stats s0, s1;
	int status;
	pid_t pid;

	get_stats(c->fd, &s0);
	pid = fork();
	if (pid == 0) {
		struct viommu_sva_bind b = { .endpoint = c->ep };
		int fd = open_dev();
		void *buf = map_anon(MIB);

		if (fd < 0 || !buf || ioctl(fd, VIOMMU_SVA_IOC_BIND, &b))
			_exit(2);
		/* The host leaves a request of ours open; we exit under it */
		host("child ep=%u pasid=%u addr=%#lx", c->ep, b.pasid, (unsigned long)buf);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	host("child-gone");
	get_stats(c->fd, &s1);
	if (!WIFEXITED(status) || WEXITSTATUS(status) || D(mm_releases) != 1 ||
	    s1.live_mms != s0.live_mms || s1.live_bonds != s0.live_bonds ||
	    D(pasid_frees) != 1 || D(binds) != 1 || D(unbinds) != 1)
		FAIL("fake-child-exit", "status %#x, mm releases +%llu, mms %u->%u, bonds %u->%u, frees +%llu, binds +%llu, unbinds +%llu",
		     status, D(mm_releases), s0.live_mms, s1.live_mms, s0.live_bonds,
		     s1.live_bonds, D(pasid_frees), D(binds), D(unbinds));
	else
		PASS("fake-child-exit", "child exited with a page request open: release flushed and detached, close freed the PASID");
}

static void fake_timeout(struct ctx *c)
{
	struct viommu_sva_ep_info e = { .endpoint = 0x2a };
	struct timespec t0, t1;
	double secs;
	int err;

	host("stall type=5 ms=2500");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	errno = 0;
	ioctl(c->fd, VIOMMU_SVA_IOC_PROBE_EP, &e);
	err = errno;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	sleep(2);
	errno = 0;
	ioctl(c->fd, VIOMMU_SVA_IOC_PROBE_EP, &e);
	if (err != ETIMEDOUT || secs > 1.9 || errno != ENOENT)
		FAIL("fake-timeout", "stalled PROBE: %s after %.2f s; then %s",
		     strerror(err), secs, strerror(errno));
	else
		PASS("fake-timeout", "stalled PROBE gave up after %.2f s (ETIMEDOUT); its late answer was absorbed, the next PROBE got S_NOENT -> ENOENT",
		     secs);
}

/* The last step: an INVALIDATE that never completes breaks the device */
static void fake_broken(struct ctx *c)
{
	struct viommu_sva_bind b = { .endpoint = c->ep };
	struct viommu_sva_pasid p = { 0 };
	unsigned char *buf = map_anon(4 * PAGE);
	struct timespec t0, t1;
	double secs;

	memset(buf, 1, 4 * PAGE);
	if (ioctl(c->fd, VIOMMU_SVA_IOC_BIND, &b)) {
		FAIL("fake-broken", "BIND: %s", strerror(errno));
		return;
	}
	host("stall type=7 ms=4000");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	munmap(buf, PAGE);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	errno = 0;
	if (!ioctl(c->fd, VIOMMU_SVA_IOC_PASID_ALLOC, &p) || errno != EIO || secs > 3)
		FAIL("fake-broken", "munmap took %.2f s; then PASID_ALLOC: %s", secs,
		     strerror(errno));
	else
		PASS("fake-broken", "an INVALIDATE never completed: munmap returned after %.2f s, the device is marked broken, requests fail with EIO",
		     secs);
	/* Its late completion comes back into a live ring: freed, no harm */
	sleep(3);
}

static int cmd_fake(uint32_t ep, uint32_t ep2, int hold)
{
	struct viommu_sva_bind b = { .endpoint = ep }, b2 = { .endpoint = ep2 };
	struct viommu_sva_info info;
	unsigned char *mapped;
	unsigned long hole;
	struct ctx c = { .ep = ep };

	host_fd = hold;
	c.fd = open_dev();
	if (c.fd < 0 || get_info(c.fd, &info) || !(info.flags & VIOMMU_SVA_INFO_CAN_BIND)) {
		FAIL("fake-bind", "no /dev/viommu-sva or cannot bind (features %#llx)",
		     (unsigned long long)info.features);
		return 1;
	}
	if (ioctl(c.fd, VIOMMU_SVA_IOC_BIND, &b) || ioctl(c.fd, VIOMMU_SVA_IOC_BIND, &b2) ||
	    b.pasid != b2.pasid || b.domain != b2.domain) {
		FAIL("fake-bind", "BIND %#x/%#x: %s; pasids %u/%u domains %u/%u", ep, ep2,
		     strerror(errno), b.pasid, b2.pasid, b.domain, b2.domain);
		return 1;
	}
	PASS("fake-bind", "endpoints %#x and %#x: one PASID %u, one domain %u (top of [%u, %u]), addr_width %u",
	     ep, ep2, b.pasid, b.domain, info.domain_start, info.domain_end, b.addr_width);
	host("bind ep=%u ep2=%u pasid=%u", ep, ep2, b.pasid);

	fake_dma_fill(&c, b.pasid);
	fake_readonly(&c, b.pasid);
	fake_munmap(&c, b.pasid, &mapped, &hole);
	fake_events(&c, b.pasid, mapped, hole);
	fake_child(&c);

	if (ioctl(c.fd, VIOMMU_SVA_IOC_UNBIND, &b2) || ioctl(c.fd, VIOMMU_SVA_IOC_UNBIND, &b))
		FAIL("fake-unbind", "UNBIND: %s", strerror(errno));
	else
		PASS("fake-unbind", "both endpoints unbound");
	host("unbind ep=%u ep2=%u pasid=%u", ep, ep2, b.pasid);
	fake_timeout(&c);
	host("state");
	fake_broken(&c);
	close(c.fd);
	return nfail != 0;
}

/* ------------------------------------------------------------- main --- */

static void usage(void)
{
	fprintf(stderr,
		"usage: sva-test info | probe-ep EP | pasid [--hold FD] | dmadev EP | bind EP |\n"
		"                sva EP [--fill-mib N] | bench EP [--mib N] |\n"
		"                fake EP EP2 --hold FD\n");
	exit(2);
}

int main(int argc, char **argv)
{
	uint32_t ep = 0;
	size_t mib = 64;
	int hold = -1, i;

	if (argc < 2)
		usage();
	if (argc >= 3 && argv[2][0] != '-')
		ep = strtoul(argv[2], NULL, 0);
	for (i = 2; i < argc; i++) {
		if ((!strcmp(argv[i], "--fill-mib") || !strcmp(argv[i], "--mib")) && i + 1 < argc)
			mib = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--hold") && i + 1 < argc)
			hold = atoi(argv[++i]);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

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
		return cmd_sva(ep, mib);
	if (!strcmp(argv[1], "bench") && argc >= 3)
		return cmd_bench(ep, mib);
	if (!strcmp(argv[1], "fake") && argc >= 4 && hold >= 0)
		return cmd_fake(ep, strtoul(argv[3], NULL, 0), hold);
	usage();
	return 2;
}
