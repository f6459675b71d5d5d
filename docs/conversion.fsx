(**
# Converting a BatchNorm network

`Conversion.batchNorm` (C#: `model.ConvertBatchNorm()`) replaces every BatchNorm the forward can reach (children,
Sequentials, ModuleLists, ModuleDicts, fields) by the matching SwitchNorm and carries its state over. With
`LogitInit.BatchLeaning`, BN's logits start a margin above the others, so a trained network keeps its function at
first. The test command runs this page as a script; `tests/consumers` does the same with TorchVision's resnet18 from C#.
*)
(*** hide ***)
#load "../fsi-scripts/references.fsx"
(** *)
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

let block (cin: int64) =
    Layer.sequential [ torch.nn.Conv2d(cin, 8L, 3L, padding = 1L); torch.nn.BatchNorm2d(8L); torch.nn.ReLU() ]

let model = Layer.sequential [ block 3L; block 8L; torch.nn.AdaptiveAvgPool2d(1L) ]
model.eval () |> ignore
let x = torch.randn (4L, 3L, 16L, 16L)
let before = (use _ = torch.no_grad () in model.forward x)

let result = Conversion.batchNorm LogitInit.BatchLeaning 8.0 model
printfn "%O" result
(**
In eval, the converted network computes nearly what it did (BN weight 1/(1 + 2e⁻⁸) in both mixtures):
*)
let after = (use _ = torch.no_grad () in model.forward x)
printfn "largest change of the output: %.2g" ((after - before).abs().max().item<float32> ())
(**
Batch-average recalibration sets each layer's running statistics to the exact mean and unbiased variance of the
batches it sees, as the paper does instead of the moving average:
*)
let batches = [ for _ in 1..4 -> torch.randn (8L, 3L, 16L, 16L) ]
printfn "recalibrated from %d batches" (Recalibrate.batchAverage model batches)
Mixture.ofModel model |> Mixture.format |> printfn "%s"
