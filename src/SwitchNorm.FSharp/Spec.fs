namespace SwitchNorm

/// The defaults of BatchNorm that every constructor, factory and spec shares.
[<RequireQualifiedAccess>]
module Defaults =

    /// Added to the mixed variance before the square root: 1e-5, as in BatchNorm.
    [<Literal>]
    let Eps = 1e-5

    /// The running-average factor of the BN statistics: 0.1, as in BatchNorm.
    [<Literal>]
    let Momentum = 0.1

    /// <summary>
    /// The BN-leaning margin of <c>Conversion.batchNorm LogitInit.BatchLeaning</c>: 2, so BN's logits start at 3 and the
    /// others at 1, a BN weight of 1/(1 + 2e^−2) = 0.787. Chosen by the conversion study (switchnorm-fashion
    /// --conversion-study, 5 seeds): at margin 2 the converted CNN's test accuracy right after conversion stays within
    /// the seeds' spread of the BN network's (77.1 ± 1.1% against 77.5 ± 0.4%), its mixtures move by up to 0.21 while
    /// fine-tuning at batch 4, and it ends 0.6 ± 0.4 points above BN fine-tuned the same way; at margin 8 (BN weight
    /// 0.9993) the softmax is saturated and the mixtures move by 3e-6, so the switch does not learn.
    /// </summary>
    [<Literal>]
    let BnLogitMargin = 2.0

/// <summary>
/// Which conventions a switchable normalizer follows for its variances and running statistics.
/// </summary>
type Semantics =
    /// <summary>
    /// BatchNorm's (the default): every variance is biased (M2 / count); the running variance keeps the batch's unbiased
    /// variance, running = (1 − momentum)·running + momentum·batch (a cumulative average without a momentum), and
    /// num_batches_tracked counts the training batches.
    /// </summary>
    | Default = 0
    /// <summary>
    /// The official PyTorch code's (switchablenorms/Switchable-Normalization, devkit/ops/switchable_norm.py), so that
    /// its checkpoints compute the same numbers. With IN mixed in (SwitchNorm2d/3d): IN's variance is unbiased,
    /// M2 / (S − 1) over a row's S values, and LN's and BN's are derived from it, mean(var_in + mean_in²) − mean², which
    /// is computed here, without cancellation, as the rows' M2·S/(S − 1) pooled by the law of total variance. Without
    /// IN (SwitchNorm1d, whose components are [LN, BN] over (N, C)): each variance is the unbiased one of its group.
    /// The running statistics keep the batch's values as they are: running = (1 − momentum)·running + momentum·batch,
    /// where momentum is 1 − the official keep factor (0.9 for 2d, 0.997 for 1d and 3d, so 0.1 and 0.003 here); without
    /// a moving average (the official using_moving_average = False) they accumulate raw sums, running_mean += mean and
    /// running_var += mean² + var. Eval uses them as stored. There is no num_batches_tracked. Where the official code
    /// divides by zero (a row of one value with IN, a group of one value without it), the call is refused.
    /// </summary>
    | Official = 1

namespace SwitchNorm.FSharp

open TorchSharp
open SwitchNorm

/// <summary>
/// What a switchable normalizer computes, independent of any module: the statistics it mixes, the switch
/// that turns logits into weights, eps, the running-average momentum, and over which rows BN pools.
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
    /// True (the default): float32 CPU inputs go through the row kernels, with per-(n, c) statistics from one
    /// two-pass reduction, O(N·C) mixing in float64, one affine pass for the output and a hand-written backward that
    /// keeps x and three values per row. Other inputs, and every input when false, go through the tensor path: the
    /// same function as a composition of tensor operations, differentiated by autograd (any dtype and device, and
    /// higher-order gradients).
    /// </summary>
    Fused: bool
    /// Over which rows BN pools: this process's batch (Scope.Local, the default) or the ranks of a communicator.
    Scope: Scope
    /// <summary>
    /// The conventions for variances and running statistics: Semantics.Default (BatchNorm's) or Semantics.Official
    /// (the official PyTorch code's; then a Momentum of None means the official using_moving_average = False: the
    /// running statistics accumulate raw sums).
    /// </summary>
    Semantics: Semantics
} with

    /// True when the Batch component is mixed in.
    member this.UsesBatch = List.contains Batch this.Components

    /// The paper's spec with the given options: [IN; LN; BN] (or [IN; LN] without BN), softmax, local statistics.
    static member Create(usingBn: bool, eps: float, momentum: System.Nullable<float>) = {
        Components =
            if usingBn then
                [ Instance; Layer; Batch ]
            else
                [ Instance; Layer ]
        Switch = Switch.Softmax
        Eps = eps
        Momentum = Option.ofNullable momentum
        Fused = true
        Scope = Scope.Local
        Semantics = Semantics.Default
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

/// Whether a normalizer runs in training (BN uses and tracks the batch) or in evaluation (BN uses the running
/// statistics); IN and LN use the input either way.
[<RequireQualifiedAccess>]
type Mode =
    /// BN uses the batch's statistics and updates the running ones.
    | Train
    /// BN uses the running statistics (or the batch's when there are none); nothing is updated.
    | Eval

/// What one call did to the running statistics.
[<RequireQualifiedAccess>]
type RunningUpdate =
    /// Nothing was updated: eval, no running statistics, no BN component, or an empty batch.
    | Unchanged
    /// The running statistics after a training call, as new tensors.
    | Updated of RunningStats

/// The result of one call of the functional normalizer.
type NormResult = {
    /// The normalized output, same shape and dtype as the input.
    Output: torch.Tensor
    /// What happened to the running statistics.
    Running: RunningUpdate
    /// The batch's per-channel moments (float64, shape [1, C], detached) when BN used the batch's statistics; with a
    /// Scope.Across spec, those of the global batch.
    BatchMoments: Moments option
}
