// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// vfio-map: static guest test program of the vhost-device-iommu CI
// (built by ci/provision.sh with gcc -static, installed as /bin/vfio-map in
// the guest initramfs).
//
// Owns: creating VFIO type1 DMA mappings through the guest's IOMMU (the
// virtio-iommu under test), so that every mapping turns into virtio-iommu
// MAP/UNMAP requests that the host can check.
//
//  1. binds the endpoint PCI device (default 0000:00:04.0) to vfio-pci through
//     driver_override (on 6.12 a PCI device without driver has no IOMMU group);
//  2. opens its group and a type1 container (VFIO_TYPE1v2_IOMMU);
//  3. mapping mode: maps COUNT buffers of SIZE bytes (own mlock'ed pages) at
//     IOVA, IOVA+STRIDE, ..., prints one MAP line per mapping and one PAGE line
//     per page with the guest-physical address from /proc/self/pagemap (read
//     after the map, because pinning may migrate pages), holds, then unmaps;
//     bench mode: N MAP+UNMAP pairs of one 4 KiB page, prints pairs/s.
//
// Every output line starts with "vfio-map: ".  Lines the host can parse:
//   vfio-map: BIND dev=0000:00:04.0 group=3 driver=vfio-pci
//   vfio-map: IOVA-RANGE start=0x0 end=0x7fffffff
//   vfio-map: MAP iova=0x10000000 gpa=0x1234000 size=0x1000
//   vfio-map: PAGE iova=0x10001000 gpa=0x1236000      (pages after the first)
//   vfio-map: HOLD seconds=N | HOLD-END reason=...
//   vfio-map: UNMAP iova=0x10000000 size=0x1000
//   vfio-map: HOLD ... (again with --hold-after-unmap: the container, and so
//             the IOMMU domain, still exist but hold no mapping)
//   vfio-map: BENCH pairs=2000 seconds=0.812 pairs/s=2463.1
//   vfio-map: OK | vfio-map: ERROR <message>   (exit status 0 / 1)

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <linux/vfio.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PFX "vfio-map: "

static volatile sig_atomic_t hold_interrupted;
static long page_size;

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

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [options]\n"
            "  --device BDF         endpoint PCI device (default 0000:00:04.0)\n"
            "  --no-bind            do not (re)bind the device to vfio-pci\n"
            "  --count N            number of mappings (default 4)\n"
            "  --iova ADDR          IOVA of the first mapping (default 0x10000000)\n"
            "  --size BYTES         size of each mapping, page multiple (default 0x1000)\n"
            "  --stride BYTES       IOVA distance between mappings (default 2*size)\n"
            "  --hold-seconds N     keep the mappings N seconds before unmapping\n"
            "                       (SIGUSR1/SIGINT/SIGTERM end the hold early)\n"
            "  --hold-stdin         keep the mappings until a line/key arrives on stdin\n"
            "  --hold-file PATH     keep the mappings until PATH exists\n"
            "  --hold-after-unmap   hold a second time after the unmaps, before the\n"
            "                       container is closed\n"
            "  --bench N            instead: N MAP+UNMAP pairs of 4 KiB, print pairs/s\n",
            argv0);
    exit(2);
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

// Basename of the symlink PATH into BUF, or "" if it does not exist.
static const char *link_name(const char *path, char *buf, size_t len) {
    char tmp[PATH_MAX];
    ssize_t n = readlink(path, tmp, sizeof tmp - 1);
    if (n < 0) {
        buf[0] = 0;
        return buf;
    }
    tmp[n] = 0;
    snprintf(buf, len, "%s", basename(tmp));
    return buf;
}

// Bind DEV to vfio-pci (if needed) and return its IOMMU group number.
static int bind_vfio(const char *dev, int do_bind) {
    char path[PATH_MAX], drv[256], grp[64];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s", dev);
    if (access(path, F_OK))
        die("no PCI device %s", dev);
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", dev);
    link_name(path, drv, sizeof drv);
    if (do_bind && strcmp(drv, "vfio-pci")) {
        if (access("/sys/bus/pci/drivers/vfio-pci", F_OK))
            die("vfio-pci driver not registered (module not loaded?)");
        char ovr[PATH_MAX];
        snprintf(ovr, sizeof ovr, "/sys/bus/pci/devices/%s/driver_override", dev);
        int err = write_sysfs(ovr, "vfio-pci");
        if (err)
            die("write %s: %s", ovr, strerror(-err));
        if (drv[0]) {
            char unbind[PATH_MAX];
            snprintf(unbind, sizeof unbind, "/sys/bus/pci/devices/%s/driver/unbind", dev);
            if ((err = write_sysfs(unbind, dev)))
                die("unbind %s from %s: %s", dev, drv, strerror(-err));
        }
        if ((err = write_sysfs("/sys/bus/pci/drivers_probe", dev)))
            die("drivers_probe %s: %s (no IOMMU group? is the endpoint behind the IOMMU?)", dev,
                strerror(-err));
        link_name(path, drv, sizeof drv);
        if (strcmp(drv, "vfio-pci"))
            die("%s is bound to '%s', not vfio-pci", dev, drv);
    }
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", dev);
    link_name(path, grp, sizeof grp);
    if (!grp[0])
        die("%s has no IOMMU group (virtio-iommu not probed, or the device is not an endpoint)",
            dev);
    out("BIND dev=%s group=%s driver=%s", dev, grp, drv[0] ? drv : "none");
    return atoi(grp);
}

static int open_container(int group_no) {
    char path[64];
    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        die("open /dev/vfio/vfio: %s", strerror(errno));
    if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
        die("unexpected VFIO API version");
    if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0)
        die("VFIO_TYPE1v2_IOMMU not supported");
    snprintf(path, sizeof path, "/dev/vfio/%d", group_no);
    int group = open(path, O_RDWR);
    if (group < 0)
        die("open %s: %s", path, strerror(errno));
    struct vfio_group_status st = {.argsz = sizeof st};
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &st))
        die("VFIO_GROUP_GET_STATUS: %s", strerror(errno));
    if (!(st.flags & VFIO_GROUP_FLAGS_VIABLE))
        die("group %d is not viable (bind all its devices to vfio-pci)", group_no);
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        die("VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        die("VFIO_SET_IOMMU(TYPE1v2): %s", strerror(errno));
    return container; // the group fd stays open for the life of the process
}

static void print_iommu_info(int container) {
    struct vfio_iommu_type1_info probe = {.argsz = sizeof probe};
    if (ioctl(container, VFIO_IOMMU_GET_INFO, &probe))
        die("VFIO_IOMMU_GET_INFO: %s", strerror(errno));
    struct vfio_iommu_type1_info *info = calloc(1, probe.argsz);
    if (!info)
        die("out of memory");
    info->argsz = probe.argsz;
    if (ioctl(container, VFIO_IOMMU_GET_INFO, info))
        die("VFIO_IOMMU_GET_INFO: %s", strerror(errno));
    if (info->flags & VFIO_IOMMU_INFO_PGSIZES)
        out("PGSIZES 0x%" PRIx64, (uint64_t)info->iova_pgsizes);
    if ((info->flags & VFIO_IOMMU_INFO_CAPS) && info->cap_offset) {
        uint32_t off = info->cap_offset;
        while (off && off < info->argsz) {
            struct vfio_info_cap_header *h = (void *)((char *)info + off);
            if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
                struct vfio_iommu_type1_info_cap_iova_range *r = (void *)h;
                for (uint32_t i = 0; i < r->nr_iovas; i++)
                    out("IOVA-RANGE start=0x%" PRIx64 " end=0x%" PRIx64,
                        (uint64_t)r->iova_ranges[i].start, (uint64_t)r->iova_ranges[i].end);
            }
            off = h->next;
        }
    }
    free(info);
}

static uint64_t gpa_of(int pagemap, const void *va) {
    uint64_t ent;
    off_t off = (off_t)((uintptr_t)va / page_size) * 8;
    if (pread(pagemap, &ent, sizeof ent, off) != sizeof ent)
        die("read /proc/self/pagemap: %s", strerror(errno));
    if (!(ent & (1ULL << 63)))
        die("page at %p not present", va);
    uint64_t pfn = ent & ((1ULL << 55) - 1);
    if (!pfn)
        die("pagemap PFN is 0 (not root?)");
    return pfn * page_size + ((uintptr_t)va % page_size);
}

static void *alloc_pinned(size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap %zu: %s", size, strerror(errno));
    if (mlock(p, size))
        die("mlock: %s", strerror(errno));
    memset(p, 0xa5, size);
    return p;
}

static int dma_map(int container, void *va, uint64_t iova, uint64_t size) {
    struct vfio_iommu_type1_dma_map m = {
        .argsz = sizeof m,
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)va,
        .iova = iova,
        .size = size,
    };
    return ioctl(container, VFIO_IOMMU_MAP_DMA, &m) ? -errno : 0;
}

static int64_t dma_unmap(int container, uint64_t iova, uint64_t size) {
    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = iova, .size = size};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u))
        return -errno;
    return (int64_t)u.size;
}

static void on_signal(int sig) {
    (void)sig;
    hold_interrupted = 1;
}

static void hold(long seconds, int use_stdin, const char *file) {
    if (seconds <= 0 && !use_stdin && !file)
        return;
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    hold_interrupted = 0;
    out("HOLD seconds=%ld stdin=%d file=%s", seconds, use_stdin, file ? file : "-");
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const char *reason = "timeout";
    for (;;) {
        if (hold_interrupted) {
            reason = "signal";
            break;
        }
        if (file && access(file, F_OK) == 0) {
            reason = "file";
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (seconds > 0 && now.tv_sec - t0.tv_sec >= seconds)
            break;
        if (use_stdin) {
            fd_set fds;
            FD_ZERO(&fds);
            FD_SET(0, &fds);
            struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
            if (select(1, &fds, NULL, NULL, &tv) > 0) {
                char buf[256];
                if (read(0, buf, sizeof buf) >= 0) {
                    reason = "stdin";
                    break;
                }
            }
        } else {
            struct timespec ts = {.tv_sec = 0, .tv_nsec = 100000000};
            nanosleep(&ts, NULL);
        }
    }
    out("HOLD-END reason=%s", reason);
}

static void bench(int container, uint64_t iova, long pairs) {
    void *buf = alloc_pinned(page_size);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < pairs; i++) {
        int err = dma_map(container, buf, iova, page_size);
        if (err)
            die("bench MAP #%ld iova=0x%" PRIx64 ": %s", i, iova, strerror(-err));
        int64_t n = dma_unmap(container, iova, page_size);
        if (n != page_size)
            die("bench UNMAP #%ld iova=0x%" PRIx64 ": %s", i, iova,
                n < 0 ? strerror((int)-n) : "short unmap");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    out("BENCH pairs=%ld seconds=%.3f pairs/s=%.1f", pairs, s, s > 0 ? pairs / s : 0.0);
}

int main(int argc, char **argv) {
    const char *dev = "0000:00:04.0", *hold_file = NULL;
    uint64_t count = 4, iova = 0x10000000, size = 0, stride = 0;
    long hold_seconds = 0, bench_pairs = 0;
    int do_bind = 1, hold_stdin = 0, hold_after_unmap = 0;
    static const struct option opts[] = {
        {"device", required_argument, 0, 'd'},   {"no-bind", no_argument, 0, 'n'},
        {"count", required_argument, 0, 'c'},    {"iova", required_argument, 0, 'i'},
        {"size", required_argument, 0, 's'},     {"stride", required_argument, 0, 't'},
        {"hold-seconds", required_argument, 0, 'H'}, {"hold-stdin", no_argument, 0, 'S'},
        {"hold-file", required_argument, 0, 'F'}, {"bench", required_argument, 0, 'b'},
        {"hold-after-unmap", no_argument, 0, 'A'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    setvbuf(stdout, NULL, _IOLBF, 0);
    page_size = sysconf(_SC_PAGESIZE);
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dev = optarg; break;
        case 'n': do_bind = 0; break;
        case 'c': count = parse_u64(optarg, "count"); break;
        case 'i': iova = parse_u64(optarg, "iova"); break;
        case 's': size = parse_u64(optarg, "size"); break;
        case 't': stride = parse_u64(optarg, "stride"); break;
        case 'H': hold_seconds = (long)parse_u64(optarg, "hold-seconds"); break;
        case 'S': hold_stdin = 1; break;
        case 'F': hold_file = optarg; break;
        case 'b': bench_pairs = (long)parse_u64(optarg, "bench"); break;
        case 'A': hold_after_unmap = 1; break;
        default: usage(argv[0]);
        }
    }
    if (optind != argc)
        usage(argv[0]);
    if (!size)
        size = page_size;
    if (size % page_size || iova % page_size)
        die("size and iova must be multiples of %ld", page_size);
    if (!stride)
        stride = 2 * size;
    if (stride < size)
        die("stride 0x%" PRIx64 " < size 0x%" PRIx64, stride, size);

    int group_no = bind_vfio(dev, do_bind);
    int container = open_container(group_no);
    print_iommu_info(container);

    if (bench_pairs > 0) {
        bench(container, iova, bench_pairs);
        out("OK");
        return 0;
    }

    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap < 0)
        die("open /proc/self/pagemap: %s", strerror(errno));
    void **bufs = calloc(count, sizeof *bufs);
    if (!bufs)
        die("out of memory");
    for (uint64_t i = 0; i < count; i++) {
        uint64_t a = iova + i * stride;
        bufs[i] = alloc_pinned(size);
        int err = dma_map(container, bufs[i], a, size);
        if (err)
            die("MAP iova=0x%" PRIx64 " size=0x%" PRIx64 ": %s", a, size, strerror(-err));
        // GPA after the map: pinning for DMA may have migrated the pages.
        out("MAP iova=0x%" PRIx64 " gpa=0x%" PRIx64 " size=0x%" PRIx64, a, gpa_of(pagemap, bufs[i]),
            size);
        for (uint64_t off = page_size; off < size; off += page_size)
            out("PAGE iova=0x%" PRIx64 " gpa=0x%" PRIx64, a + off,
                gpa_of(pagemap, (char *)bufs[i] + off));
    }
    hold(hold_seconds, hold_stdin, hold_file);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t a = iova + i * stride;
        int64_t n = dma_unmap(container, a, size);
        if (n < 0)
            die("UNMAP iova=0x%" PRIx64 ": %s", a, strerror((int)-n));
        if ((uint64_t)n != size)
            die("UNMAP iova=0x%" PRIx64 " unmapped 0x%" PRIx64 " of 0x%" PRIx64, a, (uint64_t)n,
                size);
        out("UNMAP iova=0x%" PRIx64 " size=0x%" PRIx64, a, (uint64_t)n);
    }
    if (hold_after_unmap)
        hold(hold_seconds, hold_stdin, hold_file);
    out("OK");
    return 0;
}
