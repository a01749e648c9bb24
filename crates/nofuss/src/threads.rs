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
    if let Some(limit) = limit_to_set(std::env::var_os(SPIN_LIMIT_VAR).as_deref()) {
        std::env::set_var(SPIN_LIMIT_VAR, limit);
    }
}

/// What [`park_idle_candle_workers`] sets the variable to, given its current value: the
/// nofuss limit when it is unset, nothing when the environment chose one.
fn limit_to_set(current: Option<&std::ffi::OsStr>) -> Option<String> {
    current.is_none().then(|| SPIN_LIMIT.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_limit_unless_the_environment_does() {
        // The decision alone: changing the process environment here would race the
        // other tests' threads reading it.
        assert_eq!(limit_to_set(None), Some("200".to_string()));
        assert_eq!(limit_to_set(Some("25000".as_ref())), None);
        assert_eq!(limit_to_set(Some("".as_ref())), None);
    }
}
