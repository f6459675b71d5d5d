#!/usr/bin/env -S dotnet fsi
// Quickstart: build a SwitchNorm2d, run it, read its mixture.
// Run after packing (see references.fsx): dotnet fsi fsi-scripts/quickstart.fsx
#load "references.fsx"

open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

torch.random.manual_seed 0L |> ignore

// A drop-in for torch.nn.BatchNorm2d(16): same arguments, same (N, C, H, W) -> (N, C, H, W).
let norm = new SwitchNorm2d(16L)
let x = torch.randn (8L, 16L, 12L, 12L) * 4.0 + 10.0
let y = norm.forward x

printfn "input  mean %.3f, std %.3f" (x.mean().item<float32> ()) (x.std().item<float32> ())
printfn "output mean %.3f, std %.3f  (shape %A)" (y.mean().item<float32> ()) (y.std().item<float32> ()) y.shape

// The mixture starts uniform (all logits 1, as in the paper).
printfn "mean mixture [IN LN BN] = %A" norm.MeanMixture
printfn "var  mixture [IN LN BN] = %A" norm.VarMixture

// One training step moved the BN running statistics towards the batch's.
printfn
    "num_batches_tracked = %d, running_mean[0] = %.3f"
    (norm.num_batches_tracked.item<int64> ())
    (norm.running_mean[0L].item<float32> ())

// The same normalizer as a pure function, in an explicit mode.
let spec = Norm.paper
let p = Norm.initParams spec 16L
let r = Norm.apply spec p (Some(Norm.initRunning 16L)) Mode.Train x
printfn "functional output equals the module's: %b" (torch.allclose (r.Output, y, rtol = 0.0, atol = 1e-5))

if not (torch.allclose (r.Output, y, rtol = 0.0, atol = 1e-5)) then
    exit 1
