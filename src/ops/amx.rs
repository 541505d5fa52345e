//! Intel AMX matrix products in bf16 for the CPU path in bf16: `dst (f32) = lhs · rhs` with bf16
//! operands, exact products and f32 sums (`tdpbf16ps`), for the frozen weights' products.
//!
//! On a Sapphire Rapids Xeon each core's AMX unit multiplies bf16 at up to 16× its AVX-512 f32 rate.
//! Without it, bf16 training on the CPU widened every operand to f32 and ran OpenBLAS's `sgemm`
//! (about 280 GFLOP/s on two cores), and PyTorch's bf16 (oneDNN on AMX) trained SmolLM2 faster than
//! candor did. Here a 2 × 2-tile kernel (four 16 × 16 f32 accumulators, two 16 × 32 bf16 tiles of
//! `lhs`, two of `rhs`) runs the decoder's products at 0.8–1.0 TFLOP/s on two cores.
//!
//! Operands: `lhs` is bf16 rows read in place where its width is a multiple of 32 (or f32 or any
//! other width, copied to padded bf16 rows once per product); `rhs` is a frozen weight `W` stored
//! `[rows, cols]`, used as `Wᵀ` (a projection's forward, `x·Wᵀ`) or as `W` (its input gradient,
//! `dy·W`). Each task packs one 32-column panel of `rhs` at a time into the pairs-of-rows layout the
//! unit reads (32 × K values, in cache while every row block of `lhs` passes over it), so no packed copy
//! of a weight outlives the product. Zero padding covers every edge; the accumulators of an edge block
//! go through a small buffer, so nothing outside `dst`'s block is written.
//!
//! Where it runs: x86-64 CPUs reporting AMX-TILE and AMX-BF16 (CPUID), on a Linux kernel that grants
//! the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux ≥ 5.16). `CANDOR_AMX=off` turns it
//! off; [`set_suspended`] does the same between steps for in-process A/B measurements.
//! Tile registers are not something the compiler knows of or uses: each task loads its tile
//! configuration before its first tile instruction and releases the tiles when it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use half::bf16;

use super::cpu_gemm::{DstPtr, View};

/// Rows of `lhs` (and of `dst`) per kernel call: two tiles of 16.
const MB: usize = 32;
/// Columns of `rhs` per packed panel: two tiles of 16.
const NB: usize = 32;
/// The inner dimension per tile step: 16 rows of bf16 pairs.
const KB: usize = 32;
/// bf16 values per packed `rhs` tile (16 × 32).
const TILE: usize = 512;

/// bf16 rows of `lhs`: element `(i, j)` is `data[offset + i·rs + j]`.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub data: &'a [bf16],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl<'a> Rows<'a> {
    /// A contiguous row-major `rows × cols` matrix filling `data`.
    pub fn matrix(data: &'a [bf16], rows: usize, cols: usize) -> Self {
        Rows { data, offset: 0, rows, cols, rs: cols }
    }

    /// Rows `first..first + count`.
    pub fn row_range(self, first: usize, count: usize) -> Self {
        Rows { offset: self.offset + first * self.rs, rows: count, ..self }
    }

    fn check(&self, what: &str) {
        assert!(self.rs >= self.cols || self.rows <= 1, "amx: {what} rows overlap");
        if self.rows > 0 && self.cols > 0 {
            let last = self.offset + (self.rows - 1) * self.rs + self.cols - 1;
            assert!(last < self.data.len(), "amx: {what} reaches {last}, slice has {}", self.data.len());
        }
    }
}

/// The left operand.
#[derive(Clone, Copy)]
pub(crate) enum Lhs<'a> {
    Bf16(Rows<'a>),
    /// Rounded to bf16 (to nearest even) while copied into the padded rows.
    F32(View<'a>),
}

impl Lhs<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            Lhs::Bf16(r) => (r.rows, r.cols),
            Lhs::F32(v) => (v.rows, v.cols),
        }
    }
}

/// The right operand: a weight `W` stored as [`Rows`], used as `Wᵀ` or as `W`.
#[derive(Clone, Copy)]
pub(crate) enum Rhs<'a> {
    Transposed(Rows<'a>),
    Plain(Rows<'a>),
}

impl Rhs<'_> {
    /// `(inner, cols)` of the operand as used.
    fn dims(&self) -> (usize, usize) {
        match self {
            Rhs::Transposed(w) => (w.cols, w.rows),
            Rhs::Plain(w) => (w.rows, w.cols),
        }
    }
}

/// The permission to use the unit, checked once per process.
pub(crate) struct Amx(());

static SUSPENDED: AtomicBool = AtomicBool::new(false);

/// While suspended, [`get`] answers `None` and bf16 products widen to f32 as with `CANDOR_AMX=off`;
/// unlike the variable this can change between steps (`bench train-step --alternate amx`).
pub fn set_suspended(on: bool) {
    SUSPENDED.store(on, Ordering::Relaxed);
}

/// The unit, if this CPU and kernel offer it and neither `CANDOR_AMX=off` nor [`set_suspended`]
/// turned it off.
pub(crate) fn get() -> Option<&'static Amx> {
    if SUSPENDED.load(Ordering::Relaxed) {
        return None;
    }
    probe().as_ref().ok()
}

/// Whether the unit is usable, and if not why (for `candor info` and logs).
pub fn describe() -> String {
    match probe() {
        Ok(_) if SUSPENDED.load(Ordering::Relaxed) => "AMX-BF16 (suspended)".into(),
        Ok(_) => "AMX-BF16 for bf16 products".into(),
        Err(why) => format!("no AMX: {why}"),
    }
}

fn probe() -> &'static Result<Amx, String> {
    static PROBE: OnceLock<Result<Amx, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        if std::env::var("CANDOR_AMX").is_ok_and(|v| v == "off") {
            return Err("CANDOR_AMX=off".into());
        }
        request()
    })
}

#[cfg(target_arch = "x86_64")]
fn request() -> Result<Amx, String> {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return Err("the CPU has no AMX-BF16".into());
    }
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with two integer arguments; on success the process (all its
        // threads) may use the tile registers.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if r != 0 {
            return Err(format!(
                "the kernel refused the tile state (arch_prctl: {}; Linux 5.16 or newer grants it)",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Amx(()))
    }
    #[cfg(not(target_os = "linux"))]
    Err("AMX is used on Linux only".into())
}

#[cfg(not(target_arch = "x86_64"))]
fn request() -> Result<Amx, String> {
    Err("not an x86-64 CPU".into())
}

/// A buffer of `len` values that starts on a 64-byte boundary. A tile row is 64 bytes, and
/// tile loads from line-aligned rows ran 6.6× as fast as from rows 16 bytes off a line (four 1 KB loads
/// from L1: 8.9 against 59 ns; the kernel on data in L1: 2.9 against 1.2 TFLOP/s per core), so every
/// buffer a tile is loaded from or stored to is one of these.
struct Aligned<T> {
    lines: Vec<Line>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

impl<T> Drop for Aligned<T> {
    fn drop(&mut self) {
        let lines = std::mem::take(&mut self.lines);
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let held: usize = pool.iter().map(|v| 64 * v.capacity()).sum();
            if held + 64 * lines.capacity() <= POOL_BYTES {
                pool.push(lines);
            }
        });
    }
}

thread_local! {
    /// Buffers handed back by dropped [`Aligned`]s on this thread, reused by the next ones: a fresh
    /// multi-megabyte allocation per product (a copy of `lhs`) meant fresh pages, zeroed by the kernel
    /// on first touch, every time.
    static POOL: std::cell::RefCell<Vec<Vec<Line>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most each thread's pool keeps.
const POOL_BYTES: usize = 64 << 20;

impl<T: Copy> Aligned<T> {
    /// `len` values of `T` (a float type: any bytes are a value) with whatever a previous buffer left
    /// there: the caller writes every value it reads, zeros included.
    fn reused(len: usize) -> Self {
        let need = (len * std::mem::size_of::<T>()).div_ceil(64);
        let lines = POOL
            .try_with(|pool| {
                let mut pool = pool.borrow_mut();
                let at = pool.iter().position(|v| v.capacity() >= need)?;
                Some(pool.swap_remove(at))
            })
            .ok()
            .flatten();
        let mut lines = lines.unwrap_or_else(|| Vec::with_capacity(need));
        lines.truncate(need);
        lines.resize(need, Line([0; 64]));
        Aligned { lines, len, _values: std::marker::PhantomData }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: the lines hold at least `len` values of `T` (a float type: any bytes are a value),
        // and 64-byte alignment satisfies `T`'s.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }

    fn as_ptr(&self) -> *const T {
        self.lines.as_ptr() as *const T
    }
}

/// `lhs`'s rows as the kernel reads them: bf16, `stride` apart, line-aligned, each a multiple of 32
/// values (zero padded), and a multiple of 32 rows (zero rows). In place where `lhs` already is all
/// that; otherwise copied once per product.
struct LhsRows {
    base: *const bf16,
    stride: usize,
    /// Owns the rows when they were copied (`base` points into it).
    _copy: Option<Aligned<bf16>>,
}

// SAFETY: the rows are only read, and the buffer they may point into lives as long as this value.
unsafe impl Send for LhsRows {}
unsafe impl Sync for LhsRows {}

impl LhsRows {
    /// `parallel`: copy on all threads (a product on all threads) or on this one.
    fn new(lhs: Lhs, m: usize, k: usize, parallel: bool) -> Self {
        let kp = k.next_multiple_of(KB);
        if let Lhs::Bf16(r) = lhs {
            // SAFETY: offset is inside the slice (checked by `Rows::check`)
            let base = unsafe { r.data.as_ptr().add(r.offset) };
            let lines = (base as usize).is_multiple_of(64) && (2 * r.rs).is_multiple_of(64);
            if lines && k.is_multiple_of(KB) && m.is_multiple_of(MB) {
                return LhsRows { base, stride: r.rs, _copy: None };
            }
        }
        let mut copy = Aligned::<bf16>::reused(m.next_multiple_of(MB) * kp);
        let (rows, padding) = copy.as_mut_slice().split_at_mut(m * kp);
        padding.fill(bf16::ZERO);
        if kp > k {
            rows.chunks_mut(kp).for_each(|row| row[k..].fill(bf16::ZERO));
        }
        match lhs {
            // stored transposed (a column-major view): 16 × 16 blocks transposed in registers
            #[cfg(target_arch = "x86_64")]
            Lhs::F32(v) if v.rs == 1 && v.cs != 1 => {
                let block = |(b, rows): (usize, &mut [bf16])| {
                    // SAFETY: AVX-512F is present wherever an `Amx` exists; the view is in bounds
                    // (checked in `run`) and `rows` holds the block's rows of `kp` values.
                    unsafe { round_transposed_avx512(v, 16 * b, rows, kp) }
                };
                if parallel {
                    use rayon::prelude::*;
                    rows.par_chunks_mut(16 * kp).enumerate().for_each(block);
                } else {
                    rows.chunks_mut(16 * kp).enumerate().for_each(block);
                }
            }
            _ => {
                let row = |(i, row): (usize, &mut [bf16])| match lhs {
                    Lhs::Bf16(r) => row[..k].copy_from_slice(&r.data[r.offset + i * r.rs..][..k]),
                    Lhs::F32(v) if v.cs == 1 => {
                        let src = &v.data[v.offset + i * v.rs..][..k];
                        super::simd::vectorised(
                            #[inline(always)]
                            || row[..k].iter_mut().zip(src).for_each(|(d, &s)| *d = bf16::from_f32(s)),
                        )
                    }
                    Lhs::F32(v) => {
                        (0..k).for_each(|j| row[j] = bf16::from_f32(v.data[v.offset + i * v.rs + j * v.cs]))
                    }
                };
                if parallel {
                    use rayon::prelude::*;
                    rows.par_chunks_mut(kp).enumerate().for_each(row);
                } else {
                    rows.chunks_mut(kp).enumerate().for_each(row);
                }
            }
        }
        LhsRows { base: copy.as_ptr(), stride: kp, _copy: Some(copy) }
    }

    /// The start of row block `i0..i0 + 32`.
    fn block(&self, i0: usize) -> *const bf16 {
        // SAFETY (of the `add`): a full block of `lhs` in place, or rows of the padded copy
        unsafe { self.base.add(i0 * self.stride) }
    }
}

/// Packs columns `n0..n0 + 32` of `rhs` (`k × n` as used) into `out`: per step of 32 along `k`, two
/// tiles (columns `n0..+16`, `n0+16..+32`) of 16 rows, each row 16 pairs `(rhs[2r][c], rhs[2r+1][c])`.
/// Values beyond `k` or `n` are zeros.
fn pack_panel(rhs: Rhs, n0: usize, out: &mut [bf16]) {
    let (k, n) = rhs.dims();
    let steps = k.div_ceil(KB);
    let cols = NB.min(n - n0);
    #[cfg(target_arch = "x86_64")]
    if cols == NB && k.is_multiple_of(KB) {
        // SAFETY: every CPU with AMX has AVX-512F and BW (only an `Amx` holder packs); a full panel's
        // rows and columns are inside the weight (checked by `Rows::check` before any task runs), and
        // `out` holds steps · 2 tiles.
        unsafe {
            match rhs {
                Rhs::Transposed(w) => pack_transposed_avx512(w, n0, steps, out),
                Rhs::Plain(w) => pack_plain_avx512(w, n0, steps, out),
            }
        }
        return;
    }
    if cols < NB || !k.is_multiple_of(KB) {
        out.fill(bf16::ZERO);
    }
    match rhs {
        // (rhs[κ][c], rhs[κ+1][c]) = (W[c][κ], W[c][κ+1]): adjacent in W's row c
        Rhs::Transposed(w) => {
            for c in 0..cols {
                let row = &w.data[w.offset + (n0 + c) * w.rs..][..k];
                let (t, c16) = (c / 16, c % 16);
                for p in 0..steps {
                    let tile = &mut out[(2 * p + t) * TILE..][..TILE];
                    let seg = &row[p * KB..k.min(p * KB + KB)];
                    if seg.len() == KB {
                        for r in 0..16 {
                            tile[r * 32 + 2 * c16] = seg[2 * r];
                            tile[r * 32 + 2 * c16 + 1] = seg[2 * r + 1];
                        }
                    } else {
                        for (j, &v) in seg.iter().enumerate() {
                            tile[(j / 2) * 32 + 2 * c16 + j % 2] = v;
                        }
                    }
                }
            }
        }
        // (rhs[κ][c], rhs[κ+1][c]) = (W[κ][c], W[κ+1][c]): two rows of W interleaved
        Rhs::Plain(w) => {
            for p in 0..steps {
                for r in 0..16 {
                    let kk = p * KB + 2 * r;
                    if kk >= k {
                        break;
                    }
                    let row0 = &w.data[w.offset + kk * w.rs + n0..][..cols];
                    let row1 = (kk + 1 < k).then(|| &w.data[w.offset + (kk + 1) * w.rs + n0..][..cols]);
                    for t in 0..cols.div_ceil(16) {
                        let tile = &mut out[(2 * p + t) * TILE + r * 32..][..32];
                        let width = 16.min(cols - 16 * t);
                        for c in 0..width {
                            tile[2 * c] = row0[16 * t + c];
                            tile[2 * c + 1] = row1.map_or(bf16::ZERO, |r1| r1[16 * t + c]);
                        }
                    }
                }
            }
        }
    }
}

/// [`pack_panel`] for a full panel of `Wᵀ`: each tile is a 16 × 16 transpose of 32-bit pairs (tile
/// row `r` holds `W[n0 + c][32p + 2r ..+ 2]` for the 16 columns `c`), done in registers.
///
/// # Safety
/// AVX-512F is present; rows `n0..n0 + 32` of `w` have `32 · steps` values; `out` holds `steps · 2` tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed_avx512(w: Rows, n0: usize, steps: usize, out: &mut [bf16]) {
    use std::arch::x86_64::*;
    let base = w.data.as_ptr().add(w.offset + n0 * w.rs);
    let dst = out.as_mut_ptr();
    for p in 0..steps {
        for t in 0..2 {
            // rows c = 0..16: 16 pairs each
            let mut r = [_mm512_setzero_si512(); 16];
            for (c, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(base.add((16 * t + c) * w.rs + p * KB) as *const _);
            }
            let tile = dst.add((2 * p + t) * TILE);
            for (row, v) in transpose16(r).into_iter().enumerate() {
                _mm512_storeu_si512(tile.add(row * 32) as *mut _, v);
            }
        }
    }
}

/// The transpose of a 16 × 16 matrix of 32-bit values held as 16 rows: row `i` of the result is
/// column `i` of `r`.
///
/// # Safety
/// AVX-512F is present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    let mut u = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let (a, b, c, d) = (r[4 * q], r[4 * q + 1], r[4 * q + 2], r[4 * q + 3]);
        let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        // per 128-bit lane j: column 4j (+0, +1, +2, +3) of rows 4q..4q+4
        u[4 * q] = _mm512_unpacklo_epi64(t0, t2);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t1, t3);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let (v0, v1) =
            (_mm512_shuffle_i32x4::<0x88>(u[i], u[4 + i]), _mm512_shuffle_i32x4::<0xdd>(u[i], u[4 + i]));
        let (w0, w1) = (
            _mm512_shuffle_i32x4::<0x88>(u[8 + i], u[12 + i]),
            _mm512_shuffle_i32x4::<0xdd>(u[8 + i], u[12 + i]),
        );
        // columns i, i + 8, i + 4, i + 12
        out[i] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[i + 8] = _mm512_shuffle_i32x4::<0xdd>(v0, w0);
        out[i + 4] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[i + 12] = _mm512_shuffle_i32x4::<0xdd>(v1, w1);
    }
    out
}

/// Rows `i0..i0 + rows.len() / kp` of an f32 view stored transposed (`v.rs == 1`), rounded to bf16
/// (nearest even, NaN kept) into `rows` (`kp` values apart; the padding past `v.cols` is left alone).
///
/// # Safety
/// AVX-512F is present; the view is inside its slice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_transposed_avx512(v: View, i0: usize, rows: &mut [bf16], kp: usize) {
    use std::arch::x86_64::*;
    let (m, k) = ((rows.len() / kp).min(v.rows - i0), v.cols);
    let at = |i: usize, j: usize| v.data[v.offset + i + j * v.cs];
    let mut j0 = 0;
    if m == 16 {
        while j0 + 16 <= k {
            // 16 columns j of the view: each 16 consecutive rows i, contiguous in the slice
            let cols: [__m512i; 16] = std::array::from_fn(|c| {
                let start = v.offset + i0 + (j0 + c) * v.cs;
                _mm512_loadu_si512(v.data[start..start + 16].as_ptr() as *const _)
            });
            for (i, x) in transpose16(cols).into_iter().enumerate() {
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
                let rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(_mm512_castsi512_ps(x), _mm512_castsi512_ps(x));
                let quiet = _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000));
                let bits = _mm512_srli_epi32::<16>(_mm512_mask_blend_epi32(nan, rounded, quiet));
                let out = rows[i * kp + j0..i * kp + j0 + 16].as_mut_ptr();
                _mm256_storeu_si256(out as *mut _, _mm512_cvtepi32_epi16(bits));
            }
            j0 += 16;
        }
    }
    for i in 0..m {
        for j in j0..k {
            rows[i * kp + j] = half::bf16::from_f32(at(i0 + i, j));
        }
    }
}

/// [`pack_panel`] for a full panel of `W`: tile row `r` interleaves rows `32p + 2r` and `32p + 2r + 1`
/// of `W` over the tile's 16 columns.
///
/// # Safety
/// AVX-512F and BW are present; rows `0..32 · steps` of `w` have columns `n0..n0 + 32`; `out` holds
/// `steps · 2` tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_plain_avx512(w: Rows, n0: usize, steps: usize, out: &mut [bf16]) {
    use std::arch::x86_64::*;
    // output lane 2c takes row 0's column c, lane 2c + 1 row 1's (at 32 + c in the pair of registers)
    let lo: [i16; 32] = std::array::from_fn(|e| (e / 2 + (e % 2) * 32) as i16);
    let hi: [i16; 32] = std::array::from_fn(|e| (16 + e / 2 + (e % 2) * 32) as i16);
    let (lo, hi) = (_mm512_loadu_si512(lo.as_ptr() as *const _), _mm512_loadu_si512(hi.as_ptr() as *const _));
    let base = w.data.as_ptr().add(w.offset + n0);
    let dst = out.as_mut_ptr();
    for p in 0..steps {
        for r in 0..16 {
            let k0 = p * KB + 2 * r;
            let row0 = _mm512_loadu_si512(base.add(k0 * w.rs) as *const _);
            let row1 = _mm512_loadu_si512(base.add((k0 + 1) * w.rs) as *const _);
            let tile0 = dst.add(2 * p * TILE + r * 32);
            _mm512_storeu_si512(tile0 as *mut _, _mm512_permutex2var_epi16(row0, lo, row1));
            _mm512_storeu_si512(tile0.add(TILE) as *mut _, _mm512_permutex2var_epi16(row0, hi, row1));
        }
    }
}

/// The tile configuration: palette 1, tiles 0–7 all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// The tiles configured for one task on its thread, released when dropped.
struct Tiles;

impl Tiles {
    fn load(_: &Amx) -> Tiles {
        // SAFETY: the process holds the tile permission (an `Amx` exists); CONFIG is a valid palette-1
        // configuration.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        }
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the tile state configured in `load`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// One 32 × 32 block: `c (f32, rows ldc apart) (+)= a (32 rows, lda apart) · panel` over `steps` steps
/// of 32 along the inner dimension.
///
/// # Safety
/// Tiles are configured ([`Tiles`]); `a` has 32 readable rows of `32·steps` values, `panel`
/// `steps · 2` packed tiles, `c` 32 writable (and with `accumulate` readable) rows of 32 values.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel(
    a: *const bf16,
    lda: usize,
    panel: *const bf16,
    steps: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::asm;
    let (c1, ldc) = (c.add(16 * ldc), ldc * 4);
    if accumulate {
        asm!(
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c0} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c1} + {ldc}*1]",
            "tileloadd tmm3, [{c1} + {ldc}*1 + 64]",
            c0 = in(reg) c, c1 = in(reg) c1, ldc = in(reg) ldc, options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    asm!(
        "2:",
        "tileloadd tmm4, [{a0} + {lda}*1]",
        "tileloadd tmm6, [{b} + {s64}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {lda}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b}, 2048",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c0} + {ldc}*1 + 64], tmm1",
        "tilestored [{c1} + {ldc}*1], tmm2",
        "tilestored [{c1} + {ldc}*1 + 64], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a.add(16 * lda) => _,
        b = inout(reg) panel => _,
        n = inout(reg) steps => _,
        lda = in(reg) lda * 2,
        s64 = in(reg) 64usize,
        c0 = in(reg) c,
        c1 = in(reg) c1,
        ldc = in(reg) ldc,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: *const bf16, _: usize, _: *const bf16, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("an Amx exists only on x86-64")
}

/// A destination of `len` values, initialised unless only written ([`Amx::product_new`]).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    len: usize,
}

impl Amx {
    /// `dst = lhs · rhs` (`accumulate`: `dst += …`) on all threads, `dst` row-major from `offset` with
    /// row stride `rs`. Panics (before touching memory) if the inner dimensions differ or a view
    /// does not fit its slice.
    pub fn product(&self, lhs: Lhs, rhs: Rhs, dst: &mut [f32], offset: usize, rs: usize, accumulate: bool) {
        let out = Out { ptr: dst.as_mut_ptr(), len: dst.len() };
        self.run(lhs, rhs, out, offset, rs, accumulate, true)
    }

    /// `lhs · rhs` as a new row-major buffer, on all threads: every element written once, none
    /// filled first.
    pub fn product_new(&self, lhs: Lhs, rhs: Rhs) -> Vec<f32> {
        let (m, n) = (lhs.dims().0, rhs.dims().1);
        let mut v = Vec::<f32>::with_capacity(m * n);
        let out = Out { ptr: v.as_mut_ptr(), len: m * n };
        self.run(lhs, rhs, out, 0, n, false, true);
        // SAFETY: `run` without accumulation writes every element of the m × n destination (tile
        // stores, the copies of edge blocks, or zeros when the inner dimension is empty) and reads none
        unsafe { v.set_len(m * n) };
        v
    }

    /// [`Amx::product`] on the calling thread only (inside a parallel task).
    pub fn product_here(
        &self,
        lhs: Lhs,
        rhs: Rhs,
        dst: &mut [f32],
        offset: usize,
        rs: usize,
        accumulate: bool,
    ) {
        self.run(lhs, rhs, Out { ptr: dst.as_mut_ptr(), len: dst.len() }, offset, rs, accumulate, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(&self, lhs: Lhs, rhs: Rhs, dst: Out, offset: usize, rs: usize, accumulate: bool, all: bool) {
        let ((m, k), (k2, n)) = (lhs.dims(), rhs.dims());
        assert_eq!(k, k2, "amx: [{m}×{k}]·[{k2}×{n}]");
        if m == 0 || n == 0 {
            return;
        }
        let last = offset + (m - 1) * rs + n - 1;
        assert!(last < dst.len, "amx: dst reaches {last}, slice has {}", dst.len);
        assert!(rs >= n || m == 1, "amx: dst rows overlap");
        match lhs {
            Lhs::Bf16(r) => r.check("lhs"),
            Lhs::F32(v) => {
                let last = v.offset + (m - 1) * v.rs + k.saturating_sub(1) * v.cs;
                assert!(k == 0 || last < v.data.len(), "amx: lhs reaches {last}, slice has {}", v.data.len());
            }
        }
        match rhs {
            Rhs::Transposed(w) | Rhs::Plain(w) => w.check("rhs"),
        }
        if k == 0 {
            if !accumulate {
                // SAFETY: rows of n values inside the destination (checked above)
                (0..m).for_each(|i| unsafe { dst.ptr.add(offset + i * rs).write_bytes(0, n) });
            }
            return;
        }
        let rows = LhsRows::new(lhs, m, k, all);
        let steps = k.div_ceil(KB);
        let (panels, blocks) = (n.div_ceil(NB), m.div_ceil(MB));
        let threads = if all { rayon::current_num_threads().max(1) } else { 1 };
        // split the panels over the tasks (each packs only its own), or with fewer panels than
        // threads and more row blocks, the row blocks (each task packs every panel)
        let by_panels = panels >= threads || panels >= blocks;
        let parts = if by_panels { panels.min(threads) } else { blocks.min(threads) };
        let dst = DstPtr(dst.ptr);
        let task = |part: usize| {
            let (p_range, b_range) = if by_panels {
                (panels * part / parts..panels * (part + 1) / parts, 0..blocks)
            } else {
                (0..panels, blocks * part / parts..blocks * (part + 1) / parts)
            };
            let _tiles = Tiles::load(self);
            // pack_panel writes every value of the panel; the kernel every value of `edge`
            let mut panel = Aligned::<bf16>::reused(steps * 2 * TILE);
            let mut edge = Aligned::<f32>::reused(MB * NB);
            for j in p_range {
                let n0 = j * NB;
                pack_panel(rhs, n0, panel.as_mut_slice());
                let cols = NB.min(n - n0);
                for b in b_range.clone() {
                    let i0 = b * MB;
                    let (a, lda) = (rows.block(i0), rows.stride);
                    let height = MB.min(m - i0);
                    // SAFETY: `a` has 32 rows of 32·steps values (in place: a full block of `lhs`,
                    // whose width is 32·steps; copied: padded rows); the panel has steps·2 tiles;
                    // a full block of dst is inside it (checked above) and written by this task
                    // only; an edge block goes through `edge`.
                    unsafe {
                        let at = dst.at(offset + i0 * rs + n0);
                        let aligned = (at as usize).is_multiple_of(64) && (4 * rs).is_multiple_of(64);
                        if height == MB && cols == NB && aligned {
                            kernel(a, lda, panel.as_ptr(), steps, at, rs, accumulate);
                        } else {
                            let edge = edge.as_mut_slice();
                            kernel(a, lda, panel.as_ptr(), steps, edge.as_mut_ptr(), NB, false);
                            for i in 0..height {
                                let (src, out) = (&edge[i * NB..][..cols], at.add(i * rs));
                                if accumulate {
                                    let out = std::slice::from_raw_parts_mut(out, cols);
                                    super::simd::vectorised(
                                        #[inline(always)]
                                        || out.iter_mut().zip(src).for_each(|(o, &v)| *o += v),
                                    );
                                } else {
                                    // written, never read: the destination may be uninitialised
                                    std::ptr::copy_nonoverlapping(src.as_ptr(), out, cols);
                                }
                            }
                        }
                    }
                }
            }
        };
        if parts == 1 {
            task(0);
        } else {
            use rayon::prelude::*;
            (0..parts).into_par_iter().for_each(task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amx() -> Option<&'static Amx> {
        let got = get();
        if got.is_none() {
            eprintln!("amx tests skipped: {}", describe());
        }
        got
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 37 + seed * 11) % 101) as f32 / 25.0 - 2.0).collect()
    }

    fn round(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    /// Every layout and awkward size (edges in all three dimensions, in-place and copied rows, f32 rows
    /// as stored and transposed, strided rows, accumulation, on all threads and on this one) against a naive f64 loop over the same bf16 values; the padding
    /// around dst's block is untouched.
    #[test]
    fn products_match_a_naive_loop_on_the_bf16_values() {
        let Some(amx) = amx() else { return };
        for (m, k, n) in
            [(37, 45, 70), (64, 64, 64), (50, 96, 33), (5, 32, 200), (96, 160, 17), (1, 7, 1), (48, 40, 40)]
        {
            let rs_a = k + 3;
            let a32 = values(m * rs_a, 1);
            let a16 = round(&a32);
            let a_at = |i: usize, j: usize| a16[i * rs_a + j].to_f32() as f64;
            // W stored [n, k + 5] for Wᵀ, [k, n + 2] for W
            let (wt_rs, w_rs) = (k + 5, n + 2);
            let wt = round(&values(n * wt_rs, 2));
            let w = round(&values(k * w_rs, 3));
            let ld = n + 4;
            for (name, rhs, b_at) in [
                ("Wᵀ", Rhs::Transposed(Rows { data: &wt, offset: 0, rows: n, cols: k, rs: wt_rs }), 0),
                ("W", Rhs::Plain(Rows { data: &w, offset: 0, rows: k, cols: n, rs: w_rs }), 1),
            ] {
                let b = |l: usize, j: usize| {
                    if b_at == 0 { wt[j * wt_rs + l] } else { w[l * w_rs + j] }.to_f32() as f64
                };
                let want: Vec<f64> =
                    (0..m * n).map(|e| (0..k).map(|l| a_at(e / n, l) * b(l, e % n)).sum()).collect();
                let lhs_bf16 = Lhs::Bf16(Rows { data: &a16, offset: 0, rows: m, cols: k, rs: rs_a });
                // the f32 rows are the bf16 values widened, so both give the same products
                let a_wide: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
                let lhs_f32 = Lhs::F32(View::strided(&a_wide, 0, m, k, rs_a));
                // and stored transposed (column-major, 16 × 16 blocks transposed in registers)
                let a_t: Vec<f32> =
                    (0..k * (m + 1)).map(|e| a_wide[(e % (m + 1)).min(m - 1) * rs_a + e / (m + 1)]).collect();
                let lhs_t = Lhs::F32(View::strided(&a_t, 0, k, m, m + 1).t());
                for (lhs, accumulate, all) in [
                    (lhs_bf16, false, true),
                    (lhs_bf16, true, true),
                    (lhs_f32, false, true),
                    (lhs_t, true, true),
                    (lhs_bf16, true, false),
                    (lhs_t, false, false),
                ] {
                    let mut dst = vec![1f32; 2 + m * ld];
                    if all {
                        amx.product(lhs, rhs, &mut dst, 2, ld, accumulate);
                    } else {
                        amx.product_here(lhs, rhs, &mut dst, 2, ld, accumulate);
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let expect = want[i * n + j] + if accumulate { 1.0 } else { 0.0 };
                            let got = dst[2 + i * ld + j] as f64;
                            let tol =
                                1e-5 * (1.0 + (0..k).map(|l| (a_at(i, l) * b(l, j)).abs()).sum::<f64>());
                            assert!(
                                (got - expect).abs() < tol,
                                "{name} {m}x{k}x{n} ({i},{j}): {got} vs {expect}"
                            );
                        }
                        assert!(dst[2 + i * ld + n..][..4.min(dst.len() - 2 - i * ld - n)]
                            .iter()
                            .all(|&v| v == 1.0));
                    }
                    assert_eq!(dst[..2], [1.0, 1.0]);
                }
            }
        }
    }

    /// GFLOP/s of the decoder's products (`cargo test --release amx_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn amx_speed() {
        let Some(amx) = amx() else { return };
        for (m, n, k) in [
            (1024, 576, 576),
            (1024, 192, 576),
            (1024, 1536, 576),
            (1024, 576, 1536),
            (1024, 4096, 576),
            (256, 576, 4096),
            (1024, 8192, 2048),
            (1024, 2048, 8192),
            (1024, 576, 576),
        ] {
            let a = round(&values(m * k, 1));
            let w = round(&values(n * k, 2));
            let mut c = vec![0f32; m * n];
            for (name, rhs) in [
                ("x·Wᵀ", Rhs::Transposed(Rows::matrix(&w, n, k))),
                ("dy·W", Rhs::Plain(Rows::matrix(&w, k, n))),
            ] {
                let mut times = Vec::new();
                for _ in 0..9 {
                    let t = std::time::Instant::now();
                    amx.product(Lhs::Bf16(Rows::matrix(&a, m, k)), rhs, &mut c, 0, n, false);
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                println!("{name} {m}x{n}x{k}: {:.0} GFLOP/s", 2.0 * (m * n * k) as f64 / times[4] / 1e9);
            }
        }
    }

    /// A new output written without a fill holds exactly what a product into a zeroed buffer does, on
    /// edge blocks and full ones, in place and copied.
    #[test]
    fn new_outputs_equal_products_into_zeroed_buffers() {
        let Some(amx) = amx() else { return };
        for (m, k, n) in [(70, 64, 45), (64, 40, 64), (3, 0, 5)] {
            let a = round(&values(m * k, 8));
            let w = round(&values(n * k, 9));
            let (lhs, rhs) = (Lhs::Bf16(Rows::matrix(&a, m, k)), Rhs::Transposed(Rows::matrix(&w, n, k)));
            let mut want = vec![0f32; m * n];
            amx.product(lhs, rhs, &mut want, 0, n, false);
            assert_eq!(amx.product_new(lhs, rhs), want, "{m}x{k}x{n}");
        }
    }

    /// Line-aligned operands (as the binary's allocator makes large buffers) are read and written in
    /// place: the same values as through the copies.
    #[test]
    fn line_aligned_operands_run_in_place_with_the_same_result() {
        let Some(amx) = amx() else { return };
        let (m, k, n) = (64, 96, 64);
        let mut a = Aligned::<bf16>::reused(m * k);
        a.as_mut_slice().copy_from_slice(&round(&values(m * k, 6)));
        let w = round(&values(n * k, 7));
        let a = unsafe { std::slice::from_raw_parts(a.as_ptr(), m * k) };
        assert_eq!(a.as_ptr() as usize % 64, 0);
        let lhs = Lhs::Bf16(Rows::matrix(a, m, k));
        assert!(LhsRows::new(lhs, m, k, true)._copy.is_none(), "aligned rows are read in place");
        let copied: Vec<bf16> = a.to_vec();
        let mut dst = Aligned::<f32>::reused(m * n);
        for accumulate in [false, true] {
            dst.as_mut_slice().fill(0.5);
            let mut want = vec![0.5f32; m * n];
            amx.product(lhs, Rhs::Transposed(Rows::matrix(&w, n, k)), dst.as_mut_slice(), 0, n, accumulate);
            let lhs2 = Lhs::Bf16(Rows { data: &copied, offset: 0, rows: m, cols: k, rs: k });
            amx.product(lhs2, Rhs::Transposed(Rows::matrix(&w, n, k)), &mut want, 0, n, accumulate);
            let got = dst.as_mut_slice();
            // accumulating, the tile starts from dst in place and adds to it through the copy: the
            // same sum in another order
            let tol = |w: f32| if accumulate { 1e-6 * w.abs().max(1.0) } else { 0.0 };
            let bad: Vec<_> = (0..m * n)
                .filter(|&e| (got[e] - want[e]).abs() > tol(want[e]))
                .take(5)
                .map(|e| (e / n, e % n, got[e], want[e]))
                .collect();
            assert!(bad.is_empty(), "accumulate {accumulate}: {bad:?}");
        }
    }

    #[test]
    #[should_panic(expected = "amx: lhs reaches")]
    fn a_view_past_its_slice_panics_before_touching_memory() {
        let Some(amx) = get() else { panic!("amx: lhs reaches (no AMX here: {})", describe()) };
        let (a, w) = (vec![bf16::ZERO; 60], vec![bf16::ZERO; 64 * 32]);
        let mut dst = vec![0f32; 2 * 64];
        amx.product(
            Lhs::Bf16(Rows::matrix(&a, 2, 32)),
            Rhs::Transposed(Rows::matrix(&w, 64, 32)),
            &mut dst,
            0,
            64,
            false,
        );
    }
}
