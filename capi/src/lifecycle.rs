//! Making a file, its configuration, host and policy, and destroying it.

use super::*;

/// Fill `cfg` with the defaults for a file of `size` bytes: populated,
/// 2 MiB huge pages, the `REJECT` policy, no budget.
///
/// Returns 0, or `-EINVAL` if `cfg` is null. Thread-safe (touches only
/// `cfg`).
///
/// # Safety
///
/// `cfg` is null or points to a writable `hugepunch_config`.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_config_init(cfg: *mut hugepunch_config, size: u64) -> c_int {
    guard(|| {
        if cfg.is_null() {
            return -EINVAL;
        }
        let d = Config::new(size);
        let c = hugepunch_config {
            size,
            order: d.order,
            populated: d.populated,
            policy: HUGEPUNCH_POLICY_REJECT,
            budget: HUGEPUNCH_NO_BUDGET,
        };
        // SAFETY: `cfg` is not null, and the caller promised it points to a
        // writable `hugepunch_config`.
        unsafe { put(cfg, c) };
        0
    })
}

pub(crate) fn policy_of(p: u32) -> Option<Policy> {
    match p {
        HUGEPUNCH_POLICY_REJECT => Some(Policy::Reject),
        HUGEPUNCH_POLICY_CANCEL_AND_ZERO => Some(Policy::CancelAndZero),
        _ => None,
    }
}

/// Build a file over `host` and store its handle in `*out`.
///
/// `cfg` and `host` are read during the call only (the host struct is
/// copied). Returns 0, or `-EINVAL` when a pointer is null, `allocate`,
/// `free` or `zero` is null, the policy is unknown, or the size and order
/// cannot describe a file (`*out` is then left unchanged).
///
/// The host's callbacks may be called from any thread that calls into the
/// file, concurrently, with `host->opaque`, until `hugepunch_destroy`
/// returns: they must be thread-safe. Thread-safe itself.
///
/// # Safety
///
/// `cfg` and `host` are null or readable; `out` is null or writable; the
/// callbacks are valid, thread-safe functions for `host->opaque` until
/// `hugepunch_destroy`.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_new(
    cfg: *const hugepunch_config,
    host: *const hugepunch_host,
    out: *mut *mut hugepunch_file,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return -EINVAL;
        }
        // SAFETY: null or a readable config, the caller's promise.
        let Some(cfg) = (unsafe { cfg.as_ref() }) else {
            return -EINVAL;
        };
        // SAFETY: null or a readable host struct, the caller's promise.
        let Some(host) = (unsafe { host.as_ref() }) else {
            return -EINVAL;
        };
        let Some(host) = CHost::checked(host) else {
            return -EINVAL;
        };
        let Some(policy) = policy_of(cfg.policy) else {
            return -EINVAL;
        };
        let config = Config {
            size: cfg.size,
            order: cfg.order,
            budget: (cfg.budget != HUGEPUNCH_NO_BUDGET).then_some(cfg.budget),
            policy,
            populated: cfg.populated,
        };
        match HugePunch::new(config, Arc::new(host)) {
            Ok(inner) => {
                let handle = Box::into_raw(Box::new(hugepunch_file { inner }));
                // SAFETY: `out` is not null and the caller promised it is
                // writable.
                unsafe { put(out, handle) };
                0
            }
            Err(e) => -e.errno(),
        }
    })
}

/// Release a file. It calls no callback and frees no guest memory: call
/// `hugepunch_teardown` first to free what is allocated. Null is a no-op.
///
/// Not thread-safe: no other call on `file` may be in flight, and none may
/// follow. After it returns the host's opaque pointers are no longer used.
///
/// # Safety
///
/// `file` is null or a live handle, with no other call on it in flight or
/// to come.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_destroy(file: *mut hugepunch_file) {
    guard(|| {
        if !file.is_null() {
            // SAFETY: a handle from `hugepunch_new` (a `Box`), not yet
            // destroyed, with no call in flight: the caller's promise.
            drop(unsafe { Box::from_raw(file) });
        }
        0
    });
}

/// Replace the host. Operations that already started finish with the
/// callbacks they loaded; later ones use the new set. hugepunch keeps the
/// old struct until `hugepunch_destroy`: keep its opaque pointer valid
/// until every call that began before this one has returned.
///
/// Returns 0 or `-EINVAL` (null pointer, or a required callback is null).
/// Thread-safe.
///
/// # Safety
///
/// `file` is null or a live handle; `host` is null or readable, with
/// callbacks as `hugepunch_new` requires.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_set_host(
    file: *const hugepunch_file,
    host: *const hugepunch_host,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        // SAFETY: null or a readable host struct, the caller's promise.
        let Some(host) = (unsafe { host.as_ref() }).and_then(CHost::checked) else {
            return -EINVAL;
        };
        f.set_host(Arc::new(host));
        0
    })
}

/// Replace the conversion policy (`HUGEPUNCH_POLICY_*`), with the rules of
/// `hugepunch_set_host`. Returns 0 or `-EINVAL`. Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_set_policy(file: *const hugepunch_file, policy: u32) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let (Some(f), Some(p)) = (unsafe { file_ref(file) }, policy_of(policy)) else {
            return -EINVAL;
        };
        f.set_policy(p);
        0
    })
}
