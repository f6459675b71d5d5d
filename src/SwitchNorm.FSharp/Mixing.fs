namespace SwitchNorm

open TorchSharp

/// The statistics a switchable normalizer can mix, in the paper's order [IN, LN, BN].
type Component =
    /// Instance normalization: per (n, c) over the spatial positions.
    | Instance
    /// Layer normalization: per n over the channels and spatial positions.
    | Layer
    /// Batch normalization: per c over the batch and spatial positions; keeps running statistics.
    | Batch

    /// The conventional short name: "IN", "LN" or "BN".
    member this.ShortName =
        match this with
        | Instance -> "IN"
        | Layer -> "LN"
        | Batch -> "BN"

/// <summary>
/// A switch turns a vector of K logits into K convex mixing weights (non-negative, summing to 1).
/// The paper (Luo et al., ICLR 2019) uses a softmax.
/// </summary>
type Switch = torch.Tensor -> torch.Tensor

/// Mixing weights and convex combinations of statistics.
[<RequireQualifiedAccess>]
module Mixing =

    /// The softmax switch as an object of its own type, so the fused path can recognise it and apply it inside.
    type private SoftmaxSwitch() =
        inherit FSharpFunc<torch.Tensor, torch.Tensor>()
        override _.Invoke(logits: torch.Tensor) = logits.softmax 0L

    /// <summary>The paper's switch: softmax(λ)ₖ = exp(λₖ) / Σⱼ exp(λⱼ), stable for any finite logits.</summary>
    [<CompiledName("Softmax")>]
    let softmax: Switch = unbox<Switch> (box (SoftmaxSwitch()))

    /// Whether a switch is <c>Mixing.softmax</c> (which the fused path computes in float64 itself).
    let internal isSoftmax (switch: Switch) = (box switch) :? SoftmaxSwitch

    /// <summary>
    /// Σₖ wₖ · statₖ, for weights of shape [K] and K statistics that broadcast against each other
    /// (for example [N, C], [N, 1] and [1, C]).
    /// </summary>
    [<CompiledName("Mix")>]
    let mix (weights: torch.Tensor) (stats: torch.Tensor list) : torch.Tensor =
        if int weights.shape[0] <> List.length stats then
            invalidArg "stats" $"Mixing.mix: {weights.shape[0]} weights but {List.length stats} statistics."

        stats
        |> List.mapi (fun k s -> weights[int64 k] * s)
        |> List.reduce (fun a b -> a + b)
