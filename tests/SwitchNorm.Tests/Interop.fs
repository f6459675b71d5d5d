/// PyTorch interop against a real PyTorch (Debian's python3-torch, /usr/bin/python3): files written by
/// tests/interop/official_sn.py, a Python statement of the official modules and ResNets, load into the official-semantics
/// layers and the zoo and give Python's outputs and running buffers; files written here load back in Python and give
/// the same logits; every loader error has its message. The test command installs python3-torch when it is missing; where
/// that is impossible it sets SWITCHNORM_SKIP_PYTORCH=1 and says so loudly, and these tests then only print that.
module Interop

open System
open System.Collections.Generic
open System.Diagnostics
open System.IO
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private python = "/usr/bin/python3"

let private script =
    // copied beside the test assembly by the project file: __SOURCE_DIRECTORY__ is /_/ in a deterministic (CI) build
    Path.Combine(AppContext.BaseDirectory, "interop", "official_sn.py")

let private skipped =
    Environment.GetEnvironmentVariable "SWITCHNORM_SKIP_PYTORCH" = "1"

let private run (args: string) =
    let psi = ProcessStartInfo(python, $"\"{script}\" {args}")
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()

    if p.ExitCode <> 0 then
        failwith $"python3 {script} {args} failed ({p.ExitCode}): {out.Result}{err}"

    out.Result

/// The fixtures, written once per test run by the Python side.
let private fixtures =
    lazy
        (if not (File.Exists python) then
             failwith "/usr/bin/python3 is missing: the interop tests need Debian's python3-torch (tests/run-all.sh installs it)."

         // written by the test command already, or here
         match Environment.GetEnvironmentVariable "SWITCHNORM_INTEROP_FIXTURES" with
         | dir when not (String.IsNullOrEmpty dir) && File.Exists(Path.Combine(dir, "legacy.pth")) -> dir
         | _ ->
             let dir =
                 Path.Combine(Path.GetTempPath(), $"switchnorm-interop-{Environment.ProcessId}")

             Directory.CreateDirectory dir |> ignore
             run $"fixtures \"{dir}\"" |> ignore
             dir)

let private file (name: string) = Path.Combine(fixtures.Force(), name)

/// Runs a test body unless the test command found no way to install PyTorch.
let private withPyTorch (body: unit -> unit) =
    if skipped then
        printfn "SKIPPED (loudly): SWITCHNORM_SKIP_PYTORCH=1, python3-torch could not be installed"
    else
        body ()

let private f64 = torch.ScalarType.Float64

let private official (dims: int) (c: int64) (usingBn: bool) (ma: bool) : SwitchNormNd =
    match dims with
    | 1 -> SwitchNorm1d.Official(c, using_moving_average = ma)
    | 2 -> SwitchNorm2d.Official(c, using_bn = usingBn, using_moving_average = ma)
    | _ -> SwitchNorm3d.Official(c, using_bn = usingBn, using_moving_average = ma)

/// Official modules from Python: state loaded from the official layout, then the train output, the running buffers
/// after that step, and the eval output equal Python's, on both paths.
[<Theory>]
[<InlineData("1d_ma", 1, true, true)>]
[<InlineData("1d_sums", 1, true, false)>]
[<InlineData("2d_bn_ma", 2, true, true)>]
[<InlineData("2d_bn_sums", 2, true, false)>]
[<InlineData("2d_nobn", 2, false, true)>]
[<InlineData("3d_bn_ma", 3, true, true)>]
[<InlineData("3d_nobn", 3, false, true)>]
let ``official layers loaded from PyTorch give PyTorch's outputs and running buffers`` (name: string, dims: int, usingBn: bool, ma: bool) =
    withPyTorch (fun () ->
        let io = PyTorch.readStateDict (file $"layer_{name}_io.pt")
        let x = io["x"]

        for fused in [ true; false ] do
            let m = official dims (x.size 1) usingBn ma
            m.Fused <- fused
            let r = (PyTorch.load true (file $"layer_{name}.pt") m)
            Assert.Empty(r.MissingKeys)
            m.train ()
            let y = m.forward x
            assertClose $"{name} train (fused {fused})" 1e-5 y io["y_train"]

            if usingBn then
                assertClose $"{name} running_mean" 1e-5 m.running_mean (io["running_mean"].flatten ())
                assertClose $"{name} running_var" 1e-5 m.running_var (io["running_var"].flatten ())

            m.eval ()
            assertClose $"{name} eval (fused {fused})" 1e-5 (m.forward x) io["y_eval"])

let private checkNetwork (net: torch.nn.Module<torch.Tensor, torch.Tensor>) (ioName: string) =
    let io = PyTorch.readStateDict (file ioName)
    let x = io["x"]
    net.eval ()

    let logits =
        use _ = torch.no_grad ()
        net.forward x

    assertClose $"{ioName} eval logits" 1e-4 logits io["logits"]
    net.train ()

    (use _ = torch.no_grad ()
     net.forward x)
    |> ignore

    let sd = net.state_dict ()
    let mutable compared = 0

    for kv in io do
        if kv.Key.StartsWith "after." then
            let key = kv.Key.Substring 6
            assertClose $"{ioName} {key} after a train step" 1e-4 sd[key] (kv.Value.flatten ())
            compared <- compared + 1

    Assert.True(compared >= 36, $"only {compared} running buffers compared")
    logits

/// The zoo's ResNet-18 v1 from a nested, module.-prefixed training checkpoint (with optimizer state), and v2 from a
/// flat state dict: Python's eval logits and its running buffers after a train-mode step.
[<Fact>]
let ``zoo models load official checkpoints, nested and flat, and compute PyTorch's numbers`` () =
    withPyTorch (fun () ->
        let v1 =
            Models.resnetv1sn18 {
                ResNetOptions.V1 with
                    NumClasses = 10L
            }

        let r = (PyTorch.load true (file "resnetv1sn18_nested.pth") v1)
        Assert.Empty(r.MissingKeys)
        Assert.Empty(r.UnexpectedKeys)
        checkNetwork v1 "resnetv1sn18_io.pt" |> ignore

        let v2 =
            Models.resnetv2sn18 {
                ResNetOptions.V2 with
                    NumClasses = 10L
            }

        PyTorch.load true (file "resnetv2sn18_flat.pth") v2 |> ignore
        checkNetwork v2 "resnetv2sn18_io.pt" |> ignore)

/// The -50 and -101 models have exactly the official key sets (with and without BN), and shapes that map onto them.
[<Fact>]
let ``zoo models have exactly the official keys`` () =
    withPyTorch (fun () ->
        for version in [ 1; 2 ] do
            for depth in [ 50; 101 ] do
                for bn in [ true; false ] do
                    let name = $"""keys_v{version}sn{depth}{if bn then "" else "_nobn"}.txt"""

                    let expected =
                        File.ReadAllLines(file name)
                        |> Array.map (fun l ->
                            let parts = l.Split '\t'
                            parts[0], parts[1].Split ',' |> Array.map int64 |> Array.fold (*) 1L)

                    let net =
                        if version = 1 then
                            Zoo.V1(depth, 1000L, bn, true, true) :> torch.nn.Module
                        else
                            Zoo.V2(depth, 1000L, bn, true, false)

                    let ours = [| for kv in net.state_dict () -> kv.Key, kv.Value.numel () |]
                    Assert.Equal<string[]>(expected |> Array.map fst |> Array.sort, ours |> Array.map fst |> Array.sort)
                    Assert.Equal<(string * int64)[]>(Array.sort expected, Array.sort ours)
                    net.Dispose())

/// Every loader error has a clear message and leaves the model unchanged.
[<Fact>]
let ``PyTorch loader errors are clear and load nothing`` () =
    withPyTorch (fun () ->
        let sn = SwitchNorm2d.Official(4L)
        let before = [ for kv in sn.state_dict () -> kv.Key, kv.Value.clone () ]

        let unchanged (m: torch.nn.Module) (snapshot: (string * torch.Tensor) list) =
            let now = m.state_dict ()
            Assert.True(snapshot |> List.forall (fun (k, v) -> exactEq v now[k]), "the model changed")

        throws<InvalidDataException> (fun () -> (PyTorch.load true (file "legacy.pth") sn) |> box) [
            "legacy"
            "1.6"
            "torch.save(torch.load("
        ]

        throws<InvalidDataException> (fun () -> (PyTorch.load true (file "whole_model.pth") sn) |> box) [ "whole model"; "state_dict()" ]
        unchanged sn before
        // an official checkpoint into a default-semantics layer
        let plain = new SwitchNorm2d(4L)
        let plainBefore = [ for kv in plain.state_dict () -> kv.Key, kv.Value.clone () ]

        throws<InvalidDataException> (fun () -> (PyTorch.load true (file "layer_2d_bn_ma.pt") plain) |> box) [
            "official"
            "Semantics.Default"
            "SwitchNorm2d.Official"
        ]

        unchanged plain plainBefore
        // keys of another architecture: every problem named, nothing written
        let v2 =
            Models.resnetv2sn18 {
                ResNetOptions.V2 with
                    NumClasses = 10L
            }

        let v2Before = [ for kv in v2.state_dict () -> kv.Key, kv.Value.clone () ]

        let e =
            Assert.Throws<InvalidDataException>(fun () -> (PyTorch.load true (file "resnetv1sn18_nested.pth") v2) |> ignore)

        Assert.Contains("unexpected key 'layer2.0.downsample.0.weight'", e.Message)
        Assert.Contains("missing key 'layer2.0.downsample.weight'", e.Message)
        Assert.Contains("missing key 'sn_out.weight'", e.Message)
        Assert.Contains("nothing was loaded", e.Message)
        unchanged v2 v2Before
        // a shape mismatch
        let wide = Models.resnetv1sn18 ResNetOptions.V1

        throws<InvalidDataException> (fun () -> (PyTorch.load true (file "resnetv1sn18_nested.pth") wide) |> box) [
            "size mismatch for 'fc.weight'"
            "[10, 512]"
        ]
        // not a PyTorch file, no file
        let junk = Path.Combine(fixtures.Force(), "junk.bin")
        File.WriteAllBytes(junk, Array.init 64 byte)
        throws<InvalidDataException> (fun () -> PyTorch.load true junk sn |> box) [ "neither a torch.save zip file" ]
        throws<FileNotFoundException> (fun () -> (PyTorch.load true (junk + ".missing") sn) |> box) [ "no file" ]
        // the official layout needs official semantics
        throws<ArgumentException>
            (fun () ->
                PyTorch.save PyTorchLayout.Official "" (junk + ".pt") (new SwitchNorm2d(4L))
                |> box)
            [ "Semantics.Default" ]

        unchanged sn before)

/// .NET → Python: the zoo's models written here (official layout, with and without the DataParallel prefix) load into
/// the Python modules with strict=True and give the logits computed here. And .NET → .NET through .pt and .safetensors.
[<Fact>]
let ``files written here load in PyTorch and back`` () =
    withPyTorch (fun () ->
        let dir = Path.Combine(fixtures.Force(), "back")
        Directory.CreateDirectory dir |> ignore
        let x = (PyTorch.readStateDict (file "resnetv1sn18_io.pt"))["x"]

        let write (net: torch.nn.Module<torch.Tensor, torch.Tensor>) (stem: string) (prefix: string) =
            // move the state away from the fixture's: one train step of the running statistics
            net.train ()

            (use _ = torch.no_grad ()
             net.forward x)
            |> ignore

            net.eval ()

            let logits =
                use _ = torch.no_grad ()
                net.forward x

            PyTorch.save PyTorchLayout.Official prefix (Path.Combine(dir, $"dotnet_{stem}.pth")) net
            let io = Dictionary<string, torch.Tensor>(dict [ "x", x; "logits", logits ])
            TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(Path.Combine(dir, $"dotnet_{stem}_io.pth"), io)
            logits

        let v1 =
            Models.resnetv1sn18 {
                ResNetOptions.V1 with
                    NumClasses = 10L
            }

        (PyTorch.load true (file "resnetv1sn18_nested.pth") v1) |> ignore
        let logits1 = write v1 "v1sn18" "module."

        let v2 =
            Models.resnetv2sn18 {
                ResNetOptions.V2 with
                    NumClasses = 10L
            }

        (PyTorch.load true (file "resnetv2sn18_flat.pth") v2) |> ignore
        write v2 "v2sn18" "" |> ignore
        let report = run $"check \"{dir}\""
        Assert.Contains("dotnet_v1sn18: max", report)
        Assert.Contains("dotnet_v2sn18: max", report)

        // back into .NET, from both formats
        for ext in [ ".pt"; ".safetensors" ] do
            let path = Path.Combine(dir, "roundtrip" + ext)
            PyTorch.save PyTorchLayout.Module "" path v1

            let again =
                Models.resnetv1sn18 {
                    ResNetOptions.V1 with
                        NumClasses = 10L
                }

            PyTorch.load true path again |> ignore
            again.eval ()

            use _ = torch.no_grad ()
            Assert.True(exactEq logits1 (again.forward x), $"round trip through {ext}")

        // a default-semantics model with num_batches_tracked round-trips too, and may lack it
        let m = new SwitchNorm2d(3L)
        m.train ()
        m.forward (torch.randn (4L, 3L, 5L, 5L)) |> ignore
        let path = Path.Combine(dir, "plain.pt")
        PyTorch.save PyTorchLayout.Module "" path m
        let m2 = new SwitchNorm2d(3L)
        PyTorch.load true path m2 |> ignore
        Assert.True(exactEq m.running_var m2.running_var)
        Assert.Equal(1L, m2.num_batches_tracked.item<int64> ()))

/// A .safetensors file whose header length starts with 0x80 (128 or 384 bytes, as Python's safetensors pads headers to
/// multiples of 8) is read as safetensors, not mistaken for PyTorch's legacy format.
[<Theory>]
[<InlineData(128)>]
[<InlineData(384)>]
let ``safetensors files are recognised whatever their header length`` (headerLength: int) =
    let json = """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"""
    let header = Text.Encoding.UTF8.GetBytes(json.PadRight headerLength)

    let data =
        Array.init 4 (fun i -> float32 (i + 1)) |> Array.collect BitConverter.GetBytes

    let path =
        Path.Combine(Path.GetTempPath(), $"switchnorm-header-{headerLength}.safetensors")

    File.WriteAllBytes(path, Array.concat [ BitConverter.GetBytes(uint64 headerLength); header; data ])
    Assert.Equal(0x80uy, File.ReadAllBytes(path)[0])
    let d = PyTorch.readStateDict path
    Assert.True(exactEq d["w"] (torch.tensor [| 1.0f; 2.0f; 3.0f; 4.0f |]))

/// The official layout of 1d, 2d and 3d layers: the official shapes on disk (logits untouched), and back.
[<Fact>]
let ``official layout round trips for 1d, 2d and 3d layers`` () =
    let dir = Directory.CreateTempSubdirectory("switchnorm-layout").FullName

    let cases: (SwitchNormNd * int64[] * int64[]) list = [
        SwitchNorm1d.Official(5L), [| 1L; 5L |], [| 1L; 5L |]
        SwitchNorm2d.Official(5L), [| 1L; 5L; 1L; 1L |], [| 1L; 5L; 1L |]
        SwitchNorm3d.Official(5L), [| 1L; 5L; 1L; 1L; 1L |], [| 1L; 5L; 1L |]
    ]

    for (m, affine, running) in cases do
        m.train ()

        let spatialDims =
            match m with
            | :? SwitchNorm1d -> 0
            | :? SwitchNorm2d -> 2
            | _ -> 3

        let x = torch.randn (Array.append [| 4L; 5L |] (Array.create spatialDims 3L))
        m.forward x |> ignore
        let path = Path.Combine(dir, $"{m.LayerName}.pt")
        PyTorch.save PyTorchLayout.Official "" path m
        let d = PyTorch.readStateDict path
        Assert.Equal<int64[]>(affine, d["weight"].shape)
        Assert.Equal<int64[]>(running, d["running_var"].shape)
        Assert.Equal<int64[]>(m.mean_weight.shape, d["mean_weight"].shape)

        let again: SwitchNormNd =
            match m with
            | :? SwitchNorm1d -> SwitchNorm1d.Official(5L)
            | :? SwitchNorm2d -> SwitchNorm2d.Official(5L)
            | _ -> SwitchNorm3d.Official(5L)

        PyTorch.load true path again |> ignore
        Assert.True(exactEq m.running_var again.running_var, m.LayerName)

    // a generic layer has no official shapes; an unknown file's message shows its first bytes
    let generic =
        Norm.layer
            {
                Norm.paper with
                    Semantics = Semantics.Official
            }
            5L

    throws<ArgumentException>
        (fun () ->
            PyTorch.save PyTorchLayout.Official "" (Path.Combine(dir, "g.pt")) generic
            |> box)
        [ "SwitchNorm1d, SwitchNorm2d and SwitchNorm3d only" ]

    let junk = Path.Combine(dir, "junk.bin")
    File.WriteAllBytes(junk, [| 1uy; 2uy; 3uy; 4uy; 5uy; 6uy; 7uy; 8uy; 9uy; 10uy |])
    throws<InvalidDataException> (fun () -> PyTorch.readStateDict junk |> box) [ "01-02-03-04-05-06-07-08-09" ]
