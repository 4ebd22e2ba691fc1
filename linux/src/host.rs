//! [`LinuxHost`]: the engine's [`Host`] over a real file descriptor — a
//! memfd (shmem, or hugetlbfs / THP shmem where the host already offers
//! them), a KVM guest_memfd, a file in a directory the user names (a tmpfs
//! mounted `huge=`, hugetlbfs, or any other filesystem, as QEMU's
//! `memory-backend-file,mem-path=` makes one), or a file on a private
//! `huge=always` tmpfs made for the run ([`Backend::Thp`]).
//!
//! # What each callback does
//!
//! | callback | here | blocks? |
//! |---|---|---|
//! | `free(range, order)` | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` on exactly `range`; `EINTR` retried; any other errno returned as [`HostError`] | yes (a syscall) |
//! | `allocate(range, order)` | `fallocate(KEEP_SIZE)` on `range`; for guest_memfd then one read per 4 KiB through the mapping (below) | yes |
//! | `zero(range)` | writes zeros through the backend's own shared mapping: the memory is resident (a pending punch still holds it), so nothing is allocated and a huge folio stays whole | no (page faults at most) |
//! | `is_shared(range)` | the backend's own attribute bitmap, one bit a subpage, changed only by `set_attributes` | no |
//! | `set_attributes(range, to)` | updates that bitmap | no |
//! | `invalidate_begin/end` | counted, nothing else: see below | no |
//!
//! No callback re-enters the engine; none panics except on a range outside
//! the file (an engine bug the engine's validation rules out).
//!
//! # Invalidation
//!
//! The kernel invalidates inside `fallocate(PUNCH_HOLE)` itself, exactly at
//! the moment memory is freed: for guest_memfd, `kvm_gmem_punch_hole` runs
//! `kvm_gmem_invalidate_begin/end` (zapping KVM's MMU for every memslot
//! bound to the range) under the file's invalidate lock; for both
//! backends, truncating the page cache unmaps the range from every user
//! mapping first. So the engine's invalidation around a free (a
//! completion, a 4 KiB free, teardown) is done by the free itself, and
//! doing it again here would be a second zap of the same range.
//!
//! The other invalidation — the *immediate* one of a deferred partial punch
//! of possibly-private memory, which frees nothing — has no kernel
//! counterpart that a VMM can call without freeing: the kernel zaps private
//! mappings on its own conversion path (`KVM_SET_MEMORY_ATTRIBUTES`), and
//! on the kernels this was built on a type-0 VM has no private memory at all
//! (`KVM_CAP_MEMORY_ATTRIBUTES` is 0), so no private mapping of the range
//! can exist. The backend therefore counts the begin/end pairs (and checks
//! they pair up, see [`LinuxHost::counts`]); a VMM with private memory wires
//! its own zap in a wrapping host.
//!
//! # guest_memfd allocations are faulted in
//!
//! guest_memfd's `fallocate` allocates folios without clearing them: they
//! are cleared and marked up to date at their first fault. `mincore`, the
//! only residency measure guest_memfd has (its `st_blocks` is always 0, it
//! has no pread or SEEK_HOLE), reports only up-to-date folios, so memory
//! that is allocated and never touched would be invisible. The backend's
//! `allocate` therefore reads one byte of each 4 KiB page through its
//! mapping right after the `fallocate` — the fault the guest would take
//! next anyway — so that what the file holds is what `mincore` sees
//! ([`Counts::faulted_pages`]).
//!
//! Punched subpages are not unmapped from the backend's own mapping: the
//! VMM reads through [`HugePunch::is_punched`](hugepunch::HugePunch::is_punched)
//! (CONTRACT.md "Queries for the VMM's own accesses").

use crate::attributes::SharedBits;
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, Mapping};
use hugepunch::{Attribute, ByteRange, Hint, Host, HostError, SUBPAGE_SIZE};
use rustix::fd::OwnedFd;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// The 2 MiB huge page the backend reasons about (order 9).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Which kind of file backs the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `memfd_create` (shmem; hugetlbfs or THP shmem where offered).
    Memfd,
    /// KVM `guest_memfd` of a type-0 VM, mmap()able.
    GuestMemfd,
    /// A file on a tmpfs mounted with `huge=always` for this file alone and
    /// never attached to any mount namespace ([`sys::thp_tmpfs_file`]):
    /// real transparent huge pages with no set-up, nothing left behind.
    /// Needs the right to mount (root).
    Thp,
    /// An unnamed file in this directory (`O_TMPFILE`, or a name unlinked
    /// at once), with the huge page size its filesystem reports: hugetlbfs
    /// its page size, a tmpfs its `huge=` mount option.
    File(std::path::PathBuf),
}

impl Backend {
    /// guest-memfd where /dev/kvm works and offers mmap()able guest_memfd,
    /// else memfd.
    pub fn default_here() -> Backend {
        if guest_memfd_unavailable().is_none() {
            Backend::GuestMemfd
        } else {
            Backend::Memfd
        }
    }

    /// `memfd`, `guest-memfd`, `thp` or `file`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memfd => "memfd",
            Backend::GuestMemfd => "guest-memfd",
            Backend::Thp => "thp",
            Backend::File(_) => "file",
        }
    }

    /// The backend names a user may give (`file` takes a directory, as
    /// `file:DIR` here or `--backend file --path DIR` in the tool).
    pub const NAMES: [&'static str; 4] = ["memfd", "guest-memfd", "thp", "file"];
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::File(dir) => write!(f, "file:{}", dir.display()),
            other => f.write_str(other.name()),
        }
    }
}

impl Serialize for Backend {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Backend {
    type Err = SetupError;
    fn from_str(s: &str) -> Result<Self, SetupError> {
        match s {
            "memfd" => Ok(Backend::Memfd),
            "guest-memfd" | "guest_memfd" | "gmem" => Ok(Backend::GuestMemfd),
            "thp" => Ok(Backend::Thp),
            "file" => Err(SetupError::FileNeedsPath),
            other => match other.strip_prefix("file:") {
                Some(dir) if !dir.is_empty() => Ok(Backend::File(dir.into())),
                _ => Err(SetupError::UnknownBackend(other.to_string())),
            },
        }
    }
}

/// Why a host could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// Not `memfd`, `guest-memfd`, `thp` or `file:DIR`.
    #[error("unknown backend {0:?} (memfd, guest-memfd, thp, or file with a directory)")]
    UnknownBackend(String),
    /// `file` without a directory.
    #[error("the file backend needs a directory: file:DIR (the tool: --backend file --path DIR)")]
    FileNeedsPath,
    /// The size is not a positive multiple of the huge page size.
    #[error(
        "size {size:#x} must be a positive multiple of the huge page size ({huge_page_size:#x})"
    )]
    BadSize {
        /// The size asked for.
        size: u64,
        /// The file's huge page size.
        huge_page_size: u64,
    },
    /// The directory of a file backend could not take the file.
    #[error("{dir}: {step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    File {
        /// The directory.
        dir: std::path::PathBuf,
        /// What was being done.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
    /// The THP backend could not mount its tmpfs; the message says why and
    /// what to run instead.
    #[error("cannot mount a private huge=always tmpfs: {step} failed: {}; {advice}", std::io::Error::from_raw_os_error(*errno))]
    CannotMount {
        /// The step that failed.
        step: &'static str,
        /// The errno.
        errno: i32,
        /// What to run instead.
        advice: &'static str,
    },
    /// A syscall failed.
    #[error("{step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Syscall {
        /// What was being done.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
    /// guest_memfd is not usable here; the reason says why.
    #[error("guest_memfd unavailable: {0}")]
    GuestMemfdUnavailable(String),
}

/// Is an mmap()able guest_memfd unavailable here? `None` when it works,
/// else the reason (for tests that skip, and for the default backend).
pub fn guest_memfd_unavailable() -> Option<String> {
    match sys::Kvm::open() {
        Err(e) => Some(e.to_string()),
        Ok(kvm) => {
            let want = sys::GUEST_MEMFD_FLAG_MMAP | sys::GUEST_MEMFD_FLAG_INIT_SHARED;
            (kvm.guest_memfd_flags & want != want).then(|| {
                format!(
                    "KVM_CAP_GUEST_MEMFD_FLAGS is {:#x}: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED ({want:#x}) not offered",
                    kvm.guest_memfd_flags
                )
            })
        }
    }
}

/// What backs a 2 MiB huge page of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum HugeBacking {
    /// Only 4 KiB pages; the detail says why (the host's settings).
    None(String),
    /// Transparent huge pages of shmem, as the host's settings offer them.
    Thp(String),
    /// `MFD_HUGETLB` with 2 MiB pages the host has reserved.
    Hugetlb(String),
}

impl HugeBacking {
    /// Is the memory really backed by huge pages?
    pub fn available(&self) -> bool {
        !matches!(self, HugeBacking::None(_))
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            HugeBacking::None(why) => format!("none available ({why})"),
            HugeBacking::Thp(how) => format!("THP shmem ({how})"),
            HugeBacking::Hugetlb(how) => format!("hugetlb ({how})"),
        }
    }
}

fn bracketed(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let start = s.find('[')? + 1;
    let end = start + s[start..].find(']')?;
    Some(s[start..end].to_string())
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// THP mode for 2 MiB shmem pages as the host configured it (read only:
/// system settings are never changed).
fn shmem_thp_mode() -> (String, String) {
    let top = bracketed("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_else(|| "absent".into());
    let per = bracketed("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled");
    let desc = match &per {
        Some(p) => format!("shmem_enabled=[{top}], hugepages-2048kB/shmem_enabled=[{p}]"),
        None => format!("shmem_enabled=[{top}]"),
    };
    let effective = match per.as_deref() {
        Some("inherit") | None => top,
        Some(p) => p.to_string(),
    };
    (effective, desc)
}

/// What huge page backing a memfd of `size` bytes can get here without
/// changing any system setting. hugetlb needs enough free reserved 2 MiB
/// pages; THP shmem needs `always`, `within_size`, `force` or `advise`
/// (the last through `MADV_HUGEPAGE` on the backend's mapping).
pub fn memfd_huge_backing(size: u64) -> HugeBacking {
    let free = read_u64("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").unwrap_or(0);
    let (mode, desc) = shmem_thp_mode();
    if matches!(mode.as_str(), "always" | "within_size" | "force" | "advise") {
        return HugeBacking::Thp(desc);
    }
    if free >= size / HUGE_PAGE_SIZE {
        return HugeBacking::Hugetlb(format!("{free} free 2 MiB hugetlb pages"));
    }
    HugeBacking::None(format!("{desc}, {free} free 2 MiB hugetlb pages"))
}

/// The huge page backing of a file on filesystem `fs` in `dir`, and its
/// huge page size.
fn file_backing(dir: &std::path::Path, fs: &sys::FsOf) -> (HugeBacking, u64) {
    let at = dir.display();
    match fs.magic {
        sys::HUGETLBFS_MAGIC => (
            HugeBacking::Hugetlb(format!(
                "hugetlbfs at {at}, {} pages",
                bytesize_exact(fs.block_size)
            )),
            fs.block_size,
        ),
        sys::TMPFS_MAGIC => {
            let huge = mount_options(fs.dev)
                .and_then(|opts| tmpfs_huge_option(&opts).map(str::to_string))
                .unwrap_or_else(|| "never".to_string());
            let desc = format!("tmpfs at {at}, mounted huge={huge}");
            let backing = match huge.as_str() {
                "always" | "within_size" | "advise" => HugeBacking::Thp(desc),
                _ => HugeBacking::None(desc),
            };
            (backing, HUGE_PAGE_SIZE)
        }
        other => (
            HugeBacking::None(format!(
                "{at} is on a filesystem of type {other:#x}, not tmpfs or hugetlbfs: 4 KiB pages"
            )),
            HUGE_PAGE_SIZE,
        ),
    }
}

/// `2 MiB`, `1 GiB`, else bytes.
fn bytesize_exact(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// The super options (after the ` - fstype source` separator) of the mount
/// whose superblock is `dev` in the calling thread's mountinfo (a thread
/// may have a mount namespace of its own: /proc/self is the process's
/// first thread).
fn mount_options(dev: (u32, u32)) -> Option<String> {
    let info = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .or_else(|_| std::fs::read_to_string("/proc/self/mountinfo"))
        .ok()?;
    let want = format!("{}:{}", dev.0, dev.1);
    info.lines()
        .filter(|l| l.split(' ').nth(2) == Some(want.as_str()))
        .find_map(|l| super_options(l).map(str::to_string))
}

/// The super options of one /proc/self/mountinfo line.
fn super_options(line: &str) -> Option<&str> {
    let (_, after) = line.split_once(" - ")?;
    after.split(' ').nth(2)
}

/// The value of `huge=` in a tmpfs mount's options, if given.
fn tmpfs_huge_option(opts: &str) -> Option<&str> {
    opts.split(',').find_map(|o| o.strip_prefix("huge="))
}

/// Counts of what the backend did (exact when no call is in flight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// `fallocate(PUNCH_HOLE)` calls that reached the kernel, including failed ones.
    pub punch_calls: u64,
    /// Bytes those punches covered (successful ones).
    pub punched_bytes: u64,
    /// `fallocate(KEEP_SIZE)` allocation calls that reached the kernel.
    pub allocate_calls: u64,
    /// `fallocate` calls that returned an error (after `EINTR` retries).
    pub fallocate_errors: u64,
    /// Nanoseconds spent inside `fallocate`.
    pub fallocate_nanos: u64,
    /// `zero` calls.
    pub zero_calls: u64,
    /// Bytes zeroed.
    pub zeroed_bytes: u64,
    /// Nanoseconds spent zeroing.
    pub zero_nanos: u64,
    /// 4 KiB pages faulted in after a guest_memfd allocation.
    pub faulted_pages: u64,
    /// Nanoseconds spent faulting them in.
    pub fault_nanos: u64,
    /// `invalidate_begin` calls.
    pub invalidations_begun: u64,
    /// `invalidate_end` calls.
    pub invalidations_ended: u64,
    /// Huge pages that a partial free broke into 4 KiB pieces (at least
    /// once) and that a whole free or allocation has not made whole again.
    pub huge_pages_split: u64,
}

impl Counts {
    /// Every `fallocate` call (punch or allocation).
    pub fn fallocate_calls(&self) -> u64 {
        self.punch_calls + self.allocate_calls
    }
}

#[derive(Default)]
struct Counters {
    punch_calls: AtomicU64,
    punched_bytes: AtomicU64,
    allocate_calls: AtomicU64,
    fallocate_errors: AtomicU64,
    fallocate_nanos: AtomicU64,
    zero_calls: AtomicU64,
    zeroed_bytes: AtomicU64,
    zero_nanos: AtomicU64,
    faulted_pages: AtomicU64,
    fault_nanos: AtomicU64,
    invalidations_begun: AtomicU64,
    invalidations_ended: AtomicU64,
}

fn add(c: &AtomicU64, v: u64) {
    // ORDERING: Relaxed: a statistic; readers take it at quiescent points,
    // after joining the threads that counted (the join synchronises).
    c.fetch_add(v, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    // ORDERING: Relaxed: see `add`.
    c.load(Ordering::Relaxed)
}

/// How the file was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// Backend kind.
    pub backend: Backend,
    /// Size in bytes.
    pub size: u64,
    /// Huge page backing.
    pub huge_backing: HugeBacking,
    /// guest_memfd flags used (0 for memfd).
    pub guest_memfd_flags: u64,
    /// Whether a KVM memslot is bound to the guest_memfd.
    pub memslot: bool,
    /// The huge page size the file's memory comes in (and the engine's
    /// geometry): 2 MiB, or what hugetlbfs reports.
    pub huge_page_size: u64,
}

/// The engine's host over a real file: see the module documentation.
pub struct LinuxHost {
    // Field order is drop order: the VM goes first, deleting its memslot
    // (which holds its own `Arc` of the mapping, so no drop order could
    // unmap the memory under it), then the mapping, then the file.
    kvm: Option<sys::Kvm>,
    map: Arc<Mapping>,
    fd: OwnedFd,
    info: FileInfo,
    /// One bit per subpage, set = shared.
    shared: SharedBits,
    /// One bit per 2 MiB huge page: broken by a partial free.
    split: Box<[AtomicU64]>,
    counters: Counters,
}

/// Options for [`LinuxHost::memfd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemfdOptions {
    /// Use hugetlbfs or THP shmem when the host offers them (never changes
    /// a setting). Off: plain 4 KiB shmem.
    pub use_huge_pages: bool,
}

impl LinuxHost {
    fn build(fd: OwnedFd, kvm: Option<sys::Kvm>, info: FileInfo) -> Result<Self, SetupError> {
        // SAFETY: `fd` is the memfd this host made and sized to
        // `info.size` (ftruncate), or the guest_memfd it created with that
        // size and `MMAP | INIT_SHARED` (every page faults in, and a
        // guest_memfd cannot be resized). The host keeps the fd private
        // and never truncates it; punching holes keeps the size, and a
        // hole faults in as zeros. One trap remains, on hugetlb backing
        // only: a hole touched without the `fallocate` the engine's
        // `allocate` makes first needs a free huge page, and raises SIGBUS
        // (ending the process, corrupting nothing) if the reserved pool is
        // empty — the backend's own callbacks only touch resident memory.
        let map = unsafe { Mapping::new(&fd, info.size as usize) }.map_err(|errno| {
            SetupError::Syscall {
                step: "mmap",
                errno,
            }
        })?;
        let map = Arc::new(map);
        let subpages = info.size / SUBPAGE_SIZE;
        let mut host = LinuxHost {
            kvm,
            map,
            fd,
            shared: SharedBits::new(subpages),
            split: (0..(info.size / info.huge_page_size).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            counters: Counters::default(),
            info,
        };
        if let Some(kvm) = &mut host.kvm {
            host.info.memslot = kvm.bind_memslot(&host.fd, &host.map).is_ok();
        }
        Ok(host)
    }

    fn check_size(size: u64, huge_page_size: u64) -> Result<(), SetupError> {
        if size == 0 || !size.is_multiple_of(huge_page_size) || usize::try_from(size).is_err() {
            return Err(SetupError::BadSize {
                size,
                huge_page_size,
            });
        }
        Ok(())
    }

    /// A memfd of `size` bytes (a multiple of 2 MiB), empty, every subpage
    /// private.
    pub fn memfd(size: u64, opts: MemfdOptions) -> Result<Self, SetupError> {
        Self::check_size(size, HUGE_PAGE_SIZE)?;
        let huge = if opts.use_huge_pages {
            memfd_huge_backing(size)
        } else {
            HugeBacking::None("4 KiB shmem asked for".into())
        };
        let hugetlb = matches!(huge, HugeBacking::Hugetlb(_));
        let fd = sys::memfd("hugepunch", size, hugetlb).map_err(|errno| SetupError::Syscall {
            step: "memfd_create",
            errno,
        })?;
        let info = FileInfo {
            backend: Backend::Memfd,
            size,
            huge_backing: huge,
            guest_memfd_flags: 0,
            memslot: false,
            huge_page_size: HUGE_PAGE_SIZE,
        };
        let host = Self::build(fd, None, info)?;
        if matches!(host.info.huge_backing, HugeBacking::Thp(_)) {
            // Only matters in `advise` mode; harmless otherwise.
            let _ = host.map.advise_hugepage();
        }
        Ok(host)
    }

    /// A guest_memfd of `size` bytes (a multiple of 2 MiB) of a fresh type-0
    /// VM, created with `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`
    /// (refused where `KVM_CAP_GUEST_MEMFD_FLAGS` does not offer both: without
    /// them the file cannot be mapped, zeroed or measured), mapped, and bound
    /// to memslot 0 when the kernel accepts it (`FileInfo::memslot`). Empty,
    /// every subpage private in the backend's tracking.
    pub fn guest_memfd(size: u64) -> Result<Self, SetupError> {
        Self::check_size(size, HUGE_PAGE_SIZE)?;
        let kvm = sys::Kvm::open().map_err(|e| SetupError::GuestMemfdUnavailable(e.to_string()))?;
        let want = sys::GUEST_MEMFD_FLAG_MMAP | sys::GUEST_MEMFD_FLAG_INIT_SHARED;
        if kvm.guest_memfd_flags & want != want {
            return Err(SetupError::GuestMemfdUnavailable(format!(
                "KVM_CAP_GUEST_MEMFD_FLAGS is {:#x}, need {want:#x}",
                kvm.guest_memfd_flags
            )));
        }
        let fd = kvm
            .guest_memfd(size, want)
            .map_err(|e| SetupError::GuestMemfdUnavailable(e.to_string()))?;
        let info = FileInfo {
            backend: Backend::GuestMemfd,
            size,
            huge_backing: HugeBacking::None(
                "guest_memfd allocates 4 KiB folios on this kernel".into(),
            ),
            guest_memfd_flags: want,
            memslot: false,
            huge_page_size: HUGE_PAGE_SIZE,
        };
        Self::build(fd, Some(kvm), info)
    }

    /// A file of `size` bytes on a private tmpfs mounted with `huge=always`
    /// for it alone ([`Backend::Thp`], [`sys::thp_tmpfs_file`]): real
    /// transparent huge pages with nothing to set up and nothing left
    /// behind. Where the process may not mount, the error says why and
    /// what to run instead.
    pub fn thp(size: u64) -> Result<Self, SetupError> {
        Self::check_size(size, HUGE_PAGE_SIZE)?;
        let fd = sys::thp_tmpfs_file(size).map_err(|e| SetupError::CannotMount {
            step: e.step,
            errno: e.errno,
            advice: if e.errno == libc::EPERM {
                "mounting needs CAP_SYS_ADMIN (run as root); or mount a tmpfs with \
                 -o huge=always yourself and use --backend file --path DIR on it"
            } else {
                "this kernel may lack the mount API (fsopen, Linux 5.2) or tmpfs huge= \
                 (CONFIG_TRANSPARENT_HUGEPAGE); use --backend file --path DIR on a tmpfs \
                 mounted with -o huge=always"
            },
        })?;
        let info = FileInfo {
            backend: Backend::Thp,
            size,
            huge_backing: HugeBacking::Thp(
                "a private tmpfs, huge=always, never attached to a mount point".into(),
            ),
            guest_memfd_flags: 0,
            memslot: false,
            huge_page_size: HUGE_PAGE_SIZE,
        };
        Self::build(fd, None, info)
    }

    /// An unnamed file of `size` bytes in `dir` ([`Backend::File`]), with
    /// the huge page size its filesystem reports: hugetlbfs its page size
    /// (`statfs`), a tmpfs the `huge=` option of its mount (read from
    /// /proc/self/mountinfo), any other filesystem 4 KiB pages in the
    /// engine's 2 MiB geometry. `size` must be a positive multiple of that
    /// huge page size.
    pub fn file(dir: &std::path::Path, size: u64) -> Result<Self, SetupError> {
        let file_err = |e: sys::StepError| SetupError::File {
            dir: dir.to_path_buf(),
            step: e.step,
            errno: e.errno,
        };
        // Sized after the filesystem is known: hugetlbfs refuses a size
        // that is not a multiple of its page size.
        let fd = sys::file_in(dir, 0).map_err(file_err)?;
        let fs = sys::fs_of(&fd).map_err(|errno| {
            file_err(sys::StepError {
                step: "fstatfs",
                errno,
            })
        })?;
        let (huge_backing, huge_page_size) = file_backing(dir, &fs);
        Self::check_size(size, huge_page_size)?;
        sys::set_len(&fd, size).map_err(|errno| {
            file_err(sys::StepError {
                step: "ftruncate",
                errno,
            })
        })?;
        let info = FileInfo {
            backend: Backend::File(dir.to_path_buf()),
            size,
            huge_backing,
            guest_memfd_flags: 0,
            memslot: false,
            huge_page_size,
        };
        let host = Self::build(fd, None, info)?;
        if matches!(&host.info.huge_backing, HugeBacking::Thp(d) if d.contains("advise")) {
            let _ = host.map.advise_hugepage();
        }
        Ok(host)
    }

    /// The huge page size a file of `backend` would have: what the
    /// filesystem of a [`Backend::File`] directory reports (a file is made
    /// there and dropped to ask), 2 MiB for the others.
    pub fn huge_page_size_of(backend: &Backend) -> Result<u64, SetupError> {
        let Backend::File(dir) = backend else {
            return Ok(HUGE_PAGE_SIZE);
        };
        let file_err = |e: sys::StepError| SetupError::File {
            dir: dir.to_path_buf(),
            step: e.step,
            errno: e.errno,
        };
        let fd = sys::file_in(dir, 0).map_err(file_err)?;
        let fs = sys::fs_of(&fd).map_err(|errno| {
            file_err(sys::StepError {
                step: "fstatfs",
                errno,
            })
        })?;
        Ok(file_backing(dir, &fs).1)
    }

    /// A host of `backend`; memfd uses huge pages where the host offers them.
    pub fn open(backend: &Backend, size: u64) -> Result<Self, SetupError> {
        match backend {
            Backend::Thp => Self::thp(size),
            Backend::File(dir) => Self::file(dir, size),
            Backend::Memfd => Self::memfd(
                size,
                MemfdOptions {
                    use_huge_pages: true,
                },
            ),
            Backend::GuestMemfd => Self::guest_memfd(size),
        }
    }

    /// The VM a guest_memfd belongs to (`None` for the other backends): a
    /// VMM adds its vCPUs and other memslots to it.
    pub fn kvm(&self) -> Option<&sys::Kvm> {
        self.kvm.as_ref()
    }

    /// The backend's own shared mapping of the whole file (2 MiB aligned):
    /// what a VMM hands KVM as an ordinary memslot's `userspace_addr`.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// How the file was made.
    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    /// File size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The huge page size of the file's memory (the engine's geometry).
    pub fn huge_page_size(&self) -> u64 {
        self.info.huge_page_size
    }

    /// The engine configuration for this file: its size and its huge page
    /// order.
    pub fn config(&self) -> hugepunch::Config {
        hugepunch::Config::new(self.info.size)
            .order((self.info.huge_page_size / SUBPAGE_SIZE).trailing_zeros() as u8)
    }

    /// `st_blocks * 512` of the file (`fstat`), whatever the backend (always
    /// 0 for guest_memfd).
    pub fn allocated_bytes(&self) -> Result<u64, i32> {
        sys::allocated_bytes(&self.fd)
    }

    /// Allocate the whole file (the engine's default "populated" start),
    /// not counted in [`counts`](Self::counts), then read one byte of each
    /// 4 KiB page through the backend's mapping: the whole file ends up
    /// mapped, as a VMM maps guest memory, and guest_memfd's folios up to
    /// date (see the module documentation). With THP in `advise` mode each
    /// huge page is first touched through the `MADV_HUGEPAGE` mapping,
    /// since a fallocate allocation takes no advice.
    pub fn populate_all(&self) -> Result<(), HostError> {
        if matches!(&self.info.huge_backing, HugeBacking::Thp(d) if d.contains("advise")) {
            let hp = self.info.huge_page_size;
            for h in 0..self.info.size / hp {
                self.map.zero(ByteRange::new(h * hp, SUBPAGE_SIZE));
            }
        }
        sys::allocate(&self.fd, 0, self.info.size).map_err(|errno| HostError { errno })?;
        self.map.touch(ByteRange::new(0, self.info.size));
        Ok(())
    }

    /// Allocate the whole file with one `fallocate`, not counted in
    /// [`counts`](Self::counts), without touching it through the backend's
    /// mapping: for a guest that faults its memory in itself (a guest_memfd
    /// page a vCPU writes is cleared and marked up to date by KVM). Memory
    /// the VMM never maps costs nothing to unmap when it is freed.
    pub fn allocate_all(&self) -> Result<(), HostError> {
        sys::allocate(&self.fd, 0, self.info.size).map_err(|errno| HostError { errno })
    }

    /// guest_memfd: fault in what `fallocate` just allocated (see the module
    /// documentation).
    fn fault_in(&self, range: ByteRange) {
        if self.info.backend == Backend::GuestMemfd {
            let t = Instant::now();
            self.map.touch(range);
            add(&self.counters.fault_nanos, t.elapsed().as_nanos() as u64);
            add(&self.counters.faulted_pages, range.subpages());
        }
    }

    /// Mark every subpage shared (or private) in the backend's tracking.
    pub fn set_all(&self, to: Attribute) {
        self.shared.set_all(to);
    }

    /// What the backend did so far.
    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        Counts {
            punch_calls: get(&c.punch_calls),
            punched_bytes: get(&c.punched_bytes),
            allocate_calls: get(&c.allocate_calls),
            fallocate_errors: get(&c.fallocate_errors),
            fallocate_nanos: get(&c.fallocate_nanos),
            zero_calls: get(&c.zero_calls),
            zeroed_bytes: get(&c.zeroed_bytes),
            zero_nanos: get(&c.zero_nanos),
            faulted_pages: get(&c.faulted_pages),
            fault_nanos: get(&c.fault_nanos),
            invalidations_begun: get(&c.invalidations_begun),
            invalidations_ended: get(&c.invalidations_ended),
            huge_pages_split: self
                .split
                .iter()
                // ORDERING: Relaxed: a statistic, read at quiescent points.
                .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
                .sum(),
        }
    }

    /// Invalidations begun and not yet ended (0 at quiescent points): the
    /// two counters' difference, so that a pair costs the punch that makes
    /// it two atomic adds, not four.
    pub fn invalidations_open(&self) -> i64 {
        get(&self.counters.invalidations_begun) as i64
            - get(&self.counters.invalidations_ended) as i64
    }

    /// Bytes the file really holds: `st_blocks * 512` for memfd, resident
    /// pages by `mincore` over the mapping for guest_memfd (whose
    /// `st_blocks` is always 0).
    pub fn resident_bytes(&self) -> Result<u64, i32> {
        match self.info.backend {
            Backend::GuestMemfd => self.resident_bytes_in(ByteRange::new(0, self.info.size)),
            _ => sys::allocated_bytes(&self.fd),
        }
    }

    /// Resident bytes of `range` by `mincore` (either backend).
    pub fn resident_bytes_in(&self, range: ByteRange) -> Result<u64, i32> {
        Ok(self.map.resident_pages(range)? * SUBPAGE_SIZE)
    }

    /// Read `buf.len()` bytes at `offset` without allocating anything: pread
    /// for memfd; for guest_memfd (no pread) through the mapping, and only
    /// where resident (a hole reads as zeros and is not touched).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        match self.info.backend {
            Backend::Memfd | Backend::Thp | Backend::File(_) => {
                sys::pread_exact(&self.fd, buf, offset)
            }
            Backend::GuestMemfd => {
                for (i, chunk) in buf.chunks_mut(SUBPAGE_SIZE as usize).enumerate() {
                    let at = offset + i as u64 * SUBPAGE_SIZE;
                    if self.map.resident_pages(ByteRange::new(at, SUBPAGE_SIZE))? == 1 {
                        self.map.read(at, chunk);
                    } else {
                        chunk.fill(0);
                    }
                }
                Ok(())
            }
        }
    }

    /// Fill `range` with `byte` through the mapping (allocates holes).
    pub fn fill(&self, range: ByteRange, byte: u8) {
        self.map.fill(range, byte);
    }

    /// A raw `fallocate(PUNCH_HOLE | KEEP_SIZE)` with no validation, counted
    /// like any other punch: the kernel's own answer, for comparing
    /// with hugepunch's (the invalid-punch matrix).
    pub fn raw_punch(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.timed_fallocate(true, offset, len, || sys::punch_hole(&self.fd, offset, len))
    }

    fn timed_fallocate(
        &self,
        punch: bool,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> Result<(), i32>,
    ) -> Result<(), i32> {
        let c = &self.counters;
        add(
            if punch {
                &c.punch_calls
            } else {
                &c.allocate_calls
            },
            1,
        );
        let t = Instant::now();
        let res = f();
        add(&c.fallocate_nanos, t.elapsed().as_nanos() as u64);
        match res {
            Ok(()) if punch => {
                add(&c.punched_bytes, len);
                self.note_split(offset, len, true);
            }
            Ok(()) => self.note_split(offset, len, false),
            Err(_) => add(&c.fallocate_errors, 1),
        }
        res
    }

    /// Track huge pages broken by partial frees: a partial punch of a huge
    /// page splits it; a whole free or allocation of it makes it whole.
    fn note_split(&self, offset: u64, len: u64, punch: bool) {
        let end = offset.saturating_add(len).min(self.info.size);
        let mut at = offset;
        while at < end {
            let hp = self.info.huge_page_size;
            let h = at / hp;
            let page_end = (h + 1) * hp;
            let whole = at == h * hp && end >= page_end;
            let bit = 1u64 << (h % 64);
            let w = &self.split[(h / 64) as usize];
            // ORDERING: Relaxed: a statistic (see `counts`).
            if whole {
                w.fetch_and(!bit, Ordering::Relaxed);
            } else if punch {
                w.fetch_or(bit, Ordering::Relaxed);
            }
            at = page_end;
        }
    }

    fn check(&self, r: ByteRange) {
        assert!(
            r.len > 0
                && r.offset.is_multiple_of(SUBPAGE_SIZE)
                && r.len.is_multiple_of(SUBPAGE_SIZE)
                && r.end() <= self.info.size,
            "the engine passed a range outside the file: {r:?}"
        );
    }
}

impl Host for LinuxHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.check(range);
        self.shared.all_shared(range)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        self.check(range);
        self.shared.set(range, to);
    }

    fn invalidate_begin(&self, range: ByteRange, _hint: Hint) {
        self.check(range);
        add(&self.counters.invalidations_begun, 1);
    }

    fn invalidate_end(&self, range: ByteRange) {
        self.check(range);
        add(&self.counters.invalidations_ended, 1);
    }

    fn allocate(&self, range: ByteRange, _order: u8) -> Result<(), HostError> {
        self.check(range);
        self.timed_fallocate(false, range.offset, range.len, || {
            sys::allocate(&self.fd, range.offset, range.len)
        })
        .map_err(|errno| HostError { errno })?;
        self.fault_in(range);
        Ok(())
    }

    fn free(&self, range: ByteRange, _order: u8) -> Result<(), HostError> {
        self.check(range);
        self.timed_fallocate(true, range.offset, range.len, || {
            sys::punch_hole(&self.fd, range.offset, range.len)
        })
        .map_err(|errno| HostError { errno })
    }

    fn zero(&self, range: ByteRange) {
        self.check(range);
        add(&self.counters.zero_calls, 1);
        add(&self.counters.zeroed_bytes, range.len);
        let t = Instant::now();
        self.map.zero(range);
        add(&self.counters.zero_nanos, t.elapsed().as_nanos() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for b in [
            Backend::Memfd,
            Backend::GuestMemfd,
            Backend::Thp,
            Backend::File("/dev/hugepages".into()),
        ] {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
        }
        assert!("tmpfs".parse::<Backend>().is_err());
        assert_eq!("file".parse::<Backend>(), Err(SetupError::FileNeedsPath));
        assert!("file:".parse::<Backend>().is_err());
    }

    #[test]
    fn mountinfo_super_options_are_read() {
        let line = "63 43 0:39 / /mnt rw,relatime shared:1 - tmpfs tmpfs rw,size=8192k,huge=always";
        assert_eq!(super_options(line), Some("rw,size=8192k,huge=always"));
        assert_eq!(
            tmpfs_huge_option("rw,size=8192k,huge=always"),
            Some("always")
        );
        assert_eq!(
            tmpfs_huge_option("rw,huge=within_size"),
            Some("within_size")
        );
        assert_eq!(tmpfs_huge_option("rw,relatime"), None);
        assert_eq!(super_options("no separator here"), None);
    }

    #[test]
    fn a_file_on_a_plain_directory_has_no_huge_pages() {
        let dir = std::env::temp_dir();
        let host = LinuxHost::file(&dir, 2 << 20).expect("a file in the temp dir");
        assert_eq!(host.huge_page_size(), HUGE_PAGE_SIZE);
        host.populate_all().unwrap();
        assert_eq!(host.resident_bytes().unwrap(), 2 << 20);
        // No name is left in the directory.
        let left = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".hugepunch-"))
            .count();
        assert_eq!(left, 0);
    }
}
