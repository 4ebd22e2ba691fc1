//! The constructors of [`LinuxHost`], one per [`Backend`].

use super::probe::{memfd_huge_backing, probe_dir};
use super::{Backend, FileInfo, HugeBacking, LinuxHost, SetupError, HUGE_PAGE_SIZE};
use crate::sys::{self, SizedFile};

/// Options for [`LinuxHost::memfd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemfdOptions {
    /// Use hugetlbfs or THP shmem when the host offers them (never changes
    /// a setting). Off: plain 4 KiB shmem.
    pub use_huge_pages: bool,
}

impl LinuxHost {
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
        let file =
            SizedFile::memfd("hugepunch", size, hugetlb).map_err(|errno| SetupError::Syscall {
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
        let host = Self::build(file, None, info)?;
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
        let file = kvm
            .shared_guest_memfd(size)
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
        Self::build(file, Some(kvm), info)
    }

    /// A file of `size` bytes on a private tmpfs mounted with `huge=always`
    /// for it alone ([`Backend::Thp`], [`sys::thp_tmpfs_file`]): real
    /// transparent huge pages with nothing to set up and nothing left
    /// behind. Where the process may not mount, the error says why and
    /// what to run instead.
    pub fn thp(size: u64) -> Result<Self, SetupError> {
        Self::check_size(size, HUGE_PAGE_SIZE)?;
        let file = sys::thp_tmpfs_file(size).map_err(|e| SetupError::CannotMount {
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
        Self::build(file, None, info)
    }

    /// An unnamed file of `size` bytes in `dir` ([`Backend::File`]), with
    /// the huge page size its filesystem reports: hugetlbfs its page size
    /// (`statfs`), a tmpfs the `huge=` option of its mount (read from
    /// /proc/self/mountinfo), any other filesystem 4 KiB pages in the
    /// engine's 2 MiB geometry. `size` must be a positive multiple of that
    /// huge page size.
    pub fn file(dir: &std::path::Path, size: u64) -> Result<Self, SetupError> {
        // Sized after the filesystem is known: hugetlbfs refuses a size
        // that is not a multiple of its page size.
        let (fd, huge_backing, huge_page_size) = probe_dir(dir)?;
        Self::check_size(size, huge_page_size)?;
        let file = SizedFile::new(fd, size).map_err(|errno| SetupError::File {
            dir: dir.to_path_buf(),
            step: "ftruncate",
            errno,
        })?;
        let info = FileInfo {
            backend: Backend::File(dir.to_path_buf()),
            size,
            huge_backing,
            guest_memfd_flags: 0,
            memslot: false,
            huge_page_size,
        };
        let host = Self::build(file, None, info)?;
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
        Ok(probe_dir(dir)?.2)
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
}
