/// Module options and dtypes: 1d/3d ranks, (N, C) input, half precision, last_gamma, using_bn, track_running_stats, .to().
module ModulesTests

open System
open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

type F = torch.nn.functional

[<Fact>]
let ``SwitchNorm1d on (N, C): IN mean is x and IN variance 0`` () =
    seeded 31L
    let m = new SwitchNorm1d(4L, dtype = torch.ScalarType.Float64)
    setOneHot m 0

    do
        use _ = torch.no_grad ()

        m.bias.copy_ (torch.tensor ([| 1.0; -2.0; 0.5; 3.0 |], dtype = torch.ScalarType.Float64))
        |> ignore

    let x = torch.randn (5L, 4L, dtype = torch.ScalarType.Float64)
    // (x − x) / sqrt(0 + eps) · 1 + bias = bias
    assertClose "IN on (N, C)" 1e-12 (m.forward x) (m.bias.detach().expand (5L, 4L))
    // BN one-hot on (N, C) equals BatchNorm1d
    let bn = torch.nn.BatchNorm1d(4L, dtype = torch.ScalarType.Float64)
    let m2 = new SwitchNorm1d(4L, dtype = torch.ScalarType.Float64)
    setOneHot m2 2
    assertClose "BN on (N, C)" 1e-10 (m2.forward x) (bn.forward x)
    assertClose "running_var on (N, C)" 1e-12 m2.running_var bn.running_var

[<Fact>]
let ``SwitchNorm3d BN one-hot equals BatchNorm3d`` () =
    seeded 32L
    let m = new SwitchNorm3d(3L, dtype = torch.ScalarType.Float64)
    let bn = torch.nn.BatchNorm3d(3L, dtype = torch.ScalarType.Float64)
    setOneHot m 2
    let x = torch.randn ([| 2L; 3L; 2L; 3L; 4L |], dtype = torch.ScalarType.Float64)
    assertClose "3d output" 1e-10 (m.forward x) (bn.forward x)
    assertClose "3d running_mean" 1e-12 m.running_mean bn.running_mean

[<Theory>]
[<InlineData("float16")>]
[<InlineData("bfloat16")>]
let ``half inputs are normalized in float32 and returned in their own dtype`` (name: string) =
    seeded 33L

    let dt =
        if name = "float16" then
            torch.ScalarType.Float16
        else
            torch.ScalarType.BFloat16

    let m = new SwitchNorm2d(3L) // float32 parameters: mixed precision
    let x = (torch.randn (4L, 3L, 5L, 5L) * 2.0e4).to_type dt // float16 values up to ~6e4 must not overflow
    let y = m.forward x
    Assert.Equal(dt, y.dtype)
    let m32 = new SwitchNorm2d(3L)
    let y32 = m32.forward (x.to_type torch.ScalarType.Float32)
    // the result is the float32 result rounded once to the half dtype: |y − y32| ≤ u·|y32| (+ tiny absolute slack)
    assertClose $"{name} vs float32" (tol dt) y y32
    Assert.False(y.isnan().any().item<bool> () || y.isinf().any().item<bool> ())
    // parameters in the half dtype are accepted too
    let mh = new SwitchNorm2d(3L, dtype = dt)
    Assert.Equal(dt, (mh.forward x).dtype)

[<Fact>]
let ``last_gamma starts the weight at zero and using_bn false mixes two statistics`` () =
    let m = new SwitchNorm2d(3L, last_gamma = true)
    Assert.Equal(0.0f, m.weight.abs().sum().item<float32> ())
    let nb = new SwitchNorm2d(3L, using_bn = false)
    Assert.Equal<int64[]>([| 2L |], nb.mean_weight.shape)
    Assert.Equal<string[]>([| "IN"; "LN" |], nb.Components)
    Assert.False(nb.using_bn)
    // IN+LN mixture on a batch of one equals the same mixture with the sample inside a bigger batch
    seeded 34L
    let x = torch.randn (3L, 3L, 4L, 4L)

    assertClose
        "batch independence"
        (tol torch.ScalarType.Float32)
        (nb.forward (x.narrow (0L, 1L, 1L)))
        ((nb.forward x).narrow (0L, 1L, 1L))

[<Fact>]
let ``without running statistics BN uses the batch in eval, and nothing is tracked`` () =
    seeded 35L
    let m = new SwitchNorm2d(3L, track_running_stats = false)
    Assert.Null(m.running_mean)
    Assert.Empty(m.named_buffers ())
    let x = torch.randn (4L, 3L, 3L, 3L)
    let yTrain = m.forward x
    m.eval () |> ignore
    assertClose "eval = train" 0.0 (m.forward x) yTrain

[<Fact>]
let ``module.to(float64) converts parameters and floating buffers and keeps the counter int64`` () =
    let m = new SwitchNorm2d(3L)
    m.forward (torch.randn (2L, 3L, 2L, 2L)) |> ignore
    m.``to`` (torch.ScalarType.Float64) |> ignore
    Assert.Equal(torch.ScalarType.Float64, m.weight.dtype)
    Assert.Equal(torch.ScalarType.Float64, m.mean_weight.dtype)
    Assert.Equal(torch.ScalarType.Float64, m.running_var.dtype)
    Assert.Equal(torch.ScalarType.Int64, m.num_batches_tracked.dtype)
    Assert.Equal(1L, m.num_batches_tracked.item<int64> ())
    let y = m.forward (torch.randn (2L, 3L, 2L, 2L, dtype = torch.ScalarType.Float64))
    Assert.Equal(torch.ScalarType.Float64, y.dtype)
    Assert.Equal(2L, m.num_batches_tracked.item<int64> ())

[<Fact>]
let ``running statistics follow the closed form of the exponential average`` () =
    seeded 36L
    let m = new SwitchNorm2d(2L, momentum = 0.25, dtype = torch.ScalarType.Float64)

    let xs = [
        for _ in 1..5 -> torch.randn (3L, 2L, 4L, 4L, dtype = torch.ScalarType.Float64) * 2.0 + 1.0
    ]

    for x in xs do
        m.forward x |> ignore

    // running_k = 0.75^k · init + Σᵢ 0.25 · 0.75^(k−i) · statᵢ
    let k = List.length xs

    let stat (x: torch.Tensor) (f: torch.Tensor -> torch.Tensor) =
        f (x.transpose(0L, 1L).reshape (2L, -1L))

    let expMean =
        xs
        |> List.mapi (fun i x -> stat x (fun r -> r.mean [| 1L |]) * (0.25 * Math.Pow(0.75, float (k - 1 - i))))
        |> List.reduce (+)

    let expVar =
        (xs
         |> List.mapi (fun i x ->
             stat x (fun r -> r.var (1L, unbiased = true))
             * (0.25 * Math.Pow(0.75, float (k - 1 - i))))
         |> List.reduce (+))
        + Math.Pow(0.75, float k)

    assertClose "running_mean" 1e-12 m.running_mean expMean
    assertClose "running_var" 1e-12 m.running_var expVar
    Assert.Equal(int64 k, m.num_batches_tracked.item<int64> ())

[<Theory>]
[<InlineData("narrowed (storage offset)")>]
[<InlineData("transposed")>]
[<InlineData("channels-last layout")>]
let ``inputs that are views give the same outputs and gradients as contiguous copies`` (layout: string) =
    // The float32 kernels read raw memory: views with offsets or strides must go through a contiguous copy.
    let x =
        match layout with
        | "narrowed (storage offset)" -> (randnSeeded 7L [| 4L; 3L; 5L; 5L |] torch.ScalarType.Float32).narrow (0L, 1L, 2L)
        | "transposed" -> (randnSeeded 8L [| 2L; 3L; 5L; 5L |] torch.ScalarType.Float32).transpose (2L, 3L)
        | _ -> (randnSeeded 9L [| 2L; 5L; 5L; 3L |] torch.ScalarType.Float32).permute (0L, 3L, 1L, 2L)

    let g = randnSeeded 10L x.shape torch.ScalarType.Float32

    for training in [ true; false ] do
        let run (input: torch.Tensor) =
            let m = new SwitchNorm2d(3L)
            (if training then m.train () else m.eval ()) |> ignore
            let xr = input.detach().requires_grad_ (true)
            let y = m.forward xr
            (y * g).sum().backward ()
            y.detach (), xr.grad, m.mean_weight.grad

        let y1, gx1, gl1 = run x
        let y2, gx2, gl2 = run (x.contiguous ())
        Assert.True(exactEq y1 y2, $"{layout}, training {training}: outputs differ")
        Assert.True(exactEq gx1 gx2, $"{layout}, training {training}: input gradients differ")
        Assert.True(exactEq gl1 gl2, $"{layout}, training {training}: logit gradients differ")

[<Theory>]
[<InlineData("float64")>]
[<InlineData("float32")>]
let ``the output can be modified in place, as after an in-place ReLU`` (dtypeName: string) =
    let dtype =
        if dtypeName = "float64" then
            torch.ScalarType.Float64
        else
            torch.ScalarType.Float32

    let x = randnSeeded 11L [| 2L; 3L; 4L; 4L |] dtype

    let run inPlace =
        let m = new SwitchNorm2d(3L, dtype = dtype)
        let xr = x.detach().requires_grad_ (true)
        let y = m.forward xr
        let z = if inPlace then y.relu_ () else y.relu ()
        z.square().sum().backward ()
        z.detach (), xr.grad

    let z1, g1 = run true
    let z2, g2 = run false
    Assert.True(exactEq z1 z2, "outputs differ")
    assertClose "input gradient" (tol dtype) g1 g2

[<Fact>]
let ``a custom switch must return convex weights, on every path`` () =
    let x = randnSeeded 12L [| 2L; 3L; 4L; 4L |] torch.ScalarType.Float64
    let sharp = Switch.Custom("sharp", fun l -> (l * 2.0).softmax 0L)
    let notConvex = Switch.Custom("sigmoid", fun l -> l.sigmoid ())

    // the row path (float32) against the tensor path (float64)
    let forward (switch: Switch) fused =
        let dtype =
            if fused then
                torch.ScalarType.Float32
            else
                torch.ScalarType.Float64

        let x = x.to_type dtype

        let spec = {
            Norm.paper with
                Switch = switch
                Fused = fused
        }

        let p = {
            Norm.initParams spec 3L with
                MeanLogits = torch.tensor ([| 0.3; -1.0; 0.5 |], dtype = dtype)
                VarLogits = torch.tensor ([| 1.0; 0.0; -0.5 |], dtype = dtype)
        }

        let p = {
            p with
                Weight = p.Weight |> Option.map (fun w -> w.to_type dtype)
                Bias = p.Bias |> Option.map (fun b -> b.to_type dtype)
        }

        (Norm.apply spec p None Mode.Train x).Output

    assertClose
        "a convex custom switch: row path (float32) vs tensor path (float64)"
        (tol torch.ScalarType.Float32)
        (forward sharp true)
        (forward sharp false)

    for fused in [ true; false ] do
        throws<ArgumentException> (fun () -> box (forward notConvex fused)) [ "convex weights"; "sum" ]

[<Theory>]
// 102,400 values in rows of 1,600 (the long-row passes), and 129,024 in rows of 63 (four rows at a time, with a
// 7-value tail); both above the size at which the row passes use libtorch's thread team
[<InlineData(4L, 16L, 40L, 40L)>]
[<InlineData(128L, 16L, 7L, 9L)>]
let ``row passes split across libtorch's OpenMP threads give bitwise the single-thread results`` (n: int64, c: int64, h: int64, w: int64) =
    let x = randnSeeded 31L [| n; c; h; w |] torch.ScalarType.Float32 * 3.0 + 2.0
    let g = randnSeeded 32L [| n; c; h; w |] torch.ScalarType.Float32
    let before = torch.get_num_threads ()

    let run threads =
        torch.set_num_threads threads
        let m = new SwitchNorm2d(c)
        let xs = x.detach().requires_grad_ true
        let y = m.forward xs
        (y * g).sum().backward ()
        m.eval () |> ignore
        // eval through the autograd function, and without a graph (both sample by sample)
        let ye = (m.forward (x.detach().requires_grad_ true)).detach ()

        let yn =
            use _ = torch.no_grad ()
            m.forward x

        y.detach (), xs.grad.clone (), m.mean_weight.grad.clone (), m.weight.grad.clone (), ye, yn

    try
        let one = run 1
        let two = run 2
        let (y1, dx1, dl1, dw1, ye1, yn1), (y2, dx2, dl2, dw2, ye2, yn2) = one, two

        for (what, a, b) in
            [
                "output, 1 vs 2 threads", y1, y2
                "input gradient, 1 vs 2 threads", dx1, dx2
                "logit gradient, 1 vs 2 threads", dl1, dl2
                "weight gradient, 1 vs 2 threads", dw1, dw2
                "eval output, 1 vs 2 threads", ye1, ye2
                "no-graph eval output, 1 vs 2 threads", yn1, yn2
                "no-graph eval output vs the output with a graph", yn1, ye1
            ] do
            Assert.True(exactEq a b, $"{what}: differs by {maxAbsDiff a b}")
    finally
        torch.set_num_threads before

[<Theory>]
[<InlineData("float32")>]
[<InlineData("float64")>]
let ``the functional normalizer returns the batch's per-channel moments in training`` (dtypeName: string) =
    // the module asks for them only when it recalibrates; the public Functional.forward always returns them
    let dtype =
        if dtypeName = "float64" then
            torch.ScalarType.Float64
        else
            torch.ScalarType.Float32

    let x = randnSeeded 41L [| 3L; 4L; 5L; 2L |] dtype * 2.0 + 7.0
    let m = new SwitchNorm2d(4L, dtype = dtype)

    let running = {
        Mean = m.running_mean.clone ()
        Var = m.running_var.clone ()
        BatchesTracked = 0L
    }

    let p = {
        Weight = Some m.weight
        Bias = Some m.bias
        MeanLogits = m.mean_weight
        VarLogits = m.var_weight
    }

    let r = Functional.forward Functional.paper p (Some running) Mode.Train x
    let b = r.BatchMoments.Value
    let x64 = x.to_type torch.ScalarType.Float64
    let mean = x64.mean ([| 0L; 2L; 3L |], keepdim = true)
    let var = (x64 - mean).square().mean ([| 0L; 2L; 3L |])
    Assert.Equal(30.0, b.Count)
    assertClose "batch mean" (tol dtype) b.Mean (mean.view (1L, -1L))
    assertClose "batch variance (M2 / count)" (tol dtype) (b.M2 / b.Count) (var.view (1L, -1L))
