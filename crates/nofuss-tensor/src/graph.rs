//! A training step captured once into a CUDA graph and replayed.
//!
//! A BN-Inception training step queues about two thousand kernels, each with candle's and
//! nofuss's host work around its launch; at batch 32 on an H100 the host's queueing, not
//! the GPU, set the step's time. Captured into a CUDA graph, the same step goes to the GPU
//! in one call ([`StepGraph::replay`]), and the host work of building it (autograd, the
//! tape, descriptors, launches) is done once.
//!
//! [`StepGraph::capture`] records, without running it, everything a closure queues on a
//! CUDA device's stream. What it records is replayed as it was, on the same buffers, so
//! the closure must follow these rules (a break of the first two, or a free of memory
//! made before the capture, is an error at capture time; of the others, wrong numbers):
//!
//! - no copies between host and device: nothing read back (turn the losses' finiteness
//!   checks off, use no loss that picks on the host:
//!   `nofuss_losses::LossSpec::selects_on_host`), nothing uploaded;
//! - the same shapes as eager steps that ran before it on the same thread, which set up
//!   what a capture cannot make: candle's layout cache ([`crate::with_cached_layouts`],
//!   on during the capture), the cuDNN algorithms, kernels loaded, the optimiser's state;
//! - per-step scalars from device memory: the optimiser with
//!   [`crate::optim::Optimizer::use_device_scalars`], and
//!   [`crate::optim::Optimizer::advance`] before each replay;
//! - inputs and outputs in buffers made before the capture (copy each new batch into the
//!   input before a replay, and have the closure write its results, say the loss, into
//!   outputs with `slice_set`); everything the closure allocates must be dropped before
//!   it returns (graph memory still in use when a replay starts is freed by it), and
//!   nothing made before the capture may be dropped inside it (a free during a capture
//!   must be of memory the capture allocated: replace no tensor kept from earlier steps,
//!   write into it);
//! - what the step updates in place (parameters, running statistics, the optimiser's
//!   state) stays in the same tensors between the capture and the replays: loading a
//!   checkpoint replaces the optimiser's state, so capture again after it.
//!
//! Without the `cuda` feature, or on the CPU, [`StepGraph::capture`] says so and records
//! nothing; [`graphs_available`] tells beforehand.

use candle_core::Device;

use crate::{Error, Result};

/// A captured step, replayable on the device it was captured on.
pub struct StepGraph {
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepGraph")
    }
}

/// Whether [`StepGraph::capture`] can capture on `device`: a CUDA device in a build with
/// the `cuda` feature.
pub fn graphs_available(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

impl StepGraph {
    /// Records the work `f` queues on `device` (a CUDA device) into a graph, without
    /// running it: the first [`StepGraph::replay`] runs the captured step. Waits for the
    /// device first. `f`'s error, or the driver's refusal of an operation it queued (a
    /// copy from the host, say), is returned, and the stream is left as before (also
    /// when `f` panics).
    pub fn capture<E: From<Error>>(
        device: &Device,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            return capture_cuda(d, f);
        }
        let _ = f;
        Err(E::from(Error::Graph(format!(
            "CUDA graphs need a CUDA device{}; this is {:?}",
            if cfg!(feature = "cuda") {
                ""
            } else {
                " and a build with the `cuda` feature"
            },
            device.location()
        ))))
    }

    /// Queues one run of the captured step on its stream (returns before it has run).
    pub fn replay(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self
            .graph
            .launch()
            .map_err(|e| Error::Graph(format!("replay: {e}")));
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}

#[cfg(feature = "cuda")]
fn capture_cuda<E: From<Error>>(
    d: &candle_core::CudaDevice,
    f: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<StepGraph, E> {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream, DriverError};
    use std::sync::Arc;

    /// Ends a capture that `f` left by panicking, so the stream works again.
    struct Capturing<'a>(Option<&'a Arc<CudaStream>>);
    impl Drop for Capturing<'_> {
        fn drop(&mut self) {
            if let Some(stream) = self.0.take() {
                let _ = recorded_error(stream);
                drop(stream.end_capture(sys::CUgraphInstantiate_flags(0)));
            }
        }
    }
    /// Takes an error cudarc recorded while capturing (from a call that returns
    /// nothing, such as a buffer's free when it is dropped). Taken before the capture
    /// ends: cudarc's `end_capture` returns such an error before it ends the capture,
    /// and would leave the stream capturing.
    fn recorded_error(stream: &CudaStream) -> std::result::Result<(), DriverError> {
        stream.context().check_err()
    }

    let stream = d.cuda_stream();
    let err = |what: &str, e: &dyn std::fmt::Display| E::from(Error::Graph(format!("{what}: {e}")));
    stream
        .synchronize()
        .map_err(|e| err("wait before capture", &e))?;
    // Layout uploads must come from candle's cache while capturing (it refuses a miss).
    let cache = d.enable_cuda_graph_htod_cache();
    // Thread-local: only this thread's calls join the capture, and only its illegal
    // calls (a synchronous copy, say) break it.
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| err("begin capture", &e))?;
    let mut capturing = Capturing(Some(&stream));
    let run = f();
    capturing.0 = None;
    let recorded = recorded_error(&stream);
    // Always end the capture, so the stream is usable again whatever happened. Graph
    // memory still allocated when a replay starts is freed by it.
    let ended = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    drop(cache);
    run?;
    recorded.map_err(|e| {
        err(
            "a CUDA call failed while capturing (a free of memory made before the \
             capture, say: a capture may free only what it allocated)",
            &e,
        )
    })?;
    let graph = ended
        .map_err(|e| {
            err(
                "end capture (an operation a capture cannot hold was queued)",
                &e,
            )
        })?
        .ok_or_else(|| err("end capture", &"no work was recorded"))?;
    graph.upload().map_err(|e| err("upload", &e))?;
    Ok(StepGraph { graph })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_graphs() {
        assert!(!graphs_available(&Device::Cpu));
        let mut ran = false;
        let e = StepGraph::capture(&Device::Cpu, || -> Result<()> {
            ran = true;
            Ok(())
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("CUDA graphs need a CUDA device"),
            "{e}"
        );
        assert!(!ran, "nothing is recorded, so nothing runs");
    }
}
