//! The `candor` binary: parses the command line and hands each subcommand to `cli`.

use clap::Parser;

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
