/// The property suite: invariants of Switchable Normalization over generated shapes (1d, 2d and 3d inputs, batch,
/// channel and spatial sizes including 1), inputs (normal, large offsets, tiny scales, constant channels),
/// mixing logits (random, extreme, equal, one-hot), dtypes and module options. Each property is a plain function
/// returning unit (it throws with the failing comparison), run by both runners in Properties.fs.
module PropertySuite

open System
open FsCheck
open FsCheck.FSharp
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil
open Generators

let f64 = torch.ScalarType.Float64
let f32 = torch.ScalarType.Float32


/// The input of a case at a given step, in float64 (cast it for other dtypes).
let input (c: Case) (step: int) =
    let x = randnSeeded (int64 (c.Seed * 7 + step)) c.Shape f64

    match c.Input with
    | Normal -> x
    | Offset o -> x + o
    | Tiny -> x * 1e-3
    | ConstantChannel ->
        use _ = torch.no_grad ()
        x.select(1L, 0L).fill_ (1.5) |> ignore
        x

/// A module for the case in the given dtype, with the case's logits and (when affine) weight and bias drawn
/// from the seed, so two calls build identical modules.
let moduleFor (c: Case) (dtype: torch.ScalarType) (fused: bool) : SwitchNormNd =
    let m: SwitchNormNd =
        match c.Shape.Length with
        | 2
        | 3 ->
            new SwitchNorm1d(
                c.C,
                affine = c.Affine,
                track_running_stats = c.Track,
                dtype = dtype,
                using_bn = c.UsingBn,
                last_gamma = c.LastGamma
            )
        | 4 ->
            new SwitchNorm2d(
                c.C,
                affine = c.Affine,
                track_running_stats = c.Track,
                dtype = dtype,
                using_bn = c.UsingBn,
                last_gamma = c.LastGamma
            )
        | _ ->
            new SwitchNorm3d(
                c.C,
                affine = c.Affine,
                track_running_stats = c.Track,
                dtype = dtype,
                using_bn = c.UsingBn,
                last_gamma = c.LastGamma
            )

    m.momentum <- Option.toNullable c.Momentum
    m.Fused <- fused
    use _ = torch.no_grad ()
    m.mean_weight.copy_ (torch.tensor (c.MeanLogits, dtype = f64)) |> ignore
    m.var_weight.copy_ (torch.tensor (c.VarLogits, dtype = f64)) |> ignore

    if c.Affine && not c.LastGamma then
        m.weight.copy_ (randSeeded (int64 c.Seed + 11L) [| c.C |] f64 + 0.5) |> ignore
        m.bias.copy_ (randnSeeded (int64 c.Seed + 12L) [| c.C |] f64) |> ignore

    m

/// Everything one step observes: output, gradients of sum(y · g) and buffers after the step.
type Observed = {
    Output: torch.Tensor
    Grads: (string * torch.Tensor) list
    Buffers: (string * torch.Tensor) list
}

/// One forward and backward of m on x (cast to dtype) with upstream gradient g.
let observe (m: SwitchNormNd) (dtype: torch.ScalarType) (x: torch.Tensor) (g: torch.Tensor) =
    m.zero_grad ()
    let xr = x.to_type(dtype).detach().requires_grad_ (true)
    let y = m.forward xr
    (y * g.to_type dtype).sum().backward ()

    {
        Output = y.detach().to_type f64
        Grads =
            ("x", xr.grad.to_type f64)
            :: [
                for struct (name, p) in m.named_parameters () do
                    if not (isNull p.grad) then
                        yield name, p.grad.to_type f64
            ]
        Buffers = [
            for struct (name, b) in m.named_buffers () ->
                let dt = if name = "num_batches_tracked" then b.dtype else f64
                name, b.detach().to_type(dt).clone ()
        ]
    }

/// Tolerance for a quantity of the given dtype that sums m rounded terms: the dtype's tolerance for one
/// normalized value, times √m for the random-walk growth of rounding in a sum of m terms.
let sumTol (dtype: torch.ScalarType) (m: int64) = tol dtype * sqrt (float (max 1L m))

/// Bounds for comparing with a float64 reference that mixes means as Σ w·mean: rMax, the largest
/// 1/sqrt(var + eps) any mixed statistic can reach (variances are at least the smallest per-(n, c) variance of x,
/// since LN and BN variances are at least their mean, or the smallest running variance used in eval), and the
/// reference's own rounding of the mixed mean, about u·max|x| per mean, as it reaches the output through r.
let referenceBounds (c: Case) (x: torch.Tensor) (runningVar: torch.Tensor option) =
    let minInstance =
        x.reshape(c.N, c.C, -1L).var(2L, unbiased = false).min().item<float> ()

    let minRunning =
        match runningVar with
        | Some v -> v.min().item<float> ()
        | None -> infinity

    let rMax = 1.0 / sqrt (1e-5 + max 0.0 (min minInstance minRunning))
    rMax, 4.0 * 1.1e-16 * x.abs().max().item<float> () * rMax

/// Compares two observations. Gradient entries are sums whose terms can cancel, and each term carries the
/// factor r = 1/sqrt(var + eps) ≤ rMax of the normalization, so gradient errors are bounded relative to
/// max(1, the largest entry, rMax) rather than to each entry.
let compareObserved (what: string) (atolOut: float) (atolGrad: float) (rMax: float) (a: Observed) (b: Observed) =
    assertClose $"{what}: output" atolOut a.Output b.Output

    for ((na, ga), (nb, gb)) in List.zip a.Grads b.Grads do
        if na <> nb then
            failwith $"{what}: gradient lists differ ({na} vs {nb})"

        let largest =
            if gb.numel () = 0L then
                0.0
            else
                gb.abs().max().item<float> ()

        assertClose $"{what}: grad {na}" (atolGrad * max 1.0 (max largest rMax)) ga gb

    for ((na, ba), (_, bb)) in List.zip a.Buffers b.Buffers do
        assertClose $"{what}: buffer {na}" atolOut ba bb

/// Two training steps of a module built for the case, returning the module and what each step observed.
/// Inputs are rounded to inputDtype first, so paths in different dtypes see the same values.
let train (c: Case) (dtype: torch.ScalarType) (fused: bool) (inputDtype: torch.ScalarType) =
    let rounded (t: torch.Tensor) = t.to_type(inputDtype).to_type f64
    let m = moduleFor c dtype fused
    m.train () |> ignore

    let steps = [
        for step in 1..2 ->
            let g = randnSeeded (int64 (c.Seed + 100 * step)) c.Shape f64
            observe m dtype (rounded (input c step)) (rounded g)
    ]

    m, steps

/// One eval step of a trained module on the case's third input.
let evalStep (c: Case) (m: SwitchNormNd) (dtype: torch.ScalarType) (inputDtype: torch.ScalarType) =
    let rounded (t: torch.Tensor) = t.to_type(inputDtype).to_type f64
    m.eval () |> ignore
    let g = randnSeeded (int64 c.Seed + 999L) c.Shape f64
    observe m dtype (rounded (input c 3)) (rounded g)

/// The default (fused) path equals the plain composition differentiated by autograd (the reference path):
/// outputs, every gradient and every buffer, over two training steps and one eval step. In float64 both run in
/// float64; in float32 the fused row kernels are compared with the composition in float64 on the same
/// (float32-rounded) inputs.
let fusedEqualsComposed (dtype: torch.ScalarType) (c: Case) =
    let mf, fusedSteps = train c dtype true dtype
    let mr, referenceSteps = train c f64 false dtype
    // Eval from the same state: the fused module's buffers, already compared, are given to the reference.
    (use _ = torch.no_grad ()

     for struct (name, b) in mf.named_buffers () do
         mr.get_buffer(name).copy_ (b) |> ignore)

    let fused = fusedSteps @ [ evalStep c mf dtype dtype ]
    let reference = referenceSteps @ [ evalStep c mr f64 dtype ]
    let total = c.Shape |> Array.fold (*) 1L

    for (i, (a, b)) in List.indexed (List.zip fused reference) do
        let running =
            b.Buffers |> List.tryFind (fun (n, _) -> n = "running_var") |> Option.map snd

        let rMax, mixingError = referenceBounds c (input c (i + 1)) running
        compareObserved $"step {i + 1}" (tol dtype + mixingError) (sumTol dtype total) rMax a b

let private values (t: torch.Tensor) =
    t.detach().contiguous().to_type(f64).data<float>().ToArray()

/// The case's input flattened to (N, C, S) for the array reference.
let private refInput (c: Case) (x: torch.Tensor) : Reference.Input = {
    N = int c.N
    C = int c.C
    S = int c.Spatial
    X = values x
}

/// The module's weight and bias as arrays: 1 and 0 when it is not affine.
let private affineValues (c: Case) (m: SwitchNormNd) =
    if c.Affine then
        values m.weight, values m.bias
    else
        Array.create (int c.C) 1.0, Array.zeroCreate (int c.C)

/// Outputs agree with the plain-F# float64 reference (no TorchSharp) in training (batch statistics) and in
/// eval (BN from the running statistics, which must equal the reference's closed form after one step).
/// float64 within 1e-10; float32 within its tolerance on the same float32-rounded input.
let referenceAgreement (dtype: torch.ScalarType) (c: Case) =
    let m = moduleFor c dtype true
    let x = (input c 1).to_type(dtype).to_type f64

    let w, b = affineValues c m

    let y = m.forward (x.to_type dtype)

    let yRef, batch =
        Reference.forward (refInput c x) w b c.MeanLogits c.VarLogits 1e-5 c.UsingBn None

    let _, mixingError = referenceBounds c x None
    assertClose "train output vs reference" (tol dtype + mixingError) (y.reshape (-1L)) (torch.tensor (yRef, dtype = f64))

    if c.Track && c.UsingBn then
        // BatchNorm's update after one step from mean 0, var 1: f·batch + (1 − f)·initial, unbiased variance.
        let f = defaultArg c.Momentum 1.0
        let cnt = float (c.N * c.Spatial)
        let rm = batch |> Array.map (fun (mu, _) -> f * mu)
        let rv = batch |> Array.map (fun (_, v) -> f * v * cnt / (cnt - 1.0) + (1.0 - f))
        assertClose "running_mean vs reference" (tol dtype) m.running_mean (torch.tensor (rm, dtype = f64))
        assertClose "running_var vs reference" (tol dtype) m.running_var (torch.tensor (rv, dtype = f64))
        m.eval () |> ignore
        let x2 = (input c 2).to_type(dtype).to_type f64
        let y2 = m.forward (x2.to_type dtype)

        let yRef2, _ =
            Reference.forward
                (refInput c x2)
                w
                b
                c.MeanLogits
                c.VarLogits
                1e-5
                c.UsingBn
                (Some(values m.running_mean, values m.running_var))

        let _, mixingError2 = referenceBounds c x2 (Some(m.running_var.to_type f64))
        assertClose "eval output vs reference" (tol dtype + mixingError2) (y2.reshape (-1L)) (torch.tensor (yRef2, dtype = f64))

/// When no statistic spans samples (eval with running statistics, or no BN), the float32 layer normalizes sample by
/// sample while each sample is in cache, with a graph (the kernel function builds its backward's plan from that pass)
/// or without one; both give bitwise the same output. Their values and gradients are checked against the references
/// by the properties above (their eval steps run with a graph).
let evalSameWithAndWithoutGraph (c: Case) =
    let m = moduleFor c f32 true
    // one training step, so the running statistics are not the initial ones
    m.forward ((input c 1).to_type f32) |> ignore
    let x = (input c 2).to_type f32

    let check what =
        let withGraph = (m.forward (x.detach().requires_grad_ true)).detach ()

        let noGraph =
            use _ = torch.no_grad ()
            m.forward x

        if not (exactEq noGraph withGraph) then
            failwith $"{what}: the no-graph output differs from the output with a graph by {maxAbsDiff noGraph withGraph}"

    m.eval () |> ignore
    check "eval"

    if not c.UsingBn then
        m.train () |> ignore
        check "training without BN"

/// Gradients of sum(y · g) for weight, bias and both logit vectors, and for three input coordinates, agree with
/// central differences of the float64 array reference within 1e-5 relative, with steps chosen so the quotient's
/// truncation and rounding errors both stay far below that: h = 1e-4 for the O(1) parameters, and for inputs
/// 1e-3 of the smallest statistic's scale.
let referenceGradients (c: Case) =
    let m = moduleFor c f64 true
    let x = input c 1

    let g = randnSeeded (int64 c.Seed + 5L) c.Shape f64

    let gv = values g

    let w0, b0 = affineValues c m

    let xr = x.detach().requires_grad_ (true)
    (m.forward xr * g).sum().backward ()
    let ri = refInput c x

    let lossOf (ri: Reference.Input) w b lm lv =
        let y, _ = Reference.forward ri w b lm lv 1e-5 c.UsingBn None
        Array.fold2 (fun acc a b -> acc + a * b) 0.0 y gv

    // The reference's loss carries rounding of about Σ|g|·(its mixing error); a central difference with step h
    // divides that by h.
    let rMax, mixingError = referenceBounds c x None
    let lossNoise = (gv |> Array.sumBy abs) * mixingError

    let check what (h: float) (autograd: float[]) (fd: float[]) =
        for i in 0 .. fd.Length - 1 do
            let bound = 1e-5 * max 1.0 (abs fd[i]) + 2.0 * lossNoise / h

            if Double.IsNaN autograd[i] || abs (autograd[i] - fd[i]) > bound then
                failwith $"{what}[{i}]: autograd {autograd[i]:g} vs finite difference {fd[i]:g} (bound {bound:g})"

    let h = 1e-4
    // Inputs: a step of 1e-3 of the smallest statistic's scale sqrt(var + eps) = 1/rMax, where the loss curves
    // most, so the truncation error is about (1e-3)² relative.
    let hx = 1e-3 / rMax

    check "mean_weight" h (values m.mean_weight.grad) (Reference.gradFD (fun l -> lossOf ri w0 b0 l c.VarLogits) c.MeanLogits h)
    check "var_weight" h (values m.var_weight.grad) (Reference.gradFD (fun l -> lossOf ri w0 b0 c.MeanLogits l) c.VarLogits h)

    if c.Affine then
        check "weight" h (values m.weight.grad) (Reference.gradFD (fun w -> lossOf ri w b0 c.MeanLogits c.VarLogits) w0 h)
        check "bias" h (values m.bias.grad) (Reference.gradFD (fun b -> lossOf ri w0 b c.MeanLogits c.VarLogits) b0 h)

    let gx = values xr.grad
    let rnd = Random(c.Seed)

    for _ in 1..3 do
        let j = rnd.Next(ri.X.Length)

        let fd =
            Reference.gradFD
                (fun v ->
                    let xs = Array.copy ri.X
                    xs[j] <- v[0]
                    lossOf { ri with X = xs } w0 b0 c.MeanLogits c.VarLogits)
                [| ri.X[j] |]
                hx

        check $"x (flat index {j})" hx [| gx[j] |] fd

/// A one-hot case on component hot with weight 1, bias 0, in float64.
let private oneHotModule (c: Case) (hot: int) =
    let k = if c.UsingBn then 3 else 2
    let l = Array.init k (fun i -> if i = hot then 0.0 else -1e4)

    moduleFor
        {
            c with
                MeanLogits = l
                VarLogits = l
                Affine = false
        }
        f64
        true

/// With weight 1 and bias 0, a one-component output has mean 0 and biased variance v/(v + eps) over each group
/// of that component: per (n, c) for IN, per n for LN, per c for BN, where v is the group's variance.
let normalizedSlices (c: Case) =
    let x = input c 1
    let n, ch = c.N, c.C
    let x3 = x.reshape (n, ch, -1L)

    let groups = [
        0, (fun (t: torch.Tensor) -> t.reshape (n * ch, -1L)), c.Spatial > 1L
        1, (fun (t: torch.Tensor) -> t.reshape (n, -1L)), ch * c.Spatial > 1L
        if c.UsingBn then
            2, (fun (t: torch.Tensor) -> t.transpose(0L, 1L).reshape (ch, -1L)), true
    ]

    for (hot, group, meaningful) in groups do
        if meaningful then
            let m = oneHotModule c hot
            let y = group ((m.forward x).reshape (n, ch, -1L))
            let v = (group x3).var (1L, unbiased = false)
            assertClose $"component {hot}: group means" 1e-9 (y.mean [| 1L |]) (torch.zeros_like v)
            assertClose $"component {hot}: group variances" 1e-9 (y.var (1L, unbiased = false)) (v / (v + 1e-5))

/// Scaling the input by s > 0 is the same as dividing eps by s²: SN_eps(s·x) = SN_(eps/s²)(x) exactly in real
/// arithmetic, since every statistic's mean scales by s and its variance by s². So the output changes only
/// through eps, by at most |x̂|·|1 − sqrt((σ² + eps)/(σ² + eps/s²))| per element.
let scalingIsEps (c: Case) (scaleIndex: int) =
    let s = 0.25 * float (1 + abs (scaleIndex % 32))
    let x = input c 1
    let m = moduleFor c f64 true
    let yScaled = m.forward (x * s)
    let m2 = moduleFor c f64 true
    let spec = NormSpec.Create(c.UsingBn, 1e-5 / (s * s), Option.toNullable c.Momentum)

    let p = {
        Weight = if c.Affine then Some(m2.weight :> torch.Tensor) else None
        Bias = if c.Affine then Some(m2.bias :> torch.Tensor) else None
        MeanLogits = m2.mean_weight
        VarLogits = m2.var_weight
    }

    let running =
        if c.Track then
            Some {
                Mean = m2.running_mean
                Var = m2.running_var
                BatchesTracked = 0L
            }
        else
            None

    let y = (Functional.forward spec p running Mode.Train x).Output
    assertClose $"scale {s}" 1e-9 yScaled y

/// In training, permuting the batch permutes the output, and adding a constant leaves it unchanged.
let batchSymmetries (c: Case) =
    let x = input c 1

    let perm = randpermSeeded (int64 c.Seed) c.N

    let m = moduleFor { c with Track = false } f64 true
    assertClose "batch permutation" 1e-10 (m.forward (x.index_select (0L, perm))) ((m.forward x).index_select (0L, perm))
    let shift = if c.Input = ConstantChannel then 0.0 else 37.25
    assertClose "translation" 1e-8 (m.forward (x + shift)) (m.forward x)

/// With BN as the only component, eval with the running statistics set to the batch's biased statistics gives
/// the training output; eval leaves every buffer unchanged; without running statistics there are no buffers
/// and eval uses the batch, as training does.
let trainEvalConsistency (c: Case) =
    if c.UsingBn then
        let x = input c 1
        let m = oneHotModule c 2
        let yTrain = m.forward x
        let x3 = x.reshape(c.N, c.C, -1L).transpose(0L, 1L).reshape (c.C, -1L)

        if c.Track then
            use _ = torch.no_grad ()
            m.running_mean.copy_ (x3.mean [| 1L |]) |> ignore
            m.running_var.copy_ (x3.var (1L, unbiased = false)) |> ignore

        m.eval () |> ignore
        let before = [ for struct (n, b) in m.named_buffers () -> n, b.clone () ]
        let yEval = m.forward x
        assertClose "eval with batch statistics vs train" 1e-9 yEval yTrain

        for (n, b) in before do
            if not (exactEq (m.get_buffer n) b) then
                failwith $"eval changed buffer {n}"

        if not c.Track && not (Seq.isEmpty (m.named_buffers ())) then
            failwith "a module without running statistics has buffers"

/// After k training steps the running statistics equal the closed form of BatchNorm's average of the batch
/// statistics: r_k = (1 − f)·r_(k−1) + f·b_k with f = momentum, or f = 1/k (the cumulative mean) when momentum
/// is null; the variance uses the unbiased batch variance.
let runningClosedForm (c: Case) (steps: PositiveInt) =
    if c.UsingBn && c.Track then
        let k = 1 + steps.Get % 4
        let m = moduleFor c f64 true
        let mutable rm = Array.zeroCreate (int c.C)
        let mutable rv = Array.create (int c.C) 1.0

        for step in 1..k do
            let x = input c step
            m.forward x |> ignore
            let x3 = x.reshape(c.N, c.C, -1L).transpose(0L, 1L).reshape (c.C, -1L)
            let f = defaultArg c.Momentum (1.0 / float step)
            let bm = values (x3.mean [| 1L |])
            let bv = values (x3.var (1L, unbiased = true))
            rm <- Array.map2 (fun r b -> (1.0 - f) * r + f * b) rm bm
            rv <- Array.map2 (fun r b -> (1.0 - f) * r + f * b) rv bv

        assertClose "running_mean" 1e-10 m.running_mean (torch.tensor (rm, dtype = f64))
        assertClose "running_var" 1e-10 m.running_var (torch.tensor (rv, dtype = f64))

        if m.num_batches_tracked.item<int64> () <> int64 k then
            failwith $"num_batches_tracked {m.num_batches_tracked.item<int64> ()} after {k} steps"

/// Moment merging is commutative and associative, and merging the moments of any split of a batch (into three
/// parts, sizes 1 and up) equals the moments of the whole batch.
let mergeLaws (c: Case) (cut1: PositiveInt) (cut2: PositiveInt) =
    let x = input c 1
    let rows = x.reshape(c.N, c.C, -1L).transpose(0L, 1L).reshape (1L, c.C, -1L)
    let len = rows.shape[2]

    if len >= 3L then
        let a = 1L + int64 cut1.Get % (len - 2L)
        let b = a + 1L + int64 cut2.Get % (len - a - 1L)

        let part lo hi =
            Moments.ofRows (rows.narrow (2L, lo, hi - lo))

        let p1, p2, p3 = part 0L a, part a b, part b len
        let whole = Moments.ofRows rows

        let same what (m: Moments) (r: Moments) =
            if m.Count <> r.Count then
                failwith $"{what}: count {m.Count} vs {r.Count}"

            assertClose $"{what}: mean" 1e-10 m.Mean r.Mean
            assertClose $"{what}: M2" 1e-9 m.M2 r.M2

        same "split vs whole" (Moments.merge (Moments.merge p1 p2) p3) whole
        same "associative" (Moments.merge (Moments.merge p1 p2) p3) (Moments.merge p1 (Moments.merge p2 p3))
        same "commutative" (Moments.merge p1 p2) (Moments.merge p2 p1)

/// Gradients of weight, bias, mean_weight and var_weight are finite, not all zero for random logits on a
/// non-degenerate input, and each logit vector's gradient sums to zero (softmax is invariant to a common shift).
let gradientFlow (c: Case) =
    let m = moduleFor { c with LastGamma = false } f64 true
    let x = input c 1

    let g = randnSeeded (int64 c.Seed + 3L) c.Shape f64

    (m.forward x * g).sum().backward ()

    for struct (name, p) in m.named_parameters () do
        let v = values p.grad

        if v |> Array.exists (fun a -> Double.IsNaN a || Double.IsInfinity a) then
            failwith $"{name}: non-finite gradient"

    for l in [ m.mean_weight; m.var_weight ] do
        let v = values l.grad
        let scale = 1.0 + (v |> Array.sumBy abs)

        if abs (Array.sum v) > 1e-10 * scale then
            failwith $"logit gradient sums to {Array.sum v:g}, not 0"

    let randomLogits (l: float[]) =
        l |> Array.forall (fun v -> abs v < 5.0) && Array.distinct l |> Array.length > 1

    if
        c.Input = Normal
        && c.Spatial > 1L
        && c.N > 1L
        && c.C > 1L
        && randomLogits c.MeanLogits
        && randomLogits c.VarLogits
    then
        for struct (name, p) in m.named_parameters () do
            if values p.grad |> Array.forall (fun a -> a = 0.0) then
                failwith $"{name}: all-zero gradient"

/// N × spatial = 1 in training with BN is refused with a message naming the shape, and changes nothing;
/// with using_bn false the same input normalizes.
let singleValueRefused (c: Case) =
    let shape = Array.append [| 1L; c.C |] (Array.create (c.Shape.Length - 2) 1L)

    let x = randnSeeded (int64 c.Seed) shape f64

    let m =
        moduleFor
            {
                c with
                    UsingBn = true
                    MeanLogits = [| 1.0; 1.0; 1.0 |]
                    VarLogits = [| 1.0; 1.0; 1.0 |]
            }
            f64
            true

    let before = [ for kv in m.state_dict () -> kv.Key, kv.Value.clone () ]
    throws<ArgumentException> (fun () -> box (m.forward x)) [ "more than 1 value per channel"; Checks.shapeText shape ]

    for (n, t) in before do
        if not (exactEq (m.state_dict().[n]) t) then
            failwith $"refused call changed {n}"

    let noBn =
        moduleFor
            {
                c with
                    UsingBn = false
                    MeanLogits = [| 1.0; 1.0 |]
                    VarLogits = [| 1.0; 1.0 |]
            }
            f64
            true

    let y = noBn.forward x

    if (values y) |> Array.exists Double.IsNaN then
        failwith "using_bn false: NaN output on a single-value batch"

/// float16 and bfloat16 outputs are within the dtype's rounding of the float32 output on the same (rounded)
/// input, for inputs up to 6e4 in magnitude, with no overflow.
let halfPrecision (half: torch.ScalarType) (c: Case) (big: bool) =
    let x0 = input c 1
    let x = if big then (x0 / (x0.abs().max () + 1e-3)) * 6e4 else x0
    let xh = x.to_type half
    let mh = moduleFor c half true
    let m32 = moduleFor c f32 true
    // the float32 module gets the half module's (rounded) parameters
    let sd = Collections.Generic.Dictionary<string, torch.Tensor>()

    for kv in mh.state_dict () do
        sd[kv.Key] <-
            if kv.Key = "num_batches_tracked" then
                kv.Value
            else
                kv.Value.to_type f32

    m32.load_state_dict sd |> ignore
    let yh = mh.forward xh
    let y32 = m32.forward (xh.to_type f32)
    // Where the exact output itself exceeds the dtype's range (a zero-variance statistic scales by 1/sqrt(eps)),
    // ±Inf is the correctly rounded result; everywhere else the output must be finite and close.
    let inRange = y32.abs().le (torch.tensor (torch.finfo(half).max * 0.99))
    let yIn = yh.to_type(f32).masked_select inRange
    let refIn = y32.masked_select inRange

    if not (yIn.isfinite().all().item<bool> ()) then
        failwith "half output is not finite where the float32 output is in range"

    assertClose "half vs float32" (tol half) yIn refIn

/// NaN or ±Inf in the input, at one position (n0, c0, s0), in training with every component mixed in. The policy
/// is BatchNorm's: nothing is masked. The non-finite value reaches every statistic it belongs to, so the output is
/// NaN exactly for sample n0 (its LN statistic) and, through BN, for channel c0 of every sample; everything else
/// is finite. The running statistics of channel c0 take the NaN, as BatchNorm2d's do, so a diverging run shows
/// in its buffers instead of being hidden; the other channels update normally.
let nonFiniteInput (dtype: torch.ScalarType) (c: Case) (which: int) (pos: PositiveInt) =
    if c.UsingBn && c.Track then
        let bad = [| nan; infinity; -infinity |][abs which % 3]
        let x = (input c 1).reshape (c.N, c.C, -1L)
        let total = c.N * c.C * c.Spatial
        let flat = int64 pos.Get % total
        let n0, c0 = flat / (c.C * c.Spatial), (flat / c.Spatial) % c.C
        let xb = x.clone ()
        (use _ = torch.no_grad () in xb.view(-1L)[flat] <- torch.tensor (bad, dtype = f64))
        let m = moduleFor c dtype true
        let y = (m.forward ((xb.reshape c.Shape).to_type dtype)).reshape (c.N, c.C, -1L)
        let nanAt = y.isnan().all (2L)

        for n in 0L .. c.N - 1L do
            for ch in 0L .. c.C - 1L do
                let expected = (n = n0) || (ch = c0)
                let row = y[n, ch]

                if expected && not (nanAt[n, ch].item<bool> ()) then
                    failwith $"({n}, {ch}) should be all NaN"

                if not expected && not (row.isfinite().all().item<bool> ()) then
                    failwith $"({n}, {ch}) should be finite"

        let rm = values m.running_mean

        for ch in 0 .. int c.C - 1 do
            if (int64 ch = c0) = Double.IsFinite rm[ch] then
                failwith $"running_mean[{ch}] = {rm[ch]}: only channel {c0} should be non-finite"

/// Second derivatives: with create_graph, the fused backward differentiates the composition with a graph, so a
/// gradient penalty ‖∂(y·w)/∂x‖² has the same gradients (for x, weight, bias and both logit vectors) as on the
/// composed path, in training and in eval. Second derivatives carry r³ = (var + eps)^(−3/2), so two compositions
/// that round differently differ by about u·r³: the comparison is made where every statistic's variance is at
/// least 0.01 (r ≤ 10), with the tolerance scaled by r², and skipped on near-constant inputs. In float32 the
/// composed reference itself loses about u·|x| per mixed mean, so offset inputs are compared in float64 only.
let doubleBackward (dtype: torch.ScalarType) (c: Case) (training: bool) =
    let rMax, _ = referenceBounds c (input c 1) None

    let run fused =
        let m = moduleFor c dtype fused
        (if training then m.train () else m.eval ()) |> ignore
        let x = (input c 1).to_type(dtype).detach().requires_grad_ (true)
        let w = (randnSeeded (int64 c.Seed + 21L) c.Shape f64).to_type dtype
        let y = m.forward x

        let gx =
            torch.autograd.grad ([| (y * w).sum () |], [| x |], retain_graph = true, create_graph = true)

        gx[0].square().sum().backward ()

        ("x", x.grad.to_type f64)
        :: [
            for struct (name, p) in m.named_parameters () do
                if not (isNull p.grad) then
                    yield name, p.grad.to_type f64
        ]

    let total = c.Shape |> Array.fold (*) 1L

    let offset =
        match c.Input with
        | Offset _ -> true
        | _ -> false

    if rMax <= 10.0 && not (offset && dtype <> f64) then
        for ((na, a), (nb, b)) in List.zip (run true) (run false) do
            if na <> nb then
                failwith $"gradient lists differ ({na} vs {nb})"

            let largest =
                if b.numel () = 0L then
                    0.0
                else
                    b.abs().max().item<float> ()

            assertClose $"second-order grad {na}" (sumTol dtype total * max 1.0 largest * rMax * rMax) a b


/// sparsemax over plain arrays, from its definition: τ from the largest support m with 1 + m·z(m) > Σ_{j ≤ m} z(j).
let sparsemaxReference (z: float[]) =
    let sorted = Array.sortDescending z
    let mutable cum = 0.0
    let mutable m = 0
    let mutable top = 0.0

    for j in 1 .. sorted.Length do
        cum <- cum + sorted[j - 1]

        if 1.0 + float j * sorted[j - 1] > cum then
            m <- j
            top <- cum

    let tau = (top - 1.0) / float m
    z |> Array.map (fun v -> max (v - tau) 0.0)

/// The sparse switches: sparsemax equals the array reference and lies on the simplex; sparsestmax lies on the
/// simplex at distance at least ρ·sqrt(1 − 1/K) from its centre, equals sparsemax at ρ = 0, is one-hot at ρ = 1,
/// never gives NaN (equal logits included), and both have finite gradients.
let sparseSwitches (c: SparseCase) =
    let k = c.Logits.Length
    let z = torch.tensor (c.Logits, dtype = f64)

    let onSimplex what (p: float[]) =
        if
            p |> Array.exists (fun v -> Double.IsNaN v || v < 0.0)
            || abs (Array.sum p - 1.0) > 1e-12 * float k
        then
            failwith $"{what}: %A{p} is not on the simplex"

    let sm = values (Mixing.sparsemax z)
    onSimplex "sparsemax" sm
    assertClose "sparsemax vs reference" 1e-12 (torch.tensor (sm, dtype = f64)) (torch.tensor (sparsemaxReference c.Logits, dtype = f64))
    let ss = values ((Mixing.sparsestmax c.Radius) z)
    onSimplex "sparsestmax" ss
    let r = c.Radius * sqrt (1.0 - 1.0 / float k)
    let dist = sqrt (ss |> Array.sumBy (fun p -> (p - 1.0 / float k) ** 2.0))

    if dist < r - 1e-9 then
        failwith $"sparsestmax at radius {c.Radius}: distance {dist} from the centre is below {r}"

    if c.Radius = 0.0 && ss <> sm then
        failwith $"sparsestmax at radius 0 %A{ss} differs from sparsemax %A{sm}"

    if c.Radius = 1.0 && Array.max ss < 1.0 - 1e-12 then
        failwith $"sparsestmax at radius 1 is not one-hot: %A{ss}"

    for (name, switch) in [ "sparsemax", Mixing.sparsemax; "sparsestmax", Mixing.sparsestmax c.Radius ] do
        let zr = z.detach().requires_grad_ (true)
        let w = torch.tensor (Array.init k (fun i -> float (i + 1)), dtype = f64)
        (switch zr * w).sum().backward ()

        if values zr.grad |> Array.exists (fun v -> Double.IsNaN v || Double.IsInfinity v) then
            failwith $"{name}: non-finite gradient"

/// A SwitchNorm with the sparsemax switch gives the same output and gradients on the row path (float32) and the
/// tensor path (float64), from the same float32-rounded input and logits.
let sparsemaxLayer (c: Case) =
    let x0 = (input c 1).to_type(f32).to_type f64

    let rounded (v: float[]) =
        torch.tensor(v, dtype = f64).to_type f32

    let run fused =
        let dtype = if fused then f32 else f64

        let spec = {
            NormSpec.Create(c.UsingBn, 1e-5, Option.toNullable c.Momentum) with
                Switch = Switch.Sparsemax
                Fused = fused
        }

        let x = x0.to_type(dtype).detach().requires_grad_ (true)
        let lm = (rounded c.MeanLogits).to_type(dtype).requires_grad_ (true)

        let p = {
            Weight = None
            Bias = None
            MeanLogits = lm
            VarLogits = (rounded c.VarLogits).to_type dtype
        }

        let y = (Norm.apply spec p None Mode.Train x).Output
        (y * y).sum().backward ()
        y.detach (), x.grad, lm.grad

    let y1, gx1, gl1 = run true
    let y2, gx2, gl2 = run false
    let rMax, mixingError = referenceBounds c x0 None
    // sparsemax's weights carry rounding of about u·|logit| (τ is a difference of logits), so they sum to 1 only
    // to that accuracy; the composition's Σ w·mean turns the excess into (Σw − 1)·|x|, scaled by r.
    let excess =
        abs (
            (values (Mixing.sparsemax ((rounded c.MeanLogits).to_type f64)))
            |> Array.sum
            |> fun t -> t - 1.0
        )

    let mixingError = mixingError + 2.0 * excess * x0.abs().max().item<float> () * rMax
    let total = c.Shape |> Array.fold (*) 1L

    let gradTol (g: torch.Tensor) =
        sumTol f32 total * max 1.0 (max (g.abs().max().item<float> ()) rMax)
        + mixingError * rMax

    assertClose "sparsemax layer output" (tol f32 + mixingError) y1 y2
    assertClose "sparsemax layer x gradient" (gradTol gx2) gx1 gx2
    assertClose "sparsemax layer logit gradient" (gradTol gl2) gl1 gl2
