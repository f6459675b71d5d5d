/// Semantics.Official against an independent float64 statement of the official code's formulas over plain arrays
/// (devkit/ops/switchable_norm.py: var_in = x.var (unbiased), var_ln and var_bn = mean(var_in + mean_in²) − mean², the
/// 1d module's LN and BN unbiased over their own groups, the keep-factor running update and the raw sums without a
/// moving average), on both paths, for 1d, 2d and 3d, with and without BN; gradients against finite differences; and
/// the refusals where the official code gives NaN.
module Official

open System
open FsCheck
open FsCheck.FSharp
open global.FsCheck.Xunit
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private f64 = torch.ScalarType.Float64

/// The official formulas, literally, in float64 over x (N, C, S) as a flat array.
module OfficialReference =

    let private mean (a: float[]) = Array.average a

    let private unbiased (a: float[]) =
        let m = mean a
        (a |> Array.sumBy (fun v -> (v - m) * (v - m))) / float (a.Length - 1)

    let softmax (l: float[]) =
        let m = Array.max l
        let e = l |> Array.map (fun v -> exp (v - m))
        let z = Array.sum e
        e |> Array.map (fun v -> v / z)

    /// Output and the batch's (mean, var) per channel (train) for the official 2d/3d module.
    let forward2d
        (n: int)
        (c: int)
        (s: int)
        (x: float[])
        (w: float[])
        (b: float[])
        (lm: float[])
        (lv: float[])
        (eps: float)
        (bn: (float[] * float[]) option)
        (usingBn: bool)
        =
        let row i j =
            Array.init s (fun k -> x[(i * c + j) * s + k])

        let meanIn = Array.init n (fun i -> Array.init c (fun j -> mean (row i j)))
        let varIn = Array.init n (fun i -> Array.init c (fun j -> unbiased (row i j)))

        let temp =
            Array.init n (fun i -> Array.init c (fun j -> varIn[i][j] + meanIn[i][j] ** 2.0))

        let meanLn = Array.init n (fun i -> mean meanIn[i])
        let varLn = Array.init n (fun i -> mean temp[i] - meanLn[i] ** 2.0)

        let meanBnBatch =
            Array.init c (fun j -> mean (Array.init n (fun i -> meanIn[i][j])))

        let varBnBatch =
            Array.init c (fun j -> mean (Array.init n (fun i -> temp[i][j])) - meanBnBatch[j] ** 2.0)

        let meanBn, varBn =
            match bn with
            | Some(m, v) -> m, v
            | None -> meanBnBatch, varBnBatch

        let wm, wv = softmax lm, softmax lv

        let y =
            Array.init (n * c * s) (fun idx ->
                let i, j = idx / (c * s), (idx / s) % c

                let mu, var =
                    if usingBn then
                        wm[0] * meanIn[i][j] + wm[1] * meanLn[i] + wm[2] * meanBn[j],
                        wv[0] * varIn[i][j] + wv[1] * varLn[i] + wv[2] * varBn[j]
                    else
                        wm[0] * meanIn[i][j] + wm[1] * meanLn[i], wv[0] * varIn[i][j] + wv[1] * varLn[i]

                (x[idx] - mu) / sqrt (var + eps) * w[j] + b[j])

        y, (meanBnBatch, varBnBatch)

    /// Output and the batch's (mean, var) per channel (train) for the official 1d module over (N, C).
    let forward1d
        (n: int)
        (c: int)
        (x: float[])
        (w: float[])
        (b: float[])
        (lm: float[])
        (lv: float[])
        (eps: float)
        (bn: (float[] * float[]) option)
        (usingBn: bool)
        =
        let sample i = Array.init c (fun j -> x[i * c + j])
        let channel j = Array.init n (fun i -> x[i * c + j])
        let meanLn = Array.init n (fun i -> mean (sample i))
        let varLn = Array.init n (fun i -> unbiased (sample i))

        let batch =
            if n > 1 then
                Array.init c (fun j -> mean (channel j)), Array.init c (fun j -> unbiased (channel j))
            else
                Array.zeroCreate c, Array.zeroCreate c

        let meanBn, varBn = defaultArg bn batch
        let wm, wv = softmax lm, softmax lv

        let y =
            Array.init (n * c) (fun idx ->
                let i, j = idx / c, idx % c

                let mu, var =
                    if usingBn then
                        wm[0] * meanLn[i] + wm[1] * meanBn[j], wv[0] * varLn[i] + wv[1] * varBn[j]
                    else
                        meanLn[i], varLn[i]

                (x[idx] - mu) / sqrt (var + eps) * w[j] + b[j])

        y, batch

    /// The official running update: keep·r + (1 − keep)·batch, or raw sums without a moving average.
    let update (movingAverage: bool) (keep: float) (rm: float[]) (rv: float[]) (bm: float[], bv: float[]) =
        if movingAverage then
            Array.map2 (fun r b -> keep * r + (1.0 - keep) * b) rm bm, Array.map2 (fun r b -> keep * r + (1.0 - keep) * b) rv bv
        else
            Array.map2 (+) rm bm, Array.map3 (fun r m v -> r + m * m + v) rv bm bv

type OfficialCase = {
    Dims: int
    N: int
    C: int
    Spatial: int64[]
    UsingBn: bool
    MovingAverage: bool
    Fused: bool
    Dtype: torch.ScalarType
    Offset: float
    Seed: int
} with

    member this.Shape = Array.append [| int64 this.N; int64 this.C |] this.Spatial
    member this.S = this.Spatial |> Array.fold (*) 1L |> int

    override this.ToString() =
        $"{this.Dims}d {Checks.shapeText this.Shape} bn={this.UsingBn} ma={this.MovingAverage} fused={this.Fused} {this.Dtype} offset={this.Offset} seed={this.Seed}"

type OfficialArbs =
    static member OfficialCase() : Arbitrary<OfficialCase> =
        let gen =
            gen {
                let! dims = Gen.elements [ 1; 2; 3 ]
                let! usingBn = Gen.elements [ true; false ]
                // the official 1d BN needs two samples in training; 2d/3d take a batch of one
                let! n = Gen.choose ((if dims = 1 && usingBn then 2 else 1), 5)
                let! c = Gen.choose ((if dims = 1 then 2 else 1), 6)

                let! spatial =
                    match dims with
                    | 1 -> Gen.constant [||]
                    | 2 -> Gen.map2 (fun h w -> [| int64 h; int64 w |]) (Gen.choose (2, 6)) (Gen.choose (1, 6))
                    | _ ->
                        Gen.map3 (fun d h w -> [| int64 d; int64 h; int64 w |]) (Gen.choose (1, 3)) (Gen.choose (2, 3)) (Gen.choose (1, 4))

                let! ma = Gen.elements [ true; false ]
                let! fused = Gen.elements [ true; false ]
                let! dtype = Gen.elements [ torch.ScalarType.Float32; torch.ScalarType.Float64 ]
                let! offset = Gen.elements [ 0.0; 3.0; 100.0 ]
                let! seed = Gen.choose (0, 100000)

                return {
                    Dims = dims
                    N = n
                    C = c
                    Spatial = spatial
                    UsingBn = usingBn
                    MovingAverage = ma
                    Fused = fused
                    Dtype = dtype
                    Offset = offset
                    Seed = seed
                }
            }

        let shrink (c: OfficialCase) =
            seq {
                if c.Offset <> 0.0 then
                    yield { c with Offset = 0.0 }

                if c.N > 2 then
                    yield { c with N = 2 }

                if c.C > 2 then
                    yield { c with C = 2 }

                if not c.Fused then
                    yield { c with Fused = true }
            }

        Arb.fromGenShrink (gen, shrink)

let private arr (t: torch.Tensor) =
    t.detach().contiguous().to_type(f64).data<float>().ToArray()

let officialLayer (dims: int) (c: int64) (usingBn: bool) (ma: bool) (dtype: torch.ScalarType) : SwitchNormNd =
    let dtype = Nullable dtype

    match dims with
    | 1 -> SwitchNorm1d.Official(c, dtype = dtype, using_bn = usingBn, using_moving_average = ma)
    | 2 -> SwitchNorm2d.Official(c, dtype = dtype, using_bn = usingBn, using_moving_average = ma)
    | _ -> SwitchNorm3d.Official(c, dtype = dtype, using_bn = usingBn, using_moving_average = ma)

/// Random parameters and running statistics, set in place.
let randomize (seed: int) (m: SwitchNormNd) =
    use _ = torch.no_grad ()
    let c = m.num_features
    let k = m.mean_weight.shape[0]
    let dt = m.mean_weight.dtype
    // drawn in float64 whatever the module's dtype, so modules of two dtypes get the same values
    let randn (i: int64) (n: int64) =
        randnSeeded (int64 seed + i) [| n |] f64

    let rand (i: int64) (n: int64) = randSeeded (int64 seed + i) [| n |] f64
    m.weight.copy_ (rand 1L c + 0.5) |> ignore
    m.bias.copy_ (randn 2L c) |> ignore
    m.mean_weight.copy_ (randn 3L k) |> ignore
    m.var_weight.copy_ (randn 4L k) |> ignore

    if m.using_bn then
        m.running_mean.copy_ (randn 5L c) |> ignore
        m.running_var.copy_ (rand 6L c + 0.5) |> ignore

let private reference (case: OfficialCase) (x: float[]) (m: SwitchNormNd) (bn: (float[] * float[]) option) =
    let w, b, lm, lv = arr m.weight, arr m.bias, arr m.mean_weight, arr m.var_weight

    if case.Dims = 1 then
        OfficialReference.forward1d case.N case.C x w b lm lv m.eps bn case.UsingBn
    else
        OfficialReference.forward2d case.N case.C case.S x w b lm lv m.eps bn case.UsingBn

[<Properties(Arbitrary = [| typeof<OfficialArbs> |], MaxTest = 60)>]
module Properties =

    /// Train output, running buffers after the step, and eval output against the official formulas.
    [<Property>]
    let ``official semantics compute the official outputs and running buffers`` (case: OfficialCase) =
        use scope = torch.NewDisposeScope()

        let m =
            officialLayer case.Dims (int64 case.C) case.UsingBn case.MovingAverage case.Dtype

        m.Fused <- case.Fused
        randomize case.Seed m
        let x = randnSeeded (int64 case.Seed) case.Shape case.Dtype * 2.0 + case.Offset
        let xa = arr x
        let keep = if case.Dims = 2 then 0.9 else 0.997

        let rm0, rv0 =
            (if case.UsingBn then
                 arr m.running_mean, arr m.running_var
             else
                 [||], [||])

        let t = tol case.Dtype
        // relative to the data's scale: the official formulas in float32 lose digits to the offset themselves
        let yTol = if case.Dtype = f64 then 1e-8 else 5e-4
        m.train ()
        let y = m.forward x
        let yRef, batch = reference case xa m None
        assertClose $"train output ({case})" yTol y (torch.tensor(yRef, dtype = f64).reshape case.Shape)

        if case.UsingBn then
            let erm, erv = OfficialReference.update case.MovingAverage keep rm0 rv0 batch
            let scale = 1.0 + case.Offset * case.Offset
            assertClose $"running_mean ({case})" (t * scale) m.running_mean (torch.tensor (erm, dtype = f64))
            assertClose $"running_var ({case})" (t * scale * 10.0) m.running_var (torch.tensor (erv, dtype = f64))
            Assert.Null(m.num_batches_tracked)

        m.eval ()
        let ye = m.forward x

        let bn =
            if case.UsingBn then
                Some(arr m.running_mean, arr m.running_var)
            else
                None

        let yeRef, _ = reference case xa m bn
        assertClose $"eval output ({case})" yTol ye (torch.tensor(yeRef, dtype = f64).reshape case.Shape)

    /// The row path's hand-written backward under official semantics equals autograd through the float64 composition.
    [<Property>]
    let ``official gradients agree between the row path and the composition`` (case: OfficialCase) =
        use scope = torch.NewDisposeScope()

        let grads (fused: bool) (dtype: torch.ScalarType) =
            let m = officialLayer case.Dims (int64 case.C) case.UsingBn case.MovingAverage dtype
            m.Fused <- fused
            randomize case.Seed m

            let x =
                (randnSeeded (int64 case.Seed) case.Shape f64 * 2.0 + 1.0).to_type(dtype).requires_grad_ ()

            let g = (randnSeeded (int64 case.Seed + 9L) case.Shape f64).to_type dtype
            m.train ()
            (m.forward x * g).sum().backward ()

            [ x.grad; m.weight.grad; m.bias.grad; m.mean_weight.grad; m.var_weight.grad ]
            |> List.map arr

        let row = grads true torch.ScalarType.Float32
        let composed = grads false f64

        List.zip row composed
        |> List.iteri (fun i (a, b) ->
            assertClose $"gradient {i} ({case})" 2e-4 (torch.tensor (a, dtype = f64)) (torch.tensor (b, dtype = f64)))

/// Central differences of the float64 composition under official semantics.
[<Theory>]
[<InlineData(1, true)>]
[<InlineData(2, true)>]
[<InlineData(2, false)>]
[<InlineData(3, true)>]
let ``official gradients match finite differences`` (dims: int, usingBn: bool) =
    use scope = torch.NewDisposeScope()

    let shape =
        match dims with
        | 1 -> [| 3L; 4L |]
        | 2 -> [| 2L; 3L; 2L; 3L |]
        | _ -> [| 2L; 2L; 2L; 2L; 1L |]

    let m = officialLayer dims shape[1] usingBn true f64
    m.Fused <- false
    randomize 7 m
    m.train ()
    let x0 = randnSeeded 11L shape f64
    let g = randnSeeded 12L shape f64

    let loss (x: torch.Tensor) =
        use _ = torch.no_grad ()
        (m.forward x * g).sum().item<float> ()

    let x = x0.clone().requires_grad_ ()
    (m.forward x * g).sum().backward ()
    let analytic = arr x.grad
    let flat = arr x0
    let h = 1e-6

    for i in 0 .. flat.Length - 1 do
        let at (d: float) =
            let v = Array.copy flat
            v[i] <- v[i] + d
            loss (torch.tensor(v, dtype = f64).reshape shape)

        let numeric = (at h - at -h) / (2.0 * h)

        if abs (numeric - analytic[i]) > 1e-6 * (1.0 + abs numeric) then
            failwith $"dx[{i}]: analytic {analytic[i]} vs numeric {numeric}"

/// Where the official code gives NaN, the call is refused with the reason, and nothing changes.
[<Fact>]
let ``official semantics refuse the inputs where the official code gives NaN`` () =
    let m2 = officialLayer 2 3L true true torch.ScalarType.Float32
    let before = m2.running_mean.clone ()

    throws<ArgumentException> (fun () -> m2.forward (torch.randn (2L, 3L, 1L, 1L)) |> box) [
        "more than one value per (n, c) row"
        "[2, 3, 1, 1]"
    ]

    Assert.True(exactEq before m2.running_mean)
    let m1 = officialLayer 1 3L true true torch.ScalarType.Float32
    throws<ArgumentException> (fun () -> m1.forward (torch.randn (1L, 3L)) |> box) [ "more than one value per channel" ]
    throws<ArgumentException> (fun () -> m1.forward (torch.randn (4L, 3L, 2L)) |> box) [ "2-D (N, C)" ]
    let m1c = officialLayer 1 1L false true torch.ScalarType.Float32
    throws<ArgumentException> (fun () -> m1c.forward (torch.randn (4L, 1L)) |> box) [ "more than one value per sample" ]

/// The official modules' defaults and key sets.
[<Fact>]
let ``official modules have the official parameters, buffers and default momenta`` () =
    let keys (m: torch.nn.Module) =
        [ for kv in m.state_dict () -> kv.Key ] |> List.sort

    let m2 = officialLayer 2 4L true true torch.ScalarType.Float32
    Assert.Equal<string list>([ "bias"; "mean_weight"; "running_mean"; "running_var"; "var_weight"; "weight" ], keys m2)
    Assert.Equal(1.0 - 0.9, m2.momentum.Value)
    Assert.Equal(1.0 - 0.997, (officialLayer 1 4L true true torch.ScalarType.Float32).momentum.Value)
    Assert.Equal(1.0 - 0.997, (officialLayer 3 4L true true torch.ScalarType.Float32).momentum.Value)
    Assert.Equal(2L, (officialLayer 1 4L true true torch.ScalarType.Float32).mean_weight.shape[0])
    Assert.Equal(1L, (officialLayer 1 4L false true torch.ScalarType.Float32).mean_weight.shape[0])
    Assert.Equal(2L, (officialLayer 2 4L false true torch.ScalarType.Float32).mean_weight.shape[0])
    Assert.False((officialLayer 2 4L true false torch.ScalarType.Float32).using_moving_average)
    // the plain constructor with Semantics.Official takes the momentum it is given (BatchNorm's meaning, default 0.1)
    let plain = new SwitchNorm3d(4L, semantics = Semantics.Official)
    Assert.Equal(0.1, plain.momentum.Value)
    Assert.Equal(Semantics.Official, plain.semantics)
    throws<ArgumentOutOfRangeException> (fun () -> SwitchNorm2d.Official(4L, momentum = 1.5) |> box) [ "keep factor"; "1.5" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(4L, semantics = enum<Semantics> 7) |> box) [ "semantics"; "7" ]
