//! [`HookedHost`]: a host that forwards every callback to another host
//! after a hook has seen it. The hook may block (to force an interleaving:
//! a callback waits on a barrier while the test drives another thread),
//! panic (to test the engine's panic contract), record, make an `allocate`
//! or `free` fail without reaching the inner host, or drop a callback (to
//! plant a bug: an engine that forgot an invalidation or a zero).

use super::host::{Event, RecordingHost};
use crate::{Attribute, ByteRange, Hint, Host, HostError};
use std::sync::{Arc, Mutex};

/// What a hook decides for the callback it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Call the inner host as usual.
    Forward,
    /// Return this error without calling the inner host (`allocate` and
    /// `free` only; for any other callback it means [`Action::Forward`]).
    Fail(HostError),
    /// Do not call the inner host: the callback returns as if done
    /// (`allocate` and `free` succeed). For `is_shared`, which needs the
    /// inner host's answer, it means [`Action::Forward`].
    Skip,
}

/// A hook: sees each callback (as the [`Event`] a recording host would
/// record for it) before it reaches the inner host.
pub type Hook = Arc<dyn Fn(&Event) -> Action + Send + Sync>;

/// A forwarding host with a replaceable hook (see the module docs).
pub struct HookedHost<H: Host = RecordingHost> {
    inner: Arc<H>,
    hook: Mutex<Option<Hook>>,
}

impl<H: Host> HookedHost<H> {
    /// Forward to `inner`, with no hook yet.
    pub fn new(inner: Arc<H>) -> Arc<Self> {
        Arc::new(HookedHost {
            inner,
            hook: Mutex::new(None),
        })
    }

    /// The host callbacks are forwarded to.
    pub fn inner(&self) -> &Arc<H> {
        &self.inner
    }

    /// Install `hook` (replacing any other); it applies to callbacks that
    /// start after this call.
    pub fn set(&self, hook: impl Fn(&Event) -> Action + Send + Sync + 'static) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(hook));
    }

    /// Remove the hook.
    pub fn clear(&self) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn see(&self, e: Event) -> Action {
        // The hook runs outside the lock, so it may block or panic freely.
        let hook = self.hook.lock().unwrap_or_else(|p| p.into_inner()).clone();
        hook.map_or(Action::Forward, |h| h(&e))
    }
}

impl<H: Host> Host for HookedHost<H> {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.see(Event::IsShared(range));
        self.inner.is_shared(range)
    }
    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        if self.see(Event::SetAttributes(range, to)) != Action::Skip {
            self.inner.set_attributes(range, to)
        }
    }
    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        if self.see(Event::InvalidateBegin(range, hint)) != Action::Skip {
            self.inner.invalidate_begin(range, hint)
        }
    }
    fn invalidate_end(&self, range: ByteRange) {
        if self.see(Event::InvalidateEnd(range)) != Action::Skip {
            self.inner.invalidate_end(range)
        }
    }
    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        match self.see(Event::Allocate(range, order)) {
            Action::Fail(e) => Err(e),
            Action::Skip => Ok(()),
            Action::Forward => self.inner.allocate(range, order),
        }
    }
    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        match self.see(Event::Free(range, order)) {
            Action::Fail(e) => Err(e),
            Action::Skip => Ok(()),
            Action::Forward => self.inner.free(range, order),
        }
    }
    fn zero(&self, range: ByteRange) {
        if self.see(Event::Zero(range)) != Action::Skip {
            self.inner.zero(range)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_drops_a_callback_and_fail_returns_the_error() {
        let inner = RecordingHost::new(8192, Attribute::Private, true);
        let host = HookedHost::new(inner.clone());
        host.set(|e| match e {
            Event::Zero(_) | Event::Free(..) => Action::Skip,
            Event::Allocate(..) => Action::Fail(HostError { errno: 12 }),
            _ => Action::Forward,
        });
        let r = ByteRange::new(0, 4096);
        let hint = Hint {
            huge_page: 0,
            order: 1,
        };
        host.zero(r);
        assert_eq!(host.free(r, 0), Ok(()));
        assert_eq!(host.allocate(r, 0), Err(HostError { errno: 12 }));
        host.invalidate_begin(r, hint);
        assert_eq!(inner.take_events(), vec![Event::InvalidateBegin(r, hint)]);
        assert!(inner.is_resident(0), "the skipped free freed nothing");
        host.clear();
        assert_eq!(host.free(r, 0), Ok(()));
        assert!(!inner.is_resident(0));
    }
}
