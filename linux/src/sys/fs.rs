//! Filesystems: what a file lives on (`fstatfs`), unnamed files in a
//! directory the user names, and a private `huge=always` tmpfs made with
//! the mount API for one file.

use super::errno;
use super::fd::SizedFile;
use rustix::fd::{AsFd, OwnedFd};
use rustix::io::Errno;

/// `f_type` of a hugetlbfs mount (`statfs`).
pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// `f_type` of a tmpfs mount (`statfs`).
pub const TMPFS_MAGIC: u64 = 0x0102_1994;

/// What `fstatfs` and `fstat` say about the filesystem a file lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsOf {
    /// `f_type`: [`HUGETLBFS_MAGIC`], [`TMPFS_MAGIC`], or another.
    pub magic: u64,
    /// `f_bsize`: hugetlbfs reports its huge page size here.
    pub block_size: u64,
    /// `major:minor` of `st_dev`, as /proc/self/mountinfo's third field
    /// names the mount's superblock.
    pub dev: (u32, u32),
}

/// `fstatfs` and `fstat` of `fd`.
pub fn fs_of(fd: impl AsFd) -> Result<FsOf, i32> {
    let fs = rustix::fs::fstatfs(&fd).map_err(errno)?;
    let st = rustix::fs::fstat(&fd).map_err(errno)?;
    Ok(FsOf {
        // The kernel's f_type is a signed word; the magic numbers are
        // 32-bit values, so keep the low 32 bits.
        magic: fs.f_type as u64 & 0xffff_ffff,
        block_size: fs.f_bsize as u64,
        dev: (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)),
    })
}

/// A step of making a file that failed, and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepError {
    /// The system call, as a user would look it up.
    pub step: &'static str,
    /// The errno.
    pub errno: i32,
}

fn step(step: &'static str) -> impl Fn(Errno) -> StepError {
    move |e| StepError {
        step,
        errno: errno(e),
    }
}

/// An unnamed file of `size` bytes in directory `dir`, as QEMU's
/// `memory-backend-file,mem-path=DIR` makes one: `O_TMPFILE` where the
/// filesystem supports it, else a fresh name (`O_CREAT | O_EXCL`) unlinked
/// at once, so that no name is left behind on any exit path after this
/// call returns. Sized with `ftruncate` (hugetlbfs needs a multiple of its
/// page size).
pub fn file_in(dir: &std::path::Path, size: u64) -> Result<OwnedFd, StepError> {
    use rustix::fs::{Mode, OFlags};
    let rw = OFlags::RDWR | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(dir, rw | OFlags::TMPFILE, Mode::from_bits_truncate(0o600)) {
        Ok(fd) => fd,
        // Filesystems without O_TMPFILE answer EOPNOTSUPP (or EISDIR on
        // kernels that predate it).
        Err(Errno::OPNOTSUPP | Errno::ISDIR) => {
            let mut attempt = 0u32;
            loop {
                let name = dir.join(format!(
                    ".hugepunch-{}-{}-{attempt}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos())
                ));
                match rustix::fs::open(
                    &name,
                    rw | OFlags::CREATE | OFlags::EXCL,
                    Mode::from_bits_truncate(0o600),
                ) {
                    Ok(fd) => {
                        rustix::fs::unlink(&name).map_err(step("unlink"))?;
                        break fd;
                    }
                    Err(Errno::EXIST) if attempt < 16 => attempt += 1,
                    Err(e) => return Err(step("open (O_CREAT | O_EXCL)")(e)),
                }
            }
        }
        Err(e) => return Err(step("open (O_TMPFILE)")(e)),
    };
    rustix::fs::ftruncate(&fd, size).map_err(step("ftruncate"))?;
    Ok(fd)
}

/// An unnamed file of `size` bytes on a tmpfs of its own, mounted with
/// `huge=always` and never attached anywhere: the new mount API makes the
/// mount (`fsopen("tmpfs")`, `fsconfig` `huge=always` and `size=`,
/// `fsmount`) as a detached mount object, the file is made in it with
/// `O_TMPFILE`, and the mount's descriptor is closed before this returns.
/// No mount point or name exists in any mount namespace at any moment, so
/// nothing can be left behind on any exit path, SIGKILL included; the
/// file's descriptor keeps the tmpfs alive, and closing it frees both.
/// Needs `CAP_SYS_ADMIN` (root); system settings are not touched.
pub fn thp_tmpfs_file(size: u64) -> Result<SizedFile, StepError> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(step("fsopen(\"tmpfs\")"))?;
    fsconfig_set_string(&fs, "huge", "always").map_err(step("fsconfig huge=always"))?;
    // Room for the file and nothing else: a runaway writer hits ENOSPC,
    // not the machine's memory.
    fsconfig_set_string(&fs, "size", size.to_string().as_str()).map_err(step("fsconfig size="))?;
    fsconfig_create(&fs).map_err(step("fsconfig create"))?;
    let mnt = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )
    .map_err(step("fsmount"))?;
    let fd = rustix::fs::openat(
        &mnt,
        ".",
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::TMPFILE,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(step("openat (O_TMPFILE) in the new tmpfs"))?;
    SizedFile::new(fd, size).map_err(|errno| StepError {
        step: "ftruncate",
        errno,
    })
}
