//! This process's resource use: facts for reports and the memory tests, giving freed
//! memory back to the operating system when a model goes, and the scheduling priority of the
//! threads that compute (`[pool] compute_nice`).

/// Peak resident set size of this process in bytes (`VmHWM` on Linux), when known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Gives memory that the allocator holds but no longer uses back to the operating system.
///
/// Called when a worker drops its model (unload, eviction, keep-alive, restart). glibc keeps
/// freed memory in its arenas, and after a large `free` it raises its mmap threshold, so model
/// tensors come from the arenas and stay resident after they are freed; under traffic, small
/// allocations between them fragment that space and RSS climbs with every unload/load cycle
/// (measured with `scripts/soak`, see docs/RELIABILITY.md). `malloc_trim(0)` releases the free
/// pages of every arena. Elsewhere this does nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The default nice value of the threads that run models (each worker's thread, its model's
/// forward pool and candle's barrier pool), `[pool] compute_nice`: below the HTTP host's threads, so that
/// `/metrics`, `/health` and the streaming of tokens are scheduled before more compute when
/// the cores are all busy. Compute keeps the cores whenever nothing else wants them.
pub const DEFAULT_COMPUTE_NICE: i32 = 5;

/// The nice value compute threads take (process-wide: the last pool started decides).
static COMPUTE_NICE: std::sync::atomic::AtomicI32 =
    std::sync::atomic::AtomicI32::new(DEFAULT_COMPUTE_NICE);

/// Sets the nice value compute threads started from now on take (`[pool] compute_nice`).
pub fn set_compute_nice(nice: i32) {
    COMPUTE_NICE.store(nice, std::sync::atomic::Ordering::Relaxed);
}

/// Lowers the calling thread's scheduling priority to the configured compute nice value
/// (Linux, where nice values are per thread; elsewhere nothing). A failure is logged and
/// changes nothing else.
pub fn lower_compute_thread_priority() {
    let nice = COMPUTE_NICE.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: gettid and setpriority only read and set the calling thread's scheduling
        // attributes.
        let result = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if result != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot lower a compute thread's priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Lowers the priority of candle's barrier pool threads to the compute nice value, once per
/// process. Every quantized matmul (ours and candle's) runs on that pool, so those are the
/// threads that hold the cores; candle starts them without a start hook, so each is handed
/// this as one piece of work. The calling thread takes part as the pool's last worker and is
/// left as it is.
pub fn lower_barrier_pool_priority() {
    if COMPUTE_NICE.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        return;
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let pool = candle_core::utils::barrier_pool();
        let workers = pool.n_workers();
        pool.execute(|thread| {
            if thread < workers {
                lower_compute_thread_priority();
            }
        });
    });
}
