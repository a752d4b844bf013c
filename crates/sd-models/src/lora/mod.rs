//! LoRA adapters, applied at run time per batch row.
//!
//! The base weights are never changed. A forward runs under a [`Plan`] that
//! says which rows of the batch use which adapters at which scales; every
//! `Linear` and `Conv2d` with a module path adds, for each adapter that
//! has a delta for it, `scale · (alpha / rank) · up(down(x))` to the rows
//! that use it — the base projection runs once for the whole batch. So
//! generations with different LoRA sets, different scales, or none share
//! one forward, and a row without adapters gets exactly the base output.
//!
//! `adapter.rs`: the files, resolved against a network's LoRA-capable
//! layers (`crate::modules`, registered as it loads); `plan.rs`: which rows
//! of a forward use which adapters, and the run-time product.

mod adapter;
mod plan;

pub use crate::modules::{ModuleIndex, ModuleKind, ModuleShape};
pub use adapter::{Adapter, Delta, KohyaNames, UpRows};
pub use plan::{apply, with_plan, Applied, Plan, Span};
