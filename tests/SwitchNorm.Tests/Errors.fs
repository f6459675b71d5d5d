/// Every refused call names what was expected and what arrived, and changes no state.
module Errors

open System
open System.IO
open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private snapshot (m: torch.nn.Module) = [ for kv in m.state_dict () -> kv.Key, kv.Value.detach().clone () ]

let private unchanged (before: (string * torch.Tensor) list) (m: torch.nn.Module) =
    let now = m.state_dict ()

    for (k, v) in before do
        let w = now[k]
        // NaN counts as equal to NaN here: a state that held a NaN before still holds it
        let same =
            v.shape = w.shape
            && (v.eq(w).logical_or (v.isnan().logical_and (w.isnan ()))).all().item<bool> ()

        Assert.True(same, $"state '{k}' changed")

[<Fact>]
let ``wrong rank is refused with the expected and actual shapes`` () =
    let m = new SwitchNorm2d(5L)
    let before = snapshot m

    throws<ArgumentException> (fun () -> m.forward (torch.randn (3L, 5L)) |> box) [
        "SwitchNorm2d expects a 4-D input (N, C, H, W)"
        "[3, 5]"
    ]

    throws<ArgumentException> (fun () -> (new SwitchNorm1d(5L)).forward (torch.randn (2L, 5L, 3L, 3L)) |> box) [
        "SwitchNorm1d"
        "[2, 5, 3, 3]"
    ]

    throws<ArgumentException> (fun () -> (new SwitchNorm3d(5L)).forward (torch.randn (2L, 5L, 3L, 3L)) |> box) [ "5-D"; "[2, 5, 3, 3]" ]
    unchanged before m

[<Fact>]
let ``wrong channel count is refused`` () =
    let m = new SwitchNorm2d(5L)
    let before = snapshot m
    throws<ArgumentException> (fun () -> m.forward (torch.randn (2L, 4L, 3L, 3L)) |> box) [ "5 channels"; "got 4"; "[2, 4, 3, 3]" ]
    unchanged before m

[<Fact>]
let ``bad constructor arguments are refused`` () =
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(0L) |> box) [ "num_features must be positive; got 0" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(-3L) |> box) [ "got -3" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(3L, eps = 0.0) |> box) [ "eps must be a positive"; "got 0" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(3L, eps = -1e-5) |> box) [ "eps" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(3L, momentum = 1.5) |> box) [ "momentum must lie in [0, 1]"; "1.5" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(3L, momentum = -0.1) |> box) [ "momentum" ]
    throws<ArgumentOutOfRangeException> (fun () -> new SwitchNorm2d(3L, momentum = nan) |> box) [ "momentum" ]
    throws<ArgumentException> (fun () -> new SwitchNorm2d(3L, dtype = torch.ScalarType.Int32) |> box) [ "floating-point"; "Int32" ]

[<Fact>]
let ``one value per channel in training with BN is refused and changes nothing`` () =
    let m = new SwitchNorm2d(3L)
    let before = snapshot m

    throws<ArgumentException> (fun () -> m.forward (torch.randn (1L, 3L, 1L, 1L)) |> box) [
        "more than 1 value per channel"
        "[1, 3, 1, 1]"
        "using_bn"
    ]

    unchanged before m
    Assert.Equal(0L, m.num_batches_tracked.item<int64> ())
    let m1 = new SwitchNorm1d(3L)
    throws<ArgumentException> (fun () -> m1.forward (torch.randn (1L, 3L)) |> box) [ "N × spatial = 1" ]
    // without BN it is allowed; in eval BN uses running statistics, so it is allowed too
    let noBn = new SwitchNorm2d(3L, using_bn = false)
    Assert.Equal<int64[]>([| 1L; 3L; 1L; 1L |], (noBn.forward (torch.randn (1L, 3L, 1L, 1L))).shape)
    m.eval () |> ignore
    Assert.Equal<int64[]>([| 1L; 3L; 1L; 1L |], (m.forward (torch.randn (1L, 3L, 1L, 1L))).shape)

[<Fact>]
let ``dtype mismatch and non-float input are refused`` () =
    let m = new SwitchNorm2d(3L)
    let before = snapshot m

    throws<ArgumentException>
        (fun () ->
            m.forward (torch.randn (2L, 3L, 2L, 2L, dtype = torch.ScalarType.Float64))
            |> box)
        [ "Float64"; "Float32" ]

    throws<ArgumentException> (fun () -> m.forward (torch.ones (2L, 3L, 2L, 2L, dtype = torch.ScalarType.Int64)) |> box) [
        "floating-point"
        "Int64"
    ]

    unchanged before m

[<Fact>]
let ``device mismatch is refused`` () =
    // Only a CPU backend is available here, so a mismatch is staged with a meta-device parameter.
    let m = new SwitchNorm2d(3L, device = torch.Device("meta"))
    throws<ArgumentException> (fun () -> m.forward (torch.randn (2L, 3L, 2L, 2L)) |> box) [ "device"; "cpu"; "meta" ]

[<Fact>]
let ``checkpoints with missing, unexpected or mis-shaped keys are refused and leave the module unchanged`` () =
    let dir = Directory.CreateTempSubdirectory("switchnorm-ckpt").FullName

    try
        let m = new SwitchNorm2d(3L)
        let before = snapshot m
        // mis-shaped: 4 channels
        let p4 = Path.Combine(dir, "c4.bin")
        (new SwitchNorm2d(4L)).save p4 |> ignore
        throws<InvalidDataException> (fun () -> Checkpoint.load false p4 m |> box) [ "size mismatch for 'weight'"; "[3]" ]
        // missing keys: a BatchNorm2d checkpoint lacks the logits
        let pbn = Path.Combine(dir, "bn.bin")
        let bn = torch.nn.BatchNorm2d(3L)
        bn.save pbn |> ignore

        throws<InvalidDataException> (fun () -> Checkpoint.load false pbn m |> box) [
            "missing key 'mean_weight'"
            "missing key 'var_weight'"
        ]
        // unexpected key: a SwitchNorm checkpoint into a BatchNorm2d
        let psn = Path.Combine(dir, "sn.bin")
        m.save psn |> ignore
        throws<InvalidDataException> (fun () -> Checkpoint.load false psn bn |> box) [ "unexpected key 'mean_weight'" ]
        // not a checkpoint at all
        let junk = Path.Combine(dir, "junk.bin")
        File.WriteAllBytes(junk, [| 5uy; 1uy; 2uy |])
        throws<InvalidDataException> (fun () -> Checkpoint.load false junk m |> box) [ "junk.bin" ]
        unchanged before m
        // allowMissing: the BatchNorm checkpoint loads into the SwitchNorm and keeps the logits
        use _ = torch.no_grad ()
        bn.running_mean.fill_ (2.5) |> ignore
        bn.save pbn |> ignore
        Checkpoint.load true pbn m
        Assert.Equal(2.5f, m.running_mean[0L].item<float32> ())
    finally
        Directory.Delete(dir, true)

[<Fact>]
let ``running statistics of the wrong length are refused as PyTorch refuses them`` () =
    let m = new SwitchNorm2d(4L)
    let before = snapshot m
    throws<ArgumentException> (fun () -> box (m.running_var <- torch.ones 5L)) [ "running_var should contain 4 elements not 5" ]
    throws<ArgumentException> (fun () -> box (m.running_mean <- torch.ones (1L))) [ "running_mean should contain 4 elements not 1" ]
    unchanged before m
    // the pure core: a bias and running statistics of the wrong size get the same message, not an index error
    let p = Norm.initParams Norm.paper 4L
    let x = torch.randn (2L, 4L, 3L, 3L)

    throws<ArgumentException> (fun () -> box (Norm.apply Norm.paper { p with Bias = Some(torch.zeros 5L) } None Mode.Train x)) [
        "bias should contain 4 elements not 5"
    ]

    let running = {
        Norm.initRunning 4L with
            Var = torch.ones 5L
    }

    for mode in [ Mode.Train; Mode.Eval ] do
        throws<ArgumentException> (fun () -> box (Norm.apply Norm.paper p (Some running) mode x)) [
            "running_var should contain 4 elements not 5"
        ]

[<Fact>]
let ``an empty input gives an empty output and changes nothing, as BatchNorm2d does`` () =
    for dtype in [ torch.ScalarType.Float32; torch.ScalarType.Float64 ] do
        for shape in [ [| 0L; 3L; 4L; 4L |]; [| 2L; 3L; 0L; 4L |] ] do
            for training in [ true; false ] do
                let m = new SwitchNorm2d(3L, dtype = dtype)
                let bn = torch.nn.BatchNorm2d(3L, dtype = dtype)
                m.train training |> ignore
                bn.train training |> ignore
                let before = snapshot m
                let x = torch.zeros(shape, dtype = dtype).requires_grad_ true
                let y = m.forward x
                Assert.Equal<int64[]>((bn.forward x).shape, y.shape)
                Assert.Equal(dtype, y.dtype)
                y.sum().backward ()
                Assert.Equal<int64[]>(shape, x.grad.shape)
                Assert.True((m.weight.grad.eq (torch.zeros_like m.weight.grad)).all().item<bool> ())
                unchanged before m

    // a synchronized layer in eval with an empty shard, as in training
    let shards =
        InProcessGroup.Run(
            2,
            fun comm ->
                let m = new SyncSwitchNorm2d(3L, comm)
                m.eval () |> ignore
                let n = if comm.Rank = 0 then 0L else 2L
                (m.forward (torch.randn (n, 3L, 2L, 2L))).shape[0]
        )

    Assert.Equal<int64[]>([| 0L; 2L |], shards)

[<Fact>]
let ``InProcessGroup refuses timeouts that are not positive and finite`` () =
    for t in [ 0.0; -1.0; nan; infinity; 1e300 ] do
        throws<ArgumentOutOfRangeException> (fun () -> box (InProcessGroup(2, t))) [ "timeout"; string t ]

[<Fact>]
let ``every switch refuses a non-finite logit, and the module refuses it with the state unchanged`` () =
    for bad in [ nan; infinity; -infinity ] do
        let z = torch.tensor [| 0.5; bad; 0.1 |]

        for (name, f) in
            [
                "softmax", Mixing.softmax
                "sparsemax", Mixing.sparsemax
                "sparsestmax", Mixing.sparsestmax 0.5
            ] do
            throws<ArgumentException> (fun () -> box (f z)) [ name; "finite" ]

        for kind in [ SwitchKind.Softmax; SwitchKind.Sparsemax; SwitchKind.Sparsestmax ] do
            for dtype in [ torch.ScalarType.Float32; torch.ScalarType.Float64 ] do
                let m = new SwitchNorm2d(3L, dtype = dtype)
                m.SwitchKind <- kind

                (use _ = torch.no_grad ()
                 m.var_weight[1L].fill_ (bad) |> ignore)

                let before = snapshot m

                throws<ArgumentException> (fun () -> box (m.forward (torch.randn (2L, 3L, 2L, 2L, dtype = dtype)))) [
                    "var_weight"
                    "finite"
                ]

                unchanged before m

[<Fact>]
let ``an eps that is zero in the module's dtype is refused`` () =
    throws<ArgumentOutOfRangeException> (fun () -> box (new SwitchNorm2d(4L, eps = 1e-300))) [ "eps"; "float32" ]
    // representable in float64: accepted, and a constant input gives zeros, not NaN
    let m = new SwitchNorm2d(4L, eps = 1e-300, dtype = torch.ScalarType.Float64)
    let y = m.forward (torch.ones (2L, 4L, 3L, 3L, dtype = torch.ScalarType.Float64))
    Assert.True(y.isfinite().all().item<bool> ())
    // the functional core checks it against the input's dtype
    let spec = { Norm.paper with Eps = 1e-300 }

    throws<ArgumentOutOfRangeException>
        (fun () -> box (Norm.apply spec (Norm.initParams spec 4L) None Mode.Train (torch.randn (2L, 4L, 3L, 3L))))
        [ "float32" ]

[<Fact>]
let ``float32 inputs up to 1e30 in magnitude are normalized as in float64, on both paths`` () =
    let x = randnSeeded 77L [| 8L; 4L; 5L; 5L |] torch.ScalarType.Float64

    let channels =
        torch.tensor([| 1e30; 1e-30; 1e-30; 1e-30 |], dtype = torch.ScalarType.Float64).view (1L, 4L, 1L, 1L)

    for (what, input) in
        [
            "spread 1e19", x * 1e19
            "spread 1e25", x * 1e25
            "spread 1e30", x * 1e30
            "one channel of 1e30 beside three of 1e-30", x * channels
        ] do
        for fused in [ true; false ] do
            for training in [ true; false ] do
                let m32 = new SwitchNorm2d(4L)
                let m64 = new SwitchNorm2d(4L, dtype = torch.ScalarType.Float64)
                m32.Fused <- fused

                for m in [ m32 :> SwitchNormNd; m64 ] do
                    use _ = torch.no_grad ()
                    m.mean_weight.copy_ (torch.tensor [| 0.3; -0.2; 0.5 |]) |> ignore
                    m.var_weight.copy_ (torch.tensor [| 0.1; 0.4; -0.3 |]) |> ignore
                    m.train training |> ignore

                let x32 = input.to_type torch.ScalarType.Float32
                let y32 = m32.forward x32
                let y64 = m64.forward (x32.to_type torch.ScalarType.Float64)
                assertClose $"{what}, fused {fused}, training {training}" (tol torch.ScalarType.Float32) y32 y64
