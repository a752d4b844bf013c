//! Which rows of a forward use which adapters, and the run-time low-rank
//! product each `Linear`/`Conv2d` adds under it.

use std::cell::RefCell;
use std::sync::Arc;

use tch::Tensor;

use super::adapter::{Adapter, Delta};
use crate::error::Result;

/// An adapter at a request's scale.
#[derive(Clone)]
pub struct Applied {
    pub adapter: Arc<Adapter>,
    pub scale: f64,
}

/// Rows `start..start + len` of a forward's batch use `set`.
#[derive(Clone)]
pub struct Span {
    pub start: i64,
    pub len: i64,
    pub set: Arc<[Applied]>,
}

/// One adapter's part in a plan: the rows that use it and at what scales.
struct Use {
    adapter: Arc<Adapter>,
    /// `(start, len, scale)`, rows in order, adjacent rows at one scale
    /// merged; a `len` of -1: every row, whatever the batch.
    segments: Vec<(i64, i64, f64)>,
    /// With several segments: each row's factor (its scale times a
    /// module's alpha/rank, 0 where unused), per distinct alpha/rank, made
    /// on the forward's device: the product taken in f64 and rounded to
    /// fp32 once (fp64 for fp64 inputs), as the one-run path's scalar is,
    /// so a row's arithmetic is the same batched or alone, `[rows]`.
    row_scales: RefCell<Vec<(u64, Tensor)>>,
}

impl Use {
    fn new(adapter: Arc<Adapter>) -> Self {
        Use {
            adapter,
            segments: Vec::new(),
            row_scales: RefCell::new(Vec::new()),
        }
    }

    fn add(&mut self, start: i64, len: i64, scale: f64) {
        if scale == 0.0 || len == 0 {
            return;
        }
        match self.segments.last_mut() {
            Some(last) if last.1 >= 0 && last.0 + last.1 == start && last.2 == scale => {
                last.1 += len;
            }
            _ => self.segments.push((start, len, scale)),
        }
    }

    /// Each row's factor, its scale × `module_scale`, on `like`'s device,
    /// `[batch]`.
    fn row_scales(&self, batch: i64, like: &Tensor, module_scale: f64) -> Result<Tensor> {
        let kind = if like.kind() == tch::Kind::Double {
            tch::Kind::Double
        } else {
            tch::Kind::Float
        };
        let mut cached = self.row_scales.borrow_mut();
        let fits =
            |t: &Tensor| t.size()[0] == batch && t.device() == like.device() && t.kind() == kind;
        if cached.first().is_some_and(|(_, t)| !fits(t)) {
            cached.clear();
        }
        let key = module_scale.to_bits();
        if let Some((_, t)) = cached.iter().find(|(k, _)| *k == key) {
            return Ok(t.shallow_clone());
        }
        let mut v = vec![0f64; batch as usize];
        for &(start, len, scale) in &self.segments {
            for row in v.iter_mut().skip(start as usize).take(len as usize) {
                *row += scale;
            }
        }
        for row in &mut v {
            *row *= module_scale;
        }
        let t = Tensor::from_slice(&v)
            .f_to_kind(kind)?
            .f_to_device(like.device())?;
        cached.push((key, t.shallow_clone()));
        Ok(t)
    }
}

/// Which rows of a forward use which adapters. Work is grouped by adapter:
/// per module, each adapter in the plan costs one low-rank product over
/// the rows that use it (all rows, scaled per row, where they are not one
/// run), however many requests share it.
#[derive(Default)]
pub struct Plan {
    /// None: every row, whatever the batch (one request's forwards).
    rows: Option<i64>,
    uses: Vec<Use>,
}

impl Plan {
    fn use_of(&mut self, adapter: &Arc<Adapter>) -> &mut Use {
        let at = match self
            .uses
            .iter()
            .position(|u| Arc::ptr_eq(&u.adapter, adapter))
        {
            Some(at) => at,
            None => {
                self.uses.push(Use::new(adapter.clone()));
                self.uses.len() - 1
            }
        };
        &mut self.uses[at]
    }

    fn pruned(mut self) -> Self {
        self.uses.retain(|u| !u.segments.is_empty());
        self
    }

    /// Every row of every forward run under it uses `set`.
    pub fn all(set: Arc<[Applied]>) -> Self {
        let mut plan = Plan::default();
        for a in set.iter() {
            plan.use_of(&a.adapter).add(0, -1, a.scale);
        }
        plan.pruned()
    }

    /// Per-row sets for a forward of `rows` rows.
    pub fn rows(rows: i64, spans: Vec<Span>) -> Self {
        let mut plan = Plan {
            rows: Some(rows),
            uses: Vec::new(),
        };
        for span in &spans {
            for a in span.set.iter() {
                plan.use_of(&a.adapter).add(span.start, span.len, a.scale);
            }
        }
        plan.pruned()
    }

    pub fn is_empty(&self) -> bool {
        self.uses.is_empty()
    }
}

thread_local! {
    static PLAN: RefCell<Option<Plan>> = const { RefCell::new(None) };
}

/// Run `f` (forwards on this thread) under `plan`.
pub fn with_plan<T>(plan: Plan, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Plan>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            PLAN.with(|p| *p.borrow_mut() = prev);
        }
    }
    if plan.is_empty() {
        return f();
    }
    let prev = PLAN.with(|p| p.borrow_mut().replace(plan));
    let _reset = Reset(prev);
    f()
}

/// How the low-rank product is scaled: one factor, or one per row.
enum Factor {
    All(f64),
    Rows(Tensor),
}

/// `ys += factor · up(down(xs))` in place (`ys` may be a view of rows of
/// the base output). A linear layer's up projection and addition are one
/// `addmm_` where the rows can be seen as a matrix.
fn add_delta(
    ys: &mut Tensor,
    xs: &Tensor,
    d: &Delta,
    factor: &Factor,
    conv: Option<(i64, i64)>,
) -> Result<()> {
    // A layer kept in another precision than the adapter's (T5's float32
    // `wo` in fp16): the product in the adapter's, added in the layer's.
    if xs.kind() != d.down.kind() {
        let mut delta = ys.f_zeros_like()?.f_to_kind(d.down.kind())?;
        add_delta(&mut delta, &xs.f_to_kind(d.down.kind())?, d, factor, conv)?;
        let _ = ys.f_add_(&delta.f_to_kind(ys.kind())?)?;
        return Ok(());
    }
    let mut mid = match conv {
        None => xs.f_linear(&d.down, None::<Tensor>)?,
        Some((stride, padding)) => {
            xs.f_conv2d(&d.down, None::<Tensor>, [stride], [padding], [1], 1)?
        }
    };
    match factor {
        Factor::All(f) => {
            let _ = mid.f_mul_scalar_(*f)?;
        }
        Factor::Rows(r) => {
            let mut shape = vec![1i64; mid.dim()];
            shape[0] = -1;
            let _ = mid.f_mul_(&r.f_view(shape.as_slice())?)?;
        }
    }
    if conv.is_none() {
        let (out, rank) = (d.up.size()[0], d.up.size()[1]);
        if let (Ok(mut y2), Ok(m2)) = (ys.f_view([-1, out]), mid.f_view([-1, rank])) {
            let _ = y2.f_addmm_(&m2, &d.up.f_tr()?)?;
            return Ok(());
        }
        let _ = ys.f_add_(&mid.f_linear(&d.up, None::<Tensor>)?)?;
        return Ok(());
    }
    let out = mid.f_conv2d(&d.up, None::<Tensor>, [1], [0], [1], 1)?;
    let _ = ys.f_add_(&out)?;
    Ok(())
}

/// Add the deltas of the current plan's adapters for module `path` to `y`,
/// the base output for input `xs`. `conv`: the base is a convolution with
/// this stride and padding.
pub fn apply(path: &str, xs: &Tensor, y: Tensor, conv: Option<(i64, i64)>) -> Tensor {
    PLAN.with(|p| {
        let p = p.borrow();
        let Some(plan) = p.as_ref() else {
            return y;
        };
        let batch = xs.size()[0];
        if let Some(rows) = plan.rows {
            // An invariant of the callers (the rows a plan was made for);
            // a mismatch is a bug, and `guarded` turns this into an error.
            assert_eq!(
                rows, batch,
                "LoRA plan for {rows} rows applied to a batch of {batch} ({path})"
            );
        }
        for u in &plan.uses {
            let Some(d) = u.adapter.deltas.get(path) else {
                continue;
            };
            let done = || -> Result<()> {
                match u.segments.as_slice() {
                    &[(start, len, scale)] => {
                        let f = Factor::All(scale * d.scale);
                        if len < 0 || (start == 0 && len == batch) {
                            add_delta(&mut y.shallow_clone(), xs, d, &f, conv)
                        } else {
                            let x = xs.f_narrow(0, start, len)?;
                            let mut rows = y.f_narrow(0, start, len)?;
                            add_delta(&mut rows, &x, d, &f, conv)
                        }
                    }
                    _ => {
                        let f = Factor::Rows(u.row_scales(batch, xs, d.scale)?);
                        add_delta(&mut y.shallow_clone(), xs, d, &f, conv)
                    }
                }
            };
            // Like a libtorch error in the base layer: a bug or a device
            // failure, which `guarded` turns into an error for the call.
            if let Err(e) = done() {
                panic!("LoRA {} on {path}: {e}", u.adapter.name);
            }
        }
        y
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tch::{Device, Kind};

    const F: (Kind, Device) = (Kind::Double, Device::Cpu);

    fn adapter(name: &str, path: &str, down: Tensor, up: Tensor, scale: f64) -> Arc<Adapter> {
        let mut deltas = HashMap::new();
        deltas.insert(path.to_string(), Delta { down, up, scale });
        Arc::new(Adapter {
            name: name.into(),
            deltas,
            bytes: 0,
        })
    }

    /// An adapter of zeros on module `m` (rank 2, 3 → 3): for plans alone.
    fn zero_adapter(name: &str) -> Arc<Adapter> {
        adapter(
            name,
            "m",
            Tensor::zeros([2, 3], F),
            Tensor::zeros([3, 2], F),
            1.0,
        )
    }

    fn set(a: &Arc<Adapter>, scale: f64) -> Arc<[Applied]> {
        vec![Applied {
            adapter: a.clone(),
            scale,
        }]
        .into()
    }

    fn span(start: i64, len: i64, set: Arc<[Applied]>) -> Span {
        Span { start, len, set }
    }

    /// Rows 0-1 use `a` at 0.8, 2-3 nothing, 4-5 `a` at 0.4 and `b`, 6-7
    /// `b`: `a` is applied with per-row scales, `b` to one run of rows.
    fn mixed(a: &Arc<Adapter>, b: &Arc<Adapter>) -> (Plan, [Vec<(f64, f64)>; 8]) {
        let ab: Arc<[Applied]> = vec![
            Applied {
                adapter: a.clone(),
                scale: 0.4,
            },
            Applied {
                adapter: b.clone(),
                scale: 1.0,
            },
        ]
        .into();
        let none: Arc<[Applied]> = Vec::new().into();
        let plan = Plan::rows(
            8,
            vec![
                span(0, 1, set(a, 0.8)),
                span(1, 1, set(a, 0.8)),
                span(2, 2, none),
                span(4, 2, ab),
                span(6, 2, set(b, 1.0)),
            ],
        );
        // Each row's (scale of a, scale of b).
        let s = [
            vec![(0.8, 0.0)],
            vec![(0.8, 0.0)],
            vec![(0.0, 0.0)],
            vec![(0.0, 0.0)],
            vec![(0.4, 1.0)],
            vec![(0.4, 1.0)],
            vec![(0.0, 1.0)],
            vec![(0.0, 1.0)],
        ];
        (plan, s)
    }

    #[test]
    fn adjacent_rows_at_one_scale_are_one_segment_and_shared_adapters_one_use() {
        let a = zero_adapter("a");
        let b = zero_adapter("b");
        let (plan, _) = mixed(&a, &b);
        assert_eq!(plan.uses.len(), 2);
        assert_eq!(plan.uses[0].segments, vec![(0, 2, 0.8), (4, 2, 0.4)]);
        assert_eq!(plan.uses[1].segments, vec![(4, 4, 1.0)]);
        let uniform = Plan::rows(4, vec![span(0, 2, set(&a, 0.5)), span(2, 2, set(&a, 0.5))]);
        assert_eq!(uniform.uses[0].segments, vec![(0, 4, 0.5)]);
        let zero = Plan::rows(2, vec![span(0, 2, set(&a, 0.0))]);
        assert!(zero.is_empty());
    }

    #[test]
    fn each_row_gets_its_own_adapters_on_linear_layers() {
        tch::manual_seed(7);
        let (din, dout, rank) = (6, 5, 2);
        let w = Tensor::randn([dout, din], F);
        let a = adapter(
            "a",
            "m",
            Tensor::randn([rank, din], F),
            Tensor::randn([dout, rank], F),
            0.5,
        );
        let b = adapter(
            "b",
            "m",
            Tensor::randn([3, din], F),
            Tensor::randn([dout, 3], F),
            2.0,
        );
        let (plan, scales) = mixed(&a, &b);
        let xs = Tensor::randn([8, 4, din], F);
        let base = xs.linear(&w, None::<Tensor>);
        let got = with_plan(plan, || {
            apply("m", &xs, xs.linear(&w, None::<Tensor>), None)
        });
        let other = with_plan(Plan::rows(8, vec![span(0, 8, set(&a, 1.0))]), || {
            apply("not-m", &xs, xs.linear(&w, None::<Tensor>), None)
        });
        assert!(other.equal(&base), "a module an adapter lacks is untouched");
        let delta = |ad: &Arc<Adapter>, x: &Tensor| {
            let d = &ad.deltas["m"];
            x.linear(&d.down, None::<Tensor>)
                .linear(&d.up, None::<Tensor>)
                * d.scale
        };
        for (row, s) in scales.iter().enumerate() {
            let x = xs.get(row as i64);
            let want = base.get(row as i64) + delta(&a, &x) * s[0].0 + delta(&b, &x) * s[0].1;
            let diff = (got.get(row as i64) - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-9, "row {row}: {diff}");
        }
        // Rows without adapters are the base output exactly.
        assert!(got.narrow(0, 2, 2).equal(&base.narrow(0, 2, 2)));
    }

    #[test]
    fn a_rows_factor_is_rounded_once_as_the_one_run_path_rounds_it() {
        let a = zero_adapter("a");
        let b = zero_adapter("b");
        let (plan, scales) = mixed(&a, &b);
        let like = Tensor::zeros([8], (tch::Kind::Float, tch::Device::Cpu));
        // An alpha/rank whose product with 0.8 rounds differently in two
        // steps (f32(f32(0.8) · m)) than in one (f32(0.8 · m)).
        let module = 0.3;
        let r = plan.uses[0].row_scales(8, &like, module).unwrap();
        let got: Vec<f32> = Vec::try_from(&r).unwrap();
        for (row, s) in scales.iter().enumerate() {
            assert_eq!(got[row], (s[0].0 * module) as f32, "row {row}");
        }
        let two_step = ((0.8f64 as f32) as f64 * module) as f32;
        assert_ne!(two_step, (0.8 * module) as f32, "the case tells them apart");
        // Another module's alpha/rank gets its own factors.
        let r2 = plan.uses[0].row_scales(8, &like, 0.5).unwrap();
        assert_eq!(Vec::<f32>::try_from(&r2).unwrap()[0], 0.4);
    }

    #[test]
    fn each_row_gets_its_own_adapters_on_convolutions() {
        tch::manual_seed(8);
        let (cin, cout, rank, k, stride, pad) = (3, 4, 2, 3, 2, 1);
        let w = Tensor::randn([cout, cin, k, k], F);
        let conv =
            |x: &Tensor, w: &Tensor, s: i64, p: i64| x.conv2d(w, None::<Tensor>, [s], [p], [1], 1);
        let a = adapter(
            "a",
            "m",
            Tensor::randn([rank, cin, k, k], F),
            Tensor::randn([cout, rank, 1, 1], F),
            0.5,
        );
        let b = adapter(
            "b",
            "m",
            Tensor::randn([rank, cin, k, k], F),
            Tensor::randn([cout, rank, 1, 1], F),
            1.0,
        );
        let (plan, scales) = mixed(&a, &b);
        let xs = Tensor::randn([8, cin, 7, 7], F);
        let base = conv(&xs, &w, stride, pad);
        let got = with_plan(plan, || {
            apply("m", &xs, conv(&xs, &w, stride, pad), Some((stride, pad)))
        });
        let delta = |ad: &Arc<Adapter>, x: &Tensor| {
            let d = &ad.deltas["m"];
            conv(&conv(x, &d.down, stride, pad), &d.up, 1, 0) * d.scale
        };
        for (row, s) in scales.iter().enumerate() {
            let x = xs.narrow(0, row as i64, 1);
            let want =
                base.narrow(0, row as i64, 1) + delta(&a, &x) * s[0].0 + delta(&b, &x) * s[0].1;
            let diff = (got.narrow(0, row as i64, 1) - &want)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-9, "row {row}: {diff}");
        }
    }

    #[test]
    fn a_plan_for_every_row_applies_whatever_the_batch() {
        tch::manual_seed(9);
        let w = Tensor::randn([4, 3], F);
        let a = adapter(
            "a",
            "m",
            Tensor::randn([1, 3], F),
            Tensor::randn([4, 1], F),
            1.5,
        );
        for batch in [1, 3] {
            let xs = Tensor::randn([batch, 3], F);
            let got = with_plan(Plan::all(set(&a, 0.6)), || {
                apply("m", &xs, xs.linear(&w, None::<Tensor>), None)
            });
            let d = &a.deltas["m"];
            let want = xs.linear(&w, None::<Tensor>)
                + xs.linear(&d.down, None::<Tensor>)
                    .linear(&d.up, None::<Tensor>)
                    * (0.6 * 1.5);
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-9, "batch {batch}: {diff}");
        }
    }
}
