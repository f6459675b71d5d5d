/// An independent float64 reference of Switchable Normalization over plain F# arrays (no TorchSharp):
/// statistics computed directly from their definitions, not from per-(n, c) moments.
module Reference

/// Input as a flat array with shape (N, C, S) (spatial flattened).
type Input = { N: int; C: int; S: int; X: float[] }

let at (i: Input) n c s = i.X[(n * i.C + c) * i.S + s]

let softmax (l: float[]) =
    let m = Array.max l
    let e = l |> Array.map (fun v -> exp (v - m))
    let z = Array.sum e
    e |> Array.map (fun v -> v / z)

let private meanVar (xs: float seq) =
    let a = Array.ofSeq xs
    let m = Array.average a
    m, (a |> Array.averageBy (fun v -> (v - m) * (v - m)))

/// Output y and the batch statistics (per-channel mean and biased variance) for the paper's [IN; LN; BN]
/// mixture (or [IN; LN] when usingBn is false). bnStats overrides BN with given (mean, var) per channel (eval).
let forward
    (i: Input)
    (weight: float[])
    (bias: float[])
    (meanLogits: float[])
    (varLogits: float[])
    (eps: float)
    (usingBn: bool)
    (bnOverride: (float[] * float[]) option)
    =
    let inst =
        Array.init i.N (fun n -> Array.init i.C (fun c -> meanVar (seq { for s in 0 .. i.S - 1 -> at i n c s })))

    let layer =
        Array.init i.N (fun n ->
            meanVar (
                seq {
                    for c in 0 .. i.C - 1 do
                        for s in 0 .. i.S - 1 -> at i n c s
                }
            ))

    let batch =
        Array.init i.C (fun c ->
            meanVar (
                seq {
                    for n in 0 .. i.N - 1 do
                        for s in 0 .. i.S - 1 -> at i n c s
                }
            ))

    let bnUsed =
        match bnOverride with
        | Some(m, v) -> Array.init i.C (fun c -> m[c], v[c])
        | None -> batch

    let wm = softmax meanLogits
    let wv = softmax varLogits

    let y =
        Array.init (i.N * i.C * i.S) (fun idx ->
            let n = idx / (i.C * i.S)
            let c = (idx / i.S) % i.C
            let stats = [ inst[n][c]; layer[n] ] @ (if usingBn then [ bnUsed[c] ] else [])
            let mean = List.mapi (fun k (m, _) -> wm[k] * m) stats |> List.sum
            let var = List.mapi (fun k (_, v) -> wv[k] * v) stats |> List.sum
            (i.X[idx] - mean) / sqrt (var + eps) * weight[c] + bias[c])

    y, batch

/// Central finite difference of f at every coordinate of p (step h).
let gradFD (f: float[] -> float) (p: float[]) (h: float) =
    Array.init p.Length (fun j ->
        let plus = Array.copy p
        let minus = Array.copy p
        plus[j] <- p[j] + h
        minus[j] <- p[j] - h
        (f plus - f minus) / (2.0 * h))
