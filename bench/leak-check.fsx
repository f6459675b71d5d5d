#!/usr/bin/env -S dotnet fsi
// Native-memory check: 10,000 training steps (forward, backward of sum(y · g), running-statistics update) of
// SwitchNorm2d on (8,16,16,16), printing RSS and managed memory every 2000 steps. Run after
// `dotnet build -c Release samples/SwitchNorm.Experiment` (its references: fsi-scripts/experiment-references.fsx):
//   dotnet fsi bench/leak-check.fsx              SwitchNorm2d, each step in a dispose scope (TorchSharp's idiom)
//   dotnet fsi bench/leak-check.fsx noscope      SwitchNorm2d, no dispose scope: only the GC releases tensors
//   dotnet fsi bench/leak-check.fsx bn           BatchNorm2d, the baseline (bn-noscope: without dispose scopes)
//   dotnet fsi bench/leak-check.fsx composed     SwitchNorm2d on the composed (autograd) path
#load "../fsi-scripts/experiment-references.fsx"

open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

let mode = fsi.CommandLineArgs |> Array.tryItem 1 |> Option.defaultValue "scope"

let m: torch.nn.Module<torch.Tensor, torch.Tensor> =
    match mode with
    | "bn"
    | "bn-noscope" -> torch.nn.BatchNorm2d(16L)
    | _ ->
        let sn = new SwitchNorm2d(16L)
        sn.Fused <- (mode <> "composed")
        sn

let rss () =
    use p = System.Diagnostics.Process.GetCurrentProcess()
    p.WorkingSet64 / 1048576L

let g = torch.randn (8L, 16L, 16L, 16L)

let step () =
    let x = torch.randn(8L, 16L, 16L, 16L).requires_grad_ (true)
    (m.forward x * g).sum().backward ()
    m.zero_grad ()

for i in 1..5 do
    for _ in 1..2000 do
        if mode.EndsWith "noscope" then
            step ()
        else
            use _ = torch.NewDisposeScope()
            step ()

    System.GC.Collect()
    System.GC.WaitForPendingFinalizers()
    printfn "%s: after %5d steps: RSS %d MB, managed %d MB" mode (i * 2000) (rss ()) (System.GC.GetTotalMemory(true) / 1048576L)
