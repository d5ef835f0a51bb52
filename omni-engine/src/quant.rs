//! Weight matrices kept in GGUF's quantized blocks, and the products over
//! them (`csrc/quant.cpp`).
//!
//! A loader that is asked to keep blocks hands a matrix over as a
//! [`QuantizedTensor`]: the file's bytes for its rows, untouched. A
//! [`QuantMatrix`] stacks such row runs (a fused q/k/v projection is three)
//! and multiplies fp32 activations by them, dequantizing 16 weights at a time
//! in registers; [`QuantMatrix::rows`] reads rows out as fp32 (an embedding
//! lookup). Both run the widest build the CPU has (AVX-512, AVX2, portable).
use std::ffi::{c_char, c_void};
use std::ptr::NonNull;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::shim::{from_shim, handle_from_shim, status_from_shim};

extern "C" {
    fn omni_quant_new(in_features: i64, err: *mut *mut c_char) -> *mut c_void;
    fn omni_quant_free(matrix: *mut c_void);
    fn omni_quant_add(
        matrix: *mut c_void,
        ggml_type: i32,
        rows: i64,
        bytes: *const C_tensor,
        err: *mut *mut c_char,
    ) -> bool;
    fn omni_quant_linear(
        input: *const C_tensor,
        matrix: *const c_void,
        bias: *const C_tensor,
        int8_activations: bool,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn omni_quant_rows(
        matrix: *const c_void,
        ids: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn omni_quant_force_level(cap: i32) -> i32;
    fn omni_quant_cpu_level() -> i32;
}

/// The block types the kernels read.
pub const KERNEL_TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Whether [`QuantMatrix`] can hold rows of `ty`.
pub fn has_kernel(ty: GgmlType) -> bool {
    KERNEL_TYPES.contains(&ty)
}

/// A 2-d weight as a GGUF file stores it: `rows` of `cols` elements in
/// blocks of `ggml_type`.
#[derive(Debug)]
pub struct QuantizedTensor {
    /// Block type.
    pub ggml_type: GgmlType,
    /// `[rows, cols]`, torch order.
    pub shape: [i64; 2],
    /// The blocks, `[rows, bytes per row]`, uint8 on the CPU.
    pub bytes: Tensor,
}

impl QuantizedTensor {
    /// Another handle to the same bytes.
    pub fn shallow_clone(&self) -> Self {
        Self {
            ggml_type: self.ggml_type,
            shape: self.shape,
            bytes: self.bytes.shallow_clone(),
        }
    }

    /// The weight in fp32 on the CPU.
    pub fn dequantize(&self) -> Result<Tensor> {
        QuantMatrix::new(&[self])?.dequantize()
    }
}

/// Which build of the kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelBuild {
    /// Plain C++ (any CPU).
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL/DQ.
    Avx512,
}

impl KernelBuild {
    fn from_level(level: i32) -> Self {
        match level {
            2 => KernelBuild::Avx512,
            1 => KernelBuild::Avx2,
            _ => KernelBuild::Portable,
        }
    }

    fn level(self) -> i32 {
        match self {
            KernelBuild::Portable => 0,
            KernelBuild::Avx2 => 1,
            KernelBuild::Avx512 => 2,
        }
    }

    /// The widest build this CPU runs.
    pub fn detected() -> Self {
        // SAFETY: reads a cached CPU feature check.
        Self::from_level(unsafe { omni_quant_cpu_level() })
    }

    /// This build and every narrower one, narrowest first.
    pub fn up_to(self) -> Vec<KernelBuild> {
        [
            KernelBuild::Portable,
            KernelBuild::Avx2,
            KernelBuild::Avx512,
        ]
        .into_iter()
        .filter(|b| *b <= self)
        .collect()
    }
}

/// Runs `f` with the kernels capped at `build` (tests: each build on one
/// machine). The cap is process-wide, so callers take turns (test threads
/// run side by side); `f` must not call this again. Products outside it
/// run whatever cap is in force.
pub fn with_kernel_build<R>(build: KernelBuild, f: impl FnOnce() -> R) -> R {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: sets an atomic cap.
    unsafe { omni_quant_force_level(build.level()) };
    let r = f();
    // SAFETY: as above.
    unsafe { omni_quant_force_level(-1) };
    r
}

/// How a [`QuantMatrix`] product takes its fp32 activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// As they are: the product is the dequantized matrix's, up to
    /// summation order.
    #[default]
    Fp32,
    /// In a call of one activation row (a decode step at batch 1), Q4_0,
    /// Q4_1 and Q8_0 rows multiply it quantized per 32 elements to int8
    /// (`d = max|x| / 127`, `q = x / d` rounded to nearest even), as
    /// llama.cpp does, in integer dot products: the product is the
    /// dequantized matrix's times the dequantized activations. Rows of other
    /// types, and calls of more rows (where the fp32 kernels, which unpack a
    /// block once for several rows, are as fast), take them as they are.
    Int8,
}

/// Row runs of quantized blocks, stacked into one `[out, in]` matrix that
/// the C++ side owns (it holds a reference to each run's bytes).
#[derive(Debug)]
pub struct QuantMatrix {
    handle: NonNull<c_void>,
    in_features: i64,
    out_features: i64,
}

// SAFETY: the matrix is never written after it is built; the kernels only
// read it, from any thread.
unsafe impl Send for QuantMatrix {}
// SAFETY: as above.
unsafe impl Sync for QuantMatrix {}

impl Drop for QuantMatrix {
    fn drop(&mut self) {
        // SAFETY: made by omni_quant_new, freed once.
        unsafe { omni_quant_free(self.handle.as_ptr()) }
    }
}

impl QuantMatrix {
    /// Stacks `parts` (their rows, in order). Every part must have a kernel
    /// type and the same number of columns.
    pub fn new(parts: &[&QuantizedTensor]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| Error::Weight {
            name: "quantized matrix".to_owned(),
            reason: "no parts".to_owned(),
        })?;
        let in_features = first.shape[1];
        let mut err = std::ptr::null_mut();
        // SAFETY: plain arguments.
        let ptr = unsafe { omni_quant_new(in_features, &mut err) };
        // SAFETY: straight from the shim.
        let handle = unsafe { handle_from_shim(ptr, err, "quantized matrix") }?;
        let mut m = Self {
            handle,
            in_features,
            out_features: 0,
        };
        for part in parts {
            if part.shape[1] != in_features {
                return Err(Error::Weight {
                    name: "quantized matrix".to_owned(),
                    reason: format!(
                        "parts of {} and {} columns cannot be stacked",
                        in_features, part.shape[1]
                    ),
                });
            }
            let mut err = std::ptr::null_mut();
            // SAFETY: the handle is live; the C++ side keeps its own
            // reference to the bytes.
            let ok = unsafe {
                omni_quant_add(
                    m.handle.as_ptr(),
                    part.ggml_type.0 as i32,
                    part.shape[0],
                    part.bytes.as_ptr(),
                    &mut err,
                )
            };
            // SAFETY: straight from the shim.
            unsafe { status_from_shim(ok, err, "quantized matrix") }?;
            m.out_features += part.shape[0];
        }
        Ok(m)
    }

    /// The C++ matrix, for kernels that take it directly (the fused
    /// decode layer); it lives as long as `self`.
    pub(crate) fn handle(&self) -> *const c_void {
        self.handle.as_ptr()
    }

    /// Columns (input features).
    pub fn in_features(&self) -> i64 {
        self.in_features
    }

    /// Rows (output features).
    pub fn out_features(&self) -> i64 {
        self.out_features
    }

    /// `x W^T (+ bias)`: `x` `[..., in]` fp32 on the CPU.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.linear_with(x, bias, Activations::Fp32)
    }

    /// [`QuantMatrix::linear`] with the activations treated as `activations`
    /// says.
    pub fn linear_with(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        activations: Activations,
    ) -> Result<Tensor> {
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        let mut err = std::ptr::null_mut();
        let int8 = activations == Activations::Int8;
        // SAFETY: `x`, the matrix and `bias` (which may be null) outlive the
        // call, which only reads them.
        let ptr =
            unsafe { omni_quant_linear(x.as_ptr(), self.handle.as_ptr(), bias, int8, &mut err) };
        // SAFETY: straight from the shim.
        unsafe { from_shim(ptr, err, "quantized linear") }
    }

    /// Rows `ids` (int64, any shape) in fp32: `[..., in]` on the CPU.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `linear`.
        let ptr = unsafe { omni_quant_rows(self.handle.as_ptr(), ids.as_ptr(), &mut err) };
        // SAFETY: straight from the shim.
        unsafe { from_shim(ptr, err, "quantized rows") }
    }

    /// The whole matrix in fp32.
    pub fn dequantize(&self) -> Result<Tensor> {
        let ids = Tensor::f_arange(self.out_features, (Kind::Int64, Device::Cpu))?;
        self.rows(&ids)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny deterministic generator (tests must not depend on libtorch's
    /// draw order for bytes).
    pub(crate) struct Lcg(pub u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
    }

    /// Random blocks of `ty` for `[rows, cols]` whose fp16 scales are
    /// finite (2^-8 .. 2^-5, either sign); every other byte is random, so
    /// every quant and sub-scale bit is exercised.
    pub(crate) fn random_blocks(
        ty: GgmlType,
        rows: i64,
        cols: i64,
        rng: &mut Lcg,
    ) -> QuantizedTensor {
        let (elems, block_bytes) = ty.block().unwrap_or_else(|| unreachable!());
        let blocks = (rows * cols) as usize / elems as usize;
        let scale_at: &[usize] = match ty {
            GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        };
        let mut bytes = Vec::with_capacity(blocks * block_bytes as usize);
        for _ in 0..blocks {
            let mut block: Vec<u8> = (0..block_bytes).map(|_| rng.next() as u8).collect();
            for &at in scale_at {
                let bits = (0x1c00 + rng.next() % 0x0c00) as u16 | ((rng.next() as u16 & 1) << 15);
                block[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            }
            bytes.extend_from_slice(&block);
        }
        let row_bytes = bytes.len() as i64 / rows;
        QuantizedTensor {
            ggml_type: ty,
            shape: [rows, cols],
            bytes: Tensor::from_slice(&bytes).reshape([rows, row_bytes]),
        }
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// `got` against `x W^T` in fp64 (`w` dense fp32): within 2e-5 of
    /// `|x| |W|^T` per element (fp32 sums of a few hundred products, in
    /// another order); a block read wrong is off by far more.
    fn assert_product(got: &Tensor, x: &Tensor, w: &Tensor, what: &str) {
        let (x64, w64) = (x.to_kind(Kind::Double), w.to_kind(Kind::Double));
        let want = x64.matmul(&w64.tr());
        let scale = x64.abs().matmul(&w64.abs().tr());
        let err = (got.to_kind(Kind::Double) - &want).abs() - scale * 2e-5;
        let worst = f64::try_from(err.max()).unwrap_or(f64::NAN);
        assert!(worst <= 1e-6, "{what}: error past the bound by {worst}");
    }

    const TYPES_32: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];
    const TYPES_256: [GgmlType; 2] = [GgmlType::Q4_K, GgmlType::Q6_K];

    /// Every block type, every build this CPU runs, odd row counts (tiles of
    /// 4 and 2 rows with fringes), 1 to 17 activation rows (groups of 4
    /// with fringes), 3-d inputs, on 2 threads: equal to the dense product
    /// of the portable build's dequantized matrix, and every build's
    /// dequantized rows equal the portable build's bit for bit.
    #[test]
    fn every_block_type_and_build_matches_dequantize_then_matmul() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        let mut rng = Lcg(11);
        let result = (|| -> Result<()> {
            let cases = TYPES_32
                .iter()
                .flat_map(|&t| [(t, 32), (t, 96), (t, 576)])
                .chain(TYPES_256.iter().flat_map(|&t| [(t, 256), (t, 768)]));
            for (ty, cols) in cases {
                for rows in [1, 3, 6, 37, 130] {
                    let q = random_blocks(ty, rows, cols, &mut rng);
                    let m = QuantMatrix::new(&[&q])?;
                    let dense = with_kernel_build(KernelBuild::Portable, || m.dequantize())?;
                    for build in KernelBuild::detected().up_to() {
                        let d = with_kernel_build(build, || m.dequantize())?;
                        assert!(
                            d.equal(&dense),
                            "{ty} {rows}x{cols} {build:?}: dequantized rows differ"
                        );
                        for batch in [1, 2, 3, 4, 5, 9, 17] {
                            let x = randn(&[batch, cols]);
                            let y = with_kernel_build(build, || m.linear(&x, None))?;
                            assert_eq!(y.size(), [batch, rows]);
                            assert_product(
                                &y,
                                &x,
                                &dense,
                                &format!("{ty} {rows}x{cols} batch {batch} {build:?}"),
                            );
                        }
                        let x3 = randn(&[2, 3, cols]);
                        let b = randn(&[rows]);
                        let y3 = with_kernel_build(build, || m.linear(&x3, Some(&b)))?;
                        assert_eq!(y3.size(), [2, 3, rows]);
                        let y3 = y3 - &b;
                        assert_product(
                            &y3.reshape([6, rows]),
                            &x3.reshape([6, cols]),
                            &dense,
                            &format!("{ty} 3-d {build:?}"),
                        );
                    }
                }
            }
            Ok(())
        })();
        tch::set_num_threads(threads);
        result
    }

    /// Each output row is one thread's, whole: any thread count gives one
    /// thread's answer bit for bit, for every build, fp32 and int8
    /// activations, over a fused matrix whose second part starts inside a
    /// thread's range of rows, and over a Q8_0 head.
    #[test]
    fn a_quantized_product_is_the_same_on_any_thread_count() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(4);
        let _restore = crate::RestoreThreads::new();
        let mut rng = Lcg(12);
        let (a, b) = (
            random_blocks(GgmlType::Q4_1, 999, 576, &mut rng),
            random_blocks(GgmlType::Q4_1, 301, 576, &mut rng),
        );
        let fused = QuantMatrix::new(&[&a, &b])?;
        let head = QuantMatrix::new(&[&random_blocks(GgmlType::Q8_0, 2050, 576, &mut rng)])?;
        // Every answer stays alive: a freed output could come back as the
        // next call's, already holding the right values.
        let mut answers = Vec::new();
        for m in [&fused, &head] {
            for build in KernelBuild::detected().up_to() {
                for (batch, activations) in [
                    (1, Activations::Fp32),
                    (1, Activations::Int8),
                    (3, Activations::Fp32),
                ] {
                    let x = randn(&[batch, 576]);
                    tch::set_num_threads(1);
                    let one = with_kernel_build(build, || m.linear_with(&x, None, activations))?;
                    for n in [2, 3, 4] {
                        tch::set_num_threads(n);
                        let got =
                            with_kernel_build(build, || m.linear_with(&x, None, activations))?;
                        assert!(
                            got.equal(&one),
                            "{build:?} {activations:?} batch {batch}, {n} threads: \
                             differs from one thread"
                        );
                        answers.push(got);
                    }
                    answers.push(one);
                }
            }
        }
        Ok(())
    }

    /// `x` (`[rows, cols]`) quantized to int8 per 32 elements and back, with
    /// the kernels' own fp32 operations (so bit for bit what they multiply).
    fn int8_round_trip(x: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = Vec::try_from(x.flatten(0, -1))?;
        let mut out = Vec::with_capacity(v.len());
        for block in v.chunks(32) {
            let amax = block.iter().fold(0f32, |a, &b| a.max(b.abs()));
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            // (A block too small for 1 / d in fp32 is taken as zero.)
            let (d, id) = if id.is_finite() {
                (amax / 127.0, id)
            } else {
                (0.0, 0.0)
            };
            out.extend(
                block
                    .iter()
                    .map(|&e| (e * id).round_ties_even().clamp(-127.0, 127.0) * d),
            );
        }
        Ok(Tensor::from_slice(&out).reshape(x.size()))
    }

    /// `Activations::Int8`: for Q4_0, Q4_1 and Q8_0 (odd row counts, tiles
    /// of 4 with fringes, every build this CPU runs, 2 threads) a call of
    /// one activation row equals the dequantized matrix times the
    /// round-tripped activations within the fp32 bound, which the fp32
    /// activations miss by the rounding (checked, so the path is the one
    /// tested); calls of more rows equal the fp32 path bit for bit; an
    /// all-zero block, a tiny one, a matrix of mixed parts and non-finite
    /// activations too.
    #[test]
    fn int8_activations_match_the_dequantized_product() -> Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(8);
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        let mut rng = Lcg(21);
        let result = (|| -> Result<()> {
            for ty in TYPES_32 {
                for cols in [32, 96, 576] {
                    for rows in [1, 3, 6, 37, 130] {
                        let q = random_blocks(ty, rows, cols, &mut rng);
                        let m = QuantMatrix::new(&[&q])?;
                        let dense = m.dequantize()?;
                        for batch in [1, 2, 5] {
                            let x = randn(&[batch, cols]);
                            // A zero block: scale 0, every quant 0.
                            let _ = x.narrow(1, 0, 32).narrow(0, 0, 1).fill_(0.0);
                            let xr = int8_round_trip(&x)?;
                            for build in KernelBuild::detected().up_to() {
                                let what = format!("{ty} {rows}x{cols} batch {batch} {build:?}");
                                let y = with_kernel_build(build, || {
                                    m.linear_with(&x, None, Activations::Int8)
                                })?;
                                assert_eq!(y.size(), [batch, rows]);
                                if batch > 1 {
                                    let fp32 = with_kernel_build(build, || m.linear(&x, None))?;
                                    assert!(y.equal(&fp32), "{what}: not the fp32 path");
                                    continue;
                                }
                                assert_product(&y, &xr, &dense, &what);
                                // (With one column block and one row, x is all zero.)
                                if rows >= 37 && cols > 32 {
                                    let exact = x
                                        .to_kind(Kind::Double)
                                        .matmul(&dense.to_kind(Kind::Double).tr());
                                    let off = (y.to_kind(Kind::Double) - exact).abs().max();
                                    assert!(
                                        f64::try_from(off)? > 1e-3,
                                        "{what}: int8 product equals the fp32 one"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            // A K-quant part first (the int8 parts' output columns start past
            // it) takes x as is; a Q8_0 and a Q4_1 part (its minimum term)
            // take it quantized; one block of x so small that 1 / d
            // overflows; every build.
            let cols = 256;
            let parts = [
                random_blocks(GgmlType::Q4_K, 3, cols, &mut rng),
                random_blocks(GgmlType::Q8_0, 5, cols, &mut rng),
                random_blocks(GgmlType::Q4_1, 4, cols, &mut rng),
            ];
            let m = QuantMatrix::new(&[&parts[0], &parts[1], &parts[2]])?;
            let dense = m.dequantize()?;
            let x = randn(&[1, cols]);
            let _ = x.narrow(1, 64, 32).fill_(1e-38);
            let xr = int8_round_trip(&x)?;
            for build in KernelBuild::detected().up_to() {
                let y = with_kernel_build(build, || m.linear_with(&x, None, Activations::Int8))?;
                let what = format!("mixed {build:?}");
                assert_product(&y.narrow(1, 0, 3), &x, &dense.narrow(0, 0, 3), &what);
                assert_product(&y.narrow(1, 3, 9), &xr, &dense.narrow(0, 3, 9), &what);
                // A non-finite activation makes the int8 rows' outputs NaN
                // (Q4_1's through its minimum term too), as in fp32.
                let bad = x.copy();
                let _ = bad.narrow(1, 40, 1).fill_(f64::INFINITY);
                let y = with_kernel_build(build, || m.linear_with(&bad, None, Activations::Int8))?;
                assert!(
                    bool::try_from(y.narrow(1, 3, 9).isnan().all())?,
                    "{what}: {y}"
                );
            }
            Ok(())
        })();
        tch::set_num_threads(threads);
        result
    }

    /// Parts of different block types stack into one matrix (a fused q/k/v
    /// whose parts were quantized differently): each part's rows land in
    /// their own output columns, and row lookups find the right part.
    #[test]
    fn mixed_parts_stack_in_order() -> Result<()> {
        let _g = tch::no_grad_guard();
        let mut rng = Lcg(5);
        let cols = 512;
        let parts: Vec<QuantizedTensor> = [
            (GgmlType::Q4_K, 5),
            (GgmlType::Q8_0, 3),
            (GgmlType::Q6_K, 9),
            (GgmlType::Q4_0, 2),
            (GgmlType::Q4_1, 4),
        ]
        .into_iter()
        .map(|(t, r)| random_blocks(t, r, cols, &mut rng))
        .collect();
        let refs: Vec<&QuantizedTensor> = parts.iter().collect();
        let m = QuantMatrix::new(&refs)?;
        assert_eq!((m.out_features(), m.in_features()), (23, cols));
        let dense = Tensor::cat(
            &parts
                .iter()
                .map(QuantizedTensor::dequantize)
                .collect::<Result<Vec<_>>>()?,
            0,
        );
        assert!(m.dequantize()?.equal(&dense));
        let x = randn(&[3, cols]);
        assert_product(&m.linear(&x, None)?, &x, &dense, "mixed parts");
        let ids = Tensor::from_slice(&[22i64, 0, 7, 8, 16, 17]).reshape([2, 3]);
        let rows = m.rows(&ids)?;
        assert_eq!(rows.size(), [2, 3, cols]);
        assert!(rows
            .reshape([6, cols])
            .equal(&dense.index_select(0, &ids.reshape([6]))));
        Ok(())
    }

    #[test]
    fn bad_parts_and_inputs_are_named() {
        let mut rng = Lcg(9);
        let q = random_blocks(GgmlType::Q4_0, 2, 64, &mut rng);
        let q5 = QuantizedTensor {
            ggml_type: GgmlType(6),
            shape: [2, 64],
            bytes: q.bytes.shallow_clone(),
        };
        let e = QuantMatrix::new(&[&q5]).expect_err("Q5_0 has no kernel");
        assert!(e.to_string().contains("no kernel for ggml type 6"), "{e}");
        let short = QuantizedTensor {
            ggml_type: GgmlType::Q4_0,
            shape: [3, 64],
            bytes: q.bytes.shallow_clone(),
        };
        let e = QuantMatrix::new(&[&short]).expect_err("bytes for 2 rows, not 3");
        assert!(
            e.to_string()
                .contains("expected 108 bytes for 3 rows, got 72"),
            "{e}"
        );
        let k = random_blocks(GgmlType::Q4_K, 1, 256, &mut rng);
        let e = QuantMatrix::new(&[&q, &k]).expect_err("64 and 256 columns");
        assert!(e.to_string().contains("parts of 64 and 256 columns"), "{e}");
        let ragged = QuantizedTensor {
            ggml_type: GgmlType::Q4_K,
            shape: [2, 64],
            bytes: q.bytes.shallow_clone(),
        };
        let e = QuantMatrix::new(&[&ragged]).expect_err("64 is not whole 256-blocks");
        assert!(e.to_string().contains("not whole blocks of 256"), "{e}");
        let m = QuantMatrix::new(&[&q]).unwrap_or_else(|e| panic!("{e}"));
        let e = m.linear(&randn(&[1, 63]), None).expect_err("63 features");
        assert!(e.to_string().contains("does not end in 64 features"), "{e}");
        let e = m
            .rows(&Tensor::from_slice(&[2i64]))
            .expect_err("row 2 of 2");
        assert!(e.to_string().contains("row 2 out of range"), "{e}");
    }
}
