/// Finite-difference checks in float64, and agreement with the independent array reference.
module Gradients

open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private f64 = torch.ScalarType.Float64

let private toArray (t: torch.Tensor) =
    t.detach().contiguous().to_type(f64).data<float>().ToArray()

/// Loss sum(y · g) of the functional normalizer as a function of one flattened input, the others fixed.
type private Setup = {
    X: float[]
    Shape: int64[]
    W: float[]
    B: float[]
    Lm: float[]
    Lv: float[]
    G: float[]
    UsingBn: bool
}

let private loss (s: Setup) =
    let t (a: float[]) (shape: int64[]) =
        torch.tensor(a, dtype = f64).reshape shape

    let c = s.Shape[1]
    let spec = NormSpec.Create(s.UsingBn, 1e-5, System.Nullable 0.1)

    let p = {
        Weight = Some(t s.W [| c |])
        Bias = Some(t s.B [| c |])
        MeanLogits = t s.Lm [| int64 s.Lm.Length |]
        VarLogits = t s.Lv [| int64 s.Lv.Length |]
    }

    let r = Functional.forward spec p None Mode.Train (t s.X s.Shape)
    (r.Output * t s.G s.Shape).sum().item<float> ()

let private setup (usingBn: bool) (shape: int64[]) =
    let n = shape |> Array.fold (*) 1L
    let k = if usingBn then 3L else 2L
    let c = shape[1]

    {
        X = toArray (torch.randn (n, dtype = f64) * 2.0 + 1.0)
        Shape = shape
        W = toArray (torch.rand (c, dtype = f64) + 0.5)
        B = toArray (torch.randn (c, dtype = f64))
        Lm = toArray (torch.randn (k, dtype = f64))
        Lv = toArray (torch.randn (k, dtype = f64))
        G = toArray (torch.randn (n, dtype = f64))
        UsingBn = usingBn
    }

/// Autograd gradients of sum(y · g) w.r.t. x, weight, bias, mean logits, var logits.
let private autograd (s: Setup) =
    let leaf (a: float[]) (shape: int64[]) =
        torch.tensor(a, dtype = f64).reshape(shape).requires_grad_ (true)

    let c = s.Shape[1]
    let x = leaf s.X s.Shape
    let w = leaf s.W [| c |]
    let b = leaf s.B [| c |]
    let lm = leaf s.Lm [| int64 s.Lm.Length |]
    let lv = leaf s.Lv [| int64 s.Lv.Length |]
    let spec = NormSpec.Create(s.UsingBn, 1e-5, System.Nullable 0.1)

    let p = {
        Weight = Some w
        Bias = Some b
        MeanLogits = lm
        VarLogits = lv
    }

    let r = Functional.forward spec p None Mode.Train x
    (r.Output * torch.tensor(s.G, dtype = f64).reshape (s.Shape)).sum().backward ()
    toArray x.grad, toArray w.grad, toArray b.grad, toArray lm.grad, toArray lv.grad

let private check (what: string) (analytic: float[]) (numeric: float[]) =
    // central differences with h = 1e-6 in float64: truncation O(h²·f''') ≈ 1e-12, rounding O(u·|f|/h) ≈ 1e-9
    for j in 0 .. analytic.Length - 1 do
        let err = abs (analytic[j] - numeric[j])

        if err > 1e-6 * (1.0 + abs numeric[j]) then
            failwith $"{what}[{j}]: autograd {analytic[j]} vs finite difference {numeric[j]}"

[<Theory>]
[<InlineData(true, 2, 3, 2, 2)>]
[<InlineData(true, 1, 2, 3, 2)>] // batch of 1: BN over spatial positions
[<InlineData(false, 1, 3, 2, 2)>]
[<InlineData(true, 3, 1, 2, 1)>] // one channel
let ``finite differences agree with autograd for x, weight, bias and both logit vectors`` (usingBn: bool, n: int, c: int, h: int, w: int) =
    seeded 11L
    let s = setup usingBn [| int64 n; int64 c; int64 h; int64 w |]
    let gx, gw, gb, glm, glv = autograd s
    check "x" gx (Reference.gradFD (fun v -> loss { s with X = v }) s.X 1e-6)
    check "weight" gw (Reference.gradFD (fun v -> loss { s with W = v }) s.W 1e-6)
    check "bias" gb (Reference.gradFD (fun v -> loss { s with B = v }) s.B 1e-6)
    check "mean_weight" glm (Reference.gradFD (fun v -> loss { s with Lm = v }) s.Lm 1e-6)
    check "var_weight" glv (Reference.gradFD (fun v -> loss { s with Lv = v }) s.Lv 1e-6)
    // softmax gradients sum to zero
    Assert.True(abs (Array.sum glm) < 1e-10)
    Assert.True(abs (Array.sum glv) < 1e-10)

[<Theory>]
[<InlineData(true, 3, 4, 5)>]
[<InlineData(false, 2, 3, 7)>]
[<InlineData(true, 1, 2, 9)>]
let ``module output and gradients match the float64 array reference`` (usingBn: bool, n: int, c: int, s: int) =
    seeded 12L
    let st = setup usingBn [| int64 n; int64 c; int64 s |]

    let refLoss (x: float[]) (w: float[]) (b: float[]) (lm: float[]) (lv: float[]) =
        let y, _ =
            Reference.forward { N = n; C = c; S = s; X = x } w b lm lv 1e-5 usingBn None

        Array.fold2 (fun acc a g -> acc + a * g) 0.0 y st.G

    // forward
    let yRef, _ =
        Reference.forward { N = n; C = c; S = s; X = st.X } st.W st.B st.Lm st.Lv 1e-5 usingBn None

    let m = new SwitchNorm1d(int64 c, dtype = f64, using_bn = usingBn)

    do
        use _ = torch.no_grad ()
        m.weight.copy_ (torch.tensor (st.W, dtype = f64)) |> ignore
        m.bias.copy_ (torch.tensor (st.B, dtype = f64)) |> ignore
        m.mean_weight.copy_ (torch.tensor (st.Lm, dtype = f64)) |> ignore
        m.var_weight.copy_ (torch.tensor (st.Lv, dtype = f64)) |> ignore

    let x =
        torch.tensor(st.X, dtype = f64).reshape(int64 n, int64 c, int64 s).requires_grad_ (true)

    let y = m.forward x
    assertClose "forward vs reference" 1e-10 y (torch.tensor(yRef, dtype = f64).reshape (int64 n, int64 c, int64 s))
    (y * torch.tensor(st.G, dtype = f64).reshape (int64 n, int64 c, int64 s)).sum().backward ()
    // the reference's own gradients, by finite differences
    check "x vs reference" (toArray x.grad) (Reference.gradFD (fun v -> refLoss v st.W st.B st.Lm st.Lv) st.X 1e-6)
    check "weight vs reference" (toArray m.weight.grad) (Reference.gradFD (fun v -> refLoss st.X v st.B st.Lm st.Lv) st.W 1e-6)
    check "mean_weight vs reference" (toArray m.mean_weight.grad) (Reference.gradFD (fun v -> refLoss st.X st.W st.B v st.Lv) st.Lm 1e-6)
    check "var_weight vs reference" (toArray m.var_weight.grad) (Reference.gradFD (fun v -> refLoss st.X st.W st.B st.Lm v) st.Lv 1e-6)

[<Fact>]
let ``large common offset in float32 stays within float32 rounding of the float64 reference`` () =
    seeded 13L
    let n, c, s = 4, 3, 64
    let x64 = torch.randn (int64 n, int64 c, int64 s, dtype = f64) + 1e4
    let x32 = x64.to_type torch.ScalarType.Float32
    let xs = toArray (x32.to_type f64) // the float32 values, exactly
    let ones = Array.create c 1.0

    let yRef, _ =
        Reference.forward { N = n; C = c; S = s; X = xs } ones (Array.zeroCreate c) [| 1.0; 1.0; 1.0 |] [| 1.0; 1.0; 1.0 |] 1e-5 true None

    let m = new SwitchNorm1d(int64 c)
    let y = m.forward x32
    // input rounding is exact (we compare on the float32 values); centring 1e4 ± 3 in float32 leaves relative
    // error ~ u·|x|/σ = 6e-8·1e4 = 6e-4 in the centred values; E[x²] − E[x]² would lose everything (u·x² = 6).
    assertClose "offset 1e4" 2e-3 y (torch.tensor(yRef).reshape (int64 n, int64 c, int64 s))
