//! How the `nofuss` binary and benchmarks set up their allocator (mimalloc).
//!
//! candle allocates a fresh buffer for every tensor operation and frees it soon after, so
//! a training step allocates and frees the same few hundred megabytes again and again.
//! mimalloc keeps freed memory for reuse, but returns ("purges") what has been free for
//! a while to the operating system: 1 s in mimalloc 3, which the `mimalloc` crate builds
//! (10 ms in mimalloc 2). A BN-Inception step on the CPU is longer than that, so every
//! step faulted its buffers back in page by page, with the kernel zeroing each page.
//! [`keep_freed_memory`] lengthens the delay to [`PURGE_DELAY_MS`], longer than such a
//! step (about 7 s at batch 32 on two cores), so the buffers are reused; memory that stays
//! unused longer than that still goes back. It does not raise the peak: what is kept is
//! what the next step allocates again.

/// Milliseconds mimalloc keeps freed memory before returning it to the operating system.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in mimalloc 2 and
/// 3, which keep retired options' slots so the numbering stays stable).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the environment sets
/// `MIMALLOC_PURGE_DELAY` (which then wins, as mimalloc documents). Call it first thing
/// in `main` of a binary whose global allocator is `mimalloc::MiMalloc`; elsewhere it
/// only changes a setting nobody reads.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mi_option_set stores an integer in mimalloc's option table; any option
    // index and value are accepted, and the call is thread-safe.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}

/// mimalloc's current purge delay in milliseconds.
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads an integer from mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_index_is_the_purge_delay() {
        // Index 15 must be the purge delay: unless the environment sets it, it reads
        // mimalloc's default (1000 ms in mimalloc 3, 10 ms in mimalloc 2), and
        // keep_freed_memory moves it.
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => assert_eq!(purge_delay_ms().to_string(), v),
            Err(_) => {
                assert!(
                    [1000, 10, PURGE_DELAY_MS].contains(&purge_delay_ms()),
                    "option 15 reads {}",
                    purge_delay_ms()
                );
                keep_freed_memory();
                assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
            }
        }
    }
}
