//! OpenBLAS's `cblas_sgemm`, opened at run time, for the CPU products large enough to gain from it.
//!
//! On our 2-core AVX-512 Xeons OpenBLAS 0.3 ran the decoder's products at 1.1-1.7× the GFLOP/s of the
//! `gemm` crate (1024×2048×8192: 114-132 against 75-89; the 128k-vocabulary head 119 against 74-77).
//! With its own threads it was slower on the thin rank-r LoRA products (1024×576×16: 0.75×); on one
//! thread per call, split over rayon's threads by `cpu_gemm`, it is faster there too (see [`MIN_DIM`]).
//! It is opened with `dlopen`, never linked: the binary runs where OpenBLAS is absent, on `gemm`.
//!
//! `CANDOR_BLAS` chooses: unset or `auto` opens `libopenblas.so.0` if the system has it (Debian:
//! `libopenblas0`); `off` keeps every product on `gemm`; anything else is a library name or path that
//! must open (an error otherwise, reported at start-up by [`check_choice`]).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::cpu_gemm::View;

/// Products with a side shorter than this stay on `gemm` (rank-4 LoRA products, tiny test shapes).
/// The six rank-r products of SmolLM2's 210 LoRA layers took 0.30 s on OpenBLAS against 0.40 s on
/// `gemm` at r = 16, and 0.26 against 0.31 s at r = 8 (a microbenchmark of the products alone); a whole
/// training step with them on OpenBLAS ran 1.026×, 1.014× and 1.008× as fast (three runs alternating
/// the two in one process).
pub(crate) const MIN_DIM: usize = 8;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

pub(crate) struct Blas {
    sgemm: Sgemm,
    /// What was opened and how it was built (`openblas_get_config`), for `candor info` and logs.
    pub description: String,
}

/// The library chosen by `CANDOR_BLAS`, opened on first use: `Ok(None)` means `gemm` does every product.
pub(crate) fn get() -> &'static Result<Option<Blas>, String> {
    static BLAS: OnceLock<Result<Option<Blas>, String>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let choice = std::env::var("CANDOR_BLAS").unwrap_or_default();
        match choice.as_str() {
            "off" => Ok(None),
            "" | "auto" => Ok(open("libopenblas.so.0").ok()),
            name => open(name).map(Some).map_err(|e| {
                format!("CANDOR_BLAS={name}: {e} (unset it or set it to `off` to use the built-in gemm)")
            }),
        }
    })
}

static SUSPENDED: AtomicBool = AtomicBool::new(false);

/// While suspended, every product runs on `gemm` as with `CANDOR_BLAS=off`; unlike the variable this
/// can change between steps, so `bench train-step --alternate-blas` compares both in one process.
pub fn set_suspended(on: bool) {
    SUSPENDED.store(on, Ordering::Relaxed);
}

/// The library the large products use now: [`get`]'s, unless [`set_suspended`].
pub(crate) fn active() -> Option<&'static Blas> {
    match get() {
        Ok(Some(b)) if !SUSPENDED.load(Ordering::Relaxed) => Some(b),
        _ => None,
    }
}

/// Opens the library now when `CANDOR_BLAS` names one, so a wrong name fails before any work; with
/// `auto` it opens on the first large product, and commands that multiply nothing never load it.
pub fn check_choice() -> Result<(), String> {
    match std::env::var("CANDOR_BLAS").as_deref() {
        Err(_) | Ok("" | "auto" | "off") => Ok(()),
        Ok(_) => get().as_ref().map(drop).map_err(Clone::clone),
    }
}

/// One line for logs: which library multiplies matrices on the CPU (opening it if not yet open).
pub fn describe() -> String {
    match get() {
        Ok(Some(b)) => b.description.clone(),
        Ok(None) if std::env::var("CANDOR_BLAS").as_deref() == Ok("off") => {
            "gemm crate (CANDOR_BLAS=off)".into()
        }
        Ok(None) => "gemm crate (no libopenblas.so.0 here; Debian: apt install libopenblas0)".into(),
        // check_choice has already stopped the program with this error
        Err(e) => e.clone(),
    }
}

fn open(name: &str) -> Result<Blas, String> {
    let c_name = CString::new(name).map_err(|_| "a NUL byte in the library name".to_string())?;
    // SAFETY: dlopen/dlsym with valid C strings; the handle is never closed, so the symbols stay valid
    // for the life of the process.
    unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            let why = libc::dlerror();
            return Err(if why.is_null() {
                format!("cannot open {name}")
            } else {
                CStr::from_ptr(why).to_string_lossy().into_owned()
            });
        }
        let symbol = |s: &CStr| -> *mut c_void { libc::dlsym(handle, s.as_ptr()) };
        let sgemm = symbol(c"cblas_sgemm");
        if sgemm.is_null() {
            return Err(format!("{name} has no cblas_sgemm"));
        }
        // One OpenBLAS thread: `cpu_gemm` splits each product over rayon's threads itself (see
        // `Product::on_blas`), so no OpenBLAS worker spins beside rayon's. Those calls run at the same
        // time on several threads, which OpenBLAS builds with threading or locking support take (Debian's
        // pthread and OpenMP variants; the tests run them so). Another library named by `CANDOR_BLAS`
        // keeps its own threading unless its variable (e.g. `MKL_NUM_THREADS=1`) says otherwise.
        let threads = rayon::current_num_threads();
        let set_threads = symbol(c"openblas_set_num_threads");
        if !set_threads.is_null() {
            let set_threads: unsafe extern "C" fn(c_int) = std::mem::transmute(set_threads);
            set_threads(1);
        }
        let config = symbol(c"openblas_get_config");
        let config = if config.is_null() {
            String::new()
        } else {
            let config: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(config);
            format!(" ({})", CStr::from_ptr(config()).to_string_lossy().trim())
        };
        Ok(Blas {
            sgemm: std::mem::transmute::<*mut c_void, Sgemm>(sgemm),
            description: format!("{name}{config}, products split over {threads} threads"),
        })
    }
}

/// How CBLAS reads a row-major view: as stored (`NoTrans`, rows `rs` apart) or as the transpose of a
/// stored matrix (`Trans`, columns `cs` apart). `None` when neither stride is 1 or a size overflows
/// `int`.
fn operand(v: &View) -> Option<(c_int, c_int)> {
    let ld = |stride: usize, width: usize| (stride >= width).then(|| c_int::try_from(stride).ok()).flatten();
    if v.cs == 1 {
        ld(v.rs, v.cols).map(|lda| (NO_TRANS, lda))
    } else if v.rs == 1 {
        ld(v.cs, v.rows).map(|lda| (TRANS, lda))
    } else {
        None
    }
}

impl Blas {
    /// Whether CBLAS takes these operands and a destination with row stride `rs` (see [`operand`]);
    /// sub-views keep the strides, so their products are accepted too.
    pub fn accepts(&self, lhs: &View, rhs: &View, rs: usize) -> bool {
        let dims = [lhs.rows, rhs.cols, lhs.cols, rs].map(c_int::try_from);
        dims.iter().all(Result::is_ok) && operand(lhs).is_some() && operand(rhs).is_some() && rs >= rhs.cols
    }

    /// `dst (rows rs apart) = beta·lhs·rhs (+ dst if accumulate)`, on the calling thread. Does nothing
    /// for operands that [`Blas::accepts`] refuses.
    ///
    /// # Safety
    /// `lhs` and `rhs` are in bounds of their slices, the `m × n` block at `dst` with row stride `rs`
    /// is writable, and it overlaps neither operand nor any block another thread writes meanwhile.
    pub unsafe fn product(
        &self,
        lhs: &View,
        rhs: &View,
        beta: f32,
        dst: *mut f32,
        rs: usize,
        accumulate: bool,
    ) {
        if !self.accepts(lhs, rhs, rs) {
            return;
        }
        let (Some((ta, lda)), Some((tb, ldb))) = (operand(lhs), operand(rhs)) else { return };
        let int = |v: usize| v as c_int; // checked by `accepts`
        (self.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            int(lhs.rows),
            int(rhs.cols),
            int(lhs.cols),
            beta,
            lhs.data.as_ptr().add(lhs.offset),
            lda,
            rhs.data.as_ptr().add(rhs.offset),
            ldb,
            if accumulate { 1.0 } else { 0.0 },
            dst,
            int(rs),
        );
    }
}
