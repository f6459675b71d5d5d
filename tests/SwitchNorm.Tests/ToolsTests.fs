/// Save/load, conversion, mixture reading and recalibration.
module ToolsTests

open System
open System.IO
open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

type Net() as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Net")
    let conv1 = torch.nn.Conv2d(2L, 4L, 3L, padding = 1L)

    let mutable bn1: torch.nn.Module<torch.Tensor, torch.Tensor> =
        torch.nn.BatchNorm2d(4L)

    let head =
        torch.nn.Sequential(
            struct ("conv", torch.nn.Conv2d(4L, 3L, 1L) :> torch.nn.Module<torch.Tensor, torch.Tensor>),
            struct ("bn", torch.nn.BatchNorm2d(3L) :> torch.nn.Module<torch.Tensor, torch.Tensor>)
        )

    do this.RegisterComponents()

    override _.forward x =
        x |> conv1.forward |> bn1.forward |> head.forward

type Typed() as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Typed")
    let bn = torch.nn.BatchNorm2d(2L)
    do this.RegisterComponents()
    override _.forward x = bn.forward x

[<Fact>]
let ``save and load round-trip every parameter and buffer`` () =
    seeded 21L
    let path = Path.GetTempFileName()

    try
        let a = new SwitchNorm2d(3L)
        a.forward (torch.randn (4L, 3L, 2L, 2L)) |> ignore
        use _ = torch.no_grad ()
        a.mean_weight.copy_ (torch.tensor [| 0.5f; -1.0f; 2.0f |]) |> ignore
        a.save path |> ignore
        let b = new SwitchNorm2d(3L)
        Checkpoint.load false path b
        let sa = a.state_dict ()
        let sb = b.state_dict ()
        Assert.Equal<string list>(List.ofSeq sa.Keys, List.ofSeq sb.Keys)

        for k in sa.Keys do
            Assert.True(exactEq sa[k] sb[k], k)

        // TorchSharp's own load reads it too
        (new SwitchNorm2d(3L)).load path |> ignore
    finally
        File.Delete path

[<Fact>]
let ``a BatchNorm2d checkpoint's keys are a subset of SwitchNorm2d's`` () =
    let bnKeys = torch.nn.BatchNorm2d(3L).state_dict().Keys |> Set.ofSeq
    let snKeys = (new SwitchNorm2d(3L)).state_dict().Keys |> Set.ofSeq
    Assert.True(Set.isSubset bnKeys snKeys, $"{bnKeys} ⊄ {snKeys}")

[<Fact>]
let ``conversion replaces every BatchNorm, carries state over and keeps the function with BN-leaning logits`` () =
    seeded 22L
    let net = new Net()
    // give the BNs non-trivial state
    for _ in 1..3 do
        net.forward (torch.randn (4L, 2L, 5L, 5L)) |> ignore

    net.eval () |> ignore
    let x = torch.randn (2L, 2L, 5L, 5L)
    let before = net.forward x
    let bnState = [ for kv in net.state_dict () -> kv.Key, kv.Value.clone () ]
    Conversion.batchNorm LogitInit.BatchLeaning 30.0 net |> ignore
    let mix = Mixture.ofModel net
    Assert.Equal<string list>([ "bn1"; "head.bn" ], mix |> Array.map (fun m -> m.Name) |> List.ofArray |> List.sort)
    let sd = net.state_dict ()

    for (k, v) in bnState do
        Assert.True(exactEq v sd[k], $"'{k}' not carried over")

    Assert.True(sd.ContainsKey "bn1.mean_weight" && sd.ContainsKey "head.bn.var_weight")
    // with margin 30 the softmax is one-hot on BN to float32 precision, so eval output is BatchNorm's
    assertClose "function kept" 1e-5 (net.forward x) before
    // the model's forward really goes through the new layers
    net.train () |> ignore
    net.forward (torch.randn (4L, 2L, 5L, 5L)) |> ignore
    let sn = Mixture.modules net |> List.map snd |> List.head
    Assert.Equal(4L, sn.num_batches_tracked.item<int64> ())

[<Fact>]
let ``conversion with uniform logits gives the paper's uniform mixture`` () =
    let sq =
        torch.nn.Sequential(torch.nn.Conv2d(1L, 2L, 1L) :> torch.nn.Module<torch.Tensor, torch.Tensor>, torch.nn.BatchNorm2d(2L))

    Conversion.batchNorm LogitInit.Uniform 0.0 sq |> ignore
    let m = Mixture.ofModel sq |> Array.exactlyOne

    for w in Array.append m.Mean m.Var do
        Assert.Equal(1.0 / 3.0, w, 12)

    Assert.IsType<SwitchNorm2d>(sq[1] :> obj) |> ignore

[<Fact>]
let ``conversion refuses a field typed as BatchNorm2d and changes nothing`` () =
    let m = new Typed()
    let before = m.state_dict().Keys |> List.ofSeq
    throws<InvalidOperationException> (fun () -> Conversion.batchNorm LogitInit.Uniform 0.0 m |> box) [ "declared as BatchNorm2d" ]
    Assert.Equal<string list>(before, m.state_dict().Keys |> List.ofSeq)

[<Fact>]
let ``recalibration sets the exact mean and unbiased variance of all batches and touches nothing else`` () =
    seeded 23L
    let sn = new SwitchNorm2d(3L)
    let model = torch.nn.Sequential(sn :> torch.nn.Module<torch.Tensor, torch.Tensor>)
    model.eval () |> ignore
    // batches of unequal sizes, with a large offset
    let batches = [ for n in [ 1L; 4L; 2L; 7L ] -> torch.randn (n, 3L, 3L, 2L) * 2.0 + 50.0 ]
    let paramsBefore = [ for struct (k, p) in model.named_parameters () -> k, p.detach().clone () ]
    let used = Recalibrate.batchAverage model batches
    Assert.Equal(4, used)
    let all = (torch.cat (Array.ofList batches, 0L)).to_type torch.ScalarType.Float64
    let perChannel = all.transpose(0L, 1L).reshape (3L, -1L)
    assertClose "running_mean" 1e-6 sn.running_mean (perChannel.mean [| 1L |])
    assertClose "running_var" 1e-5 sn.running_var (perChannel.var (1L, unbiased = true))
    Assert.Equal(0L, sn.num_batches_tracked.item<int64> ())
    Assert.False(model.training)

    for (k, p) in paramsBefore do
        Assert.True(exactEq p (model.get_parameter k), k)

[<Fact>]
let ``conversion maps BatchNorm1d and BatchNorm3d to SwitchNorm1d and SwitchNorm3d, momentum and eps included`` () =
    let bn1 = torch.nn.BatchNorm1d(3L, eps = 1e-3, momentum = 0.2)
    let bn3 = torch.nn.BatchNorm3d(2L)
    bn3.momentum <- Nullable()

    let sq =
        torch.nn.Sequential(bn1 :> torch.nn.Module<torch.Tensor, torch.Tensor>, bn3 :> torch.nn.Module<torch.Tensor, torch.Tensor>)

    Conversion.batchNorm LogitInit.Uniform 0.0 sq |> ignore
    let s1 = Assert.IsType<SwitchNorm1d>(sq[0] :> obj)
    let s3 = Assert.IsType<SwitchNorm3d>(sq[1] :> obj)
    Assert.Equal(1e-3, s1.eps)
    Assert.Equal(Nullable 0.2, s1.momentum)
    Assert.False(s3.momentum.HasValue)
    // a BatchNorm given directly is returned converted
    Assert.IsType<SwitchNorm2d>((Conversion.batchNorm LogitInit.Uniform 0.0 (torch.nn.BatchNorm2d(4L))).Model :> obj)
    |> ignore
