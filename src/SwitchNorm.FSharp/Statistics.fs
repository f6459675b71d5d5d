namespace SwitchNorm

open SwitchNorm.Kernels
open SwitchNorm.FSharp

/// How one mixed statistic depends on the input; this fixes how it is computed, stored and differentiated.
type internal StatKind =
    /// Per (n, c) over the spatial positions (instance).
    | PerRow
    /// Per n over the channels and positions (layer).
    | PerSample
    /// Per c over the batch and positions (batch statistics, local or across the ranks of a scope).
    | PerChannel
    /// Running statistics (BN in eval): no dependence on the input.
    | Constant

/// <summary>
/// The one table from component to statistic, consulted by both paths. Each statistic is the (mean, biased variance)
/// of a group of values, pooled from the per-row moments (count S, mean, M2) by the law of total variance:
///
/// | component | kind | group | count | mean, variance |
/// |---|---|---|---|---|
/// | IN | PerRow | each (n, c) | S | the row's mean, M2 / S |
/// | LN | PerSample | each n | C·S | pooled over the sample's C rows |
/// | BN, from the batch | PerChannel | each c | N·S (over the scope's ranks) | pooled over the N rows of channel c |
/// | BN, in eval | Constant | each c | 0 | running_mean, running_var |
///
/// The tensor path computes the right-hand column with Moments.reduce and autograd, the row path with the kernels'
/// Pool and a hand-written backward.
/// </summary>
module internal Statistics =

    /// A component's kind: BN is per channel when it uses the input (training, or no running statistics), else constant.
    let kindOf (batchFromInput: bool) (comp: Component) =
        match comp with
        | Instance -> PerRow
        | Layer -> PerSample
        | Batch when batchFromInput -> PerChannel
        | Batch -> Constant

    /// Every component's kind, in logit order.
    let kinds (components: Component list) (batchFromInput: bool) =
        components |> List.map (kindOf batchFromInput)

    /// How the row kernels store a statistic of this kind (running statistics are per channel).
    let group (kind: StatKind) =
        match kind with
        | PerRow -> StatGroup.PerRow
        | PerSample -> StatGroup.PerSample
        | PerChannel
        | Constant -> StatGroup.PerChannel

    /// BatchNorm's running-average factor for the step that makes <c>tracked</c> batches: momentum, or 1/tracked
    /// without one (a cumulative average).
    let factor (momentum: float option) (tracked: int64) =
        match momentum with
        | Some m -> m
        | None -> 1.0 / float tracked

    /// <summary>
    /// BatchNorm's update of the running statistics from the batch's per-channel mean and biased variance over
    /// <paramref name="count"/> values, in float64: running = (1 − f)·running + f·batch, with the unbiased variance
    /// var·count/(count − 1). One implementation for both paths.
    /// </summary>
    let runningUpdate (momentum: float option) (r: RunningStats) (count: float) (mean: float[]) (biasedVar: float[]) =
        let tracked = r.BatchesTracked + 1L
        let f = factor momentum tracked
        let unbiasedVar = biasedVar |> Array.map (fun v -> v * count / (count - 1.0))

        let blend (old: TorchSharp.torch.Tensor) (b: float[]) =
            let v = Array.map2 (fun o b -> (1.0 - f) * o + f * b) (TensorData.read old) b
            (TensorData.tensorLike old v).MoveToOuterDisposeScope()

        {
            Mean = blend r.Mean mean
            Var = blend r.Var unbiasedVar
            BatchesTracked = tracked
        }
