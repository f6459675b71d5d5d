namespace SwitchNorm

/// <summary>
/// The switch a SwitchNorm module uses, as a plain enum (usable from C#): the paper's softmax, sparsemax, or
/// sparsestmax at the module's radius (Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax",
/// CVPR 2019).
/// </summary>
type SwitchKind =
    /// softmax(λ): dense weights, the paper's switch (the default).
    | Softmax = 0
    /// sparsemax(λ): the Euclidean projection onto the simplex; exact zeros.
    | Sparsemax = 1
    /// sparsestmax(λ, ρ): the projection onto the simplex outside a ball of radius ρ; one-hot at ρ = 1.
    | Sparsestmax = 2

namespace SwitchNorm.FSharp

open TorchSharp
open SwitchNorm

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

/// Mixing weights and convex combinations of statistics.
[<RequireQualifiedAccess>]
module Mixing =

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

    /// The values of a small tensor, in float64.
    let private valuesOf (t: torch.Tensor) : float[] =
        use d = t.detach().to_type(torch.ScalarType.Float64).cpu().contiguous ()
        d.data<float>().ToArray()

    /// The logits' values, refused with an ArgumentException when one is NaN or infinite: every switch treats a
    /// non-finite logit alike, since no mixture follows from it (softmax would give NaN weights, the sparse
    /// projections a made-up point).
    let private finiteValues (switch: string) (z: torch.Tensor) : float[] =
        let v = valuesOf z

        if v |> Array.exists (fun a -> not (System.Double.IsFinite a)) then
            invalidArg "logits" $"Mixing.{switch}: the logits must be finite; got %A{v}."

        v

    /// <summary>
    /// The paper's switch: softmax(λ)ₖ = exp(λₖ) / Σⱼ exp(λⱼ), stable for any finite logits. A NaN or infinite logit
    /// is refused with an ArgumentException, as by every switch.
    /// </summary>
    [<CompiledName("Softmax")>]
    let softmax (logits: torch.Tensor) : torch.Tensor =
        finiteValues "softmax" logits |> ignore
        logits.softmax 0L

    /// Indices of v from largest to smallest value, ties by lower index.
    let private descending (v: float[]) =
        Array.init v.Length id
        |> Array.sortWith (fun a b -> compare (v[b], a) (v[a], b))

    let private indexTensor (idx: int[]) (device: torch.Device) =
        torch.tensor (idx |> Array.map int64, dtype = torch.ScalarType.Int64, device = device)

    /// <summary>
    /// sparsemax (Martins and Astudillo, ICML 2016): the Euclidean projection of the logits onto the simplex,
    /// max(λ − τ, 0) with τ chosen so the weights sum to 1. Unlike softmax it gives exact zeros. Differentiable
    /// through autograd (the support is fixed within a step).
    /// </summary>
    [<CompiledName("Sparsemax")>]
    let sparsemax (z: torch.Tensor) : torch.Tensor =
        let v = finiteValues "sparsemax" z
        let order = descending v
        // the support: the largest m with 1 + m·v(m) > v(1) + … + v(m), over values sorted downwards
        let mutable cum = 0.0
        let mutable m = 0

        for j in 1 .. v.Length do
            cum <- cum + v[order[j - 1]]

            if 1.0 + float j * v[order[j - 1]] > cum then
                m <- j

        use top = indexTensor order[0 .. m - 1] z.device
        use chosen = z.index_select (0L, top)
        use s = chosen.sum ()
        use tau = (s - 1.0) / float m
        use shifted = z - tau
        shifted.clamp_min (0.0)

    /// <summary>
    /// sparsestmax (Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax", CVPR 2019) at
    /// radius ρ ∈ [0, 1]: the projection of the logits onto the part of the simplex at distance at least
    /// ρ·sqrt(1 − 1/K) from its centre. ρ = 0 is sparsemax; ρ = 1 leaves only the vertices, so the weights are
    /// one-hot. When sparsemax lands inside the ball, the nearest point on the sphere maximizes ⟨p, λ⟩; it lies on
    /// the face of the m largest logits, at the face's centre plus the centred logits scaled to the sphere, for the
    /// largest m that keeps every weight non-negative. Equal logits pick the lowest index, so there is no NaN.
    /// </summary>
    [<CompiledName("Sparsestmax")>]
    let sparsestmax (radius: float) (z: torch.Tensor) : torch.Tensor =
        if not (radius >= 0.0 && radius <= 1.0) then
            invalidArg "radius" $"Mixing.sparsestmax: the radius must lie in [0, 1]; got {radius}."

        finiteValues "sparsestmax" z |> ignore

        let p0 = sparsemax z
        let k = int z.shape[0]
        let r2 = radius * radius * (1.0 - 1.0 / float k)
        let centre = 1.0 / float k
        let dist2 = valuesOf p0 |> Array.sumBy (fun p -> (p - centre) * (p - centre))

        if k = 1 || dist2 >= r2 then
            p0
        else
            p0.Dispose()
            let v = valuesOf z
            let order = descending v

            let rec onFace m =
                // the sphere's trace on the face of the top m logits: centre 1/m there, radius² r² − (1/m − 1/K)
                let rFace2 = r2 - (1.0 / float m - 1.0 / float k)

                if m = 1 then
                    // the vertex of the largest logit
                    use idx = indexTensor [| order[0] |] z.device
                    use one = torch.ones (1L, dtype = z.dtype, device = z.device)
                    use zeros = z * 0.0 // zeros that stay in the graph, so a constant result still has a (zero) gradient
                    zeros.scatter (0L, idx, one)
                elif rFace2 < 0.0 then
                    onFace (m - 1)
                else
                    let rFace = sqrt (max rFace2 0.0)
                    use idx = indexTensor order[0 .. m - 1] z.device
                    use zs = z.index_select (0L, idx)
                    use centred = zs - zs.mean ()
                    let norm = sqrt (valuesOf centred |> Array.sumBy (fun a -> a * a))

                    use direction =
                        if norm > 1e-12 then
                            centred / norm
                        else
                            // equal logits on the face: head for the first one's vertex
                            let d =
                                Array.init m (fun i -> if i = 0 then 1.0 - 1.0 / float m else -1.0 / float m)

                            let dn = sqrt (Array.sumBy (fun a -> a * a) d)
                            torch.tensor (d |> Array.map (fun a -> a / dn), dtype = z.dtype, device = z.device)

                    let ps = direction * rFace + 1.0 / float m

                    if valuesOf ps |> Array.forall (fun a -> a >= 0.0) then
                        use zeros = z * 0.0 // zeros that stay in the graph, so a constant result still has a (zero) gradient
                        zeros.scatter (0L, idx, ps)
                    else
                        ps.Dispose()
                        onFace (m - 1)

            onFace k

    /// <summary>
    /// Whether weights are one-hot: one equals 1 and the others 0, up to a few float64 roundings (sparsemax and
    /// sparsestmax produce exact zeros).
    /// </summary>
    [<CompiledName("IsOneHot")>]
    let isOneHot (weights: float[]) =
        weights.Length > 0
        && (weights |> Array.filter (fun w -> abs (w - 1.0) <= 1e-12) |> Array.length) = 1
        && (weights |> Array.filter (fun w -> abs w <= 1e-12) |> Array.length) = weights.Length - 1

/// <summary>
/// A switch: what turns a vector of K logits into K convex mixing weights (non-negative, summing to 1). The paper
/// (Luo et al., ICLR 2019) uses the softmax; SSN (Shao et al., CVPR 2019) sparsemax and sparsestmax. Every switch
/// refuses a NaN or infinite logit with an ArgumentException.
/// </summary>
[<RequireQualifiedAccess>]
type Switch =
    /// softmax(λ): dense weights, the paper's switch.
    | Softmax
    /// sparsemax(λ): the Euclidean projection onto the simplex, with exact zeros.
    | Sparsemax
    /// sparsestmax(λ, ρ) at a radius ρ in [0, 1]: sparsemax at 0, one-hot at 1.
    | Sparsestmax of radius: float
    /// Any function of the logits, named for messages; its weights are checked to be convex where they are used.
    | Custom of name: string * weights: (torch.Tensor -> torch.Tensor)

    /// The mixing weights [K] of logits [K].
    member this.Apply(logits: torch.Tensor) : torch.Tensor =
        match this with
        | Softmax -> Mixing.softmax logits
        | Sparsemax -> Mixing.sparsemax logits
        | Sparsestmax radius -> Mixing.sparsestmax radius logits
        | Custom(_, f) -> f logits

    /// <summary>
    /// The switch of a <see cref="T:SwitchNorm.SwitchKind"/>; <paramref name="radius"/> (in [0, 1]) is used by
    /// sparsestmax only.
    /// </summary>
    static member OfKind(kind: SwitchKind, radius: float) : Switch =
        match kind with
        | SwitchKind.Softmax -> Softmax
        | SwitchKind.Sparsemax -> Sparsemax
        | SwitchKind.Sparsestmax ->
            if not (radius >= 0.0 && radius <= 1.0) then
                invalidArg "radius" $"Mixing.sparsestmax: the radius must lie in [0, 1]; got {radius}."

            Sparsestmax radius
        | other -> invalidArg "kind" $"Switch.OfKind: unknown switch kind {int other}; expected Softmax, Sparsemax or Sparsestmax."
