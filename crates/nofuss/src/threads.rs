//! How the `nofuss` binary and benchmarks set up candle's own CPU worker threads.
//!
//! candle 0.11 runs element-wise operations of 64 Ki elements or more (an addition in its
//! autograd, a dtype conversion) on a pool of its own, one thread per core, whose threads
//! spin 25,000 times (`CANDLE_BARRIER_POOL_SPIN_LIMIT`) before they park. nofuss's CPU
//! operations and the matrix products run on rayon's pool, on the same cores: every such
//! candle operation left its threads spinning beside rayon's for a few hundred
//! microseconds, about 5% of the small CNN's training step on two cores (`perf`: candle's
//! pool threads in `spin_loop`). [`park_idle_candle_workers`] makes them park almost at
//! once.

/// The spin limit [`park_idle_candle_workers`] sets: 11.4-12.4 ms per small-CNN step at
/// candle's 25,000, 10.9-11.1 at 2,000, 10.8 at 500, 10.6-10.8 at 50 (batch 64, 2 cores).
pub const SPIN_LIMIT: u32 = 200;

/// The environment variable candle reads once, when its pool starts.
pub const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Sets candle's spin limit to [`SPIN_LIMIT`] unless the environment sets it (which then
/// wins). Call it first thing in `main`, before any tensor operation and before other
/// threads start: candle reads the variable when its pool starts, and the environment is
/// only safe to change while one thread runs.
pub fn park_idle_candle_workers() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_limit_unless_the_environment_does() {
        let before = std::env::var(SPIN_LIMIT_VAR).ok();
        park_idle_candle_workers();
        let want = before.clone().unwrap_or_else(|| SPIN_LIMIT.to_string());
        assert_eq!(std::env::var(SPIN_LIMIT_VAR).ok(), Some(want.clone()));
        park_idle_candle_workers(); // a second call leaves it
        assert_eq!(std::env::var(SPIN_LIMIT_VAR).ok(), Some(want));
    }
}
