//! Real transparent huge pages: the patterns on the THP backend (a private
//! `huge=always` tmpfs, `LinuxHost::thp`), with the kernel's own counters
//! saying what stayed whole, and the backend leaving nothing behind after a
//! panic or a SIGKILL.
//!
//! The counters are system wide (/proc/meminfo `ShmemHugePages`,
//! /proc/vmstat `thp_split_page`), so every test here holds [`THP`]: the
//! only other shmem huge pages on a test machine are its own. The tests
//! are ignored, with the probe's reason, where the process may not mount
//! (not root) or no hugetlb page is reserved (hugepunch-probe's `needs!`).
#![cfg(target_os = "linux")]

hugepunch_probe::include_needs!();

mod common;

use common::watchdog::Watchdog;
use common::*;
use hugepunch::HugePunch;
use hugepunch_linux::huge_counters::{HugeCounters, KernelHuge, Samples};
use hugepunch_linux::real::{run_with, RunOptions};
use hugepunch_linux::replay::{pattern, replay_direct, replay_engine};
use hugepunch_linux::{Backend, HugeBacking, LinuxHost};
use std::io::BufRead;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serialises the tests that read the system-wide counters.
static THP: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    THP.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The THP host of `size`, populated and written.
fn thp_host(size: u64) -> LinuxHost {
    host(Backend::Thp, size)
}

fn counters() -> HugeCounters {
    HugeCounters::read().expect("/proc/meminfo and /proc/vmstat")
}

/// What the kernel counted over `run` on a fresh THP file of `SIZE`.
fn measured(run: impl FnOnce(&Arc<LinuxHost>) -> u64) -> (KernelHuge, u64, Arc<LinuxHost>) {
    let empty = counters();
    let host = Arc::new(thp_host(SIZE));
    let backing = host.info().huge_backing.clone();
    assert!(matches!(backing, HugeBacking::Thp(_)), "{backing:?}");
    let start = counters();
    let extra = run(&host);
    let end = counters();
    let k = KernelHuge::from_counters(&backing, HP, &empty, &start, &end, &Samples::default())
        .expect("THP backing has kernel figures");
    (k, extra, host)
}

fn check_pattern(name: &str) {
    let _watchdog = Watchdog::arm(name);
    let _thp = lock();
    let ops = pattern(name, SIZE).unwrap();
    let huge_pages = SIZE / HP;

    // Through the engine: nothing split, every huge page it completes freed
    // whole, the rest still whole; the accounting checks of the other
    // backends hold.
    let (k, completed, host) = measured(|host| {
        let engine = HugePunch::new(host.config(), host.clone()).unwrap();
        replay_engine(&engine, &ops);
        assert_accounting(host, &engine, &format!("{name}: after the replay"));
        engine.stats().huge_frees
    });
    assert_eq!(
        k.whole_at_start, huge_pages,
        "{name}: huge=always gave every huge page of the file a THP"
    );
    assert_eq!(k.split, 0, "{name}: the engine split no huge page ({k:?})");
    assert_eq!(
        k.freed_whole, completed,
        "{name}: every huge page the engine freed was freed whole ({k:?})"
    );
    assert_eq!(
        k.whole_at_end,
        huge_pages - completed,
        "{name}: every other huge page is still whole ({k:?})"
    );
    if !matches!(name, "pin" | "conversion-churn") {
        assert_eq!(completed, huge_pages, "{name} punches every subpage");
    }
    assert_eq!(host.counts().huge_pages_split, 0);
    drop(host);

    // Directly, 4 KiB at a time: every huge page a punch touches is split.
    let (k, _, _) = measured(|host| {
        assert_eq!(replay_direct(host, &ops), 0);
        0
    });
    assert!(
        k.split >= huge_pages,
        "{name}: direct 4 KiB punching split every huge page ({k:?})"
    );
    assert_eq!(k.whole_at_end, 0, "{name}: ({k:?})");
}

macro_rules! thp_pattern_tests {
    ($($test:ident => $name:literal,)*) => {
        $(
            needs! { mount;
                #[test]
                #[cfg_attr(miri, ignore)]
                fn $test() {
                    check_pattern($name);
                }
            }
        )*
    };
}

thp_pattern_tests! {
    thp_ascending => "ascending",
    thp_descending => "descending",
    thp_random => "random",
    thp_strided => "strided",
    thp_round_robin => "round-robin",
    thp_pin => "pin",
    thp_conversion_churn => "conversion-churn",
    thp_straddling => "straddling",
}

needs! { mount;
    /// `real::run_with` on THP: the kernel's figures reach the report, the data
    /// check holds, and a budget makes the engine split what it must free.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_real_run_reports_the_kernel_figures() {
        let _watchdog = Watchdog::arm("thp_real_run_reports_the_kernel_figures");
        let _thp = lock();
        let opts = |pattern: &str, budget| RunOptions {
            backend: Backend::Thp,
            size: SIZE,
            pattern: pattern.parse().unwrap(),
            seed: hugepunch_workload::DEFAULT_SEED,
            budget,
        };
        let r = run_with(&opts("random", None)).unwrap();
        let (dk, ek) = (r.direct.kernel.unwrap(), r.engine.kernel.unwrap());
        assert_eq!((ek.split, ek.freed_whole), (0, SIZE / HP), "{ek:?}");
        assert!(dk.split >= SIZE / HP, "{dk:?}");
        assert_eq!(r.huge_pages_touched, SIZE / HP);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["backend"], "thp");
        assert_eq!(json["engine"]["kernel"]["split"], 0);
        assert!(json["direct"]["kernel"]["samples"].is_u64());

        // pin holds everything pending; with a budget of 1 MiB the engine must
        // free pending subpages 4 KiB at a time, and those frees split.
        let r = run_with(&opts("pin", None)).unwrap();
        let ek = r.engine.kernel.unwrap();
        assert_eq!((ek.split, ek.whole_at_end), (0, SIZE / HP), "{ek:?}");
        assert_eq!(r.engine.data.kept_subpages, SIZE / HP);
        let r = run_with(&opts("pin", Some(1 << 20))).unwrap();
        let ek = r.engine.kernel.unwrap();
        assert!(
            ek.split > 0,
            "a budget below the pending memory splits ({ek:?})"
        );
        assert!(r.engine.pending_bytes <= 1 << 20);
        assert_eq!(r.engine.data.kept_subpages, SIZE / HP);
    }
}

/// Bytes of THP shmem back at `base` within a few seconds (frees after an
/// exit or a close are not instant).
fn wait_for_release(base: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = counters().shmem_huge_bytes;
        if now <= base {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} bytes of THP shmem still held",
            now - base
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tmpfs_mounts(mountinfo: &str) -> usize {
    mountinfo
        .lines()
        .filter(|l| l.contains(" - tmpfs "))
        .count()
}

needs! { mount;
    /// A run that panics half-way (in a thread, the engine and the host dropped
    /// while unwinding) gives every huge page back and leaves no mount.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_backend_is_cleaned_up_after_a_panic_inside_the_run() {
        let _watchdog = Watchdog::arm("thp_backend_is_cleaned_up_after_a_panic_inside_the_run");
        let _thp = lock();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let base = counters().shmem_huge_bytes;
        let run = std::thread::spawn(|| {
            let host = Arc::new(thp_host(SIZE));
            assert!(counters().shmem_huge_bytes >= SIZE, "the file holds THPs");
            let engine = HugePunch::new(host.config(), host.clone()).unwrap();
            for sub in 0..(SIZE / SUB) / 2 + 3 {
                engine.punch(sub * SUB, SUB).unwrap();
            }
            panic!("a failure inside the run");
        })
        .join();
        assert!(run.is_err(), "the run panicked");
        wait_for_release(base, "after the panic");
        let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(tmpfs_mounts(&after), tmpfs_mounts(&mounts), "no mount left");
    }
}

/// The child of [`thp_backend_leaves_nothing_after_sigkill`]: holds a THP
/// file and waits to be killed. Ignored in a normal run (it checks nothing
/// by itself); the parent runs it with `--ignored`.
#[test]
#[ignore = "a child process: thp_backend_leaves_nothing_after_sigkill runs it"]
fn thp_sigkill_child() {
    assert!(
        std::env::var_os("HUGEPUNCH_THP_CHILD").is_some(),
        "run only as the child of thp_backend_leaves_nothing_after_sigkill"
    );
    let host = thp_host(SIZE);
    let engine = HugePunch::new(host.config(), Arc::new(host)).unwrap();
    engine.punch(0, SUB).unwrap();
    // The harness prints "test thp_sigkill_child ... " on the same line.
    println!("HUGEPUNCH-CHILD-READY");
    std::thread::sleep(Duration::from_secs(60));
    unreachable!("the parent kills this process");
}

needs! { mount;
    /// SIGKILL, the exit no destructor sees: the child's file, its tmpfs and
    /// its huge pages all go with it, and no mount point ever existed.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_backend_leaves_nothing_after_sigkill() {
        let _watchdog = Watchdog::arm("thp_backend_leaves_nothing_after_sigkill");
        let _thp = lock();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let base = counters().shmem_huge_bytes;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "thp_sigkill_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HUGEPUNCH_THP_CHILD", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run the test binary as the child");
        let stdout = child.stdout.take().unwrap();
        let ready = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("HUGEPUNCH-CHILD-READY"));
        assert!(ready, "the child never got its THP file");
        let held = counters().shmem_huge_bytes.saturating_sub(base);
        let child_mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", child.id())).unwrap();
        child.kill().expect("SIGKILL the child");
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(held >= SIZE, "the child held its huge pages: {held} bytes");
        assert_eq!(
            tmpfs_mounts(&child_mounts),
            tmpfs_mounts(&mounts),
            "the child's tmpfs was never attached to a mount point"
        );
        wait_for_release(base, "after SIGKILL");
        let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(tmpfs_mounts(&after), tmpfs_mounts(&mounts), "no mount left");
    }
}

/// Run `f` on a thread of its own in a private mount namespace, with a
/// filesystem of `fstype` mounted with `options` on a fresh directory
/// there. The mount exists only in that namespace, which goes when the
/// thread exits, on every path (the directory itself is removed after).
/// Panics, saying why, if the mount cannot be made (the tests that call it
/// run only where the build-time probe could mount).
fn in_private_mount<T: Send + 'static>(
    fstype: &'static str,
    options: String,
    f: impl FnOnce(&std::path::Path) -> T + Send + 'static,
) -> T {
    use rustix::mount::{mount, mount_change, MountFlags, MountPropagationFlags};
    use rustix::thread::UnshareFlags;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // ORDERING: Relaxed: only a unique number is wanted.
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hugepunch-{fstype}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let at = dir.clone();
    let result = std::thread::spawn(move || {
        // SAFETY: NEWNS (which implies FS) gives this thread its own mount
        // namespace, root and working directory; no file descriptor table
        // is unshared, so every descriptor stays valid on every thread.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }
            .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
        // Nothing mounted here may propagate back to the host's namespace.
        mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(|e| format!("make / private: {e}"))?;
        let data = std::ffi::CString::new(options.clone()).unwrap();
        mount(fstype, &at, fstype, MountFlags::empty(), data.as_c_str())
            .map_err(|e| format!("mount -t {fstype} -o {options}: {e}"))?;
        Ok(f(&at))
    })
    .join();
    std::fs::remove_dir(&dir).unwrap();
    let result: Result<T, String> = result.unwrap_or_else(|p| std::panic::resume_unwind(p));
    result.unwrap_or_else(|why| panic!("cannot mount a private {fstype}: {why}"))
}

needs! { mount;
    /// `--backend file --path DIR` on a tmpfs the user mounted with
    /// `huge=always`: the huge page size and THP backing are read from the
    /// mount, and the engine keeps every huge page whole until it frees it.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn file_backend_on_a_huge_always_tmpfs() {
        let _watchdog = Watchdog::arm("file_backend_on_a_huge_always_tmpfs");
        let _thp = lock();
        let run = in_private_mount("tmpfs", format!("huge=always,size={}", 2 * SIZE), |dir| {
            let backend = Backend::File(dir.to_path_buf());
            let host = LinuxHost::open(&backend, SIZE).unwrap();
            let described = host.info().huge_backing.describe();
            assert!(described.contains("huge=always"), "{described}");
            assert_eq!(host.huge_page_size(), HP);
            drop(host);
            run_with(&RunOptions {
                backend,
                size: SIZE,
                pattern: "random".parse().unwrap(),
                seed: 1,
                budget: None,
            })
            .unwrap()
        });
        let r = run;
        let (dk, ek) = (r.direct.kernel.unwrap(), r.engine.kernel.unwrap());
        assert_eq!(ek.whole_at_start, SIZE / HP, "{ek:?}");
        assert_eq!((ek.split, ek.freed_whole), (0, SIZE / HP), "{ek:?}");
        assert!(dk.split >= SIZE / HP, "{dk:?}");
    }
}

needs! { mount;
    /// A tmpfs mounted without `huge=`: the file backend says it has no huge
    /// pages and reports no kernel figures.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn file_backend_on_a_plain_tmpfs_has_no_huge_pages() {
        let _watchdog = Watchdog::arm("file_backend_on_a_plain_tmpfs_has_no_huge_pages");
        let _thp = lock();
        let run = in_private_mount("tmpfs", format!("size={SIZE}"), |dir| {
            let host = LinuxHost::open(&Backend::File(dir.to_path_buf()), SIZE).unwrap();
            host.info().huge_backing.clone()
        });
        let backing = run;
        assert!(!backing.available(), "{backing:?}");
        assert!(backing.describe().contains("huge=never"), "{backing:?}");
    }
}

needs! { hugetlb_pages;
    /// hugetlbfs where the host reserved huge pages: a 4 KiB punch releases
    /// nothing there, so direct punching releases 0 bytes and the engine all
    /// of them. Ignored where fewer than 4 2 MiB hugetlb pages are free (the
    /// reservation is a system setting, never changed here).
    #[test]
    #[cfg_attr(miri, ignore)]
    fn file_backend_on_hugetlbfs_releases_what_direct_punching_cannot() {
        let _watchdog = Watchdog::arm("file_backend_on_hugetlbfs_releases_what_direct_punching_cannot");
        let _thp = lock();
        // The probe `hugetlb_pages` asked for SIZE / HP free 2 MiB pages.
        assert_eq!(SIZE / HP, 4);
        let run = in_private_mount("hugetlbfs", "pagesize=2M".to_string(), |dir| {
            run_with(&RunOptions {
                backend: Backend::File(dir.to_path_buf()),
                size: SIZE,
                pattern: "ascending".parse().unwrap(),
                seed: 1,
                budget: None,
            })
            .unwrap()
        });
        let r = run;
        assert_eq!(r.huge_page_size, HP);
        assert_eq!(
            r.direct.bytes_released, 0,
            "4 KiB punches free nothing on hugetlbfs"
        );
        assert_eq!(r.engine.bytes_released, SIZE);
    }
}

needs! { hugetlbfs;
    /// The file backend reads the huge page size from hugetlbfs itself (its
    /// `statfs` block size), for each page size the kernel offers. Needs no
    /// reserved page: only the unnamed file is made, not mapped.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn file_backend_reads_the_hugetlbfs_page_size() {
        let _watchdog = Watchdog::arm("file_backend_reads_the_hugetlbfs_page_size");
        let sizes: Vec<u64> = std::fs::read_dir("/sys/kernel/mm/hugepages")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        let kib: u64 = name
                            .strip_prefix("hugepages-")?
                            .strip_suffix("kB")?
                            .parse()
                            .ok()?;
                        Some(kib * 1024)
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            sizes.contains(&HP),
            "the probe mounted hugetlbfs with 2 MiB pages; /sys/kernel/mm/hugepages has {sizes:?}"
        );
        for size in sizes {
            let run = in_private_mount("hugetlbfs", format!("pagesize={}K", size / 1024), |dir| {
                LinuxHost::huge_page_size_of(&Backend::File(dir.to_path_buf()))
            });
            assert_eq!(run.unwrap(), size);
        }
    }
}
