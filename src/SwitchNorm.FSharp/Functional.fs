namespace SwitchNorm

open TorchSharp

/// <summary>
/// What a switchable normalizer computes, independent of any module: the statistics it mixes, the switch
/// that turns logits into weights, eps, and the running-average momentum.
/// </summary>
type NormSpec = {
    /// The statistics to mix, in logit order (the paper: [Instance; Layer; Batch]).
    Components: Component list
    /// Logits → convex weights (the paper: softmax).
    Switch: Switch
    /// Added to the mixed variance before the square root; default 1e-5.
    Eps: float
    /// Running-average factor for the BN statistics; None means a cumulative average (BatchNorm's momentum=None).
    Momentum: float option
    /// <summary>
    /// True (the default): the fused implementation, with per-(n, c) statistics from one two-pass reduction,
    /// one affine pass for the output and a hand-written backward that keeps only x − mean and O(N·C)
    /// statistics. False: the plain composition of tensor operations differentiated by autograd, which is
    /// slower and keeps more memory, but supports higher-order gradients (create_graph).
    /// </summary>
    Fused: bool
} with

    /// True when the Batch component is mixed in.
    member this.UsesBatch = List.contains Batch this.Components

    /// The paper's spec with the given options: [IN; LN; BN] (or [IN; LN] without BN) and softmax.
    static member Create(usingBn: bool, eps: float, momentum: System.Nullable<float>) = {
        Components =
            if usingBn then
                [ Instance; Layer; Batch ]
            else
                [ Instance; Layer ]
        Switch = Mixing.softmax
        Eps = eps
        Momentum = Option.ofNullable momentum
        Fused = true
    }

/// Learnable parameters of a switchable normalizer.
type NormParams = {
    /// Per-channel scale γ [C], or None when not affine.
    Weight: torch.Tensor option
    /// Per-channel shift β [C], or None when not affine.
    Bias: torch.Tensor option
    /// Logits of the mean mixture [K].
    MeanLogits: torch.Tensor
    /// Logits of the variance mixture [K].
    VarLogits: torch.Tensor
}

/// BatchNorm-style running statistics of the BN component.
type RunningStats = {
    /// Running mean [C].
    Mean: torch.Tensor
    /// Running unbiased variance [C].
    Var: torch.Tensor
    /// How many training batches have been averaged in.
    BatchesTracked: int64
}

/// The result of one call of the functional normalizer.
type NormResult = {
    /// The normalized output, same shape and dtype as the input.
    Output: torch.Tensor
    /// The running statistics after this call (the given ones when nothing was updated).
    Running: RunningStats option
    /// The batch's per-channel moments (shape [1, C], detached) when BN used batch statistics.
    BatchMoments: Moments option
}

/// <summary>
/// The functional switchable normalizer (Luo et al., "Differentiable Learning-to-Normalize via Switchable
/// Normalization", ICLR 2019). Pure: tensors and running statistics in, output and new running statistics out.
/// </summary>
[<RequireQualifiedAccess>]
module Functional =

    /// The default spec of the paper: [IN; LN; BN], softmax, eps = 1e-5, momentum = 0.1.
    let paper = {
        Components = [ Instance; Layer; Batch ]
        Switch = Mixing.softmax
        Eps = 1e-5
        Momentum = Some 0.1
        Fused = true
    }

    /// <summary>
    /// Per-(n, c), per-n and per-c moments of x, all from one two-pass reduction over x viewed as (N, C, S).
    /// </summary>
    let private statistic (m: Moments) (comp: Component) (bnStats: unit -> torch.Tensor * torch.Tensor) =
        match comp with
        | Instance -> m.Mean, Moments.variance m
        | Layer ->
            let l = Moments.reduce 1L m
            l.Mean, Moments.variance l
        | Batch -> bnStats ()

    /// How each component's statistic is grouped in the row kernels: IN per row, LN per sample, BN per channel from
    /// the batch or, without the batch, constant (the running statistics).
    let internal kernelKinds (spec: NormSpec) (bnFromBatch: bool) =
        spec.Components
        |> List.map (fun comp ->
            match comp with
            | Instance -> PerRow
            | Layer -> PerSample
            | Batch when bnFromBatch -> PerChannel
            | Batch -> Constant)

    /// <summary>
    /// The spec's switch applied to logits in dtype. A switch other than the paper's softmax is checked: the fused
    /// paths mix means about the row mean, which equals Σ w·mean only for weights summing to 1, and the layer is only
    /// a normalizer for convex weights.
    /// </summary>
    let internal switchWeights (layer: string) (spec: NormSpec) (logits: torch.Tensor) (dtype: torch.ScalarType) =
        let w = spec.Switch(logits.to_type dtype)

        if not (Mixing.isSoftmax spec.Switch) then
            let k = List.length spec.Components
            let v = KernelNorm.read w
            let total = Array.sum v

            if
                v.Length <> k
                || v |> Array.exists (fun a -> not (a >= 0.0))
                || abs (total - 1.0) > 1e-5
            then
                invalidArg
                    "spec"
                    $"{layer}: the switch must return {k} convex weights (non-negative, summing to 1); got %A{v} (sum {total})."

        w

    /// <summary>
    /// The composed output from statistics (mean, biased variance) per component, each [N, C], [N, 1] or [1, C]:
    /// the switch's mixtures, then y = (x − mean)·scale + β as one addcmul, with scale = γ / sqrt(var + eps).
    /// </summary>
    let internal mixedOutput
        (layer: string)
        (spec: NormSpec)
        (p: NormParams)
        (cd: torch.ScalarType)
        (x3: torch.Tensor)
        (stats: (torch.Tensor * torch.Tensor) list)
        =
        let mean =
            Mixing.mix (switchWeights layer spec p.MeanLogits cd) (stats |> List.map fst)

        let var =
            Mixing.mix (switchWeights layer spec p.VarLogits cd) (stats |> List.map snd)
        // Mixing [N, C], [N, 1] and [1, C] statistics always broadcasts to [N, C].
        let invStd = ((var + spec.Eps).rsqrt ()).expand (x3.size 0, x3.size 1)

        let scale =
            match p.Weight with
            | Some w -> invStd * (w.to_type cd).view (1L, -1L)
            | None -> invStd

        let shift =
            match p.Bias with
            | Some b -> (b.to_type cd).view (1L, -1L) - mean * scale
            | None -> -(mean * scale)

        torch.addcmul (shift.unsqueeze 2L, x3, scale.unsqueeze 2L, 1.0)

    /// The running-average factor of the step that makes <c>tracked</c> batches: momentum, or 1/tracked without one.
    let private factor (spec: NormSpec) (tracked: int64) =
        match spec.Momentum with
        | Some m -> m
        | None -> 1.0 / float tracked

    /// BatchNorm's update of the running statistics from a batch's per-channel mean and unbiased variance, in float64.
    let internal runningFromArrays (spec: NormSpec) (r: RunningStats) (mean: float[]) (unbiasedVar: float[]) =
        let tracked = r.BatchesTracked + 1L
        let f = factor spec tracked

        let blend (old: torch.Tensor) (b: float[]) =
            let v = Array.map2 (fun o b -> (1.0 - f) * o + f * b) (KernelNorm.read old) b
            (KernelNorm.tensorLike old v).MoveToOuterDisposeScope()

        {
            Mean = blend r.Mean mean
            Var = blend r.Var unbiasedVar
            BatchesTracked = tracked
        }

    /// BatchNorm's update of the running statistics from a batch's per-channel moments, in the statistics' dtype.
    let internal runningFromMoments (spec: NormSpec) (r: RunningStats) (b: Moments) =
        use _ = torch.no_grad ()
        let tracked = r.BatchesTracked + 1L
        let f = factor spec tracked
        let bMean = b.Mean.detach().view(-1L).to_type r.Mean.dtype
        let bVar = (Moments.unbiasedVariance b).detach().view(-1L).to_type r.Var.dtype
        let m' = r.Mean * (1.0 - f) + bMean * f
        let v' = r.Var * (1.0 - f) + bVar * f

        {
            Mean = m'.MoveToOuterDisposeScope()
            Var = v'.MoveToOuterDisposeScope()
            BatchesTracked = tracked
        }

    /// <summary>
    /// The row-kernel output of x3c (N, C, S): through the autograd function when a gradient is needed, directly
    /// otherwise. wMean and wVar are the logits when softmaxInside, else float64 weights.
    /// </summary>
    let internal kernelOutput
        (x3c: torch.Tensor)
        (gamma: torch.Tensor)
        (beta: torch.Tensor)
        (wMean: torch.Tensor)
        (wVar: torch.Tensor)
        (plan: KernelPlan)
        (softmaxInside: bool)
        =
        let needsGraph =
            torch.is_grad_enabled ()
            && [ x3c; gamma; beta; wMean; wVar ]
               |> List.exists (fun t -> not (isNull t) && t.requires_grad)

        if needsGraph then
            torch.autograd.SingleTensorFunction<SwitchNormKernelFunction>
                .apply (box x3c, box gamma, box beta, box wMean, box wVar, box plan, box softmaxInside)
        else
            let read (t: torch.Tensor) =
                if isNull t then None else Some(KernelNorm.read t)

            let weights (t: torch.Tensor) =
                if softmaxInside then
                    KernelNorm.softmax (KernelNorm.read t)
                else
                    KernelNorm.read t

            KernelNorm.output x3c plan (read gamma) (read beta) (weights wMean) (weights wVar)

    /// The functional normalizer; with checkTensors false, the dtype and device checks of every tensor are skipped
    /// (the module has made them); with wantMoments false, BatchMoments is None (the module only needs the batch's
    /// moments when it recalibrates, and building them costs tensor allocations on every training call).
    let internal forwardCore
        (checkTensors: bool)
        (wantMoments: bool)
        (layer: string)
        (spec: NormSpec)
        (p: NormParams)
        (running: RunningStats option)
        (training: bool)
        (x: torch.Tensor)
        : NormResult =
        let k = int64 (List.length spec.Components)

        if k = 0L then
            invalidArg "spec" $"{layer}: the spec mixes no statistics."

        if checkTensors then
            Checks.floatingInput layer x

        let numFeatures =
            match p.Weight with
            | Some w -> w.size 0
            | None ->
                match running with
                | Some r -> r.Mean.size 0
                | None -> x.size (if x.dim () >= 2L then 1 else 0)

        Checks.channels layer numFeatures x

        // the module checked these already (SwitchNormNd.CheckState)
        if checkTensors then
            for (what, t) in
                [
                    yield "mean_weight", p.MeanLogits
                    yield "var_weight", p.VarLogits
                    match p.Weight with
                    | Some w -> yield "weight", w
                    | None -> ()
                    match p.Bias with
                    | Some b -> yield "bias", b
                    | None -> ()
                    match running with
                    | Some r ->
                        yield "running_mean", r.Mean
                        yield "running_var", r.Var
                    | None -> ()
                ] do
                Checks.compatible layer what x t

        for (what, t) in [ "mean_weight", p.MeanLogits; "var_weight", p.VarLogits ] do
            if t.dim () <> 1L || t.size 0 <> k then
                invalidArg
                    "p"
                    $"{layer}: {what} must have shape [{k}] (one logit per component {spec.Components |> List.map (fun c -> c.ShortName)}); got {Checks.shapeText t.shape}."

        let n = x.size 0
        let valuesPerChannel = x.numel () / numFeatures
        let bnFromBatch = spec.UsesBatch && (training || running.IsNone)

        if bnFromBatch && valuesPerChannel <= 1L then
            invalidArg
                "input"
                $"{layer}: expected more than 1 value per channel when using batch statistics (training, or no running statistics); got input shape {Checks.shapeText x.shape}, so N × spatial = {valuesPerChannel}. Use a larger batch or set using_bn = false."

        use scope = torch.NewDisposeScope()
        let origDtype = x.dtype

        let cd = Checks.computeDtype origDtype

        let x3 = x.reshape (n, numFeatures, -1L)
        let x3 = if x3.dtype = cd then x3 else x3.to_type cd

        let switched (logits: torch.Tensor) (dtype: torch.ScalarType) = switchWeights layer spec logits dtype

        let composed () =
            let inst = Moments.ofRows x3

            let bnMoments = if bnFromBatch then Some(Moments.reduce 0L inst) else None

            let bnStats () =
                match bnMoments, running with
                | Some b, _ -> b.Mean, Moments.variance b
                | None, Some r -> (r.Mean.to_type cd).view (1L, -1L), (r.Var.to_type cd).view (1L, -1L)
                | None, None -> invalidOp "unreachable: BN without batch or running statistics"

            let stats = spec.Components |> List.map (fun comp -> statistic inst comp bnStats)
            mixedOutput layer spec p cd x3 stats, bnMoments, None

        // the same tensor when the dtype already matches (to_type would make a new handle, a native call)
        let inCd (t: torch.Tensor) =
            if t.dtype = cd then t else t.to_type cd

        let gamma = p.Weight |> Option.map inCd |> Option.toObj
        let beta = p.Bias |> Option.map inCd |> Option.toObj

        let needsGraph (ts: torch.Tensor list) =
            torch.is_grad_enabled ()
            && (x3 :: gamma :: beta :: ts)
               |> List.exists (fun t -> not (isNull t) && t.requires_grad)

        let kernel () =
            let x3c = if x3.is_contiguous () then x3 else x3.contiguous ()

            let kinds = kernelKinds spec bnFromBatch

            // The paper's softmax is applied inside, in float64; any other switch is applied here, in float64.
            let softmaxInside = Mixing.isSoftmax spec.Switch

            let wMean, wVar =
                if softmaxInside then
                    p.MeanLogits, p.VarLogits
                else
                    switched p.MeanLogits torch.ScalarType.Float64, switched p.VarLogits torch.ScalarType.Float64

            if not bnFromBatch then
                // no statistic spans samples: sample by sample, while each is in cache
                let running = running |> Option.map (fun r -> r.Mean, r.Var)

                if needsGraph [ wMean; wVar ] then
                    // the kernel function's forward does the same, and builds the backward's plan from its moments
                    let deferred = {
                        Kinds = kinds
                        Running = running
                        Eps = spec.Eps
                    }

                    torch.autograd.SingleTensorFunction<SwitchNormKernelFunction>
                        .apply (box x3c, box gamma, box beta, box wMean, box wVar, box deferred, box softmaxInside),
                    None,
                    None
                else
                    let weights (t: torch.Tensor) =
                        if softmaxInside then
                            KernelNorm.softmax (KernelNorm.read t)
                        else
                            KernelNorm.read t

                    let read (t: torch.Tensor) =
                        if isNull t then None else Some(KernelNorm.read t)

                    KernelNorm.sampleOutput x3c kinds running spec.Eps (read gamma) (read beta) (weights wMean) (weights wVar) None,
                    None,
                    None
            else

                let st = KernelNorm.rowStats x3c

                let plan =
                    KernelNorm.plan st kinds (running |> Option.map (fun r -> r.Mean, r.Var)) spec.Eps

                // the batch's per-channel statistics, pooled once for the mixture and the running update
                let batch =
                    plan.Components
                    |> Array.tryFind (fun comp -> comp.Kind = PerChannel)
                    |> Option.map (fun comp -> comp.Count, comp.Mean, comp.Var)

                let bnMoments =
                    batch
                    |> Option.filter (fun _ -> wantMoments)
                    |> Option.map (fun (count, mean, var) ->
                        let asTensor (a: float[]) =
                            torch.tensor(Array.map float32 a).view (1L, -1L)

                        {
                            Count = count
                            Mean = asTensor mean
                            M2 = asTensor (var |> Array.map (fun v -> v * count))
                        })

                // BatchNorm's update of the running statistics, in float64 from the batch's statistics.
                let updated =
                    match running, batch with
                    | Some r, Some(count, mean, var) when training ->
                        Some(runningFromArrays spec r mean (var |> Array.map (fun v -> v * count / (count - 1.0))))
                    | _ -> None

                let y3 = kernelOutput x3c gamma beta wMean wVar plan softmaxInside

                y3, bnMoments, updated

        let fused () =
            let rowMean, centred, m2 = Fused.rowMoments x3

            let inst = {
                Count = float (x3.size 2)
                Mean = rowMean
                M2 = m2
            }

            let bnMoments = if bnFromBatch then Some(Moments.reduce 0L inst) else None

            let stats =
                spec.Components
                |> List.map (fun comp ->
                    match comp, bnMoments, running with
                    | Instance, _, _ -> PerRow, inst.Count, rowMean, Moments.variance inst
                    | Layer, _, _ ->
                        let l = Moments.reduce 1L inst
                        PerSample, l.Count, l.Mean, Moments.variance l
                    | Batch, Some b, _ -> PerChannel, b.Count, b.Mean, Moments.variance b
                    | Batch, None, Some r -> Constant, 0.0, (r.Mean.to_type cd).view (1L, -1L), (r.Var.to_type cd).view (1L, -1L)
                    | Batch, None, None -> invalidOp "unreachable: BN without batch or running statistics")
                |> Array.ofList

            let fs: FusedStats = {
                Kinds = stats |> Array.map (fun (k, _, _, _) -> k)
                Counts = stats |> Array.map (fun (_, c, _, _) -> c)
                Means = stats |> Array.map (fun (_, _, m, _) -> m)
                Vars = stats |> Array.map (fun (_, _, _, v) -> v)
                RowMean = rowMean
                Centred = centred
                Eps = spec.Eps
            }

            let wMean = switched p.MeanLogits cd
            let wVar = switched p.VarLogits cd

            let y3 =
                if needsGraph [ wMean; wVar ] then
                    torch.autograd.SingleTensorFunction<SwitchNormFunction>.apply (box x3, box gamma, box beta, box wMean, box wVar, box fs)
                else
                    use _ = torch.no_grad ()
                    let y, _, _ = Fused.outputOf fs gamma beta wMean wVar
                    y

            y3, bnMoments, None

        let y3, bnMoments, updated =
            if not spec.Fused then composed ()
            elif KernelNorm.applies x3 then kernel ()
            else fused ()

        let y = y3.view (x.shape)
        let y = if y.dtype = origDtype then y else y.to_type origDtype

        let newRunning =
            match updated, running, bnMoments with
            | Some u, _, _ -> Some u
            | None, Some r, Some b when training -> Some(runningFromMoments spec r b)
            | _ -> running

        let batchMoments =
            bnMoments
            |> Option.filter (fun _ -> wantMoments)
            |> Option.map (fun b ->
                let d = Moments.detach b

                {
                    d with
                        Mean = d.Mean.MoveToOuterDisposeScope()
                        M2 = d.M2.MoveToOuterDisposeScope()
                })

        {
            Output = y.MoveToOuterDisposeScope()
            Running = newRunning
            BatchMoments = batchMoments
        }

    /// <summary>
    /// Normalizes x of shape (N, C, *spatial):
    /// mean = Σₖ switch(MeanLogits)ₖ · meanₖ, var = Σₖ switch(VarLogits)ₖ · varₖ over the spec's components,
    /// y = (x − mean) / sqrt(var + eps) · weight + bias. Variances are biased. In training (or without running
    /// statistics) BN uses the batch and the running statistics are updated as BatchNorm updates them:
    /// running = (1 − f) · running + f · batch, with the unbiased batch variance and f = momentum, or
    /// 1 / batches_tracked when momentum is None. In eval BN uses the running statistics; IN and LN always use x.
    /// float16/bfloat16 inputs are normalized in float32 and returned in their own dtype.
    /// </summary>
    /// <param name="layer">Name used in error messages.</param>
    /// <param name="spec">Components, switch, eps and momentum.</param>
    /// <param name="p">Weight, bias and the two logit vectors.</param>
    /// <param name="running">BN running statistics, or None when they are not tracked.</param>
    /// <param name="training">Training mode: BN uses and tracks the batch.</param>
    /// <param name="x">The input (N, C, *spatial).</param>
    /// <exception cref="T:System.ArgumentException">Bad input: rank, channels, dtype, device, or a training
    /// batch with one value per channel when BN is mixed in.</exception>
    [<CompiledName("Forward")>]
    let forward
        (layer: string)
        (spec: NormSpec)
        (p: NormParams)
        (running: RunningStats option)
        (training: bool)
        (x: torch.Tensor)
        : NormResult =
        forwardCore true true layer spec p running training x
