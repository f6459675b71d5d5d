namespace SwitchNorm.FSharp

open System
open TorchSharp
open SwitchNorm

/// How a module calls the core: its name for messages, its own checks, and what it needs back.
type internal CoreOptions = {
    /// The layer's name in error messages, e.g. "SwitchNorm2d".
    Layer: string
    /// Checks made before any other (the module's rank and state checks). With Scope.Across, a refusal here is relayed
    /// to the other ranks through the collective header.
    LocalChecks: torch.Tensor -> unit
    /// Whether the core checks the dtype and device of every tensor itself (false when LocalChecks did).
    CheckTensors: bool
    /// Whether BatchMoments is wanted (the module only needs it when it recalibrates; building it costs tensors).
    WantMoments: bool
}

/// The scope's per-channel batch statistic, as both paths report it.
type internal BatchStat = {
    Count: float
    Mean: float[]
    /// Biased variance.
    Var: float[]
}

/// <summary>
/// The functional switchable normalizer (Luo et al., "Differentiable Learning-to-Normalize via Switchable
/// Normalization", ICLR 2019). Pure: tensors and running statistics in, output and new running statistics out.
/// </summary>
[<RequireQualifiedAccess>]
module Functional =

    /// The default spec of the paper: [IN; LN; BN], softmax, eps = 1e-5, momentum = 0.1, local statistics.
    let paper = NormSpec.Create(true, Defaults.Eps, Nullable Defaults.Momentum)

    /// <summary>
    /// The spec's switch applied to logits in dtype. A custom switch is checked: both paths mix means about the row
    /// mean, which equals Σ w·mean only for weights summing to 1, and the layer is only a normalizer for convex weights.
    /// </summary>
    let internal switchWeights (layer: string) (spec: NormSpec) (logits: torch.Tensor) (dtype: torch.ScalarType) =
        let w = spec.Switch.Apply(logits.to_type dtype)

        match spec.Switch with
        | Switch.Custom(name, _) ->
            let k = List.length spec.Components
            let v = TensorData.read w
            let total = Array.sum v

            if
                v.Length <> k
                || v |> Array.exists (fun a -> not (a >= 0.0))
                || abs (total - 1.0) > 1e-5
            then
                invalidArg
                    "spec"
                    $"{layer}: the switch {name} must return {k} convex weights (non-negative, summing to 1); got %A{v} (sum {total})."
        | _ -> ()

        w

    /// The number of channels C the parameters and running statistics speak for (the input's when they say nothing).
    let private channelsOf (p: NormParams) (running: RunningStats option) (x: torch.Tensor) =
        match p.Weight, running with
        | Some w, _ when w.dim () = 1L -> w.size 0
        | _, Some r when r.Mean.dim () = 1L -> r.Mean.size 0
        | _ -> x.size (if x.dim () >= 2L then 1 else 0)

    /// Every local check of one call, in the order a user meets them; raises with what was expected and what arrived.
    let private validate
        (o: CoreOptions)
        (spec: NormSpec)
        (p: NormParams)
        (running: RunningStats option)
        (batchFromInput: bool)
        (x: torch.Tensor)
        =
        let layer = o.Layer
        let k = int64 (List.length spec.Components)

        if k = 0L then
            invalidArg "spec" $"{layer}: the spec mixes no statistics."

        o.LocalChecks x

        if o.CheckTensors then
            Checks.floatingInput layer x

        let c = channelsOf p running x
        Checks.channels layer c x
        let logits = [ "mean_weight", p.MeanLogits; "var_weight", p.VarLogits ]

        let perChannel = [
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
        ]

        if o.CheckTensors then
            for (what, t) in logits @ perChannel do
                Checks.compatible layer what x t

        for (what, t) in logits do
            if t.dim () <> 1L || t.size 0 <> k then
                invalidArg
                    "p"
                    $"{layer}: {what} must have shape [{k}] (one logit per component {spec.Components |> List.map (fun c -> c.ShortName)}); got {Checks.shapeText t.shape}."

            if TensorData.read t |> Array.exists (fun v -> not (Double.IsFinite v)) then
                invalidArg "p" $"{layer}: {what} must hold finite logits; got {t.ToString(TorchSharp.TensorStringStyle.Julia)}."

        for (what, t) in perChannel do
            Checks.perChannel layer what c t

        Checks.epsInDtype layer spec.Eps (Checks.computeDtype x.dtype)

        let valuesPerChannel = if c > 0L then x.numel () / c else 0L

        if x.numel () > 0L then
            let s = x.numel () / (x.size 0 * c)
            let kinds = Statistics.kinds spec.Components batchFromInput

            // across ranks, the batch's count per channel is the global one, agreed on later: not checked here
            let perChannel =
                if spec.Scope = Scope.Local then
                    valuesPerChannel
                else
                    Int64.MaxValue

            match Statistics.estimatorProblem (Statistics.estimator spec) kinds c s perChannel with
            | Some problem -> invalidArg "input" $"{layer}: {problem} (input shape {Checks.shapeText x.shape})."
            | None -> ()

        if batchFromInput && spec.Scope = Scope.Local && valuesPerChannel = 1L then
            invalidArg
                "input"
                $"{layer}: expected more than 1 value per channel when using batch statistics (training, or no running statistics); got input shape {Checks.shapeText x.shape}, so N × spatial = {valuesPerChannel}. Use a larger batch or set using_bn = false."

        valuesPerChannel

    /// <summary>
    /// The output of an empty input (N = 0 or a spatial size 0), as BatchNorm gives it: an empty tensor of the input's
    /// shape that stays in the graph (the weight and bias get zero gradients); no statistic is computed or updated.
    /// </summary>
    let private emptyOutput (p: NormParams) (x: torch.Tensor) =
        let shape = Array.init (int (x.dim ())) (fun d -> if d = 1 then -1L else 1L)
        let y = x.clone ()

        let y =
            match p.Weight with
            | Some w -> y * w.view shape
            | None -> y

        let y =
            match p.Bias with
            | Some b -> y + b.view shape
            | None -> y

        if y.dtype = x.dtype then y else y.to_type x.dtype

    /// <summary>
    /// The one core every call goes through: checks, then (for a Scope.Across call that pools BN) the collective
    /// header, then the row path (float32 on the CPU with spec.Fused) or the tensor path, then the running update.
    /// </summary>
    let internal forwardCore
        (o: CoreOptions)
        (spec: NormSpec)
        (p: NormParams)
        (running: RunningStats option)
        (mode: Mode)
        (x: torch.Tensor)
        : NormResult =
        let training = (mode = Mode.Train)
        let batchFromInput = spec.UsesBatch && (training || running.IsNone)
        let cd = Checks.computeDtype x.dtype

        let rowOk () = spec.Fused && RowPath.applies cd x

        let agreement =
            match spec.Scope with
            | Scope.Across comm when batchFromInput ->
                // collective: a local refusal must reach the other ranks, or they would wait for ever
                let localError =
                    try
                        validate o spec p running batchFromInput x |> ignore
                        None
                    with e ->
                        Some e

                Collective.agree o.Layer comm localError x (localError.IsNone && rowOk ())
            | _ ->
                let values = validate o spec p running batchFromInput x

                {
                    Total = float values
                    RowPath = rowOk ()
                }

        let collective = spec.Scope <> Scope.Local && batchFromInput

        if x.numel () = 0L && not collective then
            {
                Output = emptyOutput p x
                Running = RunningUpdate.Unchanged
                BatchMoments = None
            }
        else

            use scope = torch.NewDisposeScope()
            // the spatial size spelled out: -1 is ambiguous for an empty shard
            let n, c = x.size 0, x.size 1

            let spatial =
                if n * c > 0L then
                    x.numel () / (n * c)
                else
                    x.shape |> Array.skip 2 |> Array.fold (*) 1L

            let x3 = x.reshape (n, c, spatial)
            let x3 = if x3.dtype = cd then x3 else x3.to_type cd
            let kinds = Statistics.kinds spec.Components batchFromInput
            let est = Statistics.estimator spec
            let runningPair = running |> Option.map (fun r -> r.Mean, r.Var)

            // the same tensor when the dtype already matches (to_type would make a new handle, a native call)
            let inCd (t: torch.Tensor) =
                if t.dtype = cd then t else t.to_type cd

            let gamma = p.Weight |> Option.map inCd |> Option.toObj
            let beta = p.Bias |> Option.map inCd |> Option.toObj

            let y3, batch =
                if agreement.RowPath then
                    let w =
                        match spec.Switch with
                        | Switch.Softmax -> {
                            Mean = p.MeanLogits
                            Var = p.VarLogits
                            SoftmaxInside = true
                          }
                        | _ -> {
                            Mean = switchWeights o.Layer spec p.MeanLogits torch.ScalarType.Float64
                            Var = switchWeights o.Layer spec p.VarLogits torch.ScalarType.Float64
                            SoftmaxInside = false
                          }

                    let y3, batch =
                        RowPath.forward spec.Scope agreement.Total est kinds runningPair spec.Eps gamma beta w x3

                    y3,
                    batch
                    |> Option.map (fun (count, mean, var) ->
                        lazy
                            {
                                Count = count
                                Mean = mean
                                Var = var
                            })
                else
                    let wMean = switchWeights o.Layer spec p.MeanLogits cd
                    let wVar = switchWeights o.Layer spec p.VarLogits cd

                    let y3, batch =
                        TensorPath.forward spec.Scope agreement.Total est kinds runningPair spec.Eps gamma beta wMean wVar x3

                    y3,
                    batch
                    |> Option.map (fun b ->
                        lazy
                            (use _ = torch.no_grad ()

                             {
                                 Count = b.Count
                                 Mean = TensorData.read b.Mean
                                 Var = TensorData.read (b.M2 / est.Divisor b.Count)
                             }))

            let y = y3.reshape (x.shape)
            let y = if y.dtype = x.dtype then y else y.to_type x.dtype

            let update =
                match running, batch with
                | Some r, Some b when training ->
                    let b = b.Force()

                    match spec.Semantics with
                    | Semantics.Official -> RunningUpdate.Updated(Statistics.officialUpdate spec.Momentum r b.Mean b.Var)
                    | _ -> RunningUpdate.Updated(Statistics.runningUpdate spec.Momentum r b.Count b.Mean b.Var)
                | _ -> RunningUpdate.Unchanged

            let batchMoments =
                batch
                |> Option.filter (fun _ -> o.WantMoments)
                |> Option.map (fun b ->
                    let b = b.Force()

                    let row (v: float[]) =
                        torch.tensor(v, dtype = torch.ScalarType.Float64).view(1L, -1L).MoveToOuterDisposeScope()

                    {
                        Count = b.Count
                        Mean = row b.Mean
                        M2 = row (b.Var |> Array.map (fun v -> v * est.Divisor b.Count))
                    })

            {
                Output = y.MoveToOuterDisposeScope()
                Running = update
                BatchMoments = batchMoments
            }

    /// <summary>
    /// Normalizes x of shape (N, C, *spatial):
    /// mean = Σₖ switch(MeanLogits)ₖ · meanₖ, var = Σₖ switch(VarLogits)ₖ · varₖ over the spec's components,
    /// y = (x − mean) / sqrt(var + eps) · weight + bias. Variances are biased. In Mode.Train (or without running
    /// statistics) BN uses the batch (of the spec's scope) and the running statistics are updated as BatchNorm updates
    /// them: running = (1 − f) · running + f · batch, with the unbiased batch variance and f = momentum, or
    /// 1 / batches_tracked when momentum is None. In Mode.Eval BN uses the running statistics; IN and LN always use x.
    /// float16/bfloat16 inputs are normalized in float32 and returned in their own dtype. An empty input gives an
    /// empty output and changes nothing, as with BatchNorm. A Scope.Across spec is collective when BN uses the batch:
    /// every rank must call it.
    /// </summary>
    /// <param name="spec">Components, switch, eps, momentum and scope.</param>
    /// <param name="p">Weight, bias and the two logit vectors.</param>
    /// <param name="running">BN running statistics, or None when they are not tracked.</param>
    /// <param name="mode">Mode.Train: BN uses and tracks the batch; Mode.Eval: BN uses the running statistics.</param>
    /// <param name="x">The input (N, C, *spatial).</param>
    /// <exception cref="T:System.ArgumentException">Bad input: rank, channels, dtype, device, sizes of the parameters
    /// or running statistics, non-finite logits, or a training batch with one value per channel when BN is mixed
    /// in.</exception>
    [<CompiledName("Forward")>]
    let forward (spec: NormSpec) (p: NormParams) (running: RunningStats option) (mode: Mode) (x: torch.Tensor) : NormResult =
        forwardCore
            {
                Layer = "SwitchNorm"
                LocalChecks = ignore
                CheckTensors = true
                WantMoments = true
            }
            spec
            p
            running
            mode
            x
