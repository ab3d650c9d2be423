//! Memory probes: how many bytes a stage holds now and at its peak.
//!
//! One interface, two sources. On the CPU backend tensors are ordinary heap allocations, so
//! a counting global allocator ([`CountingAllocator`], installed by the binaries) sees every
//! byte. On cubecl backends (wgpu, cuda) [`cube_pool_probe`] (feature `cubecl`) reads the
//! backend's own pool statistics. Readers call [`MemoryProbe::current`] only after a device
//! sync, so queued work is counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of memory statistics for one device.
pub trait MemoryProbe: Send + Sync {
    /// Where the numbers come from, for reports ("heap", "wgpu pool").
    fn source(&self) -> &str;
    /// Bytes in use now.
    fn current(&self) -> u64;
    /// The most bytes in use since the last [`reset_peak`](Self::reset_peak).
    fn peak(&self) -> u64;
    /// Start a new peak window at the current usage.
    fn reset_peak(&self);
    /// Give cached but unused memory back (device pools). The default does nothing, which is
    /// right for the heap: the allocator returns memory as tensors drop.
    fn cleanup(&self) {}
}

/// A probe that knows nothing: reports zeros. For libraries used without a probe installed.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbe;

/// Keep freed activation memory in the process for the next tensor, instead of unmapping it.
///
/// glibc maps every allocation above its mmap threshold (adaptive, at most 32 MiB) afresh and
/// unmaps it on free, so each large activation pays page faults and the kernel's zeroing on
/// first touch: a GEMM into a fresh 126 MB output (the 512² GEGLU projection) ran at 123
/// GFLOP/s against 175 with the memory kept (2-core EPYC). Binaries call this once at start.
/// The process keeps up to its peak mapped after a run; the peak itself is unchanged. A no-op
/// off Linux glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before any tensor exists
    // and with valid parameter constants, it has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

impl MemoryProbe for NoProbe {
    fn source(&self) -> &str {
        "none"
    }
    fn current(&self) -> u64 {
        0
    }
    fn peak(&self) -> u64 {
        0
    }
    fn reset_peak(&self) {}
}

/// A global allocator that counts live bytes and their high-water mark.
///
/// Install it in a binary:
/// ```ignore
/// #[global_allocator]
/// static ALLOC: ip2p_pipeline::memory::CountingAllocator = ip2p_pipeline::memory::CountingAllocator::new();
/// ```
/// and pass `&ALLOC` (it implements [`MemoryProbe`]) to the pipeline.
pub struct CountingAllocator {
    current: AtomicU64,
    peak: AtomicU64,
}

impl CountingAllocator {
    pub const fn new() -> Self {
        Self {
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    fn add(&self, n: usize) {
        let now = self.current.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.current.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are only bookkeeping.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        self.sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.sub(layout.size());
            self.add(new_size);
        }
        p
    }
}

impl MemoryProbe for CountingAllocator {
    fn source(&self) -> &str {
        "heap (counting allocator)"
    }
    fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
    fn reset_peak(&self) {
        self.peak.store(self.current(), Ordering::Relaxed);
    }
}

/// A probe over a device pool that reports its state only when asked (cubecl's
/// `memory_usage`). `read` returns `(in_use, reserved)`: the bytes held by live tensors, and
/// the bytes the pool holds from the device, which only grows between cleanups and so bounds
/// the in-use peak between two reads from above. [`current`](MemoryProbe::current) is the
/// first; the peak is the largest second seen since [`reset_peak`](MemoryProbe::reset_peak):
/// what the device had to give the pool during the stage, as a GPU's memory counter shows it.
pub struct SampledPeak<F: Fn() -> (u64, u64) + Send + Sync, C: Fn() + Send + Sync> {
    name: String,
    read: F,
    clean: C,
    peak: AtomicU64,
}

impl<F: Fn() -> (u64, u64) + Send + Sync, C: Fn() + Send + Sync> SampledPeak<F, C> {
    pub fn new(name: impl Into<String>, read: F, clean: C) -> Self {
        Self {
            name: name.into(),
            read,
            clean,
            peak: AtomicU64::new(0),
        }
    }

    fn sample(&self) -> (u64, u64) {
        let (in_use, reserved) = (self.read)();
        let high = reserved.max(in_use);
        self.peak.fetch_max(high, Ordering::Relaxed);
        (in_use, high)
    }
}

impl<F: Fn() -> (u64, u64) + Send + Sync, C: Fn() + Send + Sync> MemoryProbe for SampledPeak<F, C> {
    fn source(&self) -> &str {
        &self.name
    }
    fn current(&self) -> u64 {
        self.sample().0
    }
    fn peak(&self) -> u64 {
        self.sample();
        self.peak.load(Ordering::Relaxed)
    }
    fn reset_peak(&self) {
        let (_, high) = (self.read)();
        self.peak.store(high, Ordering::Relaxed);
    }
    fn cleanup(&self) {
        (self.clean)()
    }
}

/// A probe over a cubecl runtime's memory pool (see [`SampledPeak`]): bytes in use now, and
/// as the peak the pool's reservation; cleanup through the pool's own `memory_cleanup`.
#[cfg(feature = "cubecl")]
pub fn cube_pool_probe<R: burn::cubecl::Runtime>(
    name: &str,
    device: &R::Device,
) -> SampledPeak<impl Fn() -> (u64, u64) + Send + Sync + use<R>, impl Fn() + Send + Sync + use<R>> {
    let client = R::client(device);
    let cleaner = client.clone();
    SampledPeak::new(
        name,
        move || {
            client
                .memory_usage()
                .map_or((0, 0), |u| (u.bytes_in_use, u.bytes_reserved))
        },
        move || cleaner.memory_cleanup(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_allocator_tracks_current_and_peak() {
        let a = CountingAllocator::new();
        let layout = Layout::from_size_align(1 << 20, 8).unwrap();
        unsafe {
            let p = a.alloc(layout);
            assert_eq!(a.current(), 1 << 20);
            let q = a.alloc(layout);
            assert_eq!(a.peak(), 2 << 20);
            a.dealloc(q, layout);
            assert_eq!(a.current(), 1 << 20);
            assert_eq!(a.peak(), 2 << 20);
            a.reset_peak();
            assert_eq!(a.peak(), 1 << 20);
            let p = a.realloc(p, layout, 3 << 20);
            assert_eq!(a.current(), 3 << 20);
            a.dealloc(p, Layout::from_size_align(3 << 20, 8).unwrap());
        }
        assert_eq!(a.current(), 0);
        assert_eq!(a.peak(), 3 << 20);
    }

    #[test]
    fn sampled_peak_keeps_the_largest_reservation() {
        let in_use = AtomicU64::new(10);
        let reserved = AtomicU64::new(16);
        let read = || {
            (
                in_use.load(Ordering::Relaxed),
                reserved.load(Ordering::Relaxed),
            )
        };
        let probe = SampledPeak::new("pool", read, || {});
        assert_eq!(probe.current(), 10);
        assert_eq!(probe.peak(), 16);
        in_use.store(50, Ordering::Relaxed);
        reserved.store(64, Ordering::Relaxed);
        assert_eq!(probe.current(), 50);
        in_use.store(20, Ordering::Relaxed);
        reserved.store(32, Ordering::Relaxed);
        assert_eq!(probe.peak(), 64);
        probe.reset_peak();
        assert_eq!(probe.peak(), 32);
        // A pool that reports no reservation: the peak is the in-use maximum.
        reserved.store(0, Ordering::Relaxed);
        in_use.store(40, Ordering::Relaxed);
        assert_eq!(probe.peak(), 40);
    }
}
