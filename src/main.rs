//! The `candor` binary: parses the command line and hands each subcommand to `cli`.

use std::alloc::{GlobalAlloc, Layout, System};

use clap::Parser;

/// Blocks of 64 KB or more start on a 64-byte cache line. The CPU's AMX unit loads and stores matrix
/// tiles one 64-byte row at a time, and from rows off a line boundary it ran 6.6× slower
/// (`src/ops/amx.rs`); with the activations and gradients line-aligned, its products read them in place
/// instead of copying each into an aligned buffer first. Such a block is a system block 64 bytes
/// longer, its start rounded up to the next line with the distance stored in the 8 bytes before it
/// (glibc's own `posix_memalign` left so many gaps that a training step's peak RSS went from 1.0 to
/// 1.5-2.4 GB). Smaller blocks are the system's as they are.
struct LineAligned;

impl LineAligned {
    const LINE: usize = 64;
    const FROM: usize = 64 << 10;

    /// Whether a block of this layout is line-aligned by us (the layout alone decides, so alloc,
    /// realloc and dealloc agree).
    fn ours(l: Layout) -> bool {
        l.size() >= Self::FROM && l.align() <= 16
    }

    /// The system block behind a block of `size` bytes of ours.
    fn raw(size: usize) -> Layout {
        // SAFETY: 16 is a power of two; size + 64 does not overflow isize for any block this process
        // can hold
        unsafe { Layout::from_size_align_unchecked(size + Self::LINE, 16) }
    }

    /// The line-aligned start inside the system block at `raw` (16 to 64 bytes in), with the distance
    /// written just before it.
    unsafe fn place(raw: *mut u8) -> *mut u8 {
        if raw.is_null() {
            return raw;
        }
        let p = raw.add(Self::LINE - raw as usize % Self::LINE);
        (p as *mut usize).sub(1).write_unaligned(p as usize - raw as usize);
        p
    }

    /// The system block of ours at `p`.
    unsafe fn origin(p: *mut u8) -> *mut u8 {
        p.sub((p as *mut usize).sub(1).read_unaligned())
    }
}

// SAFETY: blocks below FROM (or with larger alignments) go to the system allocator as asked; ours are
// system blocks 64 bytes longer, returned from the line they start on and freed from their origin.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if Self::ours(l) {
            Self::place(System.alloc(Self::raw(l.size())))
        } else {
            System.alloc(l)
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if Self::ours(l) {
            Self::place(System.alloc_zeroed(Self::raw(l.size())))
        } else {
            System.alloc_zeroed(l)
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if Self::ours(l) {
            System.dealloc(Self::origin(p), Self::raw(l.size()))
        } else {
            System.dealloc(p, l)
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, l.align());
        match (Self::ours(l), Self::ours(new)) {
            (false, false) => System.realloc(p, l, new_size),
            (true, true) => {
                let start = p as usize - Self::origin(p) as usize;
                let raw = System.realloc(Self::origin(p), Self::raw(l.size()), new_size + Self::LINE);
                if raw.is_null() {
                    return raw;
                }
                // the data sits `start` bytes into the moved block; the line there may differ
                Self::place_keeping(raw, start, l.size().min(new_size))
            }
            _ => {
                let q = self.alloc(new);
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                    self.dealloc(p, l);
                }
                q
            }
        }
    }
}

impl LineAligned {
    /// [`LineAligned::place`] for a block whose `len` bytes of data start `start` bytes in: moves them
    /// to the block's line-aligned start.
    unsafe fn place_keeping(raw: *mut u8, start: usize, len: usize) -> *mut u8 {
        let offset = Self::LINE - raw as usize % Self::LINE;
        if offset != start {
            std::ptr::copy(raw.add(start), raw.add(offset), len);
        }
        Self::place(raw)
    }
}

#[global_allocator]
static ALLOCATOR: LineAligned = LineAligned;

fn main() {
    keep_freed_memory();
    let cli = candor::cli::Cli::parse();
    if let Err(e) = candor::cli::run(cli) {
        // One line, no backtrace: every error names the file or field at fault.
        eprintln!("error: {}", candor::error::one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// glibc hands every freed block above its mmap threshold (128 KB, rising to at most 32 MB) back to the
/// kernel, which zeroes the pages again when the next op asks for them: 6-13% of a CPU training step
/// went to the kernel's `clear_page`. Serve blocks up to 32 MB from the heap and keep freed memory for
/// reuse; the peak is what it was (it is reached every step anyway).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

#[cfg(test)]
mod tests {
    /// Large blocks start on a line through growth, shrinking and zeroed allocation, keep their
    /// contents when reallocated across the threshold both ways, and small ones are left alone.
    #[test]
    fn large_blocks_are_line_aligned_and_keep_their_contents() {
        let line = super::LineAligned::LINE;
        let from = super::LineAligned::FROM / 4;
        let big = vec![1.5f32; from + 3];
        assert_eq!(big.as_ptr() as usize % line, 0);
        let zeroed = vec![0f32; 3 * from];
        assert_eq!(zeroed.as_ptr() as usize % line, 0);
        assert!(zeroed.iter().all(|&v| v == 0.0));
        // grown one push at a time from small to large: every realloc path
        let mut v: Vec<u32> = Vec::new();
        for i in 0..(4 * from as u32) {
            v.push(i);
            if v.len() * 4 >= super::LineAligned::FROM {
                assert_eq!(v.as_ptr() as usize % line, 0, "len {}", v.len());
            }
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        // shrunk below the threshold and back
        v.truncate(100);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        v.extend(100..(2 * from as u32));
        assert_eq!(v.as_ptr() as usize % line, 0);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        // many blocks at once, freed in another order
        let blocks: Vec<Vec<u8>> =
            (0..64).map(|i| vec![i as u8; super::LineAligned::FROM + 17 * i]).collect();
        for (i, b) in blocks.iter().enumerate().rev() {
            assert_eq!(b.as_ptr() as usize % line, 0);
            assert!(b.iter().all(|&x| x == i as u8));
        }
        drop(blocks);
        drop(big);
    }
}
