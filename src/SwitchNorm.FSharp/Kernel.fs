namespace SwitchNorm

#nowarn "9" // native pointers: the kernel reads and writes tensor memory directly

open System
open System.Collections.Generic
open System.Numerics
open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open System.Threading.Tasks
open Microsoft.FSharp.NativeInterop
open TorchSharp
open SwitchNorm.Kernels

/// Access to tensor memory and row parallelism for the kernel normalizer. The row passes themselves are in
/// SwitchNorm.Kernels (C#), because F# does not emit MethodImplOptions.AggressiveOptimization and those
/// loops must be optimized from the first call.
module internal Kernel =

    /// The address of a contiguous CPU tensor's first element.
    let pointer (t: torch.Tensor) : nativeptr<float32> =
        let bytes = t.bytes
        NativePtr.ofVoidPtr (Unsafe.AsPointer(&MemoryMarshal.GetReference bytes))

    /// Runs body lo hi over [0, rows) split into contiguous ranges, one per libtorch thread
    /// (torch.get_num_threads), or inline when the work is small.
    let forRows (rows: int) (rowLen: int) (body: int -> int -> unit) =
        let threads = max 1 (torch.get_num_threads ())

        if threads = 1 || rows < 2 || int64 rows * int64 rowLen < 65536L then
            body 0 rows
        else
            let chunks = min rows threads

            Parallel.For(
                0,
                chunks,
                ParallelOptions(MaxDegreeOfParallelism = threads),
                fun ci -> body (int (int64 rows * int64 ci / int64 chunks)) (int (int64 rows * int64 (ci + 1) / int64 chunks))
            )
            |> ignore

/// Per-(n, c) statistics of a float32 input from the row kernels, in float64.
type internal RowStats = {
    N: int
    C: int
    S: int
    /// Each row's mean rounded to float32: the centre of every later pass over the row.
    Centre: float32[]
    /// Each row's mean.
    Mean: float[]
    /// Each row's centred sum of squares.
    M2: float[]
}

/// One mixed statistic expanded to every (n, c) row, in float64.
type internal RowComponent = {
    Kind: StatKind
    /// Values behind the statistic (0 for running statistics).
    Count: float
    /// The statistic's mean at each row.
    Mean: float[]
    /// The statistic's biased variance at each row.
    Var: float[]
}

/// Everything the kernel normalizer's forward and backward share for one input.
type internal KernelPlan = {
    Stats: RowStats
    Components: RowComponent[]
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
    /// Mixed mean and 1/sqrt(var + eps) per row.
    Mu: float[]
    R: float[]
    InputNeedsGrad: bool
}

/// The fused normalizer on float32 CPU data: one kernel call per pass over the data, O(N·C) mixing in float64.
module internal KernelNorm =

    let private values (t: torch.Tensor) : float[] =
        use d = t.detach().to_type(torch.ScalarType.Float64).cpu().contiguous ()
        d.data<float>().ToArray()

    /// Reads a small tensor (weights, logits, running statistics) as float64 values.
    let read (t: torch.Tensor) = values t

    /// Whether x3 (N, C, S) can go through the row kernels.
    let applies (x3: torch.Tensor) =
        x3.dtype = torch.ScalarType.Float32
        && x3.device_type = DeviceType.CPU
        && x3.numel () > 0L
        && x3.numel () <= int64 Int32.MaxValue / 4L

    /// Per-row mean and centred sum of squares of a contiguous float32 x3: a mean pass and a centred pass per
    /// row (the second one mostly from cache), corrected by the centred sum so the rounded centre costs nothing.
    let rowStats (x3: torch.Tensor) : RowStats =
        let n, c, s = int x3.shape[0], int x3.shape[1], int x3.shape[2]
        let rows = n * c
        let px = Kernel.pointer x3
        let centre = Array.zeroCreate rows
        let mean = Array.zeroCreate rows
        let m2 = Array.zeroCreate rows
        Kernel.forRows rows s (fun lo hi -> RowKernels.Stats(px, s, centre, mean, m2, lo, hi))

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
        let rows = st.N * st.C
        let k = float (rows / groups)
        let mean = Array.zeroCreate groups
        let m2 = Array.zeroCreate groups

        for i in 0 .. rows - 1 do
            let g = if bySample then i / st.C else i % st.C
            mean[g] <- mean[g] + st.Mean[i] / k

        for i in 0 .. rows - 1 do
            let g = if bySample then i / st.C else i % st.C
            let d = st.Mean[i] - mean[g]
            m2[g] <- m2[g] + st.M2[i] + float st.S * d * d

        let count = k * float st.S

        for g in 0 .. groups - 1 do
            m2[g] <- m2[g] / count

        count, mean, m2

    /// The batch's per-channel count, mean and biased variance.
    let batchStats (st: RowStats) = pool st false

    /// values[g] at every row of group g (per sample or per channel).
    let private expandRows (st: RowStats) (bySample: bool) (values: float[]) =
        let out = Array.zeroCreate (st.N * st.C)

        for i in 0 .. out.Length - 1 do
            out[i] <- values[if bySample then i / st.C else i % st.C]

        out

    /// Expands each component's statistic to every row.
    let plan (st: RowStats) (kinds: StatKind list) (running: (torch.Tensor * torch.Tensor) option) (eps: float) =
        let pooled (bySample: bool) kind =
            let count, mean, var = pool st bySample

            {
                Kind = kind
                Count = count
                Mean = expandRows st bySample mean
                Var = expandRows st bySample var
            }

        let expand (kind: StatKind) =
            match kind with
            | PerRow -> {
                Kind = kind
                Count = float st.S
                Mean = st.Mean
                Var = st.M2 |> Array.map (fun v -> v / float st.S)
              }
            | PerSample -> pooled true kind
            | PerChannel -> pooled false kind
            | Constant ->
                match running with
                | Some(m, v) -> {
                    Kind = kind
                    Count = 0.0
                    Mean = expandRows st false (values m)
                    Var = expandRows st false (values v)
                  }
                | None -> invalidOp "unreachable: constant statistics without running statistics"

        {
            Stats = st
            Components = kinds |> List.map expand |> Array.ofList
            Eps = eps
        }

    /// Mixed mean and 1/sqrt(var + eps) per row.
    let private mixed (plan: KernelPlan) (wm: float[]) (wv: float[]) =
        let rows = plan.Stats.N * plan.Stats.C
        let mu = Array.zeroCreate rows
        let var = Array.zeroCreate rows

        // μ = rowMean + Σ w·(mean − rowMean): the same as Σ w·mean for weights summing to 1, but the weights'
        // rounding only scales the (small) differences, never a large common offset.
        for k in 0 .. plan.Components.Length - 1 do
            let m = plan.Components[k].Mean
            let v = plan.Components[k].Var

            for i in 0 .. rows - 1 do
                mu[i] <- mu[i] + wm[k] * (m[i] - plan.Stats.Mean[i])
                var[i] <- var[i] + wv[k] * v[i]

        for i in 0 .. rows - 1 do
            mu[i] <- mu[i] + plan.Stats.Mean[i]
            var[i] <- 1.0 / sqrt (var[i] + plan.Eps)

        mu, var

    /// The normalized output (N, C, S) of a contiguous float32 x3, with the mixed mean and 1/std per row.
    let output (x3: torch.Tensor) (plan: KernelPlan) (gamma: float[] option) (beta: float[] option) (wm: float[]) (wv: float[]) =
        let st = plan.Stats
        let rows = st.N * st.C
        let mu, r = mixed plan wm wv
        let scale = Array.zeroCreate rows
        let shift = Array.zeroCreate rows

        for i in 0 .. rows - 1 do
            let c = i % st.C

            let sc =
                match gamma with
                | Some g -> r[i] * g[c]
                | None -> r[i]

            let b =
                match beta with
                | Some b -> b[c]
                | None -> 0.0

            scale[i] <- float32 sc
            shift[i] <- float32 (b + (float st.Centre[i] - mu[i]) * sc)

        let y = torch.empty_like x3
        let px = Kernel.pointer x3
        let py = Kernel.pointer y
        Kernel.forRows rows st.S (fun lo hi -> RowKernels.Affine(px, py, st.S, st.Centre, scale, shift, lo, hi))
        y, mu, r

    /// Gradients of Σ grad·y with respect to x (or null), weight, bias and both mixing-weight vectors.
    let backward (x3: torch.Tensor) (grad3: torch.Tensor) (sv: KernelSaved) =
        let plan = sv.Plan
        let st = plan.Stats
        let rows = st.N * st.C
        let px = Kernel.pointer x3
        let pg = Kernel.pointer grad3
        let sumG = Array.zeroCreate rows
        let sumGx = Array.zeroCreate rows
        Kernel.forRows rows st.S (fun lo hi -> RowKernels.GradSums(pg, px, st.S, st.Centre, sumG, sumGx, lo, hi))

        let dGamma = Array.zeroCreate st.C
        let dBeta = Array.zeroCreate st.C
        let dMu = Array.zeroCreate rows
        let dVar = Array.zeroCreate rows
        let gr = Array.zeroCreate rows

        for i in 0 .. rows - 1 do
            let c = i % st.C

            let gamma =
                match sv.Gamma with
                | Some g -> g[c]
                | None -> 1.0

            // Σ g·(x − μ) from Σ g·(x − centre)
            let sumGxMu = sumGx[i] + (float st.Centre[i] - sv.Mu[i]) * sumG[i]
            gr[i] <- sv.R[i] * gamma
            dBeta[c] <- dBeta[c] + sumG[i]
            dGamma[c] <- dGamma[c] + sv.R[i] * sumGxMu
            dMu[i] <- -gr[i] * sumG[i]
            dVar[i] <- -0.5 * gr[i] * sv.R[i] * sv.R[i] * sumGxMu

        let k = plan.Components.Length
        let dwm = Array.zeroCreate k
        let dwv = Array.zeroCreate k

        for j in 0 .. k - 1 do
            let m = plan.Components[j].Mean
            let v = plan.Components[j].Var

            for i in 0 .. rows - 1 do
                dwm[j] <- dwm[j] + dMu[i] * (m[i] - st.Mean[i])
                dwv[j] <- dwv[j] + dVar[i] * v[i]

        let dx =
            if not sv.InputNeedsGrad then
                null
            else
                // Gradients reaching each per-sample and per-channel statistic.
                let muSample = Array.zeroCreate st.N
                let varSample = Array.zeroCreate st.N
                let muChannel = Array.zeroCreate st.C
                let varChannel = Array.zeroCreate st.C

                for i in 0 .. rows - 1 do
                    muSample[i / st.C] <- muSample[i / st.C] + dMu[i]
                    varSample[i / st.C] <- varSample[i / st.C] + dVar[i]
                    muChannel[i % st.C] <- muChannel[i % st.C] + dMu[i]
                    varChannel[i % st.C] <- varChannel[i % st.C] + dVar[i]

                // dx = gr·g + q·(x − centre) + c0 per row: each statistic passes its gradient on as a mean
                // (1/count per value) and a biased variance (2·(x − its mean)/count per value).
                let q = Array.zeroCreate rows
                let c0 = Array.zeroCreate rows

                for j in 0 .. k - 1 do
                    let comp = plan.Components[j]

                    if comp.Kind <> Constant then
                        for i in 0 .. rows - 1 do
                            let dm, dv =
                                match comp.Kind with
                                | PerRow -> dMu[i], dVar[i]
                                | PerSample -> muSample[i / st.C], varSample[i / st.C]
                                | _ -> muChannel[i % st.C], varChannel[i % st.C]

                            let dvq = sv.WVar[j] * dv * 2.0 / comp.Count
                            q[i] <- q[i] + dvq

                            c0[i] <-
                                c0[i]
                                + sv.WMean[j] * dm / comp.Count
                                + dvq * (float st.Centre[i] - comp.Mean[i])

                let p32 = Array.map float32 gr
                let q32 = Array.map float32 q
                let c32 = Array.map float32 c0
                let dx = torch.empty_like x3
                let pd = Kernel.pointer dx
                Kernel.forRows rows st.S (fun lo hi -> RowKernels.GradInput(pg, px, pd, st.S, st.Centre, p32, q32, c32, lo, hi))
                dx

        dx, dGamma, dBeta, dwm, dwv

/// The kernel normalizer as an autograd function. Inputs: x (N, C, S) contiguous float32, weight [C] or null,
/// bias [C] or null, mean weights [K] and variance weights [K] in float64, and the <see cref="T:SwitchNorm.KernelPlan"/> of x.
/// Keeps x and O(N·C) values for the backward.
type internal SwitchNormKernelFunction() =
    inherit torch.autograd.SingleTensorFunction<SwitchNormKernelFunction>()

    override _.Name = "SwitchNormKernelBackward"

    override _.forward(ctx, vars) =
        let tensorAt i =
            match vars[i] with
            | :? torch.Tensor as t -> t
            | _ -> null

        let x3 = tensorAt 0
        let gamma, beta, wm, wv = tensorAt 1, tensorAt 2, tensorAt 3, tensorAt 4
        let plan = vars[5] :?> KernelPlan

        let read t =
            if isNull t then None else Some(KernelNorm.read t)

        let wMean, wVar = KernelNorm.read wm, KernelNorm.read wv
        let g = read gamma
        let y, mu, r = KernelNorm.output x3 plan g (read beta) wMean wVar
        ctx.save_for_backward (List<torch.Tensor>([ x3 ]))

        ctx.save_data (
            "saved",
            box {
                Plan = plan
                WMean = wMean
                WVar = wVar
                Gamma = g
                HasBias = not (isNull beta)
                Mu = mu
                R = r
                InputNeedsGrad = x3.requires_grad
            }
        )

        y

    override _.backward(ctx, grad) =
        GradHandOver.Release()
        use scope = torch.NewDisposeScope()
        let sv = ctx.get_data "saved" :?> KernelSaved
        let x3 = ctx.get_saved_variables().[0]
        let st = sv.Plan.Stats
        let grad3 = grad.reshape(int64 st.N, int64 st.C, int64 st.S).contiguous ()
        let dx, dGamma, dBeta, dwm, dwv = KernelNorm.backward x3 grad3 sv
        let f32 (a: float[]) = torch.tensor (Array.map float32 a)

        let f64 (a: float[]) =
            torch.tensor (a, dtype = torch.ScalarType.Float64)

        let grads = [
            dx
            (if sv.Gamma.IsSome then f32 dGamma else null)
            (if sv.HasBias then f32 dBeta else null)
            f64 dwm
            f64 dwv
        ]

        GradHandOver.Keep grads
        grad.Dispose()
        List<torch.Tensor>(grads @ [ null ])
