namespace SwitchNorm

#nowarn "9" // native pointers: the kernel reads and writes tensor memory directly

open System
open System.Collections.Generic
open System.Numerics
open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open Microsoft.FSharp.NativeInterop
open TorchSharp
open SwitchNorm.Kernels
open SwitchNorm.FSharp

/// Row parallelism for the row path. The row passes themselves are in
/// SwitchNorm.Kernels (C#), because F# does not emit MethodImplOptions.AggressiveOptimization and those
/// loops must be optimized from the first call.
module internal Rows =

    /// <summary>
    /// Runs body over rows [0, rows): on the calling thread for small inputs or one libtorch thread, otherwise split
    /// across libtorch's own OpenMP team (<c>OmpRows</c>). Threads of our own would compete with that team, whose
    /// workers spin-wait after each libtorch operator: measured here (2 cores), a 0.7 ms x.clone() at 2 threads took
    /// 68 ms right after a Parallel.For over the rows, and blocking helper threads gained nothing in a network.
    /// </summary>
    let forRows (rows: int) (rowLen: int) (body: int -> int -> unit) =
        let threads =
            if OmpRows.Available && int64 rows * int64 rowLen >= 65536L then
                min rows (torch.get_num_threads ())
            else
                1

        if threads <= 1 then
            body 0 rows
        else
            OmpRows.For(rows, threads, OmpRows.RowRange(fun lo hi -> body lo hi))

/// Per-(n, c) statistics of a float32 input from the row kernels, in float64.
type internal RowStats = {
    N: int
    C: int
    S: int
    /// Each row's mean rounded to float32: the centre of every later pass over the row.
    Centre: float[]
    /// Each row's mean.
    Mean: float[]
    /// Each row's centred sum of squares.
    M2: float[]
}

/// One mixed statistic, in float64, stored once per group (row, sample or channel).
type internal RowComponent = {
    Kind: StatKind
    /// Values behind the statistic (0 for running statistics).
    Count: float
    /// The statistic's mean per group: per row (N·C), per sample (N) or per channel (C), as Kind says.
    Mean: float[]
    /// The statistic's biased variance per group, once multiplied by VarScale.
    Var: float[]
    /// 1/S for the per-row statistic, whose Var is the rows' M2 (shared with the row statistics, so no array of its
    /// own is kept for the backward); 1 for the others.
    VarScale: float
    /// The variance's divisor D (the estimator's: Count, or Count − 1 for unbiased groups), for the backward.
    VarCount: float
}

/// Everything the kernel normalizer's forward and backward share for one input.
type internal KernelPlan = {
    Stats: RowStats
    Components: RowComponent[]
    Eps: float
    /// The estimator's factor κ of the rows' M2 (1, or S/(S − 1) for unbiased rows), already applied to Stats.M2.
    Within: float
    /// The estimator, for the create_graph backward's composition.
    Estimator: Estimator
    /// For a synchronized layer: the ranks whose rows share the per-channel (BN) statistic, so the gradients
    /// reaching it are summed over them in the backward.
    Reducer: ICommunicator option
}

/// <summary>
/// For the kernel function when no statistic spans samples (eval, or no BN): its forward normalizes sample by sample
/// (<c>KernelNorm.sampleOutput</c>) and builds the backward's plan from the moments that pass computed.
/// </summary>
type internal DeferredPlan = {
    Kinds: StatKind list
    Estimator: Estimator
    Running: (torch.Tensor * torch.Tensor) option
    Eps: float
}

/// What the kernel normalizer's backward keeps besides x: O(N·C) values.
type internal KernelSaved = {
    Plan: KernelPlan
    /// Mixing weights of the mean and the variance.
    WMean: float[]
    WVar: float[]
    /// Per-channel scale, or None.
    Gamma: float[] option
    HasBias: bool
    InputNeedsGrad: bool
    /// The mixing weights are the softmax of the inputs at positions 3 and 4 (the logits), applied inside.
    SoftmaxInside: bool
    /// The dtype of the inputs at positions 3 and 4, for their gradients.
    WeightsDtype: torch.ScalarType
}

/// The fused normalizer on float32 CPU data: one kernel call per pass over the data, O(N·C) mixing in float64.
module internal KernelNorm =

    /// softmax(l) in float64, stable for any finite logits.
    let softmax (l: float[]) =
        let m = Array.max l
        let e = l |> Array.map (fun v -> exp (v - m))
        let z = Array.sum e
        e |> Array.map (fun v -> v / z)

    /// The gradient of a loss with respect to logits l, given its gradient dw with respect to w = softmax(l):
    /// w ⊙ (dw − Σ w·dw).
    let softmaxBackward (w: float[]) (dw: float[]) =
        let dot = Array.fold2 (fun acc a b -> acc + a * b) 0.0 w dw
        Array.map2 (fun wi dwi -> wi * (dwi - dot)) w dw

    /// Whether x3 (N, C, S) can go through the row kernels.
    let applies (computeDtype: torch.ScalarType) (x: torch.Tensor) =
        computeDtype = torch.ScalarType.Float32
        && x.device_type = DeviceType.CPU
        && x.numel () > 0L
        && x.numel () <= int64 Int32.MaxValue / 4L

    /// Row statistics of x3 (N, C, S) to be filled in.
    let emptyRowStats (x3: torch.Tensor) : RowStats =
        let n, c, s = int (x3.size 0), int (x3.size 1), int (x3.size 2)

        {
            N = n
            C = c
            S = s
            Centre = GC.AllocateUninitializedArray<float>(n * c)
            Mean = GC.AllocateUninitializedArray<float>(n * c)
            M2 = GC.AllocateUninitializedArray<float>(n * c)
        }

    /// Multiplies the rows' M2 in [lo, lo + count) by the estimator's κ (nothing to do for κ = 1).
    let scaleRows (kappa: float) (m2: float[]) (lo: int) (count: int) =
        if kappa <> 1.0 then
            for i in lo .. lo + count - 1 do
                m2[i] <- m2[i] * kappa

    /// Per-row mean and centred sum of squares (times the estimator's κ) of a contiguous float32 x3: a mean pass and a centred pass per
    /// row (the second one mostly from cache), corrected by the centred sum so the rounded centre costs nothing.
    let rowStats (est: Estimator) (x3: torch.Tensor) : RowStats =
        let n, c, s = int (x3.size 0), int (x3.size 1), int (x3.size 2)
        let rows = n * c
        let px = TensorData.pointer x3
        let centre = GC.AllocateUninitializedArray<float> rows
        let mean = GC.AllocateUninitializedArray<float> rows
        let m2 = GC.AllocateUninitializedArray<float> rows
        Rows.forRows rows s (fun lo hi -> RowKernels.Stats(px, s, centre, mean, m2, lo, hi))
        scaleRows (est.Within s) m2 0 rows

        {
            N = n
            C = c
            S = s
            Centre = centre
            Mean = mean
            M2 = m2
        }

    /// Pools rows per sample (bySample) or per channel by the law of total variance: count, mean and biased
    /// variance of each group.
    let private pool (st: RowStats) (bySample: bool) =
        let groups = if bySample then st.N else st.C
        let mean = Array.zeroCreate groups
        let var = Array.zeroCreate groups
        let count = RowKernels.Pool(st.N, st.C, st.S, st.Mean, st.M2, bySample, mean, var)
        count, mean, var

    /// <summary>
    /// The per-channel (BN) statistic of the scope's batch: the rows' own pooled count, mean and biased variance for
    /// Scope.Local; for Scope.Across, the global mean from an allreduce of the C per-channel sums, then the global M2
    /// about it from an allreduce of count·(var + (mean − globalMean)²) per channel (the parallel-variance formula):
    /// exactly the full batch's statistics for shards of any size, with no E[x²] − E[x]².
    /// </summary>
    let private batchStatistic (scope: Scope) (total: float) (st: RowStats) =
        let count, mean, var = pool st false

        match scope with
        | Scope.Local -> count, mean, var
        | Scope.Across comm ->
            let sums = Array.init st.C (fun i -> count * mean[i])
            comm.AllreduceSum sums
            let meanG = sums |> Array.map (fun v -> v / total)

            let m2 =
                Array.init st.C (fun i ->
                    let d = mean[i] - meanG[i]
                    count * var[i] + count * d * d)

            comm.AllreduceSum m2
            total, meanG, m2 |> Array.map (fun v -> v / total)

    /// <summary>
    /// Each component's statistic, per group, following the table (Statistics): the rows' own moments for PerRow,
    /// pooled ones for PerSample and PerChannel (over the scope's ranks), the running statistics for Constant.
    /// <paramref name="total"/> is the scope's number of values per channel.
    /// </summary>
    let plan
        (scope: Scope)
        (total: float)
        (est: Estimator)
        (st: RowStats)
        (kinds: StatKind list)
        (running: (torch.Tensor * torch.Tensor) option)
        (eps: float)
        =
        // a pooled statistic's variance by the estimator's divisor: Pool and batchStatistic divide by the count
        let pooled kind (count, mean, var: float[]) =
            let d = est.Divisor count

            {
                Kind = kind
                Count = count
                Mean = mean
                Var =
                    (if d = count then
                         var
                     else
                         var |> Array.map (fun v -> v * count / d))
                VarScale = 1.0
                VarCount = d
            }

        let comp (kind: StatKind) =
            match kind with
            | PerRow ->
                let s = float st.S

                {
                    Kind = kind
                    Count = s
                    Mean = st.Mean
                    Var = st.M2
                    VarScale = 1.0 / est.Divisor s
                    VarCount = est.Divisor s
                }
            | PerSample -> pooled kind (pool st true)
            | PerChannel -> pooled kind (batchStatistic scope total st)
            | Constant ->
                match running with
                | Some(m, v) -> {
                    Kind = kind
                    Count = 0.0
                    Mean = TensorData.read m
                    Var = TensorData.read v
                    VarScale = 1.0
                    VarCount = 0.0
                  }
                | None -> invalidOp "unreachable: constant statistics without running statistics"

        let reducer =
            match scope with
            | Scope.Across comm when List.contains PerChannel kinds -> Some comm
            | _ -> None

        {
            Stats = st
            Components = kinds |> List.map comp |> Array.ofList
            Eps = eps
            Within = est.Within st.S
            Estimator = est
            Reducer = reducer
        }

    /// Mixed mean and 1/sqrt(var + eps) per row, into mu and r (at least N·C long).
    let private mixInto (plan: KernelPlan) (wm: float[]) (wv: float[]) (mu: float[]) (r: float[]) =
        let st = plan.Stats
        let comps = plan.Components
        // μ = rowMean + Σ w·(mean − rowMean): the same as Σ w·mean for weights summing to 1, but the weights'
        // rounding only scales the (small) differences, never a large common offset.
        RowKernels.MixAll(
            st.N,
            st.C,
            comps.Length,
            comps |> Array.map (fun comp -> Statistics.group comp.Kind),
            comps |> Array.map (fun comp -> comp.Mean),
            comps |> Array.map (fun comp -> comp.Var),
            comps |> Array.map (fun comp -> comp.VarScale),
            wm,
            wv,
            st.Mean,
            plan.Eps,
            mu,
            r
        )

    /// <summary>
    /// The normalized output (N, C, S) of a contiguous float32 x3. The mixed mean and 1/std per row are temporaries
    /// from a pool (the backward recomputes them, an O(N·C) pass, rather than keep them in the graph).
    /// </summary>
    let output (x3: torch.Tensor) (plan: KernelPlan) (gamma: float[] option) (beta: float[] option) (wm: float[]) (wv: float[]) =
        let st = plan.Stats
        let rows = st.N * st.C
        let pool = Buffers.ArrayPool<float>.Shared
        let mu, r = pool.Rent rows, pool.Rent rows

        try
            mixInto plan wm wv mu r
            let y = torch.empty_like x3
            let px = TensorData.pointer x3
            let py = TensorData.pointer y
            let g, b = defaultArg gamma null, defaultArg beta null
            Rows.forRows rows st.S (fun lo hi -> RowKernels.Affine(px, py, st.C, st.S, st.Centre, r, mu, g, b, lo, hi))
            y
        finally
            pool.Return mu
            pool.Return r

    /// <summary>
    /// The output of a contiguous float32 x3 without a graph, when no statistic spans samples (per-row, per-sample
    /// and constant statistics only: eval, or no BN). Sample by sample: its rows' moments, its statistics, their
    /// mixture and its output, while the sample is still in cache; the samples are split across libtorch's threads.
    /// The same kernels, with the same per-row arithmetic, as rowStats, plan and output, so the result is bitwise
    /// that of the whole-batch path. With keep, the rows' moments are also written there (for a backward).
    /// </summary>
    let sampleOutput
        (x3: torch.Tensor)
        (est: Estimator)
        (kinds: StatKind list)
        (running: (torch.Tensor * torch.Tensor) option)
        (eps: float)
        (gamma: float[] option)
        (beta: float[] option)
        (wm: float[])
        (wv: float[])
        (keep: RowStats option)
        =
        let n, c, s = int (x3.size 0), int (x3.size 1), int (x3.size 2)
        let codes = kinds |> List.map Statistics.group |> Array.ofList

        let runMean, runVar =
            match running with
            | Some(m, v) when List.contains Constant kinds -> TensorData.read m, TensorData.read v
            | _ -> null, null

        if
            List.contains PerChannel kinds
            || (List.contains Constant kinds && isNull runMean)
        then
            invalidOp "unreachable: sampleOutput with batch statistics"

        let y = torch.empty_like x3
        let px = TensorData.pointer x3
        let py = TensorData.pointer y
        let g, b = defaultArg gamma null, defaultArg beta null
        let hasSample = List.contains PerSample kinds
        let sampleLen = c * s
        let kappa = est.Within s
        let sampleCount = float sampleLen
        let sampleScale = sampleCount / est.Divisor sampleCount
        let invRow = 1.0 / est.Divisor(float s)

        Rows.forRows n sampleLen (fun lo hi ->
            // one sample's statistics, reused from sample to sample
            let centre, mean, m2 = Array.zeroCreate c, Array.zeroCreate c, Array.zeroCreate c
            let mu, r = Array.zeroCreate c, Array.zeroCreate c
            let sampleMean, sampleVar = Array.zeroCreate 1, Array.zeroCreate 1

            for a in lo .. hi - 1 do
                let xa = NativePtr.add px (a * sampleLen)
                let ya = NativePtr.add py (a * sampleLen)
                RowKernels.Stats(xa, s, centre, mean, m2, 0, c)
                scaleRows kappa m2 0 c

                match keep with
                | Some st ->
                    // the rows' moments for a backward, which builds its plan from them
                    Array.blit centre 0 st.Centre (a * c) c
                    Array.blit mean 0 st.Mean (a * c) c
                    Array.blit m2 0 st.M2 (a * c) c
                | None -> ()

                if hasSample then
                    RowKernels.Pool(1, c, s, mean, m2, true, sampleMean, sampleVar) |> ignore
                    sampleVar[0] <- sampleVar[0] * sampleScale

                RowKernels.MixSample(
                    c,
                    codes.Length,
                    codes,
                    mean,
                    m2,
                    invRow,
                    sampleMean[0],
                    sampleVar[0],
                    runMean,
                    runVar,
                    wm,
                    wv,
                    eps,
                    mu,
                    r
                )

                RowKernels.Affine(xa, ya, c, s, centre, r, mu, g, b, 0, c))

        y

    /// Gradients of Σ grad·y with respect to x (or null), weight, bias and both mixing-weight vectors.
    let backward (x3: torch.Tensor) (grad3: torch.Tensor) (sv: KernelSaved) =
        let plan = sv.Plan
        let st = plan.Stats
        let rows = st.N * st.C
        let px = TensorData.pointer x3
        let pg = TensorData.pointer grad3
        // Per-row temporaries come from a pool: a training loop would otherwise allocate about 60 bytes per
        // (n, c) row per step for the GC to collect.
        let pool = Buffers.ArrayPool<float>.Shared
        let sumG, sumGx = pool.Rent rows, pool.Rent rows
        let dMu, dVar, gr = pool.Rent rows, pool.Rent rows, pool.Rent rows
        let q, c0 = pool.Rent rows, pool.Rent rows
        let mu, r = pool.Rent rows, pool.Rent rows

        try
            mixInto plan sv.WMean sv.WVar mu r
            Rows.forRows rows st.S (fun lo hi -> RowKernels.GradSums(pg, px, st.S, st.Centre, sumG, sumGx, lo, hi))

            let k = plan.Components.Length
            let comps = plan.Components
            let kinds = comps |> Array.map (fun comp -> Statistics.group comp.Kind)
            let means = comps |> Array.map (fun comp -> comp.Mean)
            let dGamma = Array.zeroCreate st.C
            let dBeta = Array.zeroCreate st.C
            let dwm = Array.zeroCreate k
            let dwv = Array.zeroCreate k
            // Gradients reaching each per-sample and per-channel statistic.
            let muSample, muChannel = Array.zeroCreate st.N, Array.zeroCreate st.C
            let varSample, varChannel = Array.zeroCreate st.N, Array.zeroCreate st.C

            RowKernels.GradMix(
                st.N,
                st.C,
                k,
                kinds,
                means,
                comps |> Array.map (fun comp -> comp.Var),
                comps |> Array.map (fun comp -> comp.VarScale),
                st.Mean,
                sumG,
                sumGx,
                st.Centre,
                mu,
                r,
                defaultArg sv.Gamma null,
                gr,
                dMu,
                dVar,
                dGamma,
                dBeta,
                dwm,
                dwv,
                muSample,
                muChannel,
                varSample,
                varChannel
            )

            match plan.Reducer with
            | Some comm ->
                // a synchronized BN statistic depends on every rank's rows: its gradient is the sum over the ranks
                // (collective, so done whether or not this rank's input needs a gradient)
                let both = Array.append muChannel varChannel
                comm.AllreduceSum both
                Array.blit both 0 muChannel 0 st.C
                Array.blit both st.C varChannel 0 st.C
            | None -> ()

            let dx =
                if not sv.InputNeedsGrad then
                    null
                else
                    // dx = gr·g + q·(x − centre) + c0 per row; running statistics (Constant) pass nothing on.
                    RowKernels.InputCoefficients(
                        st.N,
                        st.C,
                        k,
                        kinds,
                        comps |> Array.map (fun comp -> comp.Kind <> Constant),
                        comps |> Array.map (fun comp -> comp.Count),
                        comps |> Array.map (fun comp -> comp.VarCount),
                        plan.Within,
                        sv.WMean,
                        sv.WVar,
                        means,
                        st.Mean,
                        dMu,
                        dVar,
                        muSample,
                        muChannel,
                        varSample,
                        varChannel,
                        st.Centre,
                        q,
                        c0
                    )

                    let dx = torch.empty_like x3
                    let pd = TensorData.pointer dx
                    Rows.forRows rows st.S (fun lo hi -> RowKernels.GradInput(pg, px, pd, st.S, st.Centre, gr, q, c0, lo, hi))
                    dx

            dx, dGamma, dBeta, dwm, dwv
        finally
            for a in [ sumG; sumGx; dMu; dVar; gr; q; c0; mu; r ] do
                pool.Return a


/// The kernel normalizer as an autograd function. Inputs: x (N, C, S) contiguous float32, weight [C] or null,
/// bias [C] or null, mean and variance weights [K] in float64 (or, with the flag at position 6 set, the logits
/// whose softmax they are), and the <see cref="T:SwitchNorm.KernelPlan"/> of x, or a
/// <see cref="T:SwitchNorm.DeferredPlan"/> when the forward goes sample by sample and builds the plan itself.
/// Keeps x and O(N·C) values for the backward.
type internal SwitchNormKernelFunction() =
    inherit torch.autograd.SingleTensorFunction<SwitchNormKernelFunction>()

    override _.Name = "SwitchNormKernelBackward"

    override _.forward(ctx, vars) =
        let tensorAt = Autograd.tensorAt vars
        let x3 = tensorAt 0
        let gamma, beta, wm, wv = tensorAt 1, tensorAt 2, tensorAt 3, tensorAt 4
        let softmaxInside = vars[6] :?> bool

        let read t =
            if isNull t then None else Some(TensorData.read t)

        let weights t =
            if softmaxInside then
                KernelNorm.softmax (TensorData.read t)
            else
                TensorData.read t

        let wMean, wVar = weights wm, weights wv
        let g = read gamma

        let plan, y =
            match vars[5] with
            | :? DeferredPlan as d ->
                let st = KernelNorm.emptyRowStats x3

                let y =
                    KernelNorm.sampleOutput x3 d.Estimator d.Kinds d.Running d.Eps g (read beta) wMean wVar (Some st)

                KernelNorm.plan Scope.Local 0.0 d.Estimator st d.Kinds d.Running d.Eps, y
            | plan ->
                let plan = plan :?> KernelPlan
                plan, KernelNorm.output x3 plan g (read beta) wMean wVar

        ctx.save_for_backward (List<torch.Tensor>([ x3; gamma; beta; wm; wv ]))
        Autograd.record ctx vars

        ctx.save_data (
            "saved",
            box {
                Plan = plan
                WMean = wMean
                WVar = wVar
                Gamma = g
                HasBias = not (isNull beta)
                InputNeedsGrad = x3.requires_grad
                SoftmaxInside = softmaxInside
                WeightsDtype = wm.dtype
            }
        )

        y

    override _.backward(ctx, grad) =
        Autograd.guarded "SwitchNorm" ctx (fun () -> SwitchNormKernelFunction.Backward(ctx, grad))

    static member private Backward(ctx: torch.autograd.AutogradContext, grad: torch.Tensor) =
        GradHandOver.Release()
        use scope = torch.NewDisposeScope()
        let sv = ctx.get_data "saved" :?> KernelSaved
        let saved = ctx.get_saved_variables ()
        let x3 = saved[0]
        let st = sv.Plan.Stats

        if torch.is_grad_enabled () then
            // create_graph: differentiate the composition, with a graph, so higher derivatives are exact. A synchronized
            // layer's composition pools BN over the same ranks again (every rank runs this backward, so the collectives
            // match), over the global count the forward agreed on.
            let gamma, beta, wm, wv = saved[1], saved[2], saved[3], saved[4]

            let scope, total =
                match sv.Plan.Reducer with
                | Some comm -> Scope.Across comm, (sv.Plan.Components |> Array.find (fun c -> c.Kind = PerChannel)).Count
                | None -> Scope.Local, 0.0

            let kinds = sv.Plan.Components |> Array.map (fun c -> c.Kind) |> List.ofArray

            let constants =
                sv.Plan.Components
                |> Array.tryFind (fun c -> c.Kind = Constant)
                |> Option.map (fun c -> torch.tensor c.Mean, torch.tensor c.Var)

            let f64 = torch.ScalarType.Float64

            // the composition in float64, as the row path mixes
            let weights (t: torch.Tensor) =
                if sv.SoftmaxInside then
                    t.to_type(f64).softmax 0L
                else
                    t.to_type f64

            let in64 (t: torch.Tensor) =
                if isNull t then null else t.to_type f64

            let y, _ =
                TensorPath.forward
                    scope
                    total
                    sv.Plan.Estimator
                    kinds
                    constants
                    sv.Plan.Eps
                    (in64 gamma)
                    (in64 beta)
                    (weights wm)
                    (weights wv)
                    (x3.to_type f64)

            let g3 = grad.reshape (int64 st.N, int64 st.C, int64 st.S)

            let grads =
                Autograd.differentiableGrads [ x3; gamma; beta; wm; wv ] y (g3.to_type f64)

            GradHandOver.Keep grads
            List<torch.Tensor>(grads @ [ null; null ])
        else

            let grad3 = grad.reshape(int64 st.N, int64 st.C, int64 st.S).contiguous ()
            let dx, dGamma, dBeta, dwm, dwv = KernelNorm.backward x3 grad3 sv
            let f32 (a: float[]) = torch.tensor (Array.map float32 a)

            let weightGrad (w: float[]) (dw: float[]) =
                let d =
                    if sv.SoftmaxInside then
                        KernelNorm.softmaxBackward w dw
                    else
                        dw

                TensorData.tensorOf sv.WeightsDtype d

            let grads = [
                dx
                (if sv.Gamma.IsSome then f32 dGamma else null)
                (if sv.HasBias then f32 dBeta else null)
                weightGrad sv.WMean dwm
                weightGrad sv.WVar dwv
            ]

            GradHandOver.Keep grads
            grad.Dispose()
            // none for the plan and the softmax flag
            List<torch.Tensor>(grads @ [ null; null ])

/// The mixing weights as the row path takes them.
type internal RowWeights = {
    /// The mean logits (SoftmaxInside) or the switch's float64 mean weights.
    Mean: torch.Tensor
    /// The variance logits (SoftmaxInside) or the switch's float64 variance weights.
    Var: torch.Tensor
    /// The weights are the softmax of Mean and Var, taken in float64 by the kernels (the paper's switch).
    SoftmaxInside: bool
}

/// <summary>
/// The row path: float32 CPU inputs through the row kernels (SwitchNorm.Kernels), with a hand-written backward. Two
/// schedules of the same kernels and per-row arithmetic: when a statistic spans samples (BN from the batch), the whole
/// batch's row statistics, then the plan, then the output; otherwise sample by sample, each while it is in cache.
/// </summary>
module internal RowPath =

    /// Whether an input x whose statistics are computed in computeDtype can go through the row kernels: float32 (or a
    /// half dtype, computed in float32), on the CPU, non-empty, and small enough for 32-bit offsets.
    let applies (computeDtype: torch.ScalarType) (x: torch.Tensor) = KernelNorm.applies computeDtype x

    /// <summary>
    /// The output (N, C, S) of x3, through the kernel function when a gradient is needed and directly otherwise, and,
    /// when BN used the batch, the scope's per-channel (count, mean, biased variance).
    /// </summary>
    let forward
        (scope: Scope)
        (total: float)
        (est: Estimator)
        (kinds: StatKind list)
        (running: (torch.Tensor * torch.Tensor) option)
        (eps: float)
        (gamma: torch.Tensor)
        (beta: torch.Tensor)
        (w: RowWeights)
        (x3: torch.Tensor)
        =
        let x3c = if x3.is_contiguous () then x3 else x3.contiguous ()
        let graph = Autograd.needsGraph [ x3c; gamma; beta; w.Mean; w.Var ]

        let weights (t: torch.Tensor) =
            if w.SoftmaxInside then
                KernelNorm.softmax (TensorData.read t)
            else
                TensorData.read t

        let through (plan: obj) =
            torch.autograd.SingleTensorFunction<SwitchNormKernelFunction>
                .apply (box x3c, box gamma, box beta, box w.Mean, box w.Var, plan, box w.SoftmaxInside)

        if not (List.contains PerChannel kinds) then
            if graph then
                // the kernel function's forward goes sample by sample too, and builds the backward's plan from its moments
                through (
                    box {
                        Kinds = kinds
                        Estimator = est
                        Running = running
                        Eps = eps
                    }
                ),
                None
            else
                KernelNorm.sampleOutput
                    x3c
                    est
                    kinds
                    running
                    eps
                    (TensorData.readOption gamma)
                    (TensorData.readOption beta)
                    (weights w.Mean)
                    (weights w.Var)
                    None,
                None
        else
            let plan =
                KernelNorm.plan scope total est (KernelNorm.rowStats est x3c) kinds running eps

            let batch =
                plan.Components
                |> Array.tryFind (fun comp -> comp.Kind = PerChannel)
                |> Option.map (fun comp -> comp.Count, comp.Mean, comp.Var)

            let y3 =
                if graph then
                    through (box plan)
                else
                    KernelNorm.output x3c plan (TensorData.readOption gamma) (TensorData.readOption beta) (weights w.Mean) (weights w.Var)

            y3, batch
