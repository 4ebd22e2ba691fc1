/*
 * qemu_discard.c: QEMU's guest_memfd discard path routed through hugepunch.
 *
 * When a confidential guest converts memory from private to shared, QEMU's
 * kvm_convert_memory() changes the KVM memory attributes of the range and
 * then discards the private copy: ram_block_discard_guest_memfd_range()
 * punches a hole in the RAMBlock's guest_memfd with
 * fallocate(PUNCH_HOLE | KEEP_SIZE), 4 KiB at a time when the guest
 * converts 4 KiB at a time. Each of those punches splits the 2 MiB huge
 * page behind it. This program has the same shape, but the discard goes
 * through hugepunch: the 4 KiB punches are recorded, and each huge page is
 * freed once, whole, when its last subpage has been discarded.
 *
 * It builds a RAMBlock-like object over a memfd, or a KVM guest_memfd
 * (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, bound to a
 * memslot with KVM_SET_USER_MEMORY_REGION2 when the kernel accepts it),
 * sends it a stream of random 4 KiB private->shared conversions, prints
 * hugepunch's statistics, and checks against the kernel (st_blocks for a
 * memfd, mincore() over the mapping for a guest_memfd) that exactly the
 * completed huge pages were released, then that teardown released the
 * rest.
 *
 * Usage: qemu_discard memfd|guest_memfd [seed]
 * Exit status: 0 when every check passed, 1 when one failed, 77 when the
 * backend is not available here (the reason is printed).
 *
 * Build (tests/c_example.rs does this):
 *   cc -std=c11 -Wall -Wextra -Werror -I capi/include \
 *      capi/examples/qemu_discard.c libhugepunch_capi.a -lpthread -ldl -lm
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hugepunch.h"

/*
 * guest_memfd and memslot2 (Linux 6.8, flags from 6.18): the kernel
 * headers installed here are older, so the constants are defined here
 * (the values of include/uapi/linux/kvm.h).
 */
#define HP_KVM_CAP_USER_MEMORY2 231
#define HP_KVM_CAP_GUEST_MEMFD 234
#define HP_KVM_CAP_GUEST_MEMFD_FLAGS 244
#define HP_GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#define HP_GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#define HP_KVM_MEM_GUEST_MEMFD (1U << 2)

struct hp_kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

struct hp_kvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

#define HP_KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct hp_kvm_create_guest_memfd)
#define HP_KVM_SET_USER_MEMORY_REGION2 \
    _IOW(KVMIO, 0x49, struct hp_kvm_userspace_memory_region2)

#define SUBPAGE UINT64_C(4096)
#define HUGE_PAGE (UINT64_C(2) << 20)
#define SUBPAGES_PER_HUGE (HUGE_PAGE / SUBPAGE)
#define SIZE (UINT64_C(64) << 20) /* 32 huge pages */
#define HUGE_PAGES (SIZE / HUGE_PAGE)
#define WHOLE 16           /* huge pages the guest converts entirely */
#define SCATTERED 2000     /* random 4 KiB conversions over the others */

#define EXIT_SKIP 77

/* The RAMBlock: the private memory's file and what the host tracks. */
typedef struct RamBlock {
    const char *backend;
    int kvm_fd, vm_fd;     /* -1 for a memfd */
    int guest_memfd;       /* the private memory's file (or the memfd) */
    uint8_t *host;         /* its shared mapping (for zeroing, mincore) */
    uint64_t size;
    bool memslot;          /* bound to a memslot */
    uint8_t *shared;       /* one byte per 4 KiB: the memory attribute */
    hugepunch_file *hp;
    /* What the host did, for the report. */
    uint64_t frees_huge, frees_small, fallocate_errors, invalidations, zeroed;
} RamBlock;

static int failures;

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            fprintf(stderr, "CHECK FAILED (%s:%d): ", __FILE__, \
                    __LINE__);                                  \
            fprintf(stderr, __VA_ARGS__);                       \
            fputc('\n', stderr);                                \
            failures++;                                         \
        }                                                       \
    } while (0)

/* ---- the host callbacks ---------------------------------------------- */

/* Shared memory is backed elsewhere (the RAMBlock's shared side): a range
 * whose every subpage is shared has no mapping backed by this file. */
static bool host_is_shared(void *opaque, uint64_t offset, uint64_t len)
{
    RamBlock *rb = opaque;
    for (uint64_t o = offset; o < offset + len; o += SUBPAGE) {
        if (!__atomic_load_n(&rb->shared[o / SUBPAGE], __ATOMIC_ACQUIRE)) {
            return false;
        }
    }
    return true;
}

/* QEMU sets KVM_SET_MEMORY_ATTRIBUTES here; KVM_CAP_MEMORY_ATTRIBUTES is
 * not offered on this machine, so the attribute lives in the host. */
static int host_set_attributes(void *opaque, uint64_t offset, uint64_t len, uint32_t to)
{
    RamBlock *rb = opaque;
    for (uint64_t o = offset; o < offset + len; o += SUBPAGE) {
        __atomic_store_n(&rb->shared[o / SUBPAGE], to == HUGEPUNCH_SHARED, __ATOMIC_RELEASE);
    }
    return 0;
}

/* A guest_memfd invalidates KVM's mappings itself when it is punched: the
 * engine's invalidations only need counting here. */
static int host_invalidate_begin(void *opaque, uint64_t offset, uint64_t len,
                                 uint64_t huge_page, uint8_t order)
{
    RamBlock *rb = opaque;
    (void)offset;
    (void)len;
    (void)huge_page;
    (void)order;
    __atomic_fetch_add(&rb->invalidations, 1, __ATOMIC_RELAXED);
    return 0;
}

static int host_invalidate_end(void *opaque, uint64_t offset, uint64_t len)
{
    (void)opaque;
    (void)offset;
    (void)len;
    return 0;
}

static int host_allocate(void *opaque, uint64_t offset, uint64_t len, uint8_t order)
{
    RamBlock *rb = opaque;
    (void)order;
    /* guest_memfd needs KEEP_SIZE on every fallocate. */
    if (fallocate(rb->guest_memfd, FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len)) {
        return -errno;
    }
    return 0;
}

/* ram_block_discard_guest_memfd_range(), once per huge page instead of
 * once per 4 KiB. */
static int host_free(void *opaque, uint64_t offset, uint64_t len, uint8_t order)
{
    RamBlock *rb = opaque;
    if (fallocate(rb->guest_memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, (off_t)len)) {
        int err = errno;
        __atomic_fetch_add(&rb->fallocate_errors, 1, __ATOMIC_RELAXED);
        fprintf(stderr, "%s: fallocate(PUNCH_HOLE) %" PRIx64 " +%" PRIx64 ": %s\n",
                rb->backend, offset, len, strerror(err));
        return -err;
    }
    __atomic_fetch_add(order ? &rb->frees_huge : &rb->frees_small, 1, __ATOMIC_RELAXED);
    return 0;
}

static int host_zero(void *opaque, uint64_t offset, uint64_t len)
{
    RamBlock *rb = opaque;
    memset(rb->host + offset, 0, len);
    __atomic_fetch_add(&rb->zeroed, len, __ATOMIC_RELAXED);
    return 0;
}

/* ---- the RAMBlock's file --------------------------------------------- */

static int open_memfd(RamBlock *rb)
{
    rb->backend = "memfd";
    rb->kvm_fd = rb->vm_fd = -1;
    rb->guest_memfd = memfd_create("qemu_discard", MFD_CLOEXEC);
    if (rb->guest_memfd < 0 || ftruncate(rb->guest_memfd, (off_t)rb->size)) {
        perror("memfd");
        return 1;
    }
    return 0;
}

/* 0, 1 (error) or EXIT_SKIP with the reason printed. */
static int open_guest_memfd(RamBlock *rb)
{
    rb->backend = "guest_memfd";
    rb->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (rb->kvm_fd < 0) {
        printf("skipped: guest_memfd: cannot open /dev/kvm: %s\n", strerror(errno));
        return EXIT_SKIP;
    }
    rb->vm_fd = ioctl(rb->kvm_fd, KVM_CREATE_VM, 0);
    if (rb->vm_fd < 0) {
        printf("skipped: guest_memfd: KVM_CREATE_VM: %s\n", strerror(errno));
        return EXIT_SKIP;
    }
    if (ioctl(rb->vm_fd, KVM_CHECK_EXTENSION, HP_KVM_CAP_GUEST_MEMFD) <= 0) {
        printf("skipped: guest_memfd: KVM_CAP_GUEST_MEMFD is not offered\n");
        return EXIT_SKIP;
    }
    int flags = ioctl(rb->vm_fd, KVM_CHECK_EXTENSION, HP_KVM_CAP_GUEST_MEMFD_FLAGS);
    uint64_t want = HP_GUEST_MEMFD_FLAG_MMAP | HP_GUEST_MEMFD_FLAG_INIT_SHARED;
    if (flags < 0 || ((uint64_t)flags & want) != want) {
        printf("skipped: guest_memfd: KVM_CAP_GUEST_MEMFD_FLAGS is %d, need MMAP | "
               "INIT_SHARED (3) to map and measure it\n", flags);
        return EXIT_SKIP;
    }
    struct hp_kvm_create_guest_memfd gmem = {.size = rb->size, .flags = want};
    rb->guest_memfd = ioctl(rb->vm_fd, HP_KVM_CREATE_GUEST_MEMFD, &gmem);
    if (rb->guest_memfd < 0) {
        printf("skipped: guest_memfd: KVM_CREATE_GUEST_MEMFD: %s\n", strerror(errno));
        return EXIT_SKIP;
    }
    return 0;
}

/* QEMU binds each RAMBlock with a guest_memfd to a memslot; the slot keeps
 * a pointer into the mapping, so it is deleted before the mapping goes. */
static void bind_memslot(RamBlock *rb)
{
    if (rb->vm_fd < 0 || ioctl(rb->vm_fd, KVM_CHECK_EXTENSION, HP_KVM_CAP_USER_MEMORY2) <= 0) {
        return;
    }
    struct hp_kvm_userspace_memory_region2 region = {
        .slot = 0,
        .flags = HP_KVM_MEM_GUEST_MEMFD,
        .guest_phys_addr = 0,
        .memory_size = rb->size,
        .userspace_addr = (uint64_t)(uintptr_t)rb->host,
        .guest_memfd_offset = 0,
        .guest_memfd = (uint32_t)rb->guest_memfd,
    };
    rb->memslot = ioctl(rb->vm_fd, HP_KVM_SET_USER_MEMORY_REGION2, &region) == 0;
    if (!rb->memslot) {
        printf("note: KVM_SET_USER_MEMORY_REGION2: %s (going on without a memslot)\n",
               strerror(errno));
    }
}

static void unbind_memslot(RamBlock *rb)
{
    if (rb->memslot) {
        struct hp_kvm_userspace_memory_region2 region = {.slot = 0};
        if (ioctl(rb->vm_fd, HP_KVM_SET_USER_MEMORY_REGION2, &region)) {
            perror("delete memslot");
            failures++;
        }
        rb->memslot = false;
    }
}

/* Bytes the kernel holds for the file: st_blocks for a memfd; a
 * guest_memfd reports none, so mincore() over its shared mapping. */
static uint64_t kernel_resident_bytes(RamBlock *rb)
{
    if (rb->kvm_fd < 0) {
        struct stat st;
        if (fstat(rb->guest_memfd, &st)) {
            perror("fstat");
            exit(1);
        }
        return (uint64_t)st.st_blocks * 512;
    }
    size_t pages = rb->size / SUBPAGE;
    unsigned char *vec = malloc(pages);
    if (!vec || mincore(rb->host, rb->size, vec)) {
        perror("mincore");
        exit(1);
    }
    uint64_t resident = 0;
    for (size_t i = 0; i < pages; i++) {
        resident += (vec[i] & 1) * SUBPAGE;
    }
    free(vec);
    return resident;
}

/* ---- QEMU's conversion path, through hugepunch ------------------------ */

/* ram_block_discard_guest_memfd_range(): discard the private copy of a
 * range that just became shared. QEMU calls fallocate here; hugepunch
 * defers it until the whole huge page is discarded. */
static int ram_block_discard_guest_memfd_range(RamBlock *rb, uint64_t offset, uint64_t len)
{
    int ret = hugepunch_punch(rb->hp, offset, len);
    if (ret) {
        fprintf(stderr, "%s: discard %" PRIx64 " +%" PRIx64 ": %s\n", rb->backend, offset,
                len, strerror(-ret));
    }
    return ret;
}

/* kvm_convert_memory(): the attribute change, then the discard of the
 * side the memory left. A conversion to private over a pending punch is
 * refused with -EAGAIN and the offset (as KVM reports error_offset): the
 * range is populated (the punched subpages come back zeroed) and the
 * conversion retried. The shared side (another file in QEMU) is not
 * modelled here. */
static int kvm_convert_memory(RamBlock *rb, uint64_t start, uint64_t size, bool to_private)
{
    uint64_t error_offset = 0;
    int ret = hugepunch_convert(rb->hp, start, size,
                                to_private ? HUGEPUNCH_PRIVATE : HUGEPUNCH_SHARED,
                                &error_offset);
    if (ret == -EAGAIN) {
        CHECK(error_offset >= start && error_offset < start + size,
              "error_offset %" PRIx64 " outside the range", error_offset);
        ret = hugepunch_populate(rb->hp, start, size, NULL);
        if (!ret) {
            ret = hugepunch_convert(rb->hp, start, size, HUGEPUNCH_PRIVATE, NULL);
        }
    }
    if (ret) {
        return ret;
    }
    if (!to_private) {
        return ram_block_discard_guest_memfd_range(rb, start, size);
    }
    return 0;
}

/* ---- the run ----------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t next_random(void)
{
    /* xorshift64*: a fixed sequence for a given seed. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void print_stats(const hugepunch_stats *s)
{
    printf("hugepunch statistics:\n");
#define FIELD(name) printf("  %-24s %" PRIu64 "\n", #name, s->name)
    FIELD(punch_calls);
    FIELD(convert_calls);
    FIELD(populate_calls);
    FIELD(punched_subpages);
    FIELD(pending_subpages);
    FIELD(pending_bytes_peak);
    FIELD(huge_frees);
    FIELD(teardown_frees);
    FIELD(small_freed_subpages);
    FIELD(free_calls);
    FIELD(invalidations);
    FIELD(invalidations_immediate);
    FIELD(conversions_ok);
    FIELD(conversions_rejected);
    FIELD(repopulated_subpages);
    FIELD(forced_splits);
    FIELD(free_errors);
    FIELD(errors_invalid_range);
    FIELD(errors_torn_down);
#undef FIELD
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "memfd") && strcmp(argv[1], "guest_memfd"))) {
        fprintf(stderr, "usage: %s memfd|guest_memfd [seed]\n", argv[0]);
        return 2;
    }
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x9e3779b97f4a7c15ULL;
    if (!rng_state) {
        rng_state = 1;
    }

    RamBlock rb = {.size = SIZE, .kvm_fd = -1, .vm_fd = -1};
    int ret = strcmp(argv[1], "memfd") ? open_guest_memfd(&rb) : open_memfd(&rb);
    if (ret) {
        return ret;
    }
    rb.shared = calloc(SIZE / SUBPAGE, 1);
    rb.host = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, rb.guest_memfd, 0);
    if (!rb.shared || rb.host == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    bind_memslot(&rb);

    /* The guest's memory: allocated, private, written. */
    if (fallocate(rb.guest_memfd, FALLOC_FL_KEEP_SIZE, 0, (off_t)SIZE)) {
        perror("fallocate");
        return 1;
    }
    memset(rb.host, 0xa5, SIZE);
    CHECK(kernel_resident_bytes(&rb) == SIZE, "the populated file holds %" PRIu64 " bytes",
          kernel_resident_bytes(&rb));

    hugepunch_config cfg;
    ret = hugepunch_config_init(&cfg, SIZE);
    CHECK(ret == 0, "hugepunch_config_init: %d", ret);
    hugepunch_host host = {
        .opaque = &rb,
        .is_shared = host_is_shared,
        .set_attributes = host_set_attributes,
        .invalidate_begin = host_invalidate_begin,
        .invalidate_end = host_invalidate_end,
        .allocate = host_allocate,
        .free = host_free,
        .zero = host_zero,
    };
    ret = hugepunch_new(&cfg, &host, &rb.hp);
    if (ret) {
        fprintf(stderr, "hugepunch_new: %s\n", strerror(-ret));
        return 1;
    }
    printf("%s: %" PRIu64 " MiB, %" PRIu64 " huge pages of 2 MiB%s\n", rb.backend, SIZE >> 20,
           HUGE_PAGES, rb.memslot ? ", bound to memslot 0" : "");

    /* Bad input is refused, and changes nothing. */
    CHECK(hugepunch_punch(NULL, 0, SUBPAGE) == -EINVAL, "null handle");
    CHECK(hugepunch_punch(rb.hp, 0x800, SUBPAGE) == -EINVAL, "unaligned punch");
    CHECK(hugepunch_punch(rb.hp, SIZE, SUBPAGE) == -EINVAL, "punch past the end");

    /* The guest converts huge pages 0 .. WHOLE-1 to shared, 4 KiB at a
     * time in random order (bounce buffers, a ballooned region): each 4 KiB
     * is one conversion and one discard, as QEMU handles them today. */
    uint32_t *order = malloc(WHOLE * SUBPAGES_PER_HUGE * sizeof(*order));
    uint32_t n = WHOLE * SUBPAGES_PER_HUGE;
    for (uint32_t i = 0; i < n; i++) {
        order[i] = i;
    }
    for (uint32_t i = n - 1; i > 0; i--) {
        uint32_t j = (uint32_t)(next_random() % (i + 1));
        uint32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    uint64_t conversions = 0;
    for (uint32_t i = 0; i < n; i++) {
        ret = kvm_convert_memory(&rb, (uint64_t)order[i] * SUBPAGE, SUBPAGE, false);
        CHECK(ret == 0, "convert %u: %d", order[i], ret);
        conversions++;
    }
    free(order);

    /* And SCATTERED random 4 KiB conversions over the other huge pages:
     * they never complete one, so nothing of them is freed (nor split). */
    for (int i = 0; i < SCATTERED; i++) {
        uint64_t sub = WHOLE * SUBPAGES_PER_HUGE +
                       next_random() % ((HUGE_PAGES - WHOLE) * SUBPAGES_PER_HUGE);
        /* Leave the last subpage of each huge page private. */
        if (sub % SUBPAGES_PER_HUGE == SUBPAGES_PER_HUGE - 1) {
            sub--;
        }
        ret = kvm_convert_memory(&rb, sub * SUBPAGE, SUBPAGE, false);
        CHECK(ret == 0, "convert subpage %" PRIu64 ": %d", sub, ret);
        conversions++;
    }

    /* A device's buffer goes back to private: a pending punch refuses the
     * conversion (-EAGAIN, error_offset); populate, retry. */
    uint64_t back = (uint64_t)(HUGE_PAGES - 1) * HUGE_PAGE;
    bool was_punched = false;
    for (uint64_t o = back; o < back + 16 * SUBPAGE; o += SUBPAGE) {
        bool p = false;
        CHECK(hugepunch_is_punched(rb.hp, o, &p) == 0, "is_punched");
        was_punched |= p;
    }
    hugepunch_stats before;
    hugepunch_get_stats(rb.hp, &before);
    ret = kvm_convert_memory(&rb, back, 16 * SUBPAGE, true);
    CHECK(ret == 0, "convert back to private: %d", ret);
    hugepunch_stats s;
    CHECK(hugepunch_get_stats(rb.hp, &s) == 0, "stats");
    CHECK(s.conversions_rejected == before.conversions_rejected + (was_punched ? 1 : 0),
          "a conversion over a pending punch is refused once");
    for (uint64_t o = back; o < back + 16 * SUBPAGE; o++) {
        if (rb.host[o] != 0xa5 && rb.host[o] != 0) {
            CHECK(0, "byte %" PRIx64 " is %#x after the conversion back", o, rb.host[o]);
            break;
        }
    }

    /* What it cost, and what the kernel says was released. */
    print_stats(&s);
    uint64_t resident = kernel_resident_bytes(&rb);
    uint64_t released = SIZE - resident;
    printf("conversions to shared: %" PRIu64 " (QEMU today: %" PRIu64
           " fallocate calls of 4 KiB, each splitting its huge page)\n",
           conversions, conversions);
    printf("fallocate(PUNCH_HOLE) calls: %" PRIu64 " of 2 MiB, %" PRIu64 " of 4 KiB runs\n",
           rb.frees_huge, rb.frees_small);
    printf("released (kernel): %" PRIu64 " bytes = %" PRIu64 " huge pages; pending: %" PRIu64
           " subpages still held\n",
           released, released / HUGE_PAGE, s.pending_subpages);

    CHECK(s.huge_frees == WHOLE, "huge_frees %" PRIu64 ", want %d", s.huge_frees, WHOLE);
    CHECK(s.free_calls == WHOLE && rb.frees_huge == WHOLE && rb.frees_small == 0,
          "free calls %" PRIu64 " (huge %" PRIu64 ", small %" PRIu64 "), want %d of 2 MiB",
          s.free_calls, rb.frees_huge, rb.frees_small, WHOLE);
    CHECK(released == WHOLE * HUGE_PAGE, "the kernel released %" PRIu64 " bytes, want %" PRIu64,
          released, WHOLE * HUGE_PAGE);
    CHECK(s.pending_subpages > 0 && s.pending_subpages < SCATTERED + 1,
          "pending %" PRIu64, s.pending_subpages);
    CHECK(s.invalidations_immediate == 0, "shared memory needs no immediate invalidation");
    CHECK(rb.fallocate_errors == 0 && s.free_errors == 0, "no free failed");

    /* The pending runs: what a VMM reading guest memory itself (migration,
     * a dump) treats as zeros. */
    size_t runs = 0;
    ret = hugepunch_pending_ranges(rb.hp, 0, SIZE, NULL, 0, &runs);
    CHECK(ret == -ERANGE && runs > 0, "pending_ranges with no room: %d, %zu runs", ret, runs);
    hugepunch_range *r = calloc(runs, sizeof(*r));
    size_t got = 0;
    CHECK(hugepunch_pending_ranges(rb.hp, 0, SIZE, r, runs, &got) == 0 && got == runs,
          "pending_ranges");
    uint64_t pending_bytes = 0;
    for (size_t i = 0; i < got; i++) {
        pending_bytes += r[i].len;
    }
    free(r);
    CHECK(pending_bytes == s.pending_subpages * SUBPAGE, "the runs add up to the pending bytes");

    /* Shutdown: teardown frees the rest, whole huge pages where whole. */
    uint64_t still = 1;
    ret = hugepunch_teardown(rb.hp, &still);
    CHECK(ret == 0 && still == 0, "teardown: %d, %" PRIu64 " bytes left", ret, still);
    hugepunch_get_stats(rb.hp, &s);
    resident = kernel_resident_bytes(&rb);
    printf("after teardown: %" PRIu64 " teardown frees, the kernel holds %" PRIu64 " bytes\n",
           s.teardown_frees, resident);
    CHECK(resident == 0, "the kernel still holds %" PRIu64 " bytes after teardown", resident);
    CHECK(s.teardown_frees == HUGE_PAGES - WHOLE, "teardown_frees %" PRIu64, s.teardown_frees);
    CHECK(hugepunch_punch(rb.hp, 0, SUBPAGE) == -EIO, "a punch after teardown is -EIO");

    hugepunch_destroy(rb.hp);
    unbind_memslot(&rb);
    munmap(rb.host, SIZE);
    close(rb.guest_memfd);
    if (rb.vm_fd >= 0) {
        close(rb.vm_fd);
        close(rb.kvm_fd);
    }
    free(rb.shared);
    if (failures) {
        printf("qemu_discard (%s): %d check(s) FAILED\n", rb.backend, failures);
        return 1;
    }
    printf("qemu_discard (%s): every check passed\n", rb.backend);
    return 0;
}
