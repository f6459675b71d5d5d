#!/usr/bin/env -S dotnet fsi
// Native-memory check: 5000 training steps of SwitchNorm2d (or BatchNorm2d with any argument) on (8,16,16,16),
// printing RSS and managed memory after each 1000. Run after `dotnet build -c Release samples/SwitchNorm.Demo`:
//   dotnet fsi bench/leak-check.fsx        (SwitchNorm2d)
//   dotnet fsi bench/leak-check.fsx bn     (BatchNorm2d, the baseline)
#load "../fsi-scripts/references.fsx"

open TorchSharp
open SwitchNorm

let m =
    (if fsi.CommandLineArgs.Length > 1 then
         torch.nn.BatchNorm2d(16L) :> torch.nn.Module<torch.Tensor, torch.Tensor>
     else
         new SwitchNorm2d(16L))

let rss () =
    System.Diagnostics.Process.GetCurrentProcess().Refresh()
    System.Diagnostics.Process.GetCurrentProcess().WorkingSet64 / 1048576L

let run n =
    for _ in 1..n do
        use _ = torch.NewDisposeScope()
        let x = torch.randn(8L, 16L, 16L, 16L).requires_grad_ (true)
        let y = m.forward x
        y.sum().backward ()
        m.zero_grad ()

for i in 1..5 do
    run 1000
    System.GC.Collect()
    printfn "after %d steps: RSS %d MB, managed %d MB" (i * 1000) (rss ()) (System.GC.GetTotalMemory(true) / 1048576L)
