namespace SwitchNorm

open System.Collections.Generic
open TorchSharp
open SwitchNorm.FSharp

/// Sums a float64 vector across ranks, differentiably: the gradient of a sum over ranks is the sum over ranks of the
/// gradients, so the backward is an allreduce too (every rank's loss depends on the shared result).
type internal AllreduceFunction() =
    inherit torch.autograd.SingleTensorFunction<AllreduceFunction>()

    override _.Name = "AllreduceSumBackward"

    override _.forward(ctx, vars) =
        let x = vars[0] :?> torch.Tensor
        let comm = vars[1] :?> ICommunicator
        let v = TensorData.read x
        comm.AllreduceSum v
        ctx.save_data ("comm", box comm)
        Autograd.record ctx vars
        torch.tensor(v, dtype = torch.ScalarType.Float64).``to`` (x.device)

    override _.backward(ctx, grad) =
        Autograd.guarded "SyncSwitchNorm" ctx (fun () ->
            GradHandOver.Release()
            let comm = ctx.get_data "comm" :?> ICommunicator
            let v = TensorData.read grad
            comm.AllreduceSum v
            let g = torch.tensor(v, dtype = torch.ScalarType.Float64).``to`` (grad.device)
            GradHandOver.Keep [ g ]
            grad.Dispose()
            List<torch.Tensor>([ g; null ]))

/// <summary>
/// The tensor path, which is also the composed reference: the normalizer as a composition of differentiable tensor
/// operations, for any dtype and device, differentiated by autograd (so twice differentiable). It serves inputs the
/// row kernels do not take, every input when the spec's Fused is false, and the row path's create_graph backward.
/// </summary>
module internal TensorPath =

    /// <summary>
    /// The BN moments [1, C] of the scope's batch from this process's per-row moments: Moments.reduce over the rows for
    /// Scope.Local; for Scope.Across, in float64, the global mean from an allreduce of the per-channel sums and the
    /// global M2 from an allreduce of Σ_rows [M2_row + S·(rowMean − mean)²] (the law of total variance), both
    /// differentiable. <paramref name="total"/> is the global number of values per channel.
    /// </summary>
    let batchMoments (scope: Scope) (total: float) (inst: Moments) : Moments =
        match scope with
        | Scope.Local -> Moments.reduce 0L inst
        | Scope.Across comm ->
            let f64 = torch.ScalarType.Float64
            let cd = inst.Mean.dtype

            let allreduce (t: torch.Tensor) =
                torch.autograd.SingleTensorFunction<AllreduceFunction>.apply (box t, box comm)

            let rowMean = inst.Mean.to_type f64
            let s = inst.Count
            let mean64 = allreduce ((rowMean * s).sum ([| 0L |])) / total
            let between = (rowMean - mean64.view (1L, -1L)).square () * s
            let m2 = allreduce ((inst.M2.to_type f64 + between).sum ([| 0L |]))

            {
                Count = total
                Mean = (mean64.to_type cd).view (1L, -1L)
                M2 = (m2.to_type cd).view (1L, -1L)
            }

    /// <summary>
    /// The table's tensor column: each kind's (mean, variance by the estimator), broadcastable to [N, C], from the
    /// per-row moments (whose M2 already carries the estimator's κ), the scope's batch moments (for PerChannel) and the running statistics (for Constant).
    /// </summary>
    let statistics
        (est: Estimator)
        (kinds: StatKind list)
        (inst: Moments)
        (batch: Moments option)
        (running: (torch.Tensor * torch.Tensor) option)
        =
        let cd = inst.Mean.dtype
        let variance (m: Moments) = m.M2 / est.Divisor m.Count

        kinds
        |> List.map (fun kind ->
            match kind, batch, running with
            | PerRow, _, _ -> inst.Mean, variance inst
            | PerSample, _, _ ->
                let l = Moments.reduce 1L inst
                l.Mean, variance l
            | PerChannel, Some b, _ -> b.Mean, variance b
            | Constant, _, Some(m, v) -> (m.to_type cd).view (1L, -1L), (v.to_type cd).view (1L, -1L)
            | PerChannel, None, _
            | Constant, _, None -> invalidOp "unreachable: a batch statistic without the batch's or the running statistics")

    /// <summary>
    /// The output (N, C, S) from the statistics: μ = rowMean + Σ w·(mean − rowMean) (the weights' rounding only scales
    /// small differences, never a large common offset), σ² = Σ w·var, and y = (x − μ)·γ/sqrt(σ² + eps) + β.
    /// </summary>
    let output
        (x3: torch.Tensor)
        (rowMean: torch.Tensor)
        (stats: (torch.Tensor * torch.Tensor) list)
        (eps: float)
        (gamma: torch.Tensor)
        (beta: torch.Tensor)
        (wMean: torch.Tensor)
        (wVar: torch.Tensor)
        =
        let n, c = x3.size 0, x3.size 1
        let offsets = stats |> List.map (fun (m, _) -> m - rowMean)
        let mu = (rowMean + Mixing.mix wMean offsets).expand (n, c)
        let var = Mixing.mix wVar (stats |> List.map snd)
        let r = (var + eps).rsqrt().expand (n, c)
        let scale = if isNull gamma then r else r * gamma.view (1L, -1L)
        let y = (x3 - mu.unsqueeze 2L) * scale.unsqueeze 2L
        if isNull beta then y else y + beta.view (1L, -1L, 1L)

    /// <summary>
    /// The whole tensor path on x3 (N, C, S) in the compute dtype (statistics and output in float64 for float32 input,
    /// so no square overflows): the per-row moments of one two-pass reduction, the table's statistics, and the output; also the scope's batch moments when a statistic is PerChannel. The
    /// weights are the switch's, in the compute dtype; gamma and beta are in it too, or null.
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
        (wMean: torch.Tensor)
        (wVar: torch.Tensor)
        (x3: torch.Tensor)
        =
        // float32 statistics are taken in float64: a spread of about 1.8e19 already overflows a float32 square
        let sd =
            if x3.dtype = torch.ScalarType.Float32 then
                torch.ScalarType.Float64
            else
                x3.dtype

        let inS (t: torch.Tensor) =
            if isNull t || t.dtype = sd then t else t.to_type sd

        let inst =
            let m = Moments.ofRows (inS x3)
            let kappa = est.Within(int (x3.size 2))
            if kappa = 1.0 then m else { m with M2 = m.M2 * kappa }

        let batch =
            if List.contains PerChannel kinds then
                Some(batchMoments scope total inst)
            else
                None

        let stats = statistics est kinds inst batch running

        let y =
            output (inS x3) inst.Mean stats eps (inS gamma) (inS beta) (inS wMean) (inS wVar)

        (if y.dtype = x3.dtype then y else y.to_type x3.dtype), batch
