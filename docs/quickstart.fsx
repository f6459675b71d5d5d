(**
# Quickstart

A SwitchNorm2d is a drop-in for `torch.nn.BatchNorm2d`: the same arguments, the same (N, C, H, W) in and out. The
test command runs this page as a script.
*)
(*** hide ***)
#load "../fsi-scripts/references.fsx"
(** *)
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

let norm = new SwitchNorm2d(16L)
let x = torch.randn (8L, 16L, 12L, 12L) * 4.0 + 10.0
let y = norm.forward x
(**
The output is normalized, and the layer has learned nothing yet, so its mixtures are uniform:
*)
printfn "output mean %.3f, std %.3f" (y.mean().item<float32> ()) (y.std().item<float32> ())
printfn "mean mixture [IN LN BN] = %A" norm.MeanMixture
(**
The same normalizer as a pure function: parameters and running statistics in, output and what happened to them out.
*)
let spec = Norm.paper
let p = Norm.initParams spec 16L
let r = Norm.apply spec p (Some(Norm.initRunning 16L)) Mode.Train x

match r.Running with
| RunningUpdate.Updated stats -> printfn "batches tracked: %d" stats.BatchesTracked
| RunningUpdate.Unchanged -> ()
(**
Layers compose without casts:
*)
let block =
    torch.nn.Conv2d(3L, 16L, 3L, padding = 1L)
    >-> new SwitchNorm2d(16L)
    >-> Layer.ofFn "relu" torch.nn.functional.relu

printfn "block output %A" (block.forward (torch.randn (2L, 3L, 8L, 8L))).shape
