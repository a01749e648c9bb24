//! Host-to-device uploads that do not hold the host up: batches to a GPU through
//! page-locked staging buffers.
//!
//! candle's `Tensor::from_slice` copies from the caller's pageable memory. CUDA cannot
//! read pageable memory directly: the driver copies it through staging memory of its own
//! and, for a copy of more than a few kilobytes, waits for the stream's earlier work
//! before the call returns. A training step's batch upload (19 MB of pixels at batch 128)
//! thus holds the host until the GPU has finished the step before, and the GPU idles
//! while the host then copies and queues. [`Uploader`] copies the data into one of a few
//! page-locked buffers it keeps and queues the transfer from there
//! (`cuMemcpyHtoDAsync` from pinned memory returns at once, as PyTorch's
//! `pin_memory=True` loaders and `tensor.to(device, non_blocking=True)` do). A buffer is
//! written again only once its previous transfer has finished (an event per buffer), so
//! with the trainer one step ahead of the GPU the host never waits in steady state.
//!
//! On the CPU an upload is `Tensor::from_slice`.
//!
//! ```
//! use candle_core::Device;
//! use nofuss_tensor::upload::Uploader;
//!
//! let mut up = Uploader::default();
//! let pixels: Vec<u8> = (0..48).collect();
//! let t = up.upload(&pixels, (1, 3, 4, 4), &Device::Cpu)?;
//! assert_eq!(t.flatten_all()?.to_vec1::<u8>()?, pixels);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{Device, Result, Shape, Tensor};

/// An element type [`Uploader`] can upload (u8, u32, f32).
#[cfg(feature = "cuda")]
pub trait Element:
    candle_core::WithDType
    + candle_core::cuda_backend::CudaDType
    + candle_core::cuda_backend::cudarc::driver::DeviceRepr
{
}
/// An element type [`Uploader`] can upload (u8, u32, f32).
#[cfg(not(feature = "cuda"))]
pub trait Element: candle_core::WithDType {}

impl Element for u8 {}
impl Element for u32 {}
impl Element for f32 {}

/// Staging buffers of an [`Uploader`], used in turn: a batch's images and labels take
/// two, so a buffer is written again two batches after its last transfer.
#[cfg(feature = "cuda")]
const SLOTS: usize = 4;

/// Uploads host slices to a device; on CUDA through page-locked staging buffers of its
/// own, used in turn (module docs), each grown to the largest upload it took. One per
/// stream of batches (a loader's epoch); uploads must not be made while a CUDA graph is
/// being captured on the same thread.
pub struct Uploader {
    #[cfg(feature = "cuda")]
    staged: bool,
    #[cfg(feature = "cuda")]
    slots: [Option<cuda::Slot>; SLOTS],
    #[cfg(feature = "cuda")]
    next: usize,
}

impl Default for Uploader {
    /// Uploads through staging buffers.
    fn default() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            staged: true,
            #[cfg(feature = "cuda")]
            slots: Default::default(),
            #[cfg(feature = "cuda")]
            next: 0,
        }
    }
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Uploader");
        #[cfg(feature = "cuda")]
        d.field(
            "staging_bytes",
            &self
                .slots
                .iter()
                .map(|s| s.as_ref().map_or(0, |s| s.capacity()))
                .collect::<Vec<_>>(),
        );
        d.finish()
    }
}

impl Uploader {
    /// An uploader without staging buffers: `Tensor::from_slice` on every device, for a
    /// one-off upload (making page-locked memory costs more than one transfer saves).
    pub fn direct() -> Self {
        #[allow(unused_mut)]
        let mut up = Self::default();
        #[cfg(feature = "cuda")]
        {
            up.staged = false;
        }
        up
    }

    /// `data` as a tensor of `shape` on `device`. On CUDA the call returns once the data
    /// is in a staging buffer; the transfer runs in stream order, before anything queued
    /// after it reads the tensor.
    pub fn upload<T: Element>(
        &mut self,
        data: &[T],
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            candle_core::bail!(
                "upload: {} values for shape {shape:?} ({} elements)",
                data.len(),
                shape.elem_count()
            );
        }
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) if self.staged && !data.is_empty() => self.upload_cuda(data, shape, d),
            _ => Tensor::from_slice(data, shape, device),
        }
    }

    #[cfg(feature = "cuda")]
    fn upload_cuda<T: Element>(
        &mut self,
        data: &[T],
        shape: Shape,
        d: &candle_core::CudaDevice,
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::driver::{result, DevicePtrMut};
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        let stream = d.cuda_stream();
        let bytes = std::mem::size_of_val(data);
        let slot = &mut self.slots[self.next];
        self.next = (self.next + 1) % SLOTS;
        if slot.as_ref().is_some_and(|s| s.capacity() < bytes) {
            // Too small: dropped (waiting for its last transfer) before a larger one.
            *slot = None;
        }
        let slot = match slot {
            Some(s) => s,
            empty => empty.insert(cuda::Slot::new(stream.context(), bytes)?),
        };
        // Its transfer of `SLOTS` uploads ago has left the buffer.
        let host = slot.writable()?.cast::<T>();
        // SAFETY: the buffer holds at least `bytes` bytes, is page-aligned (so aligned for
        // `T`), is not in use by a transfer (waited for above), and `data` is host memory
        // of its own, so the two do not overlap.
        let staged = unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len());
            std::slice::from_raw_parts(host, data.len())
        };
        // SAFETY: the transfer below writes every element before anything reads them.
        let mut dst = unsafe { d.alloc::<T>(data.len())? };
        {
            let (ptr, _written) = dst.device_ptr_mut(&stream);
            // SAFETY: `ptr` holds `data.len()` elements of `T`; `staged` stays allocated
            // and unwritten until the event recorded below has passed.
            unsafe { result::memcpy_htod_async(ptr, staged, stream.cu_stream()) }.w()?;
        }
        slot.record(&stream)?;
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, d.clone())),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        sys, CudaContext, CudaEvent, CudaStream, PinnedHostSlice,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::Result;
    use std::sync::Arc;

    /// A page-locked buffer and the event after its last transfer.
    pub(super) struct Slot {
        buf: PinnedHostSlice<u8>,
        done: CudaEvent,
    }

    impl Slot {
        pub(super) fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
            // SAFETY: the bytes are written before any transfer reads them.
            let buf = unsafe { ctx.alloc_pinned::<u8>(bytes.max(1)) }.w()?;
            let done = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .w()?;
            Ok(Self { buf, done })
        }

        pub(super) fn capacity(&self) -> usize {
            self.buf.len()
        }

        /// The buffer's start, once its last transfer has finished.
        pub(super) fn writable(&mut self) -> Result<*mut u8> {
            self.done.synchronize().w()?;
            self.buf.as_mut_ptr().w()
        }

        /// Marks the transfer just queued on `stream` as the buffer's last.
        pub(super) fn record(&self, stream: &CudaStream) -> Result<()> {
            self.done.record(stream).w()
        }
    }

    impl Drop for Slot {
        fn drop(&mut self) {
            // Page-locked memory is freed after this (the field's own drop): not while a
            // transfer may still read it.
            let _ = self.done.synchronize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_keep_values_shape_and_type_and_check_the_count() {
        let mut up = Uploader::default();
        let dev = Device::Cpu;
        let a: Vec<u8> = (0..=255).collect();
        let t = up.upload(&a, (4, 64), &dev).unwrap();
        assert_eq!(t.dims(), &[4, 64]);
        assert_eq!(t.flatten_all().unwrap().to_vec1::<u8>().unwrap(), a);
        let b = [7u32, 1, 3];
        assert_eq!(up.upload(&b, 3, &dev).unwrap().to_vec1::<u32>().unwrap(), b);
        let empty: [f32; 0] = [];
        assert_eq!(up.upload(&empty, (0, 3), &dev).unwrap().dims(), &[0, 3]);
        let e = up.upload(&b, (2, 2), &dev).unwrap_err().to_string();
        assert!(e.contains("3 values for shape"), "{e}");
    }
}
