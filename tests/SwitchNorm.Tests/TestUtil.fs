module TestUtil

open System
open TorchSharp
open Xunit

// Tests share libtorch's global random generator (torch.random.manual_seed): run them one at a time, so a seed
// gives the same values whatever else is running.
[<assembly: CollectionBehavior(DisableTestParallelization = true)>]
do ()

/// Tolerances follow from the dtype's unit roundoff u: float64 u = 1.1e-16, float32 u = 6.0e-8.
/// Normalized outputs are O(1) and come out of reductions over at most a few thousand values, whose
/// rounding error grows like log2(n)·u for pairwise sums; a factor of about 100·u covers that with margin
/// while staying far below any real error (a wrong statistic moves outputs by 1e-2 or more).
let tol (dtype: torch.ScalarType) =
    match dtype with
    | torch.ScalarType.Float64 -> 1e-10
    | torch.ScalarType.Float32 -> 2e-5
    | torch.ScalarType.Float16 -> 4e-3 // u = 4.9e-4
    | torch.ScalarType.BFloat16 -> 3e-2 // u = 3.9e-3
    | _ -> failwith "tol: not a floating dtype"

/// Max |a − b| over all elements, in float64.
let maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) =
    use d =
        (a.to_type torch.ScalarType.Float64 - b.to_type torch.ScalarType.Float64).abs ()

    if d.numel () = 0L then 0.0 else d.max().item<float> ()

/// Asserts |a − b| ≤ atol + rtol·|b| elementwise and the same shape, reporting the worst element.
let assertClose (what: string) (atol: float) (a: torch.Tensor) (b: torch.Tensor) =
    if a.shape <> b.shape then
        failwith $"{what}: shape {SwitchNorm.Checks.shapeText a.shape} vs {SwitchNorm.Checks.shapeText b.shape}"

    use a64 = a.detach().to_type torch.ScalarType.Float64
    use b64 = b.detach().to_type torch.ScalarType.Float64
    use err = (a64 - b64).abs () - b64.abs () * atol

    if err.numel () > 0L then
        let worst = err.max().item<float> ()

        if Double.IsNaN worst || worst > atol then
            failwith $"{what}: max |a − b| = {maxAbsDiff a b:g} exceeds tolerance {atol:g}"

/// Same shape and bitwise-equal values.
let exactEq (a: torch.Tensor) (b: torch.Tensor) =
    a.shape = b.shape && (a.eq b).all().item<bool> ()

let seeded (seed: int64) = torch.random.manual_seed seed |> ignore

/// A generator of its own for one draw: unlike the global seed, unaffected by tests running on other threads.
let private generator (seed: int64) = new torch.Generator(uint64 seed)

/// Standard normal values of the given shape from a private generator seeded with seed.
let randnSeeded (seed: int64) (shape: int64[]) (dtype: torch.ScalarType) =
    use g = generator seed
    torch.randn (shape, dtype = dtype, generator = g)

/// Uniform [0, 1) values of the given shape from a private generator seeded with seed.
let randSeeded (seed: int64) (shape: int64[]) (dtype: torch.ScalarType) =
    use g = generator seed
    torch.rand (shape, dtype = dtype, generator = g)

/// A random permutation of 0 .. n − 1 from a private generator seeded with seed.
let randpermSeeded (seed: int64) (n: int64) =
    use g = generator seed
    torch.randperm (n, generator = g)

/// Logits that make the softmax exactly one-hot (exp(−1e4) underflows to 0 in every dtype).
let oneHotLogits (k: int) (hot: int) (dtype: torch.ScalarType) =
    torch.tensor (Array.init k (fun i -> if i = hot then 0.0 else -1e4), dtype = dtype)

/// Sets a SwitchNorm module's logits to one-hot on component `hot`.
let setOneHot (m: SwitchNorm.SwitchNormNd) (hot: int) =
    use _ = torch.no_grad ()
    let k = int m.mean_weight.shape[0]
    use l = oneHotLogits k hot m.mean_weight.dtype
    m.mean_weight.copy_ l |> ignore
    m.var_weight.copy_ l |> ignore

let throws<'e when 'e :> exn> (f: unit -> obj) (fragments: string list) =
    let e = Assert.ThrowsAny<'e>(fun () -> f () |> ignore)

    for frag in fragments do
        if not (e.Message.Contains(frag: string)) then
            failwith $"message '{e.Message}' lacks '{frag}'"
