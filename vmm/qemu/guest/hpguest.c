/*
 * hpguest: the guest side of `hugepunch qemu`. It runs as the only program
 * of a Debian kernel's initramfs and answers one command a line on its
 * standard input (the serial console) with one line on its standard output,
 * each reply starting with "HP " so the host can pick replies out of kernel
 * messages on the same console. The protocol is in README.md beside this
 * file.
 *
 * It fills memory with a pattern every word of which depends on the seed,
 * the region, the page and the word, frees part of it so that the balloon
 * finds free memory scattered or in runs, and checks every byte it kept.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define MIB (1UL << 20)
#define MAX_REGIONS 64
#define RESERVE_MIB 64
#define KPF_OFFLINE 23 /* balloon pages are PageOffline (kernel-page-flags.h) */

struct region {
    uint64_t *mem;
    size_t pages;
    uint64_t seed;
    uint8_t *kept; /* one byte a page: 1 = kept, checked by verify */
};

static struct region regions[MAX_REGIONS];
static int nregions;

static void reply(const char *fmt, ...)
{
    va_list ap;

    fputs("HP ", stdout);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* The first word of a page; word w is it XOR w times an odd constant. */
static uint64_t page_base(uint64_t seed, int r, size_t p)
{
    return splitmix(splitmix(seed) ^ ((uint64_t)r << 48) ^ p);
}

static void write_page(struct region *g, int r, size_t p)
{
    uint64_t base = page_base(g->seed, r, p);
    uint64_t *w = g->mem + p * WORDS;

    for (size_t i = 0; i < WORDS; i++) {
        w[i] = base ^ (i * 0xD6E8FEB86659FD93ULL);
    }
}

static int page_ok(const struct region *g, int r, size_t p)
{
    uint64_t base = page_base(g->seed, r, p);
    const volatile uint64_t *w = g->mem + p * WORDS;

    for (size_t i = 0; i < WORDS; i++) {
        if (w[i] != (base ^ (i * 0xD6E8FEB86659FD93ULL))) {
            return 0;
        }
    }
    return 1;
}

static uint64_t meminfo(const char *key)
{
    char line[256];
    uint64_t v = 0;
    size_t n = strlen(key);
    FILE *f = fopen("/proc/meminfo", "r");

    if (!f) {
        return 0;
    }
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, key, n) && line[n] == ':') {
            v = strtoull(line + n + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

static long ms_since(const struct timespec *t0)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

/* A new region of `mib` MiB, every page written; -1 when it cannot be. */
static int new_region(uint64_t mib, uint64_t seed)
{
    struct region *g;
    size_t len = mib * MIB;

    if (nregions == MAX_REGIONS) {
        reply("error too many regions");
        return -1;
    }
    g = &regions[nregions];
    g->mem = mmap(NULL, len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (g->mem == MAP_FAILED) {
        reply("error mmap of %llu MiB: %s", (unsigned long long)mib, strerror(errno));
        return -1;
    }
    /* 4 KiB pages in the guest, so that freeing one frees one. */
    madvise(g->mem, len, MADV_NOHUGEPAGE);
    g->pages = len / PAGE;
    g->seed = seed;
    g->kept = malloc(g->pages);
    if (!g->kept) {
        munmap(g->mem, len);
        reply("error out of memory for the page map");
        return -1;
    }
    memset(g->kept, 1, g->pages);
    for (size_t p = 0; p < g->pages; p++) {
        write_page(g, nregions, p);
    }
    return nregions++;
}

static void cmd_fill(char *arg)
{
    char what[32] = "", mode[32] = "";
    unsigned long long seed = 0, mib;
    size_t freed = 0;
    struct timespec t0;
    struct region *g;
    int r;

    if (sscanf(arg, "%31s %31s %llu", what, mode, &seed) != 3 ||
        (strcmp(mode, "scattered") && strcmp(mode, "contiguous"))) {
        reply("error usage: fill <MiB|max> <scattered|contiguous> <seed>");
        return;
    }
    if (!strcmp(what, "max")) {
        mib = meminfo("MemAvailable") / 1024;
        mib = mib > RESERVE_MIB ? mib - RESERVE_MIB : 0;
    } else {
        mib = strtoull(what, NULL, 10);
    }
    if (!mib) {
        reply("error no memory to fill");
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r = new_region(mib, seed);
    if (r < 0) {
        return;
    }
    g = &regions[r];
    if (!strcmp(mode, "scattered")) {
        /* a random half of the pages, one by one */
        uint64_t x = splitmix(seed ^ 0x5ca77e7ed);
        for (size_t p = 0; p < g->pages; p++) {
            if (!(p & 63)) {
                x = splitmix(x);
            }
            if ((x >> (p & 63)) & 1) {
                madvise((char *)g->mem + p * PAGE, PAGE, MADV_DONTNEED);
                g->kept[p] = 0;
                freed++;
            }
        }
    } else {
        size_t half = g->pages / 2;
        madvise((char *)g->mem + half * PAGE, (g->pages - half) * PAGE, MADV_DONTNEED);
        memset(g->kept + half, 0, g->pages - half);
        freed = g->pages - half;
    }
    reply("fill region=%d pages=%zu kept=%zu freed=%zu memfree_kib=%llu ms=%ld", r,
          g->pages, g->pages - freed, freed,
          (unsigned long long)meminfo("MemFree"), ms_since(&t0));
}

static void cmd_reuse(char *arg)
{
    unsigned long long mib, seed;
    struct timespec t0;
    int r;

    if (sscanf(arg, "%llu %llu", &mib, &seed) != 2 || !mib) {
        reply("error usage: reuse <MiB> <seed>");
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r = new_region(mib, seed);
    if (r >= 0) {
        reply("reuse region=%d pages=%zu memfree_kib=%llu ms=%ld", r, regions[r].pages,
              (unsigned long long)meminfo("MemFree"), ms_since(&t0));
    }
}

static void cmd_verify(void)
{
    size_t pages = 0, bad = 0;
    int first_r = -1;
    size_t first_p = 0;
    struct timespec t0;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int r = 0; r < nregions; r++) {
        struct region *g = &regions[r];
        for (size_t p = 0; p < g->pages; p++) {
            if (!g->kept[p]) {
                continue;
            }
            pages++;
            if (!page_ok(g, r, p)) {
                if (!bad++) {
                    first_r = r;
                    first_p = p;
                }
            }
        }
    }
    if (bad) {
        reply("verify regions=%d pages=%zu bad_pages=%zu first_bad=%d:%zu ms=%ld", nregions,
              pages, bad, first_r, first_p, ms_since(&t0));
    } else {
        reply("verify regions=%d pages=%zu bad_pages=0 first_bad=none ms=%ld", nregions,
              pages, ms_since(&t0));
    }
}

static void cmd_release(void)
{
    size_t pages = 0;

    for (int r = 0; r < nregions; r++) {
        munmap(regions[r].mem, regions[r].pages * PAGE);
        free(regions[r].kept);
        pages += regions[r].pages;
    }
    nregions = 0;
    reply("release pages=%zu memfree_kib=%llu", pages,
          (unsigned long long)meminfo("MemFree"));
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Read and write a word of every cache line of the first MiB of kept pages. */
static void cmd_access(char *arg)
{
    unsigned long long mib = strtoull(arg, NULL, 10);
    size_t want = mib * MIB / PAGE, n = 0;
    uint64_t ns[3];

    if (!want) {
        reply("error usage: access <MiB>");
        return;
    }
    for (int round = 0; round < 3; round++) {
        struct timespec t0, t1;
        n = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int r = 0; r < nregions && n < want; r++) {
            struct region *g = &regions[r];
            for (size_t p = 0; p < g->pages && n < want; p++) {
                if (!g->kept[p]) {
                    continue;
                }
                volatile uint64_t *w = g->mem + p * WORDS;
                for (size_t i = 0; i < WORDS; i += 8) {
                    w[i] = w[i]; /* the same value: the pattern stays */
                }
                n++;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ns[round] = ((t1.tv_sec - t0.tv_sec) * 1000000000ULL + t1.tv_nsec - t0.tv_nsec) /
                    (n ? n : 1);
    }
    qsort(ns, 3, sizeof(ns[0]), cmp_u64);
    reply("access pages=%zu ns_per_page=%llu", n, (unsigned long long)ns[1]);
}

/* Count the balloon's pages, and the 2 MiB-aligned runs made only of them. */
static void cmd_balloonmap(void)
{
    int fd = open("/proc/kpageflags", O_RDONLY);
    uint64_t flags[512];
    size_t pages = 0, whole = 0, partial = 0;

    if (fd < 0) {
        reply("error /proc/kpageflags: %s", strerror(errno));
        return;
    }
    for (;;) {
        ssize_t got = read(fd, flags, sizeof(flags));
        size_t n, in = 0;
        if (got <= 0) {
            break;
        }
        n = got / sizeof(flags[0]);
        for (size_t i = 0; i < n; i++) {
            in += (flags[i] >> KPF_OFFLINE) & 1;
        }
        pages += in;
        if (n == 512 && in == 512) {
            whole++;
        } else if (in) {
            partial++;
        }
    }
    close(fd);
    reply("balloonmap pages=%zu whole_huge=%zu partial_huge=%zu", pages, whole, partial);
}

static void hello(void)
{
    char id[64] = "unknown";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");

    if (f) {
        if (fgets(id, sizeof(id), f)) {
            id[strcspn(id, "\n")] = 0;
        }
        fclose(f);
    }
    reply("ready boot_id=%s memtotal_kib=%llu memfree_kib=%llu memavailable_kib=%llu", id,
          (unsigned long long)meminfo("MemTotal"), (unsigned long long)meminfo("MemFree"),
          (unsigned long long)meminfo("MemAvailable"));
}

int main(void)
{
    char line[256];
    struct termios t;

    if (tcgetattr(0, &t) == 0) {
        t.c_lflag &= ~(ECHO | ECHONL);
        t.c_iflag &= ~(IXON | IXOFF);
        tcsetattr(0, TCSANOW, &t);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    hello();
    while (fgets(line, sizeof(line), stdin)) {
        char *cmd = line, *arg;
        line[strcspn(line, "\r\n")] = 0;
        while (*cmd == ' ') {
            cmd++;
        }
        if (!*cmd) {
            continue;
        }
        arg = cmd + strcspn(cmd, " ");
        if (*arg) {
            *arg++ = 0;
        }
        if (!strcmp(cmd, "fill")) {
            cmd_fill(arg);
        } else if (!strcmp(cmd, "reuse")) {
            cmd_reuse(arg);
        } else if (!strcmp(cmd, "verify")) {
            cmd_verify();
        } else if (!strcmp(cmd, "release")) {
            cmd_release();
        } else if (!strcmp(cmd, "meminfo")) {
            reply("meminfo memtotal_kib=%llu memfree_kib=%llu memavailable_kib=%llu",
                  (unsigned long long)meminfo("MemTotal"),
                  (unsigned long long)meminfo("MemFree"),
                  (unsigned long long)meminfo("MemAvailable"));
        } else if (!strcmp(cmd, "access")) {
            cmd_access(arg);
        } else if (!strcmp(cmd, "balloonmap")) {
            cmd_balloonmap();
        } else if (!strcmp(cmd, "reboot")) {
            sync();
            reboot(RB_AUTOBOOT);
        } else {
            reply("error unknown command: %s", cmd);
        }
    }
    return 0;
}
