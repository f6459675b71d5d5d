#!/usr/bin/env -S dotnet fsi
// Train a small CNN with SwitchNorm2d on the embedded Fashion-MNIST subset for a short while, print the learned
// mixtures and plot them as stacked bars (the paper's figure), using the experiment's own model and plotting code.
// Run after one build: dotnet build -c Release samples/SwitchNorm.Experiment && dotnet fsi fsi-scripts/mixture-plot.fsx [steps] [png]
#load "experiment-references.fsx"
#r "../samples/SwitchNorm.Experiment/bin/Release/net10.0/switchnorm-fashion.dll"
#r "../samples/SwitchNorm.Experiment/bin/Release/net10.0/ScottPlot.dll"
#r "../samples/SwitchNorm.Experiment/bin/Release/net10.0/SkiaSharp.dll"

open System.IO
open System.Threading
open System.Runtime.InteropServices
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

// SkiaSharp's native library, by full path: dotnet fsi does not read the build's list of native assets, and the
// library's soname (libSkiaSharp.so.119.0.0) does not match the name SkiaSharp asks for.
let skia =
    NativeLibrary.Load(
        Path.Combine(__SOURCE_DIRECTORY__, "../samples/SwitchNorm.Experiment/bin/Release/net10.0/runtimes/linux-x64/native/libSkiaSharp.so")
    )

NativeLibrary.SetDllImportResolver(typeof<SkiaSharp.SKImage>.Assembly, fun name _ _ -> if name = "libSkiaSharp" then skia else nativeint 0)

let args = fsi.CommandLineArgs |> Array.skip 1
let steps = if args.Length > 0 then int args[0] else 300

let png =
    if args.Length > 1 then
        args[1]
    else
        Path.Combine(Path.GetTempPath(), "switchnorm-mixture.png")

torch.set_num_threads 2
let train, test = Data.embedded ()

let spec: Experiment.RunSpec = {
    Normalizer = Experiment.SN
    BatchSize = 16
    Epochs = 1
    MaxSteps = Some steps
    Seed = 1
    RecalibrationBatches = 50
}

printfn "Training SwitchNorm2d CNN for %d steps of batch 16 on %d Fashion-MNIST images..." steps train.Count

match Experiment.run spec train test ignore CancellationToken.None with
| Some r ->
    printfn "test accuracy after recalibration: %.1f%%" (100.0 * r.TestAccuracy)
    printfn "%s" (Mixture.format r.Mixtures)
    let dir = Path.Combine(Path.GetTempPath(), "switchnorm-mixture-plot")
    Directory.CreateDirectory dir |> ignore

    for p in Report.plotMixtures dir [ r ] do
        File.Copy(p, png, true)
        printfn "wrote %s (%d bytes)" png (FileInfo(png).Length)
| None -> failwith "training was cancelled"
