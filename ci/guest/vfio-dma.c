// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// vfio-dma: static guest test program of the vhost-device-iommu CI (built
// by ci/provision.sh like vfio-map, installed as /bin/vfio-dma).
//
// Owns: driving dma-test-device (PCI 1234:d3a0, the vfio-user DMA engine
// of this repository) from the guest and checking the bytes its DMA moves.
//
//   --mode vfio (default): binds the device to vfio-pci, opens its group in
//       a type1 container (so its DMA goes through the guest's IOMMU), maps
//       buffers with VFIO_IOMMU_MAP_DMA (one read-only), programs BAR0
//       through the VFIO device fd (pread/pwrite) and checks:
//         dma-regs      ID/VERSION/CAPS, bad commands give ERROR
//         dma-fill      FILL lands in the mapped pages
//         dma-copy      COPY between two mappings
//         dma-checksum  CHECKSUM equals the guest's FNV-1a
//         (HOLD: the host compares `ctl translate` with the MAP/PAGE lines)
//         dma-readonly  FILL/COPY into the read-only mapping fault, bytes unchanged
//         dma-unmapped  after VFIO_IOMMU_UNMAP_DMA, FILL/CHECKSUM fault, bytes unchanged
//         dma-partial   a FILL running into an unmapped page stops there
//         dma-stale     --loops N x (map, FILL must land, unmap, FILL must fault),
//                       alternating two buffers at one IOVA
//   --mode phys: for identity/bypass domains: no VFIO container; BAR0 through
//       sysfs resource0, DMA addresses are guest-physical (pagemap):
//         dma-identity  FILL and COPY at guest-physical addresses
//   --bench-cycles N / --bench-ops N (vfio mode): N x (map, FILL 4 KiB, unmap)
//       cycles/s, or N FILLs of 4 KiB on one long-lived mapping, ops/s; the
//       registers are programmed once, each FILL is a CMD write and STATUS
//       polls (MMIO round trips to the device process).
//
// Output lines ("vfio-dma: " prefix):
//   MAP iova=0x.. gpa=0x.. size=0x..   PAGE iova=0x.. gpa=0x..   HOLD ...
//   PASS <check> <detail> | FAIL <check> <detail>
//   BENCH cycles=N seconds=S cycles/s=R map_us=M dma_us=D unmap_us=U
//   BENCH ops=N seconds=S ops/s=R
//   OK (exit 0) | ERROR <message> (exit 1: could not set up)

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <linux/vfio.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#define PFX "vfio-dma: "

// Register interface of dma-test-device (dma-test-device/src/lib.rs).
#define R_ID 0x000
#define R_VERSION 0x004
#define R_CAPS 0x008
#define R_SRC 0x010
#define R_DST 0x018
#define R_LEN 0x020
#define R_PATTERN 0x028
#define R_CMD 0x038
#define R_STATUS 0x03c
#define R_RESULT 0x040
#define R_FAULT_ADDR 0x048
#define R_FAULT_INFO 0x050
#define R_DONE_BYTES 0x058
#define OP_COPY 1
#define OP_FILL 2
#define OP_CHECKSUM 3
#define CMD_USE_PASID (1u << 8)
#define ST_BUSY 1
#define ST_DONE 2
#define ST_FAULT 3
#define ST_ERROR 4
#define FAULT_TRANSLATION 1
#define FAULT_WRITE (1u << 8)

static long page_size;
static int failures;

// BAR0 access: the VFIO device fd at the region offset, or a sysfs mmap.
static int bar_fd = -1;
static off_t bar_off;
static volatile uint32_t *bar_map;

static void out(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs(PFX, stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    fflush(stdout);
    va_end(ap);
}

static void die(const char *fmt, ...) {
    va_list ap;
    char buf[512];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    out("ERROR %s", buf);
    exit(1);
}

// check(ok, name, fmt...): one PASS/FAIL line.
static int check(int ok, const char *name, const char *fmt, ...) {
    va_list ap;
    char buf[512];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    out("%s %s %s", ok ? "PASS" : "FAIL", name, buf);
    if (!ok)
        failures++;
    return ok;
}

static uint32_t rd32(uint32_t off) {
    if (bar_map)
        return bar_map[off / 4];
    uint32_t v;
    if (pread(bar_fd, &v, 4, bar_off + off) != 4)
        die("BAR0 read at 0x%x: %s", off, strerror(errno));
    return v;
}

static void wr32(uint32_t off, uint32_t v) {
    if (bar_map) {
        bar_map[off / 4] = v;
        return;
    }
    if (pwrite(bar_fd, &v, 4, bar_off + off) != 4)
        die("BAR0 write at 0x%x: %s", off, strerror(errno));
}

// 64-bit registers as two 32-bit halves (the interface allows both).
static uint64_t rd64(uint32_t off) { return rd32(off) | (uint64_t)rd32(off + 4) << 32; }
static void wr64(uint32_t off, uint64_t v) {
    wr32(off, (uint32_t)v);
    wr32(off + 4, (uint32_t)(v >> 32));
}

struct result {
    uint32_t status, info;
    uint64_t fault_addr, done, value;
};

// Runs one operation and polls STATUS until it is no longer BUSY.
static struct result dma(uint32_t cmd, uint64_t src, uint64_t dst, uint64_t len, uint64_t pattern) {
    struct result r = {0};
    wr64(R_SRC, src);
    wr64(R_DST, dst);
    wr64(R_LEN, len);
    wr64(R_PATTERN, pattern);
    wr32(R_CMD, cmd);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while ((r.status = rd32(R_STATUS)) == ST_BUSY) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec > 10)
            break;
    }
    r.info = rd32(R_FAULT_INFO);
    r.fault_addr = rd64(R_FAULT_ADDR);
    r.done = rd64(R_DONE_BYTES);
    r.value = rd64(R_RESULT);
    return r;
}

// Starts the programmed operation again (SRC/DST/LEN/PATTERN unchanged)
// and polls STATUS: two MMIO round trips and the polls, for the benchmark.
static uint32_t dma_again(uint32_t cmd) {
    uint32_t st;
    wr32(R_CMD, cmd);
    while ((st = rd32(R_STATUS)) == ST_BUSY)
        ;
    return st;
}

static const char *status_name(uint32_t s) {
    static const char *names[] = {"IDLE", "BUSY", "DONE", "FAULT", "ERROR"};
    return s < 5 ? names[s] : "?";
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

// Whether buf[0..n) is the FILL of `pattern`.
static int is_fill(const uint8_t *buf, size_t n, uint64_t pattern) {
    for (size_t i = 0; i < n; i++)
        if (buf[i] != (uint8_t)(pattern >> (8 * (i % 8))))
            return 0;
    return 1;
}

static int all_bytes(const uint8_t *buf, size_t n, uint8_t v) {
    for (size_t i = 0; i < n; i++)
        if (buf[i] != v)
            return 0;
    return 1;
}

static uint64_t parse_u64(const char *s, const char *what) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || end == s)
        die("bad %s '%s'", what, s);
    return v;
}

static int write_sysfs(const char *path, const char *val) {
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -errno;
    ssize_t n = write(fd, val, strlen(val));
    int err = n < 0 ? -errno : 0;
    close(fd);
    return err;
}

static void link_name(const char *path, char *buf, size_t len) {
    char tmp[PATH_MAX];
    ssize_t n = readlink(path, tmp, sizeof tmp - 1);
    buf[0] = 0;
    if (n < 0)
        return;
    tmp[n] = 0;
    snprintf(buf, len, "%s", basename(tmp));
}

// Binds DEV to vfio-pci (6.12 gives a VIOT endpoint its group only then);
// returns the IOMMU group number.
static int bind_vfio(const char *dev) {
    char path[PATH_MAX], drv[256], grp[64];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", dev);
    link_name(path, drv, sizeof drv);
    if (strcmp(drv, "vfio-pci")) {
        char p[PATH_MAX];
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/driver_override", dev);
        int err = write_sysfs(p, "vfio-pci");
        if (err)
            die("write %s: %s (no such device?)", p, strerror(-err));
        if (drv[0]) {
            snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/driver/unbind", dev);
            write_sysfs(p, dev);
        }
        if ((err = write_sysfs("/sys/bus/pci/drivers_probe", dev)))
            die("drivers_probe %s: %s", dev, strerror(-err));
        link_name(path, drv, sizeof drv);
    }
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", dev);
    link_name(path, grp, sizeof grp);
    if (!grp[0])
        die("%s has no IOMMU group (is it a VIOT endpoint?)", dev);
    out("BIND dev=%s group=%s driver=%s", dev, grp, drv[0] ? drv : "none");
    return atoi(grp);
}

static int container = -1;

static void open_vfio(const char *dev) {
    char path[64];
    int group_no = bind_vfio(dev);
    container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        die("open /dev/vfio/vfio: %s", strerror(errno));
    snprintf(path, sizeof path, "/dev/vfio/%d", group_no);
    int group = open(path, O_RDWR);
    if (group < 0)
        die("open %s: %s", path, strerror(errno));
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        die("VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        die("VFIO_SET_IOMMU: %s", strerror(errno));
    bar_fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, dev);
    if (bar_fd < 0)
        die("VFIO_GROUP_GET_DEVICE_FD %s: %s", dev, strerror(errno));
    struct vfio_region_info ri = {.argsz = sizeof ri, .index = VFIO_PCI_BAR0_REGION_INDEX};
    if (ioctl(bar_fd, VFIO_DEVICE_GET_REGION_INFO, &ri))
        die("VFIO_DEVICE_GET_REGION_INFO BAR0: %s", strerror(errno));
    if (ri.size < 0x1000)
        die("BAR0 is 0x%llx bytes", (unsigned long long)ri.size);
    bar_off = (off_t)ri.offset;
    // Memory space on (vfio-pci's reset may have cleared it).
    struct vfio_region_info ci = {.argsz = sizeof ci, .index = VFIO_PCI_CONFIG_REGION_INDEX};
    if (ioctl(bar_fd, VFIO_DEVICE_GET_REGION_INFO, &ci) == 0) {
        uint16_t cmd;
        if (pread(bar_fd, &cmd, 2, (off_t)ci.offset + 4) == 2) {
            cmd |= 0x6; // memory space, bus master
            if (pwrite(bar_fd, &cmd, 2, (off_t)ci.offset + 4) != 2)
                die("enable memory space: %s", strerror(errno));
        }
    }
}

static void open_phys(const char *dev) {
    char path[PATH_MAX];
    bind_vfio(dev); // attaches the endpoint to its (identity) domain on 6.12
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/enable", dev);
    write_sysfs(path, "1");
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource0", dev);
    int fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0)
        die("open %s: %s", path, strerror(errno));
    void *p = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap %s: %s", path, strerror(errno));
    bar_map = p;
}

static void *alloc_pinned(size_t size, uint8_t fill) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap %zu: %s", size, strerror(errno));
    if (mlock(p, size))
        die("mlock: %s", strerror(errno));
    memset(p, fill, size);
    return p;
}

static int pagemap = -1;

static uint64_t gpa_of(const void *va) {
    uint64_t ent;
    if (pagemap < 0 && (pagemap = open("/proc/self/pagemap", O_RDONLY)) < 0)
        die("open /proc/self/pagemap: %s", strerror(errno));
    off_t off = (off_t)((uintptr_t)va / page_size) * 8;
    if (pread(pagemap, &ent, sizeof ent, off) != sizeof ent || !(ent & (1ULL << 63)))
        die("pagemap of %p: not present", va);
    return (ent & ((1ULL << 55) - 1)) * page_size + (uintptr_t)va % page_size;
}

static int dma_map(void *va, uint64_t iova, uint64_t size, int writable) {
    struct vfio_iommu_type1_dma_map m = {
        .argsz = sizeof m,
        .flags = VFIO_DMA_MAP_FLAG_READ | (writable ? VFIO_DMA_MAP_FLAG_WRITE : 0),
        .vaddr = (uintptr_t)va,
        .iova = iova,
        .size = size,
    };
    return ioctl(container, VFIO_IOMMU_MAP_DMA, &m) ? -errno : 0;
}

static void map_or_die(void *va, uint64_t iova, uint64_t size, int writable, int print) {
    int err = dma_map(va, iova, size, writable);
    if (err)
        die("MAP iova=0x%" PRIx64 ": %s", iova, strerror(-err));
    if (!print)
        return;
    out("MAP iova=0x%" PRIx64 " gpa=0x%" PRIx64 " size=0x%" PRIx64 " %s", iova, gpa_of(va), size,
        writable ? "rw" : "ro");
    for (uint64_t off = page_size; off < size; off += page_size)
        out("PAGE iova=0x%" PRIx64 " gpa=0x%" PRIx64, iova + off, gpa_of((char *)va + off));
}

static void unmap_or_die(uint64_t iova, uint64_t size) {
    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = iova, .size = size};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u) || u.size != size)
        die("UNMAP iova=0x%" PRIx64 ": %s", iova, strerror(errno));
}

static void hold_stdin(void) {
    out("HOLD stdin=1");
    char buf[256];
    fd_set fds;
    FD_ZERO(&fds);
    FD_SET(0, &fds);
    struct timeval tv = {.tv_sec = 120};
    if (select(1, &fds, NULL, NULL, &tv) > 0 && read(0, buf, sizeof buf) >= 0)
        out("HOLD-END reason=stdin");
    else
        out("HOLD-END reason=timeout");
}

// A fault with the expected address and direction, reason "translation".
static int is_fault(struct result r, uint64_t addr, int write) {
    return r.status == ST_FAULT && r.fault_addr == addr &&
           r.info == (FAULT_TRANSLATION | (write ? FAULT_WRITE : 0));
}

// A result in a message: RF in the format, RA(r) in the arguments.
#define RF "status=%s fault_addr=0x%" PRIx64 " fault_info=0x%x done=0x%" PRIx64
#define RA(r) status_name((r).status), (r).fault_addr, (r).info, (r).done

// Layout of the vfio mode (IOVAs): A 2 pages rw, B 2 pages rw, R 1 page
// read-only, C 1 page rw followed by an unmapped page, S the stale loop.
#define IOVA_A 0x100000
#define IOVA_B 0x200000
#define IOVA_R 0x300000
#define IOVA_C 0x400000
#define IOVA_S 0x500000

static void test_vfio(int hold, long loops) {
    size_t two = 2 * page_size, one = page_size;
    uint8_t *a = alloc_pinned(two, 0), *b = alloc_pinned(two, 0xee), *ro = alloc_pinned(one, 0x77);
    uint8_t *c = alloc_pinned(one, 0x11);
    for (size_t i = 0; i < two; i++)
        a[i] = (uint8_t)(i * 7 + (i >> 8));
    map_or_die(a, IOVA_A, two, 1, 1);
    map_or_die(b, IOVA_B, two, 1, 1);
    map_or_die(ro, IOVA_R, one, 0, 1);
    map_or_die(c, IOVA_C, one, 1, 1);

    uint32_t id = rd32(R_ID), ver = rd32(R_VERSION), caps = rd32(R_CAPS);
    struct result bad = dma(0x7, IOVA_A, IOVA_B, 8, 0);
    struct result nolen = dma(OP_FILL, 0, IOVA_B, 0, 0);
    struct result pasid = dma(OP_FILL | CMD_USE_PASID, 0, IOVA_B, 8, 0);
    check(id == 0x414d4456 && ver == 1 && (caps & 7) == 7 && bad.status == ST_ERROR &&
              nolen.status == ST_ERROR && (caps & 8 || pasid.status == ST_ERROR),
          "dma-regs", "id=0x%x version=%u caps=0x%x; bad opcode/LEN 0/PASID: %s/%s/%s", id, ver, caps,
          status_name(bad.status), status_name(nolen.status), status_name(pasid.status));

    uint64_t pat = 0x0123456789abcdefULL;
    struct result r = dma(OP_FILL, 0, IOVA_B + 8, two - 16, pat);
    check(r.status == ST_DONE && r.done == two - 16 && is_fill(b + 8, two - 16, pat) &&
              all_bytes(b, 8, 0xee) && all_bytes(b + two - 8, 8, 0xee),
          "dma-fill", "FILL iova=0x%x len=0x%zx: " RF, IOVA_B + 8, two - 16, RA(r));

    r = dma(OP_COPY, IOVA_A, IOVA_B, two, 0);
    check(r.status == ST_DONE && memcmp(a, b, two) == 0, "dma-copy",
          "COPY 0x%x -> 0x%x len=0x%zx: " RF, IOVA_A, IOVA_B, two, RA(r));

    r = dma(OP_CHECKSUM, IOVA_A + 3, 0, two - 3, 0);
    uint64_t want = fnv1a(a + 3, two - 3);
    check(r.status == ST_DONE && r.value == want, "dma-checksum",
          "CHECKSUM iova=0x%x: result=0x%" PRIx64 " expected 0x%" PRIx64 " " RF, IOVA_A + 3,
          r.value, want, RA(r));

    if (hold)
        hold_stdin();

    r = dma(OP_FILL, 0, IOVA_R, one, pat);
    struct result r2 = dma(OP_COPY, IOVA_A, IOVA_R + 0x10, 0x20, 0);
    check(is_fault(r, IOVA_R, 1) && r.done == 0 && is_fault(r2, IOVA_R + 0x10, 1) &&
              all_bytes(ro, one, 0x77),
          "dma-readonly", "FILL read-only iova=0x%x: " RF "; COPY: " RF "; bytes unchanged",
          IOVA_R, RA(r), RA(r2));

    memset(b, 0x5a, two);
    unmap_or_die(IOVA_B, two);
    out("UNMAP iova=0x%x size=0x%zx", IOVA_B, two);
    r = dma(OP_FILL, 0, IOVA_B, two, pat);
    r2 = dma(OP_CHECKSUM, IOVA_B + page_size, 0, 8, 0);
    check(is_fault(r, IOVA_B, 1) && r.done == 0 && is_fault(r2, IOVA_B + page_size, 0) &&
              all_bytes(b, two, 0x5a),
          "dma-unmapped", "FILL after UNMAP: " RF "; CHECKSUM: " RF "; bytes unchanged",
          RA(r), RA(r2));

    r = dma(OP_FILL, 0, IOVA_C + 0x800, one, pat);
    check(is_fault(r, IOVA_C + one, 1) && r.done == one - 0x800 && all_bytes(c, 0x800, 0x11) &&
              is_fill(c + 0x800, one - 0x800, pat),
          "dma-partial", "FILL 0x%x..+0x%zx over an unmapped page: " RF, IOVA_C + 0x800, one,
          RA(r));

    // The cache must never serve a translation after its UNMAP completed:
    // one IOVA alternates between two buffers.
    uint8_t *s[2] = {alloc_pinned(one, 0), alloc_pinned(one, 0)};
    long ok = 0;
    char why[256] = "";
    for (long i = 0; i < loops; i++) {
        uint8_t *cur = s[i & 1], *other = s[!(i & 1)];
        memset(cur, 0, one);
        memset(other, 0, one);
        uint64_t p = 0x1111111111111111ULL * (uint64_t)(i % 15 + 1);
        map_or_die(cur, IOVA_S, one, 1, 0);
        struct result in = dma(OP_FILL, 0, IOVA_S, one, p);
        unmap_or_die(IOVA_S, one);
        struct result after = dma(OP_FILL, 0, IOVA_S, one, ~p);
        if (in.status != ST_DONE || !is_fill(cur, one, p) || !all_bytes(other, one, 0)) {
            snprintf(why, sizeof why, "cycle %ld: FILL while mapped: status=%s", i,
                     status_name(in.status));
            break;
        }
        if (!is_fault(after, IOVA_S, 1) || !is_fill(cur, one, p) || !all_bytes(other, one, 0)) {
            snprintf(why, sizeof why, "cycle %ld: FILL after UNMAP: " RF, i, RA(after));
            break;
        }
        ok++;
    }
    check(ok == loops, "dma-stale", "%ld/%ld map/FILL/unmap/FILL-faults cycles%s%s", ok, loops,
          why[0] ? ": " : "", why);
}

static void test_phys(void) {
    size_t one = page_size;
    uint8_t *x = alloc_pinned(one, 0), *y = alloc_pinned(one, 0);
    uint64_t gx = gpa_of(x), gy = gpa_of(y), pat = 0xfeedfacecafebeefULL;
    out("PHYS x=0x%" PRIx64 " y=0x%" PRIx64, gx, gy);
    struct result r = dma(OP_FILL, 0, gx, one, pat);
    struct result r2 = dma(OP_COPY, gx, gy + 0x100, 0x200, 0);
    check(r.status == ST_DONE && is_fill(x, one, pat) && r2.status == ST_DONE &&
              memcmp(x, y + 0x100, 0x200) == 0 && all_bytes(y, 0x100, 0),
          "dma-identity", "FILL gpa=0x%" PRIx64 ": %s, COPY -> gpa=0x%" PRIx64 ": %s", gx,
          status_name(r.status), gy + 0x100, status_name(r2.status));
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void bench(long cycles, long ops) {
    uint8_t *buf = alloc_pinned(page_size, 0);
    if (cycles > 0) {
        // Time per phase: the guest's map, the device's DMA, the unmap.
        double t_map = 0, t_dma = 0, t_unmap = 0, t0 = now_s();
        for (long i = 0; i < cycles; i++) {
            double a = now_s();
            map_or_die(buf, IOVA_S, page_size, 1, 0);
            double b = now_s();
            uint32_t st = i ? dma_again(OP_FILL) : dma(OP_FILL, 0, IOVA_S, page_size, 0x5a).status;
            if (st != ST_DONE)
                die("bench cycle %ld: status %s", i, status_name(st));
            double c = now_s();
            unmap_or_die(IOVA_S, page_size);
            double d = now_s();
            t_map += b - a;
            t_dma += c - b;
            t_unmap += d - c;
        }
        double s = now_s() - t0;
        out("BENCH cycles=%ld seconds=%.3f cycles/s=%.1f map_us=%.1f dma_us=%.1f unmap_us=%.1f", cycles,
            s, cycles / s, t_map / cycles * 1e6, t_dma / cycles * 1e6, t_unmap / cycles * 1e6);
    }
    if (ops > 0) {
        map_or_die(buf, IOVA_S, page_size, 1, 0);
        struct result r = dma(OP_FILL, 0, IOVA_S, page_size, 0x5a);
        if (r.status != ST_DONE)
            die("bench first op: " RF, RA(r));
        double t0 = now_s();
        for (long i = 0; i < ops; i++) {
            uint32_t st = dma_again(OP_FILL);
            if (st != ST_DONE)
                die("bench op %ld: status %s", i, status_name(st));
        }
        double s = now_s() - t0;
        unmap_or_die(IOVA_S, page_size);
        out("BENCH ops=%ld seconds=%.3f ops/s=%.1f", ops, s, ops / s);
    }
}

int main(int argc, char **argv) {
    const char *dev = "0000:00:05.0", *mode = "vfio";
    int hold = 0;
    long loops = 50, bench_cycles = 0, bench_ops = 0;
    static const struct option opts[] = {
        {"device", required_argument, 0, 'd'}, {"mode", required_argument, 0, 'm'},
        {"hold-stdin", no_argument, 0, 'H'},   {"loops", required_argument, 0, 'l'},
        {"bench-cycles", required_argument, 0, 'c'}, {"bench-ops", required_argument, 0, 'o'},
        {0, 0, 0, 0},
    };
    setvbuf(stdout, NULL, _IOLBF, 0);
    page_size = sysconf(_SC_PAGESIZE);
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dev = optarg; break;
        case 'm': mode = optarg; break;
        case 'H': hold = 1; break;
        case 'l': loops = (long)parse_u64(optarg, "loops"); break;
        case 'c': bench_cycles = (long)parse_u64(optarg, "bench-cycles"); break;
        case 'o': bench_ops = (long)parse_u64(optarg, "bench-ops"); break;
        default:
            fprintf(stderr, "usage: %s [--device BDF] [--mode vfio|phys] [--hold-stdin] [--loops N]\n"
                            "          [--bench-cycles N] [--bench-ops N]\n", argv[0]);
            return 2;
        }
    }
    if (!strcmp(mode, "phys")) {
        open_phys(dev);
        test_phys();
    } else if (!strcmp(mode, "vfio")) {
        open_vfio(dev);
        if (bench_cycles || bench_ops)
            bench(bench_cycles, bench_ops);
        else
            test_vfio(hold, loops);
    } else {
        die("unknown mode '%s'", mode);
    }
    if (failures)
        die("%d check(s) failed", failures);
    out("OK");
    return 0;
}
