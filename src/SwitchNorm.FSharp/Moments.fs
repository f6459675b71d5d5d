namespace SwitchNorm.FSharp

open TorchSharp

/// <summary>
/// Moments of groups of values: for each entry of <c>Mean</c> and <c>M2</c>, the mean and the sum of squared
/// deviations from that mean (M2) of <c>Count</c> values. All entries of one record share the same count.
/// Merging two records uses Chan et al.'s parallel update, which stays exact in float32 where
/// E[x²] − E[x]² would cancel catastrophically on inputs with a large common offset.
/// </summary>
type Moments = {
    /// Number of values behind each entry.
    Count: float
    /// Mean of each group.
    Mean: torch.Tensor
    /// Sum of squared deviations from the group's mean.
    M2: torch.Tensor
}

/// Pure functions over <see cref="T:SwitchNorm.Moments"/>.
[<RequireQualifiedAccess>]
module Moments =

    /// <summary>
    /// Per-row moments of <c>x3</c> of shape (N, C, S): for each (n, c), the mean of the S values and their
    /// centred sum of squares, computed in two passes (mean, then squares of the centred values), so no
    /// precision is lost to a common offset. Gradients flow through both.
    /// </summary>
    [<CompiledName("OfRows")>]
    let ofRows (x3: torch.Tensor) : Moments =
        let mean = x3.mean ([| 2L |], keepdim = true)
        use centred = x3 - mean
        use sq = centred.square ()
        let m2 = sq.sum ([| 2L |])

        {
            Count = float x3.shape[2]
            Mean = mean.squeeze (2L)
            M2 = m2
        }

    /// Biased variance M2 / Count (what normalization uses).
    [<CompiledName("Variance")>]
    let variance (m: Moments) = m.M2 / m.Count

    /// Unbiased variance M2 / (Count − 1) (what BatchNorm's running_var stores); needs Count &gt; 1.
    [<CompiledName("UnbiasedVariance")>]
    let unbiasedVariance (m: Moments) = m.M2 / (m.Count - 1.0)

    /// <summary>
    /// Pools the entries of <c>m</c> along dimension <c>dim</c> into one group each, by the law of total
    /// variance: M2 = Σ M2ᵢ + Count · Σ (meanᵢ − mean)². The dimension is kept with size 1.
    /// LayerNorm's moments are <c>reduce 1</c> of the instance moments, BatchNorm's are <c>reduce 0</c>.
    /// </summary>
    [<CompiledName("Reduce")>]
    let reduce (dim: int64) (m: Moments) : Moments =
        let k = float m.Mean.shape[int dim]
        let mean = m.Mean.mean ([| dim |], keepdim = true)
        use dev = m.Mean - mean
        use dev2 = dev.square ()
        use between = dev2.sum ([| dim |], keepdim = true)
        use within = m.M2.sum ([| dim |], keepdim = true)

        {
            Count = m.Count * k
            Mean = mean
            M2 = within + between * m.Count
        }

    /// <summary>
    /// Merges the moments of two disjoint sets of values with matching entry shapes (Chan et al., 1979):
    /// n = na + nb, δ = mean_b − mean_a, mean = mean_a + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n.
    /// Associative and commutative up to rounding; an empty side (Count = 0) returns the other.
    /// </summary>
    [<CompiledName("Merge")>]
    let merge (a: Moments) (b: Moments) : Moments =
        if a.Count = 0.0 then
            b
        elif b.Count = 0.0 then
            a
        else
            let n = a.Count + b.Count
            use delta = b.Mean - a.Mean
            use step = delta * (b.Count / n)
            use d2 = delta.square ()
            use sumM2 = a.M2 + b.M2

            {
                Count = n
                Mean = a.Mean + step
                M2 = sumM2 + d2 * (a.Count * b.Count / n)
            }

    /// Detaches the tensors from the autograd graph (for statistics kept across steps).
    [<CompiledName("Detach")>]
    let detach (m: Moments) = {
        m with
            Mean = m.Mean.detach ()
            M2 = m.M2.detach ()
    }
