namespace SwitchNorm

open System
open System.Collections.Generic
open TorchSharp

/// How one mixed statistic depends on the input; this fixes its share of the hand-written backward.
type internal StatKind =
    /// Per (n, c) over the spatial positions (instance).
    | PerRow
    /// Per n over the channels and positions (layer).
    | PerSample
    /// Per c over the batch and positions (batch statistics).
    | PerChannel
    /// Running statistics (BN in eval): no dependence on the input.
    | Constant

/// Statistics of one input, computed without autograd, that the fused normalizer mixes.
type internal FusedStats = {
    /// The kind of each component's statistic, in logit order.
    Kinds: StatKind[]
    /// How many values are behind each component's statistic.
    Counts: float[]
    /// Each component's mean, broadcastable to [N, C].
    Means: torch.Tensor[]
    /// Each component's biased variance, broadcastable to [N, C].
    Vars: torch.Tensor[]
    /// Per-(n, c) mean [N, C].
    RowMean: torch.Tensor
    /// x − RowMean, [N, C, S], for the output (the backward keeps x and recomputes it).
    Centred: torch.Tensor
    /// Added to the mixed variance.
    Eps: float
}

/// What the backward pass needs besides tensors.
type internal FusedInfo = {
    Kinds: StatKind[]
    Counts: float[]
    HasWeight: bool
    HasBias: bool
    InputNeedsGrad: bool
    Eps: float
}

/// The fused normalizer: per-(n, c) statistics from one two-pass reduction, O(N·C) mixing, one affine pass
/// for the output, and a hand-written backward of two passes over the gradient.
module internal Fused =

    /// The tensor at position i of an autograd function's arguments, or null when that argument is not a tensor.
    let tensorAt (vars: obj[]) (i: int) : torch.Tensor =
        match vars[i] with
        | :? torch.Tensor as t -> t
        | _ -> null

    /// Per-row mean [N, C], the centred tensor x − mean [N, C, S] and the centred sum of squares [N, C]:
    /// two passes (mean, then the norm of the centred rows), no E[x²] − E[x]² cancellation.
    let rowMoments (x3: torch.Tensor) =
        use _ = torch.no_grad ()
        let mean = x3.mean ([| 2L |], keepdim = true)
        let centred = x3 - mean
        use norm = torch.linalg.vector_norm (centred, 2, [| 2L |], false)
        mean.squeeze 2L, centred, norm.square ()

    /// Mixed mean μ [N, C], 1/sqrt(σ² + eps) [N, C], and the output.
    let outputOf (st: FusedStats) (gamma: torch.Tensor) (beta: torch.Tensor) (wMean: torch.Tensor) (wVar: torch.Tensor) =
        let n, c = st.RowMean.shape[0], st.RowMean.shape[1]
        // μ = rowMean + Σ w·(mean − rowMean): the weights' rounding only scales small differences.
        let offsets = st.Means |> Array.map (fun m -> m - st.RowMean) |> List.ofArray
        let mu = (st.RowMean + Mixing.mix wMean offsets).expand (n, c)
        use var = Mixing.mix wVar (List.ofArray st.Vars)
        use varEps = var + st.Eps
        let r = varEps.rsqrt().expand (n, c)
        let scale = if isNull gamma then r else r * gamma.view (1L, -1L)
        use d = st.RowMean - mu
        use shift0 = d * scale

        use shift =
            if isNull beta then
                shift0.alias ()
            else
                shift0 + beta.view (1L, -1L)

        // One pass, any strides, and a fresh tensor (not a view, which libtorch would mark as created inside a
        // custom function and refuse to modify in place afterwards).
        torch.addcmul (shift.unsqueeze 2L, st.Centred, scale.unsqueeze 2L, 1.0), mu, r

    /// <summary>
    /// The same normalization as a composition of differentiable tensor operations, from the input, the
    /// parameters and the statistics' kinds (with the running statistics for Constant ones). The fused backward
    /// uses it when a graph of the gradient is requested (create_graph), so second derivatives are exact too.
    /// </summary>
    let composedOutput
        (kinds: StatKind[])
        (constants: (torch.Tensor * torch.Tensor) option)
        (eps: float)
        (x3: torch.Tensor)
        (gamma: torch.Tensor)
        (beta: torch.Tensor)
        (wMean: torch.Tensor)
        (wVar: torch.Tensor)
        =
        let inst = Moments.ofRows x3

        let stat kind =
            match kind, constants with
            | PerRow, _ -> inst.Mean, Moments.variance inst
            | PerSample, _ ->
                let l = Moments.reduce 1L inst
                l.Mean, Moments.variance l
            | PerChannel, _ ->
                let b = Moments.reduce 0L inst
                b.Mean, Moments.variance b
            | Constant, Some(m, v) -> m.to_type(x3.dtype).view (1L, -1L), v.to_type(x3.dtype).view (1L, -1L)
            | Constant, None -> invalidOp "unreachable: constant statistics without running statistics"

        let stats = kinds |> Array.map stat |> List.ofArray
        let mu = Mixing.mix (wMean.to_type x3.dtype) (stats |> List.map fst)
        let var = Mixing.mix (wVar.to_type x3.dtype) (stats |> List.map snd)
        let r = (var + eps).rsqrt ()
        let scale = if isNull gamma then r else r * gamma.view (1L, -1L)
        let y = (x3 - mu.unsqueeze 2L) * scale.unsqueeze 2L
        if isNull beta then y else y + beta.view (1L, -1L, 1L)

    /// <summary>
    /// Gradients of Σ grad·y with respect to each input (null where an input is null or needs no gradient), with
    /// a graph, for create_graph.
    /// </summary>
    let differentiableGrads (inputs: torch.Tensor list) (y: torch.Tensor) (grad: torch.Tensor) =
        let needs (t: torch.Tensor) = not (isNull t) && t.requires_grad
        let targets = inputs |> List.filter needs |> Array.ofList

        let grads =
            torch.autograd.grad ([| y |], targets, [| grad |], retain_graph = true, create_graph = true, allow_unused = true)

        let mutable next = 0

        inputs
        |> List.map (fun t ->
            if needs t then
                let g = grads[next]
                next <- next + 1
                g
            else
                null)

/// <summary>
/// Gradient tensors a custom backward hands to libtorch, which copies them when the backward returns; their
/// managed handles are released at the next backward on the same thread, so at most one set stays alive per
/// thread whether or not the caller has a dispose scope open.
/// </summary>
type internal GradHandOver private () =
    [<ThreadStatic; DefaultValue>]
    static val mutable private handedOver: List<torch.Tensor>

    /// Disposes the handles of the previous backward on this thread.
    static member Release() =
        let l = GradHandOver.handedOver

        if not (isNull l) then
            for t in l do
                t.Dispose()

            l.Clear()

    /// Takes the handles out of any dispose scope; they are disposed at the next Release.
    static member Keep(ts: torch.Tensor list) =
        if isNull GradHandOver.handedOver then
            GradHandOver.handedOver <- List<torch.Tensor>()

        for t in ts do
            if not (isNull t) then
                t.DetachFromDisposeScope() |> ignore
                GradHandOver.handedOver.Add t

/// The fused normalizer as an autograd function. Inputs: x (N, C, S), weight [C] or null, bias [C] or null,
/// mean weights [K], variance weights [K], and the <see cref="T:SwitchNorm.FusedStats"/> of x.
type internal SwitchNormFunction() =
    inherit torch.autograd.SingleTensorFunction<SwitchNormFunction>()

    override _.Name = "SwitchNormBackward"

    override _.forward(ctx, vars) =
        let tensorAt = Fused.tensorAt vars
        let x3 = tensorAt 0
        let gamma, beta, wm, wv = tensorAt 1, tensorAt 2, tensorAt 3, tensorAt 4
        let st = vars[5] :?> FusedStats
        let y, mu, r = Fused.outputOf st gamma beta wm wv

        ctx.save_for_backward (
            List<torch.Tensor>(
                [ x3; st.RowMean; mu; r; wm; wv; gamma ]
                @ List.ofArray st.Means
                @ List.ofArray st.Vars
                @ [ beta ]
            )
        )

        ctx.save_data (
            "info",
            box {
                Kinds = st.Kinds
                Counts = st.Counts
                HasWeight = not (isNull gamma)
                HasBias = not (isNull beta)
                InputNeedsGrad = x3.requires_grad
                Eps = st.Eps
            }
        )

        y

    override _.backward(ctx, grad) =
        GradHandOver.Release()
        use scope = torch.NewDisposeScope()
        let info = ctx.get_data "info" :?> FusedInfo
        let saved = ctx.get_saved_variables ()

        let x3, rowMean, mu, r, wm, wv, gamma =
            saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6]

        let k = info.Kinds.Length
        let means = Array.init k (fun i -> saved[7 + i])
        let vars = Array.init k (fun i -> saved[7 + k + i])
        let beta = saved[7 + 2 * k]
        let n, c, s = x3.size 0, x3.size 1, x3.size 2

        if torch.is_grad_enabled () then
            // create_graph: differentiate the composition, with a graph, so higher derivatives are exact.
            let constants =
                info.Kinds
                |> Array.tryFindIndex ((=) Constant)
                |> Option.map (fun i -> means[i], vars[i])

            let y = Fused.composedOutput info.Kinds constants info.Eps x3 gamma beta wm wv

            let grads =
                Fused.differentiableGrads [ x3; gamma; beta; wm; wv ] y (grad.reshape (n, c, s))

            GradHandOver.Keep grads
            List<torch.Tensor>(grads @ [ null ])
        else

            // Only x is kept for the backward: x − rowMean is recomputed here (one pass).
            let xc =
                use _ = torch.no_grad ()
                x3.detach () - rowMean.unsqueeze 2L

            let g3 = grad.reshape (n, c, s)
            // The only full-size reductions: Σₛ g and Σₛ g·(x − rowMean), per (n, c).
            let sumG = g3.sum ([| 2L |])
            let sumGxc = (g3 * xc).sum ([| 2L |])
            // Σₛ g·(x − μ), without re-centring x.
            let sumGxMu = sumGxc + (rowMean - mu) * sumG
            let gr = if info.HasWeight then r * gamma.view (1L, -1L) else r
            let dBias = if info.HasBias then sumG.sum [| 0L |] else null
            let dWeight = if info.HasWeight then (r * sumGxMu).sum [| 0L |] else null
            // ∂L/∂μ and ∂L/∂σ² per (n, c).
            let dMu = -(gr * sumG)
            let dVar = gr * r.square () * sumGxMu * -0.5
            let dwm = torch.stack [ for m in means -> (dMu * (m - rowMean)).sum () ]
            let dwv = torch.stack [ for v in vars -> (dVar * v).sum () ]

            let dx =
                if not info.InputNeedsGrad then
                    null
                else
                    // Each statistic passes its gradient to x as a mean (1/count each) and a biased variance
                    // (2·(x − its mean)/count each): per (n, c), a multiple q of (x − rowMean) plus a constant.
                    let mutable q = torch.zeros_like dMu
                    let mutable c0 = torch.zeros_like dMu

                    for i in 0 .. k - 1 do
                        let reduce (t: torch.Tensor) =
                            match info.Kinds[i] with
                            | PerRow -> t
                            | PerSample -> t.sum ([| 1L |], keepdim = true)
                            | PerChannel -> t.sum ([| 0L |], keepdim = true)
                            | Constant -> null

                        match info.Kinds[i] with
                        | Constant -> ()
                        | _ ->
                            let dm = reduce dMu * (wm[int64 i] / info.Counts[i])
                            let dv = reduce dVar * (wv[int64 i] * (2.0 / info.Counts[i]))
                            q <- q + dv
                            c0 <- c0 + dm + dv * (rowMean - means[i])

                    let dx3 = torch.addcmul (c0.unsqueeze 2L, xc, q.unsqueeze 2L, 1.0)
                    dx3.addcmul_ (g3, gr.unsqueeze 2L, 1.0)

            let grads = [ dx; dWeight; dBias; dwm; dwv ]
            GradHandOver.Keep grads
            // The incoming gradient's handle was made for this call alone.
            grad.Dispose()
            List<torch.Tensor>(grads @ [ null ])
