(**
# PyTorch checkpoints and the official model zoo

Every Switchable Normalization model trained so far comes from the official PyTorch code. `Models.*` (C#: `models.*`)
builds its ResNets with the official module names and `Semantics.Official` in every SN layer; `PyTorch.load`
(C#: `model.LoadPyTorch(path)`) reads `torch.save` files and .safetensors all or nothing, and `PyTorch.save`
(C#: `model.SavePyTorch(path, layout)`) writes files Python's `torch.load` reads. The test command runs this page as a
script; `tests/SwitchNorm.Tests/Interop.fs` checks the same routes against a real PyTorch (Debian's python3-torch).
*)
(*** hide ***)
#load "../fsi-scripts/references.fsx"
(** *)
open System.IO
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

torch.random.manual_seed 0L |> ignore
let net = Models.resnetv1sn18 { ResNetOptions.V1 with NumClasses = 10L }
let keys = [ for kv in net.state_dict () -> kv.Key ]
printfn "%d keys, e.g. %s; no num_batches_tracked: %b" keys.Length keys[1] (keys |> List.forall (fun k -> not (k.EndsWith "num_batches_tracked")))
(**
Written in the official layout with the DataParallel prefix, as the official training script's files are, and loaded
into a fresh network, the logits are bitwise the same:
*)
let path = Path.Combine(Path.GetTempPath(), "interop-guide.pth")
PyTorch.save PyTorchLayout.Official "module." path net
let fresh = Models.resnetv1sn18 { ResNetOptions.V1 with NumClasses = 10L }
let result = PyTorch.load true path fresh
net.eval ()
fresh.eval ()
let x = torch.randn (2L, 3L, 224L, 224L)

let same =
    use _ = torch.no_grad ()
    (net.forward x).eq(fresh.forward x).all().item<bool> ()

printfn "missing keys %A, same logits: %b" result.MissingKeys same
(**
Loading checks everything first. A default-semantics layer refuses an official checkpoint (its statistics would
differ from the official ones), and the message says what to build instead:
*)
let layerPath = Path.Combine(Path.GetTempPath(), "interop-guide-layer.pt")
PyTorch.save PyTorchLayout.Official "" layerPath (SwitchNorm2d.Official(64L))
let plain = new SwitchNorm2d(64L)

try
    PyTorch.load true layerPath plain |> ignore
with :? InvalidDataException as e ->
    printfn "refused: %s" (e.Message.Substring(0, min 160 e.Message.Length))
(**
The checkpoints released in 2018 use PyTorch's legacy serialization. Re-save each once with any PyTorch ≥ 1.6:

```
python3 -c "import torch; torch.save(torch.load('old.pth', map_location='cpu'), 'new.pth')"
```

then `PyTorch.load true "new.pth" (Models.resnetv1sn50 ResNetOptions.V1)`.
*)
