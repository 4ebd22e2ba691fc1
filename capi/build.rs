//! Probes, for the crate's tests, whether this machine's KVM offers
//! mmap()able guest_memfd (the C example's guest_memfd run needs it): a
//! test that needs it is marked `#[ignore = "needs ...: <reason>"]` where
//! it is missing (hugepunch-probe's `needs!`). The probe is the C example's
//! own check, compiled with the C compiler and run; it never fails the
//! build (no compiler, no kernel headers: the capability counts as
//! missing, with that reason).
use hugepunch_probe::Probe;

const PROBE_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
int main(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { printf("open /dev/kvm failed: %s\n", strerror(errno)); return 1; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) { printf("KVM_CREATE_VM failed: %s\n", strerror(errno)); return 1; }
    int cap = ioctl(vm, KVM_CHECK_EXTENSION, 234); /* KVM_CAP_GUEST_MEMFD */
    if (cap <= 0) { printf("KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) is %d\n", cap); return 1; }
    int flags = ioctl(vm, KVM_CHECK_EXTENSION, 244); /* KVM_CAP_GUEST_MEMFD_FLAGS */
    if (flags < 0 || (flags & 3) != 3) {
        printf("KVM_CAP_GUEST_MEMFD_FLAGS is %#x: MMAP | INIT_SHARED not offered\n", flags);
        return 1;
    }
    return 0;
}
"#;

fn guest_memfd() -> Result<(), String> {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
    let src = out.join("probe_guest_memfd.c");
    let exe = out.join("probe_guest_memfd");
    std::fs::write(&src, PROBE_C).map_err(|e| format!("write the probe: {e}"))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let built = std::process::Command::new(&cc)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .map_err(|e| format!("no C compiler `{cc}`: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "compiling the probe failed: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    let ran = std::process::Command::new(&exe)
        .output()
        .map_err(|e| format!("run the probe: {e}"))?;
    if ran.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&ran.stdout).trim().to_string())
    }
}

fn main() {
    hugepunch_probe::build_script_with(&[Probe {
        name: "guest_memfd",
        needs: "KVM guest_memfd that can be mapped (KVM_CAP_GUEST_MEMFD, and \
                KVM_CAP_GUEST_MEMFD_FLAGS offering MMAP | INIT_SHARED)",
        check: guest_memfd,
    }]);
}
