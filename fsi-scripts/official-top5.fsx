#!/usr/bin/env -S dotnet fsi
// An official-format Switchable Normalization checkpoint (torch.save of {'epoch', 'state_dict' with 'module.' keys,
// 'optimizer', ...}, as the official training script writes them) loaded into the zoo's ResNet-50... here ResNet-18 v1
// with 10 classes, the checkpoint the interop tests write with a real PyTorch (no weights can be downloaded here), and
// the top-5 classes of an image tensor.
//   dotnet fsi fsi-scripts/official-top5.fsx [checkpoint.pth]
// Without an argument it takes $SWITCHNORM_INTEROP_FIXTURES/resnetv1sn18_nested.pth (the test command writes it with
// tests/interop/official_sn.py), or writes that file itself with /usr/bin/python3.
// For a released ImageNet checkpoint: Models.resnetv1sn50 ResNetOptions.V1, after re-saving the 2018 file once with
// PyTorch >= 1.6: python3 -c "import torch; torch.save(torch.load('old.pth', map_location='cpu'), 'new.pth')".
#load "references.fsx"

open System
open System.Diagnostics
open System.IO
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

if Environment.GetEnvironmentVariable "SWITCHNORM_SKIP_PYTORCH" = "1" then
    printfn "SKIPPED (loudly): no python3-torch here to write the official-format checkpoint"
    exit 0

let checkpoint =
    match fsi.CommandLineArgs |> Array.tail with
    | [| path |] -> path
    | _ ->
        let dir =
            match Environment.GetEnvironmentVariable "SWITCHNORM_INTEROP_FIXTURES" with
            | d when not (String.IsNullOrEmpty d) -> d
            | _ ->
                let d = Path.Combine(Path.GetTempPath(), "switchnorm-top5")

                let script =
                    Path.Combine(__SOURCE_DIRECTORY__, "..", "tests", "interop", "official_sn.py")

                use p = Process.Start("/usr/bin/python3", $"\"{script}\" fixtures \"{d}\"")
                p.WaitForExit()

                if p.ExitCode <> 0 then
                    failwith "official_sn.py fixtures failed"

                d

        Path.Combine(dir, "resnetv1sn18_nested.pth")

// the official architecture with official semantics in every SN layer; keys exactly the official ones
let net =
    Models.resnetv1sn18 {
        ResNetOptions.V1 with
            NumClasses = 10L
    }

let sw = Stopwatch.StartNew()
let result = PyTorch.load true checkpoint net

printfn
    "loaded %s in %d ms (module. prefix stripped, optimizer state dropped; missing: %A)"
    (Path.GetFileName checkpoint)
    sw.ElapsedMilliseconds
    result.MissingKeys

net.eval ()

// an "image": (1, 3, 224, 224), normalized as ImageNet inputs are
torch.random.manual_seed 0L |> ignore
let image = torch.rand (1L, 3L, 224L, 224L)
let mean = torch.tensor([| 0.485f; 0.456f; 0.406f |]).view (1L, 3L, 1L, 1L)
let std = torch.tensor([| 0.229f; 0.224f; 0.225f |]).view (1L, 3L, 1L, 1L)

let probs =
    use _ = torch.no_grad ()
    (net.forward ((image - mean) / std)).softmax 1L

let struct (p, classes) = probs.topk 5
printfn "top-5 classes:"

for i in 0..4 do
    printfn "  class %d  p = %.4f" (classes[0L, int64 i].item<int64> ()) (p[0L, int64 i].item<float32> ())
