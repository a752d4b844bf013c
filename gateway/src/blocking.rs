//! Where CPU work in the gateway runs: small image work inline on the I/O
//! thread (a hop to another thread costs more than it), large work on the
//! blocking pool so one big image does not stall every other generation's
//! steps.

use crate::error::{Error, Result};

/// Images up to this many pixels are encoded or decoded on the I/O thread.
pub const INLINE_PIXELS: u64 = 128 * 128;

/// Encoded inputs up to this many bytes are decoded on the I/O thread.
pub const INLINE_BYTES: usize = 32 << 10;

/// Run `f` inline when `small`, else on the blocking pool.
pub async fn off_thread<T: Send + 'static>(
    small: bool,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if small {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("image task failed: {e}")))?
}
