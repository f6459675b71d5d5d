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
/// How the statistics' variances are estimated (the table's variance column, set by the spec's Semantics). Every
/// variance is Σ_rows [κ·M2_row + S·(rowMean − mean)²] / D over its group of rows (S values each, count values in all).
/// </summary>
type internal Estimator =
    /// Semantics.Default: κ = 1, D = count (biased variances, as BatchNorm normalizes).
    | Biased
    /// Semantics.Official with IN: κ = S/(S − 1), D = count: IN's variance is the rows' unbiased one, and LN's and BN's
    /// are the official mean(var_in + mean_in²) − mean², without its cancellation.
    | UnbiasedRows
    /// Semantics.Official without IN: κ = 1, D = count − 1: each statistic's variance is its group's unbiased one.
    | UnbiasedGroups

    /// The factor κ of the rows' M2, for rows of s values.
    member this.Within(s: int) =
        match this with
        | UnbiasedRows -> float s / float (s - 1)
        | Biased
        | UnbiasedGroups -> 1.0

    /// The divisor D of a variance over count values.
    member this.Divisor(count: float) =
        match this with
        | UnbiasedGroups -> count - 1.0
        | Biased
        | UnbiasedRows -> count

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

    /// The variance estimator of a spec (see Estimator).
    let estimator (spec: NormSpec) =
        match spec.Semantics with
        | Semantics.Official when List.contains Instance spec.Components -> UnbiasedRows
        | Semantics.Official -> UnbiasedGroups
        | _ -> Biased

    /// <summary>
    /// What the estimator needs of an input with s values per row, in every group a call computes (sample groups of
    /// c·s values, channel groups of the batch's total per channel, when that statistic is used), as a message; None when
    /// the official formulas are finite. The official code divides by zero for a row of one value (with IN) and for a
    /// group of one value (without IN): those inputs are refused, not answered with NaN.
    /// </summary>
    let estimatorProblem (est: Estimator) (kinds: StatKind list) (c: int64) (s: int64) (perChannel: int64) =
        match est with
        | Biased -> None
        | UnbiasedRows when s < 2L ->
            Some
                $"official semantics with IN need more than one value per (n, c) row: the official code's unbiased IN variance is NaN for a single value; got {s} value(s) per row"
        | UnbiasedRows -> None
        | UnbiasedGroups ->
            if List.contains PerSample kinds && c * s < 2L then
                Some
                    $"official semantics without IN need more than one value per sample: the official code's unbiased LN variance is NaN for a single value; got {c * s}"
            elif List.contains PerChannel kinds && perChannel < 2L then
                Some
                    $"official semantics without IN need more than one value per channel in training: the official code's unbiased BN variance is NaN for a batch of one; got {perChannel}"
            else
                None

    /// <summary>
    /// The official code's update of the running statistics (Semantics.Official), in float64, from the batch's
    /// per-channel mean and variance as the estimator defines it: with a momentum f (1 − the official keep factor),
    /// running = (1 − f)·running + f·batch; without one (the official using_moving_average = False),
    /// running_mean += mean and running_var += mean² + var. The counter is kept but not stored by official modules.
    /// </summary>
    let officialUpdate (momentum: float option) (r: RunningStats) (mean: float[]) (var: float[]) =
        let apply (old: TorchSharp.torch.Tensor) (f: float -> int -> float) =
            let v = TensorData.read old |> Array.mapi (fun i o -> f o i)
            (TensorData.tensorLike old v).MoveToOuterDisposeScope()

        match momentum with
        | Some f -> {
            Mean = apply r.Mean (fun o i -> (1.0 - f) * o + f * mean[i])
            Var = apply r.Var (fun o i -> (1.0 - f) * o + f * var[i])
            BatchesTracked = r.BatchesTracked + 1L
          }
        | None -> {
            Mean = apply r.Mean (fun o i -> o + mean[i])
            Var = apply r.Var (fun o i -> o + mean[i] * mean[i] + var[i])
            BatchesTracked = r.BatchesTracked + 1L
          }

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
