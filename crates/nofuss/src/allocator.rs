//! How the `nofuss` binary and benchmarks set up their allocator (mimalloc).
//!
//! candle allocates a fresh buffer for every tensor operation and frees it soon after, so
//! a training step allocates and frees the same few hundred megabytes again and again.
//! mimalloc keeps freed memory for reuse, but returns ("purges") free memory to the
//! operating system after a delay: 1 s in mimalloc 3, which the `mimalloc` crate builds
//! (10 ms in mimalloc 2). The delay is per arena, not per block: the first free after a
//! purge starts the clock, and when it runs out *everything* free in the arena at that
//! moment goes back, however recently it was freed (`mi_arena_schedule_purge` /
//! `mi_arena_try_purge` in mimalloc 3's `arena.c`). Under a training loop's steady churn
//! that is a purge of all the step's buffers every delay, and the next step faults them
//! back in page by page, with the kernel zeroing each page: a BN-Inception step on the
//! CPU (seconds long) refaulted its buffers every few steps even at a 10 s delay.
//! [`keep_freed_memory`] turns purging off ([`PURGE_DELAY_MS`] = -1), so the buffers are
//! reused for the whole run. What is kept is what the next step allocates again, so the
//! peak barely moves (a BN-Inception batch-16 CPU run: 1.42 GB against 1.34-1.40 GB with
//! the 10 s delay); the memory goes back when the process ends.

/// mimalloc's purge delay set by [`keep_freed_memory`]: -1, never purge.
pub const PURGE_DELAY_MS: i64 = -1;

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
