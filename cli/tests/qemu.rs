//! End to end under a real VMM and a real guest kernel: `hugepunch qemu`
//! boots Debian's kernel on QEMU with hugepunch (and on QEMU as it is),
//! balloons, deflates, reuses, reboots with the balloon inflated, and
//! balloons again, while the guest checks every byte it kept and the
//! kernel counts the guest file's huge pages.
//!
//! Needs root (a private huge=always tmpfs) and what `vmm/qemu/build.sh`
//! and `vmm/qemu/guest/build.sh` build; where either is missing, the tests
//! are listed as ignored with the reason.

#[cfg(target_os = "linux")]
hugepunch_probe::include_needs!();

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HUGE: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// The guest's memory: 256 huge pages.
const MEMORY: &str = "512M";

/// One QEMU run at a time: the kernel's huge page counters
/// (ShmemHugePages, thp_split_page) are machine-wide, so a second guest file
/// would count in the first one's figures.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `hugepunch qemu ARGS --json`; fails the test (killing QEMU's
/// parent, which takes QEMU with it) if it runs longer than `limit`.
#[allow(dead_code)]
fn run_qemu(args: &[&str], limit: Duration) -> std::process::Output {
    // A test that failed holding it poisons it; the counters are still fine.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hugepunch"))
        .arg("qemu")
        .args(["--memory", MEMORY, "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "watchdog: hugepunch qemu {args:?} ran over {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.wait_with_output().expect("output")
}

/// [`run_qemu`], which must succeed: its report.
#[allow(dead_code)]
fn qemu(args: &[&str], limit: Duration) -> Value {
    let out = run_qemu(args, limit);
    assert!(
        out.status.success(),
        "hugepunch qemu {args:?}: exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

#[allow(dead_code)]
fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[allow(dead_code)]
fn side<'a>(report: &'a Value, qemu: &str, scenario: &str) -> &'a Value {
    report["sides"]
        .as_array()
        .expect("sides")
        .iter()
        .find(|s| s["qemu"] == qemu && s["scenario"] == scenario)
        .unwrap_or_else(|| panic!("no {qemu} side for {scenario} in {report}"))
}

/// What every run must show: the guest's data intact through every step of
/// both boots, and the guest really rebooted.
#[allow(dead_code)]
fn data_intact(s: &Value) {
    let checked = &s["checked"];
    // After the inflation, after deflate and reuse, after inflating again;
    // after the reboot: inflated, then deflated and reused.
    assert_eq!(num(checked, "checks"), 5, "{s}");
    assert!(num(checked, "pages") > 100_000, "{s}");
    assert_eq!(num(checked, "bad_pages"), 0, "the guest lost data: {s}");
    assert_eq!(num(s, "boots"), 2, "{s}");
    // The kernel gave the whole guest file huge pages before QEMU started.
    assert_eq!(num(s, "whole_at_start"), (512 << 20) / HUGE, "{s}");
}

#[cfg(target_os = "linux")]
needs! { mount, qemu_balloon;
    /// QEMU with hugepunch, budget off, scattered and contiguous: the data
    /// survives inflate, deflate, reuse and a reboot with the balloon
    /// inflated; no huge page is split; every huge page the guest ballooned
    /// whole is freed whole, once, and the kernel's counts and the file's
    /// allocated bytes agree with the engine's; what was pending at the
    /// reset is forgotten, none of it left behind. QEMU as it is, beside
    /// it, splits huge pages the guest ballooned whole.
    #[test]
    fn qemu_balloon_through_hugepunch_keeps_data_and_huge_pages() {
        let report = qemu(&["--scenario", "scattered,contiguous"], Duration::from_secs(900));
        for scenario in ["scattered", "contiguous"] {
            let s = side(&report, "hugepunch", scenario);
            data_intact(s);
            assert_eq!(num(s, "split"), 0, "hugepunch split a huge page: {s}");
            let inflated = &s["hugepunch_stats_after_inflate"];
            let freed_whole = num(inflated, "huge-frees");
            // The guest's own count of the huge pages it ballooned whole.
            assert_eq!(Some(freed_whole), s["ballooned_whole"].as_u64(), "{s}");
            assert_eq!(num(inflated, "free-calls"), freed_whole, "{s}");
            assert_eq!(
                num(s, "whole_at_start") - num(s, "whole_after_inflate"),
                freed_whole,
                "the kernel's count of huge pages gone: {s}"
            );
            assert_eq!(num(s, "released"), freed_whole * HUGE, "{s}");
            assert_eq!(
                num(s, "released") + num(s, "held_back"),
                num(&s["inflate"], "bytes"),
                "every ballooned byte released or held back: {s}"
            );
            let end = &s["hugepunch_stats"];
            assert_eq!(num(end, "free-errors"), 0, "{s}");
            assert_eq!(num(end, "forced-splits"), 0, "{s}");
            // Device resets: QEMU's at start-up and each driver's at probe
            // too; the reboot adds more.
            assert!(num(end, "resets") > num(inflated, "resets"), "{s}");
            assert_eq!(
                num(end, "forgotten-subpages") * PAGE,
                num(s, "pending_at_reset"),
                "the reset forgot what was pending: {s}"
            );
            assert_eq!(num(end, "pending-subpages"), 0, "deflated, nothing pending: {s}");
        }
        // Scattered, nothing is ballooned whole; contiguous, most of it is.
        let scattered = side(&report, "hugepunch", "scattered");
        assert!(num(scattered, "pending_at_reset") > 0, "the reset had pending: {scattered}");
        let contiguous = side(&report, "hugepunch", "contiguous");
        let ballooned_whole = num(&contiguous["hugepunch_stats_after_inflate"], "huge-frees");
        assert!(ballooned_whole > 50, "{contiguous}");

        for scenario in ["scattered", "contiguous"] {
            let s = side(&report, "stock", scenario);
            data_intact(s);
            assert!(num(s, "released") >= num(&s["inflate"], "bytes") - HUGE, "{s}");
        }
        // QEMU as it is splits the huge pages the guest ballooned whole as
        // well: each arrives 4 KiB at a time.
        let stock = side(&report, "stock", "contiguous");
        assert!(num(stock, "split_in_inflate") >= ballooned_whole / 2, "{stock}");
    }
}

#[cfg(target_os = "linux")]
needs! { mount, qemu_balloon;
    /// The negative control of the reset rule: with
    /// `x-hugepunch-forget-on-reset=off`, what was pending when the guest
    /// rebooted stays pending though the new kernel owns it, and a
    /// completion after the reboot discards the new kernel's pages. Which
    /// of them it hits varies from run to run: the new guest's program
    /// crashes or finds bad pages (seen: "Segmentation fault" right after
    /// the second boot), or the run ends with stale frames still pending
    /// though the balloon is empty. The test above would catch each: its
    /// data checks pass and nothing is pending at its end.
    #[test]
    fn qemu_reset_without_forgetting_loses_the_new_kernel_s_data() {
        let args = [
            "--only",
            "hugepunch",
            "--scenario",
            "scattered",
            "--balloon-property",
            "x-hugepunch-forget-on-reset=off",
        ];
        let out = run_qemu(&args, Duration::from_secs(600));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // The damage showed in the second boot: the guest's program
            // died, or its checks found pages that lost their data.
            let second_boot = stderr.matches("HPINIT").count() >= 2;
            assert!(
                (second_boot && stderr.contains("closed the console"))
                    || stderr.contains("did not read back"),
                "failed, but not from lost data: {stderr}"
            );
            return;
        }
        let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        let s = side(&report, "hugepunch", "scattered");
        let end = &s["hugepunch_stats"];
        assert!(num(s, "pending_at_reset") > 0, "{s}");
        assert_eq!(num(end, "forgotten-subpages"), 0, "{s}");
        assert!(
            num(&s["checked"], "bad_pages") > 0 || num(end, "pending-subpages") > 0,
            "stale pending frames after the reset: {s}"
        );
    }
}
