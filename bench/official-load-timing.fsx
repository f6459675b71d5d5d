// How long an official ResNet-50 v1 SN checkpoint takes to load, and one eval forward of (1, 3, 224, 224).
//   /usr/bin/python3 tests/interop/official_sn.py resnet50 /tmp/r50 && dotnet fsi bench/official-load-timing.fsx /tmp/r50
// (the first command writes a nested, module.-prefixed checkpoint with optimizer state, as the official training
// script does, with python3-torch; run after `dotnet build -c Release samples/SwitchNorm.Experiment`)
#load "../fsi-scripts/experiment-references.fsx"

open System.Diagnostics
open System.IO
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

let dir = fsi.CommandLineArgs[1]
let path = Path.Combine(dir, "resnetv1sn50_nested.pth")
torch.set_num_threads 2

for run in 1..3 do
    let sw = Stopwatch.StartNew()
    let net = Models.resnetv1sn50 ResNetOptions.V1
    let built = sw.Elapsed.TotalMilliseconds
    PyTorch.load true path net |> ignore
    let loaded = sw.Elapsed.TotalMilliseconds
    net.eval ()
    let x = torch.randn (1L, 3L, 224L, 224L)

    let first =
        use _ = torch.no_grad ()
        let t = Stopwatch.StartNew()
        net.forward x |> ignore
        t.Elapsed.TotalMilliseconds

    let steady =
        use _ = torch.no_grad ()
        let t = Stopwatch.StartNew()

        for _ in 1..5 do
            net.forward x |> ignore

        t.Elapsed.TotalMilliseconds / 5.0

    printfn
        "run %d (2 threads): build %.0f ms, load %.0f ms (%.0f MB file), first eval forward %.0f ms, then %.0f ms per forward"
        run
        built
        (loaded - built)
        (float (FileInfo(path).Length) / 1e6)
        first
        steady

    net.Dispose()
