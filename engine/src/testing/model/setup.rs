//! The configuration of one case, shared by the model and the
//! differential harness.

use super::SUB;
use crate::{Attribute, Policy};

/// The configuration of one case: a file and its host's starting state.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Huge page order (1 to 18).
    pub order: u8,
    /// Number of huge pages of the file.
    pub huge_pages: u64,
    /// Pending-bytes budget, if any.
    pub budget: Option<u64>,
    /// Conversion policy at the start.
    pub policy: Policy,
    /// Whether the file starts populated (every huge page allocated whole).
    pub populated: bool,
    /// The attribute every subpage starts with.
    pub start: Attribute,
}

impl Setup {
    /// Subpages per huge page.
    pub fn per(&self) -> u64 {
        1 << self.order
    }
    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.huge_pages * (SUB << self.order)
    }
    /// Subpages of the file.
    pub fn subpages(&self) -> u64 {
        self.huge_pages * self.per()
    }
    /// Order 18: too many subpages to compare one by one after every step.
    pub fn sparse(&self) -> bool {
        self.order > 12
    }
}
