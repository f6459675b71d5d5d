// A stranger's script: the packages of the local feed only (tests/consumers/run.sh fills in the feed and version).
#i "nuget: @FEED@"
#r "nuget: SwitchNorm.FSharp, @VERSION@"
#r "nuget: libtorch-cpu-linux-x64, 2.10.0"

open System.IO
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

// loads TorchSharp's native libraries (on Debian 12, a patched copy of libLibTorchSharp.so from the user's cache)
Backend.Load()

let model =
    torch.nn.Conv2d(3L, 8L, 3L, padding = 1L)
    >-> new SwitchNorm2d(8L)
    >-> Layer.ofFn "relu" torch.nn.functional.relu

let optimizer = torch.optim.SGD(model.parameters (), 0.05)

for step in 1..3 do
    use _ = torch.NewDisposeScope()
    optimizer.zero_grad ()
    let loss = (model.forward (torch.randn (4L, 3L, 8L, 8L))).square().mean ()
    loss.backward ()
    optimizer.step () |> ignore
    printfn "step %d: loss %.4f" step (loss.item<float32> ())

let path = Path.GetTempFileName()
model.save path |> ignore
Checkpoint.load false path model
File.Delete path
Mixture.ofModel model |> Mixture.format |> printfn "%s"
printfn "script ok"
