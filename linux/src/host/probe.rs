//! Backend probing: the kinds of file ([`Backend`]), whether guest_memfd
//! works here, and what huge page backing a memfd or a directory's
//! filesystem can get — read from the host's settings and mounts, never
//! changed.

use super::{SetupError, HUGE_PAGE_SIZE};
use crate::sys;
use rustix::fd::OwnedFd;
use serde::Serialize;
use std::path::Path;

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
fn file_backing(dir: &Path, fs: &sys::FsOf) -> (HugeBacking, u64) {
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

/// A fresh unnamed file in `dir` (not yet sized), with the huge page
/// backing and huge page size its filesystem gives it.
pub(super) fn probe_dir(dir: &Path) -> Result<(OwnedFd, HugeBacking, u64), SetupError> {
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
    let (backing, huge_page_size) = file_backing(dir, &fs);
    Ok((fd, backing, huge_page_size))
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
}
