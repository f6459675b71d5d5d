/// Folding for deployment: a SwitchNorm whose two mixtures are one-hot on the same statistic becomes the plain
/// TorchSharp layer, with the same eval output.
module FoldingTests

open System
open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private f32 = torch.ScalarType.Float32

type private M = torch.nn.Module<torch.Tensor, torch.Tensor>

/// A custom module that holds one layer in a field and one in a ModuleList, and calls both in its forward.
type private Holder(first: M, second: M) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("holder")
    let mutable first = first
    let items = torch.nn.ModuleList<M>(second)
    do this.RegisterComponents()
    member _.Items = items
    override _.forward x = items[0].call (first.call x)

/// A layer of the given rank whose mixtures both select component `hot` (logits 0 there, −40 elsewhere).
let private selecting (dims: int) (hot: int) (affine: bool) (seed: int64) : SwitchNormNd =
    let m: SwitchNormNd =
        match dims with
        | 1 -> new SwitchNorm1d(3L, affine = affine)
        | 3 -> new SwitchNorm3d(3L, affine = affine)
        | _ -> new SwitchNorm2d(3L, affine = affine)

    use _ = torch.no_grad ()
    let logits = torch.tensor (Array.init 3 (fun i -> if i = hot then 0.0f else -40.0f))
    m.mean_weight.copy_ logits |> ignore
    m.var_weight.copy_ logits |> ignore

    if affine then
        m.weight.copy_ (randnSeeded seed [| 3L |] f32) |> ignore
        m.bias.copy_ (randnSeeded (seed + 1L) [| 3L |] f32) |> ignore

    m.running_mean.copy_ (randnSeeded (seed + 2L) [| 3L |] f32) |> ignore

    m.running_var.copy_ ((randnSeeded (seed + 3L) [| 3L |] f32).abs () + 0.5)
    |> ignore

    m

let private input (dims: int) (seed: int64) =
    let shape =
        match dims with
        | 1 -> [| 4L; 3L; 6L |]
        | 3 -> [| 2L; 3L; 3L; 4L; 2L |]
        | _ -> [| 2L; 3L; 5L; 4L |]

    randnSeeded seed shape f32 * 2.0 + 1.0

[<Fact>]
let ``every one-hot selection folds into the plain layer with the same eval output, in any container`` () =
    for dims in [ 1; 2; 3 ] do
        for hot in [ 0; 1; 2 ] do
            for affine in [ true; false ] do
                let seed = int64 (dims * 100 + hot * 10 + (if affine then 1 else 0))
                let a = selecting dims hot affine seed
                let b = selecting dims hot affine (seed + 50L)
                let mixed = new SwitchNorm1d(3L)
                let holder = new Holder(a, b)
                let model = holder :> M
                let list = holder.Items
                model.eval () |> ignore
                let x = input dims seed
                let before = (use _ = torch.no_grad () in model.forward x)
                let result = Folding.forInference model
                let after = (use _ = torch.no_grad () in model.forward x)
                let name = [| "IN"; "LN"; "BN" |][hot]
                let what = $"{dims}d, selecting {name}, affine {affine}"
                // IN of a 1d layer has no plain equivalent and stays SwitchNorm
                let expected = if dims = 1 && hot = 0 then 0 else 2
                Assert.True((result.Count = expected), $"{what}: folded {result.Count}, expected {expected} ({result})")
                assertClose what 1e-4 after before

                if expected > 0 then
                    Assert.False(list[0] :? SwitchNormNd, $"{what}: the list still holds a SwitchNorm")

                // a mixed selection stays SwitchNorm
                Assert.Equal(0, (Folding.forInference (Layer.sequential [ mixed ])).Count)

[<Fact>]
let ``Conv followed by BatchNorm, or by a SwitchNorm that selects BN, fuses into the convolution with the same eval output`` () =
    for dims in [ 1; 2; 3 ] do
        let conv (cin: int64) (bias: bool) : M =
            match dims with
            | 1 -> torch.nn.Conv1d(cin, 3L, 3L, padding = 1L, bias = bias)
            | 3 -> torch.nn.Conv3d(cin, 3L, 3L, padding = 1L, bias = bias)
            | _ -> torch.nn.Conv2d(cin, 3L, 3L, padding = 1L, bias = bias)

        let bn: M =
            let b: TorchSharp.Modules.BatchNorm =
                match dims with
                | 1 -> torch.nn.BatchNorm1d(3L)
                | 3 -> torch.nn.BatchNorm3d(3L)
                | _ -> torch.nn.BatchNorm2d(3L)

            use _ = torch.no_grad ()
            b.weight.copy_ (randnSeeded 5L [| 3L |] f32) |> ignore
            b.bias.copy_ (randnSeeded 6L [| 3L |] f32) |> ignore
            b.running_mean.copy_ (randnSeeded 7L [| 3L |] f32) |> ignore
            b.running_var.copy_ ((randnSeeded 8L [| 3L |] f32).abs () + 0.5) |> ignore
            b :> M

        let sn = selecting dims 2 true 40L :> M
        let inner = Layer.sequential [ conv 3L true; sn; torch.nn.ReLU() ]
        let model = Layer.sequential [ conv 3L false; bn; torch.nn.ReLU(); inner ]
        model.eval () |> ignore
        let x = input dims 9L
        let before = (use _ = torch.no_grad () in model.forward x)
        let result = Folding.fuseConvBn model
        let after = (use _ = torch.no_grad () in model.forward x)
        Assert.Equal<string list>([ "1"; "3.1" ], List.ofSeq result.Names)
        assertClose $"{dims}d fused" 1e-4 after before
