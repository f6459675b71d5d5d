namespace SwitchNorm

open System
open System.Collections.Generic
open TorchSharp

/// Sums a float64 vector across ranks, differentiably: the gradient of a sum over ranks is the sum over ranks of the
/// gradients, so the backward is an allreduce too (every rank's loss depends on the shared result).
type internal AllreduceFunction() =
    inherit torch.autograd.SingleTensorFunction<AllreduceFunction>()

    static member Values(t: torch.Tensor) =
        use d = t.detach().to_type(torch.ScalarType.Float64).cpu().contiguous ()
        d.data<float>().ToArray()

    override _.Name = "AllreduceSumBackward"

    override _.forward(ctx, vars) =
        let x = vars[0] :?> torch.Tensor
        let comm = vars[1] :?> ICommunicator
        let v = AllreduceFunction.Values x
        comm.AllreduceSum v
        ctx.save_data ("comm", box comm)
        torch.tensor(v, dtype = torch.ScalarType.Float64).``to`` (x.device)

    override _.backward(ctx, grad) =
        GradHandOver.Release()
        let comm = ctx.get_data "comm" :?> ICommunicator
        let v = AllreduceFunction.Values grad
        comm.AllreduceSum v
        let g = torch.tensor(v, dtype = torch.ScalarType.Float64).``to`` (grad.device)
        GradHandOver.Keep [ g ]
        grad.Dispose()
        List<torch.Tensor>([ g; null ])

/// <summary>
/// Switchable Normalization whose BN statistics are those of the global batch, split across the ranks of a
/// communicator. IN and LN stay per sample, so local. From the per-(n, c) means and centred sums of squares of one
/// two-pass reduction, the ranks sum their per-channel sums (one allreduce of C values), then their sums of squares
/// about the global mean, Σ_rows [M2_row + S · (rowMean − mean)²] (a second allreduce): exactly the full batch's
/// mean and biased variance whatever the shard sizes, with no E[x²] − E[x]². Both allreduces are differentiable, so
/// the backward allreduces the gradient terms that flow through the BN mean and variance. The running statistics
/// are updated from the global statistics, identically on every rank.
/// </summary>
[<RequireQualifiedAccess>]
module Sync =

    let private dtypeCode (t: torch.ScalarType) = float (int t)

    /// <summary>
    /// The float32 CPU path: the row kernels for the per-(n, c) moments and the output, the global BN statistics from
    /// two allreduces of C values, and the kernel backward, which allreduces the C-sized gradients reaching them.
    /// </summary>
    let private fused
        (layer: string)
        (comm: ICommunicator)
        (spec: NormSpec)
        (p: NormParams)
        (running: RunningStats option)
        (training: bool)
        (x3: torch.Tensor)
        (total: float)
        =
        let x3c = x3.contiguous ()
        let st = KernelNorm.rowStats x3c
        let local = KernelNorm.plan st (Functional.kernelKinds spec true) None spec.Eps
        // this shard's per-channel statistics, pooled once by the plan (a collective layer always mixes BN)
        let localBatch = local.Components |> Array.find (fun comp -> comp.Kind = PerChannel)
        let countL, meanL, varL = localBatch.Count, localBatch.Mean, localBatch.Var
        let c = st.C
        // the global mean from the per-channel sums, then the global M2 by the parallel-variance formula
        let sums = Array.init c (fun i -> countL * meanL[i])
        comm.AllreduceSum sums
        let meanG = sums |> Array.map (fun v -> v / total)

        let m2 =
            Array.init c (fun i ->
                let d = meanL[i] - meanG[i]
                countL * varL[i] + countL * d * d)

        comm.AllreduceSum m2
        let varG = m2 |> Array.map (fun v -> v / total)

        let plan = {
            local with
                Components =
                    local.Components
                    |> Array.map (fun comp ->
                        if comp.Kind = PerChannel then
                            {
                                comp with
                                    Count = total
                                    Mean = meanG
                                    Var = varG
                            }
                        else
                            comp)
                Reducer = Some comm
        }

        let softmaxInside = Mixing.isSoftmax spec.Switch

        let switched (logits: torch.Tensor) =
            Functional.switchWeights layer spec logits torch.ScalarType.Float64

        let wMean, wVar =
            if softmaxInside then
                p.MeanLogits, p.VarLogits
            else
                switched p.MeanLogits, switched p.VarLogits

        let gamma = p.Weight |> Option.toObj
        let beta = p.Bias |> Option.toObj

        let y3 = Functional.kernelOutput x3c gamma beta wMean wVar plan softmaxInside

        let updated =
            match running with
            | Some r when training -> Some(Functional.runningFromArrays spec r meanG (m2 |> Array.map (fun v -> v / (total - 1.0))))
            | _ -> None

        let asRow (a: float[]) =
            torch.tensor(Array.map float32 a).view(1L, -1L).MoveToOuterDisposeScope()

        y3,
        updated,
        {
            Count = total
            Mean = asRow meanG
            M2 = asRow m2
        }

    /// <summary>
    /// Normalizes this rank's shard x (N_r, C, *spatial). Collective when <paramref name="collective"/> (BN from the
    /// batch: training, or no running statistics), which the caller decides from its configuration alone:
    /// every rank must call it, and later call backward on a loss that depends on the output. A local error (a bad
    /// input on one rank) is passed in as <paramref name="localError"/> so every rank learns of it through the first
    /// allreduce and raises, instead of leaving the others waiting. Ranks that disagree on the channel count or the
    /// dtype, or a global batch with at most one value per channel, raise an ArgumentException on every rank.
    /// A rank with an empty shard (N_r = 0) contributes nothing to the BN statistics and gets an empty output.
    /// </summary>
    let forward
        (layer: string)
        (comm: ICommunicator)
        (collective: bool)
        (localError: exn option)
        (spec: NormSpec)
        (p: NormParams)
        (running: RunningStats option)
        (training: bool)
        (x: torch.Tensor)
        : NormResult =
        if not collective then
            // nothing is shared: eval with running statistics, or no BN component
            match localError with
            | Some e -> raise e
            | None -> Functional.forwardCore false true layer spec p running training x
        else
            let size, rank = comm.Size, comm.Rank

            let channelsOf (t: torch.Tensor) =
                if t.dim () >= 2L then t.size 1 else -1L

            let valueCount (t: torch.Tensor) =
                if t.dim () >= 2L then
                    t.numel () / max 1L (t.size 1)
                else
                    0L

            // per rank: ok, channels, dtype, values per channel, whether the row kernels can take its shard (all
            // ranks must take the same path: the two exchange different gradient terms in the backward)
            let kernelOk =
                spec.Fused
                && x.dim () >= 2L
                && x.dtype = torch.ScalarType.Float32
                && x.device_type = DeviceType.CPU
                && x.numel () > 0L
                && x.numel () <= int64 Int32.MaxValue / 4L

            let fields = 5
            let header = Array.zeroCreate (fields * size)
            header[fields * rank] <- (if localError.IsNone then 1.0 else 0.0)
            header[fields * rank + 1] <- float (channelsOf x)
            header[fields * rank + 2] <- dtypeCode x.dtype
            header[fields * rank + 3] <- float (valueCount x)
            header[fields * rank + 4] <- (if kernelOk then 1.0 else 0.0)
            comm.AllreduceSum header

            let field i =
                Array.init size (fun r -> header[fields * r + i])

            let perRank (vals: float[]) (show: float -> string) =
                vals |> Array.mapi (fun r v -> $"rank {r}: {show v}") |> String.concat ", "

            match localError with
            | Some e -> raise e
            | None -> ()

            let failed =
                field 0
                |> Array.indexed
                |> Array.filter (fun (_, ok) -> ok = 0.0)
                |> Array.map fst

            if failed.Length > 0 then
                let which = failed |> Array.map string |> String.concat ", "
                raise (InvalidOperationException($"{layer}: rank(s) {which} refused their input; see the error on that rank."))

            let agree (what: string) (values: float[]) (show: float -> string) =
                if values |> Array.exists (fun v -> v <> values[0]) then
                    raise (ArgumentException($"{layer}: ranks disagree on {what} ({perRank values show}).", "input"))

            agree "the number of channels" (field 1) (fun c -> string (int64 c))
            agree "the dtype" (field 2) (fun d -> string (LanguagePrimitives.EnumOfValue<sbyte, torch.ScalarType>(sbyte d)))

            let counts = field 3
            let total = Array.sum counts

            if total <= 1.0 then
                raise (
                    ArgumentException(
                        $"{layer}: expected more than 1 value per channel across all ranks when using batch statistics; got {total} ({perRank counts (fun c -> string (int64 c))}).",
                        "input"
                    )
                )

            Checks.floatingInput layer x
            let numFeatures = x.size 1
            let n = x.size 0
            let spatial = x.shape |> Array.skip 2 |> Array.fold (*) 1L

            use scope = torch.NewDisposeScope()
            let origDtype = x.dtype

            let cd = Checks.computeDtype origDtype

            let x3 = x.reshape (n, numFeatures, spatial)
            let x3 = if x3.dtype = cd then x3 else x3.to_type cd
            let f64 = torch.ScalarType.Float64

            if field 4 |> Array.forall (fun ok -> ok = 1.0) then
                let y3, updated, moments = fused layer comm spec p running training x3 total

                {
                    Output = y3.reshape(x.shape).MoveToOuterDisposeScope()
                    Running = updated |> Option.orElse running
                    BatchMoments = Some moments
                }
            else

                let allreduce (t: torch.Tensor) =
                    torch.autograd.SingleTensorFunction<AllreduceFunction>.apply (box t, box comm)

                // Per-row moments from one two-pass reduction (IN's own statistics); everything after them is (N, C)-sized.
                let inst = Moments.ofRows x3
                let rowMean = inst.Mean.to_type f64
                let s = float spatial

                // the global mean: allreduce of the per-channel sums
                let sum = allreduce ((rowMean * s).sum ([| 0L |]))
                let mean64 = sum / total
                let meanG = (mean64.to_type cd).view (1L, -1L)

                // the global centred sum of squares about it, by the law of total variance over the rows:
                // Σ (x − mean)² = Σ_rows [M2_row + S · (rowMean − mean)²]
                let between = (rowMean - mean64.view (1L, -1L)).square () * s
                let m2 = allreduce ((inst.M2.to_type f64 + between).sum ([| 0L |]))
                let varG = ((m2 / total).to_type cd).view (1L, -1L)

                let stats =
                    spec.Components
                    |> List.map (fun comp ->
                        match comp with
                        | Instance -> inst.Mean, Moments.variance inst
                        | Layer ->
                            let l = Moments.reduce 1L inst
                            l.Mean, Moments.variance l
                        | Batch -> meanG, varG)


                let y3 = Functional.mixedOutput layer spec p cd x3 stats
                let y = (if origDtype = cd then y3 else y3.to_type origDtype).reshape (x.shape)

                let moments = {
                    Count = total
                    Mean = (mean64.detach().to_type cd).view(1L, -1L).MoveToOuterDisposeScope()
                    M2 = (m2.detach().to_type cd).view(1L, -1L).MoveToOuterDisposeScope()
                }

                let updated =
                    match running with
                    | Some r when training -> Some(Functional.runningFromMoments spec r moments)
                    | _ -> None

                {
                    Output = y.MoveToOuterDisposeScope()
                    Running = updated |> Option.orElse running
                    BatchMoments = Some moments
                }
