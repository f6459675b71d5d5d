/// Conversion over generated model shapes: every BatchNorm the forward reaches (through Sequentials, ModuleLists,
/// ModuleDicts, fields, nesting) is replaced, a shared BatchNorm stays one shared SwitchNorm, and the result says
/// what was converted.
module Conversion

open System
open System.Collections.Generic
open FsCheck
open FsCheck.FSharp
open global.FsCheck.Xunit
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

type private M = torch.nn.Module<torch.Tensor, torch.Tensor>

/// A model shape: leaves are BatchNorms from a pool of three (the same index twice is one shared instance) or ReLU.
type Shape =
    | Norm of pool: int
    | Relu
    | Seq of Shape list
    | ListOf of Shape list
    | DictOf of Shape list
    | Fields of Shape * Shape

/// A custom module whose forward walks its children as a user's would: a ModuleList, a ModuleDict, or two fields.
type private Walker(kind: string, children: M list) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("walker")

    let items =
        if kind = "list" then
            torch.nn.ModuleList<M>(Array.ofList children)
        else
            torch.nn.ModuleList<M>()

    let named =
        if kind = "dict" then
            torch.nn.ModuleDict<M>(children |> List.mapi (fun i c -> struct ($"m{i}", c)) |> Array.ofList)
        else
            torch.nn.ModuleDict<M>()

    let mutable first: M = if kind = "fields" then children[0] else null
    let mutable second: M = if kind = "fields" then children[1] else null

    do this.RegisterComponents()

    override _.forward(x) =
        match kind with
        | "list" -> items |> Seq.fold (fun (x: torch.Tensor) m -> m.call x) x
        | "dict" -> named.values () |> Seq.fold (fun (x: torch.Tensor) m -> m.call x) x
        | _ -> second.call (first.call x)

type ConversionArbs =
    static member Shape() : Arbitrary<Shape> =
        let rec shape depth =
            if depth = 0 then
                Gen.frequency [ 3, Gen.choose (0, 2) |> Gen.map Norm; 1, Gen.constant Relu ]
            else
                let sub = shape (depth - 1)
                let children = Gen.choose (1, 3) |> Gen.bind (fun n -> Gen.listOfLength n sub)

                Gen.frequency [
                    2, shape 0
                    1, children |> Gen.map Seq
                    1, children |> Gen.map ListOf
                    1, children |> Gen.map DictOf
                    1, Gen.map2 (fun a b -> Fields(a, b)) sub sub
                ]

        // shrink a container to one of its children
        let shrink (s: Shape) =
            match s with
            | Seq cs
            | ListOf cs
            | DictOf cs -> Seq.ofList cs
            | Fields(a, b) ->
                seq {
                    a
                    b
                }
            | _ -> Seq.empty

        Arb.fromGenShrink (shape 3, shrink)

let rec private build (pool: torch.nn.Module[]) (s: Shape) : M =
    match s with
    | Norm i -> pool[i] :?> M
    | Relu -> torch.nn.ReLU() :> M
    | Seq cs -> torch.nn.Sequential(cs |> List.map (build pool) |> Array.ofList) :> M
    | ListOf cs -> new Walker("list", cs |> List.map (build pool)) :> M
    | DictOf cs -> new Walker("dict", cs |> List.map (build pool)) :> M
    | Fields(a, b) -> new Walker("fields", [ build pool a; build pool b ]) :> M

/// The modules of type 'T that a forward of the model calls, in call order (through forward pre-hooks).
let private calls<'T when 'T :> torch.nn.Module> (model: M) (x: torch.Tensor) =
    let seen = List<torch.nn.Module>()

    let removers = [
        for m in
            (model :> torch.nn.Module)
            :: [ for struct (_, m) in model.named_modules () -> m ] do
            match m with
            | :? 'T ->
                let h = m :?> M
                yield h.register_forward_pre_hook (Action<torch.nn.Module>(fun m -> seen.Add m))
            | _ -> ()
    ]

    use _ = torch.no_grad ()
    model.call x |> ignore

    for r in removers do
        r.remove ()

    List.ofSeq seen

let private convertsEverythingReached (s: Shape) =
    let pool: torch.nn.Module[] =
        Array.init 3 (fun _ -> torch.nn.BatchNorm2d(2L, dtype = torch.ScalarType.Float64))

    let model = build pool s
    let x = torch.randn (2L, 2L, 3L, 3L, dtype = torch.ScalarType.Float64)
    model.eval () |> ignore

    let inRegistry =
        HashSet<torch.nn.Module>(
            (model :> torch.nn.Module)
            :: [ for struct (_, m) in model.named_modules () -> m ]
            |> List.filter (fun m -> m :? TorchSharp.Modules.BatchNorm),
            HashIdentity.Reference
        )

    let before = calls<TorchSharp.Modules.BatchNorm> model x
    let result = Conversion.batchNorm LogitInit.Uniform 0.0 model
    let model = result.Model :?> M
    let after = calls<SwitchNormNd> model x

    let left =
        (model :> torch.nn.Module)
        :: [ for struct (_, m) in model.named_modules () -> m ]
        |> List.filter (fun m -> m :? TorchSharp.Modules.BatchNorm)
    // the same BatchNorm before ↦ the same SwitchNorm after, different ones ↦ different ones
    let pairs = List.zip (List.truncate after.Length before) after

    let tied =
        pairs
        |> List.forall (fun (b1, s1) ->
            pairs
            |> List.forall (fun (b2, s2) -> obj.ReferenceEquals(b1, b2) = obj.ReferenceEquals(s1, s2)))

    (left.IsEmpty
     && before.Length = after.Length
     && tied
     && result.Count = inRegistry.Count)
    |> Prop.label
        $"left {left.Length}, calls {before.Length} -> {after.Length}, tied {tied}, count {result.Count} (in the registry {inRegistry.Count})"

[<Properties(Arbitrary = [| typeof<ConversionArbs> |], MaxTest = 60)>]
module ConversionProperties =

    [<Property>]
    let ``every BatchNorm the forward reaches is converted, and shared ones stay shared`` (s: Shape) = convertsEverythingReached s

[<Fact>]
let ``affine=false and track_running_stats=false convert, a ModuleList model converts, and the result names what changed`` () =
    let bn = torch.nn.BatchNorm2d(3L, affine = false, track_running_stats = false)
    let shared = torch.nn.BatchNorm2d(3L)
    let model = torch.nn.ModuleList<M>(bn, shared, torch.nn.Sequential(shared))
    let r = Conversion.batchNorm LogitInit.BatchLeaning 8.0 model
    Assert.Equal(2, r.Count)
    Assert.Equal<string list>([ "0"; "1"; "2.0" ], List.ofSeq r.Names)
    let first = model[0] :?> SwitchNormNd
    Assert.False(first.affine)
    Assert.False(first.track_running_stats)
    Assert.Same(model[1], (model[2] :?> TorchSharp.Modules.Sequential).children () |> Seq.head)
    let y = first.forward (torch.randn (2L, 3L, 4L, 4L))
    Assert.Equal<int64[]>([| 2L; 3L; 4L; 4L |], y.shape)

[<Fact>]
let ``a margin whose logits are not finite in the dtype, or a container typed for BatchNorm, is refused with nothing changed`` () =
    let model = torch.nn.Sequential(torch.nn.BatchNorm2d(3L), torch.nn.BatchNorm2d(3L))
    let before = [ for struct (n, m) in model.named_children () -> n, m ]

    throws<InvalidOperationException> (fun () -> box (Conversion.batchNorm LogitInit.BatchLeaning 1e39 model)) [
        "not finite in Float32"
        "nothing was changed"
    ]

    let typed =
        torch.nn.ModuleList<TorchSharp.Modules.BatchNorm2d>(torch.nn.BatchNorm2d(3L))

    throws<InvalidOperationException> (fun () -> box (Conversion.batchNorm LogitInit.Uniform 0.0 typed)) [ "holds only BatchNorm2d" ]
    Assert.IsType<TorchSharp.Modules.BatchNorm2d>(typed[0]) |> ignore

    let after = [ for struct (n, m) in model.named_children () -> n, m ]

    for ((n1, m1), (n2, m2)) in List.zip before after do
        Assert.Equal(n1, n2)
        Assert.Same(m1, m2)
