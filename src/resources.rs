//! This process's resource use: facts for reports and the memory tests, and giving freed
//! memory back to the operating system when a model goes.

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
