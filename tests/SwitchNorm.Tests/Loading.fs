/// Loading is all or nothing on every route: a state dict with one corrupted entry (a broadcastable or wrong shape, a
/// wrong dtype, a missing or an unexpected key) is refused before anything is written, or, for keys a non-strict
/// load may skip, loaded exactly.
module Loading

open System
open System.Collections.Generic
open System.IO
open FsCheck
open FsCheck.FSharp
open global.FsCheck.Xunit
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

/// A module whose buffers are exactly the given entries, to write a TorchSharp checkpoint of any content.
type private Holder(entries: (string * torch.Tensor) list) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("holder")

    do
        for (k, t) in entries do
            this.register_buffer (k, t)

    override _.forward x = x

/// How one entry is corrupted.
type Corruption =
    | ShapeOne
    | ShapeScalar
    | ShapeLonger
    | ShapeColumn
    | WrongDtype
    | Missing
    | Unexpected

/// Where the state goes in.
type Route =
    | ModuleLoadStateDict
    | ModelLoadStateDict
    | ModuleLoadFile
    | CheckpointLoad

type LoadCase = {
    Key: int
    Corruption: Corruption
    Strict: bool
    Route: Route
} with

    override this.ToString() =
        $"key #{this.Key}, {this.Corruption}, strict {this.Strict}, {this.Route}"

type LoadArbs =
    static member LoadCase() : Arbitrary<LoadCase> =
        let gen =
            gen {
                let! key = Gen.choose (0, 6)

                let! corruption =
                    Gen.elements [
                        ShapeOne
                        ShapeScalar
                        ShapeLonger
                        ShapeColumn
                        WrongDtype
                        Missing
                        Unexpected
                    ]

                let! strict = Gen.elements [ true; false ]
                let! route = Gen.elements [ ModuleLoadStateDict; ModelLoadStateDict; ModuleLoadFile; CheckpointLoad ]

                return {
                    Key = key
                    Corruption = corruption
                    Strict = strict
                    Route = route
                }
            }

        // shrink toward the first key and the plainest route
        let shrink (c: LoadCase) =
            seq {
                if c.Key > 0 then
                    yield { c with Key = 0 }

                if c.Route <> ModuleLoadStateDict then
                    yield { c with Route = ModuleLoadStateDict }

                if not c.Strict then
                    yield { c with Strict = true }
            }

        Arb.fromGenShrink (gen, shrink)

let private snapshot (m: torch.nn.Module) = [ for kv in m.state_dict () -> kv.Key, kv.Value.detach().clone () ]

let private sameAs (expected: (string * torch.Tensor) list) (m: torch.nn.Module) =
    let now = m.state_dict ()
    expected |> List.forall (fun (k, v) -> exactEq v now[k])

let private corrupt (c: LoadCase) (source: (string * torch.Tensor) list) =
    let key, t = source[c.Key % source.Length]

    let replaced (v: torch.Tensor) =
        source |> List.map (fun (k, x) -> if k = key then k, v else k, x)

    match c.Corruption with
    | ShapeOne -> replaced (torch.ones (1L, dtype = t.dtype))
    | ShapeScalar when t.dim () = 0L -> replaced (torch.ones (2L, dtype = t.dtype))
    | ShapeScalar -> replaced (torch.tensor(3.0).to_type t.dtype)
    | ShapeLonger -> replaced (torch.ones (t.numel () + 1L, dtype = t.dtype))
    | ShapeColumn -> replaced (t.reshape([| -1L; 1L |]).clone ())
    | WrongDtype ->
        replaced (
            t.to_type (
                if t.dtype = torch.ScalarType.Float64 then
                    torch.ScalarType.Float32
                else
                    torch.ScalarType.Float64
            )
        )
    | Missing -> source |> List.filter (fun (k, _) -> k <> key)
    | Unexpected -> source @ [ "extra", torch.ones 2L ]

let private loadAllOrNothing (c: LoadCase) =
    let sn = new SwitchNorm2d(4L, dtype = torch.ScalarType.Float32)
    let model = Layer.sequential [ torch.nn.Identity(); sn ]
    // a different valid state to load: every value moved
    let source = [
        for kv in sn.state_dict () ->
            kv.Key,
            (if kv.Value.dtype = torch.ScalarType.Int64 then
                 kv.Value + 7L
             else
                 kv.Value + 0.25)
    ]

    let corrupted = corrupt c source
    let before = snapshot sn
    let dir = Directory.CreateTempSubdirectory("switchnorm-load").FullName

    let load () =
        match c.Route with
        | ModuleLoadStateDict -> sn.load_state_dict (Dictionary(dict corrupted), c.Strict) |> ignore
        | ModelLoadStateDict ->
            let prefixed = corrupted |> List.map (fun (k, v) -> "1." + k, v)
            Checkpoint.loadStateDict c.Strict (Dictionary(dict prefixed)) model |> ignore
        | ModuleLoadFile ->
            let path = Path.Combine(dir, "state.bin")
            (new Holder(corrupted)).save path |> ignore
            sn.load (path, c.Strict) |> ignore
        | CheckpointLoad ->
            let path = Path.Combine(dir, "state.bin")
            (new Holder(corrupted)).save path |> ignore
            Checkpoint.load (not c.Strict) path sn

    let refused =
        try
            load ()
            false
        with _ ->
            true

    Directory.Delete(dir, true)

    // the checkpoint route refuses an unexpected key whatever it allows to be missing
    let mayLoad =
        match c.Corruption, c.Route with
        | Missing, _ -> not c.Strict
        | Unexpected, CheckpointLoad -> false
        | Unexpected, _ -> not c.Strict
        | _ -> false

    if mayLoad then
        let present = corrupted |> List.filter (fun (k, _) -> k <> "extra")
        not refused && sameAs present sn
    else
        refused && sameAs before sn

[<Properties(Arbitrary = [| typeof<LoadArbs> |], MaxTest = 60)>]
module LoadingProperties =

    [<Property>]
    let ``a corrupted state dict is refused with nothing written, on every route`` (c: LoadCase) = loadAllOrNothing c

[<Fact>]
let ``the refusal names every problem`` () =
    let sn = new SwitchNorm2d(4L)

    let source =
        Dictionary(
            dict [
                for kv in sn.state_dict () ->
                    kv.Key,
                    (match kv.Key with
                     | "bias" -> torch.ones 1L
                     | "running_var" -> torch.tensor 1.0f
                     | _ -> kv.Value.clone ())
            ]
        )

    throws<InvalidDataException> (fun () -> box (sn.load_state_dict source)) [
        "nothing was loaded"
        "size mismatch for 'bias'"
        "size mismatch for 'running_var'"
        "[4]"
    ]
