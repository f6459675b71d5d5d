#!/usr/bin/env -S dotnet fsi
// The maths on live tensors: a one-hot mixture is exactly BatchNorm, InstanceNorm or LayerNorm (checked against
// libtorch's own functions), any mixture is the convex combination the paper defines, and the sparse switches put
// their weights on the simplex. Exits with 1 if any check fails.
// Run after packing (see references.fsx): dotnet fsi fsi-scripts/invariants.fsx
#load "references.fsx"

open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

type F = torch.nn.functional

let f64 = torch.ScalarType.Float64
// float64 outputs are O(1) and come from sums of a few hundred values: a few hundred ulps of 1.1e-16 at most.
let tolerance = 1e-12
let mutable failures = 0

let check (what: string) (a: torch.Tensor) (b: torch.Tensor) =
    let d = (a - b).abs().max().item<float> ()
    let ok = d <= tolerance
    printfn "  %-58s max |diff| = %.1e  %s" what d (if ok then "ok" else "FAILED")

    if not ok then
        failures <- failures + 1

torch.random.manual_seed 1L |> ignore
let x = torch.randn (4L, 3L, 5L, 5L, dtype = f64) * 3.0 + 2.0
let eps = 1e-5

let layerWith (logits: float[]) =
    let m = new SwitchNorm2d(3L, dtype = f64)
    use _ = torch.no_grad ()
    m.mean_weight.copy_ (torch.tensor (logits, dtype = f64)) |> ignore
    m.var_weight.copy_ (torch.tensor (logits, dtype = f64)) |> ignore
    m

// exp(-1e4) underflows to exactly 0, so these logits make the softmax exactly one-hot.
let oneHot k =
    Array.init 3 (fun i -> if i = k then 0.0 else -1e4)

printfn "One-hot mixtures reduce to the classic normalizers (training mode, float64):"
check "IN one-hot = F.instance_norm" ((layerWith (oneHot 0)).forward x) (F.instance_norm (x, eps = eps))
check "LN one-hot = F.layer_norm over (C, H, W)" ((layerWith (oneHot 1)).forward x) (F.layer_norm (x, [| 3L; 5L; 5L |], eps = eps))

let rm, rv = torch.zeros (3L, dtype = f64), torch.ones (3L, dtype = f64)
check "BN one-hot = F.batch_norm (training)" ((layerWith (oneHot 2)).forward x) (F.batch_norm (x, rm, rv, training = true, eps = eps))

printfn "A learned mixture is the paper's convex combination:"
let m = layerWith [| 0.7; -0.4; 1.3 |]
let w = m.MeanMixture
printfn "  weights [IN LN BN] = %s, sum = %.17f" (w |> Array.map (sprintf "%.4f") |> String.concat " ") (Array.sum w)

if abs (Array.sum w - 1.0) > 1e-15 || Array.exists (fun v -> v < 0.0) w then
    printfn "  the weights are not convex: FAILED"
    failures <- failures + 1

// The statistics by hand, from torch.var_mean over each group (biased variances, as BatchNorm normalizes).
let stat (dims: int64[]) =
    let struct (v, mu) = torch.var_mean (x, dims, false, true)
    mu, v

let (mi, vi), (ml, vl), (mb, vb) =
    stat [| 2L; 3L |], stat [| 1L; 2L; 3L |], stat [| 0L; 2L; 3L |]

let mean = mi * w[0] + ml * w[1] + mb * w[2]
let var = vi * w[0] + vl * w[1] + vb * w[2]
check "y = (x − Σ wₖ μₖ) / sqrt(Σ wₖ σ²ₖ + eps)" (m.forward x) ((x - mean) / (var + eps).sqrt ())

printfn "Sparse switches put their weights on the simplex, with exact zeros:"

let onSimplex (name: string) (v: float[]) =
    let ok =
        abs (Array.sum v - 1.0) < 1e-12
        && Array.forall (fun p -> p >= 0.0 && not (System.Double.IsNaN p)) v

    printfn "  %-40s %s  %s" name (v |> Array.map (sprintf "%.4f") |> String.concat " ") (if ok then "ok" else "FAILED")

    if not ok then
        failures <- failures + 1

let values (t: torch.Tensor) = t.data<float>().ToArray()
let z = torch.tensor ([| 0.9; 0.5; -0.2 |], dtype = f64)
onSimplex "softmax(0.9, 0.5, -0.2)" (values (Mixing.softmax z))
onSimplex "sparsemax(0.9, 0.5, -0.2)" (values (Mixing.sparsemax z))

for r in [ 0.0; 0.5; 1.0 ] do
    onSimplex $"sparsestmax radius {r}" (values ((Mixing.sparsestmax r) z))

onSimplex "sparsestmax radius 1 of equal logits (no NaN)" (values ((Mixing.sparsestmax 1.0) (torch.ones (3L, dtype = f64))))

if failures > 0 then
    printfn "%d check(s) FAILED" failures
    exit 1
else
    printfn "All checks passed."
