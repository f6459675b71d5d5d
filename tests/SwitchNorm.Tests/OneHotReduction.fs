/// At one-hot mixture weights the layer must equal TorchSharp's own BatchNorm2d, InstanceNorm and layer_norm
/// (plus per-channel affine): outputs, gradients and buffers, in train and eval.
module OneHotReduction

open System
open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

type F = torch.nn.functional

let private randomAffine (m: SwitchNormNd) =
    use _ = torch.no_grad ()

    m.weight.copy_ (torch.rand (m.num_features, dtype = m.weight.dtype) + 0.5)
    |> ignore

    m.bias.copy_ (torch.randn (m.num_features, dtype = m.bias.dtype)) |> ignore

/// Runs forward and backward of sum(y · g) and returns y, x.grad, weight.grad, bias.grad.
let private step (f: torch.Tensor -> torch.Tensor) (x: torch.Tensor) (g: torch.Tensor) (w: torch.Tensor) (b: torch.Tensor) =
    let xr = x.detach().requires_grad_ (true)
    let y = f xr
    (y * g).sum().backward ()
    y.detach (), xr.grad.clone (), w.grad.clone (), b.grad.clone ()

let private zeroGrads (ts: torch.Tensor list) =
    for t in ts do
        if not (isNull t.grad) then
            t.grad.zero_ () |> ignore

[<Theory>]
[<InlineData("float64", 0.1)>]
[<InlineData("float32", 0.1)>]
[<InlineData("float64", -1.0)>] // momentum null: cumulative average
[<InlineData("float32", 0.3)>]
let ``BN one-hot equals BatchNorm2d: outputs, gradients and buffers over steps, then eval`` (dtypeName: string, momentum: float) =
    seeded 1L

    let dtype =
        if dtypeName = "float64" then
            torch.ScalarType.Float64
        else
            torch.ScalarType.Float32

    let c = 3L
    let sn = new SwitchNorm2d(c, dtype = dtype)
    let bn = torch.nn.BatchNorm2d(c, dtype = dtype)

    if momentum < 0.0 then
        sn.momentum <- Nullable()
        bn.momentum <- Nullable()
    else
        sn.momentum <- Nullable momentum
        bn.momentum <- Nullable momentum

    randomAffine sn
    setOneHot sn 2

    do
        use _ = torch.no_grad ()
        bn.weight.copy_ sn.weight |> ignore
        bn.bias.copy_ sn.bias |> ignore

    let t = tol dtype

    for s in 1..4 do
        let x = torch.randn (4L, c, 5L, 3L, dtype = dtype) * 3.0 + float s
        let g = torch.randn (4L, c, 5L, 3L, dtype = dtype)
        zeroGrads [ sn.weight; sn.bias; bn.weight; bn.bias ]
        let y1, gx1, gw1, gb1 = step sn.forward x g sn.weight sn.bias
        let y2, gx2, gw2, gb2 = step bn.forward x g bn.weight bn.bias
        assertClose $"step {s} output" t y1 y2
        assertClose $"step {s} grad x" t gx1 gx2
        assertClose $"step {s} grad weight" t gw1 gw2
        assertClose $"step {s} grad bias" t gb1 gb2
        assertClose $"step {s} running_mean" t sn.running_mean bn.running_mean
        assertClose $"step {s} running_var" t sn.running_var bn.running_var
        Assert.Equal(bn.num_batches_tracked.to_type(torch.ScalarType.Int64).item<int64> (), sn.num_batches_tracked.item<int64> ())

    sn.eval () |> ignore
    bn.eval () |> ignore
    let rmBefore = sn.running_mean.clone ()
    let rvBefore = sn.running_var.clone ()
    let x = torch.randn (2L, c, 4L, 4L, dtype = dtype) + 2.0
    let g = torch.randn (2L, c, 4L, 4L, dtype = dtype)
    zeroGrads [ sn.weight; sn.bias; bn.weight; bn.bias ]
    let y1, gx1, gw1, gb1 = step sn.forward x g sn.weight sn.bias
    let y2, gx2, gw2, gb2 = step bn.forward x g bn.weight bn.bias
    assertClose "eval output" t y1 y2
    assertClose "eval grad x" t gx1 gx2
    assertClose "eval grad weight" t gw1 gw2
    assertClose "eval grad bias" t gb1 gb2
    Assert.True(exactEq rmBefore sn.running_mean && exactEq rvBefore sn.running_var, "eval changed the running statistics")
    Assert.Equal(4L, sn.num_batches_tracked.item<int64> ())

[<Theory>]
[<InlineData(true)>]
[<InlineData(false)>]
let ``IN one-hot equals instance_norm with per-channel affine, train and eval`` (training: bool) =
    seeded 2L
    let dtype = torch.ScalarType.Float64
    let sn = new SwitchNorm2d(4L, dtype = dtype)
    randomAffine sn
    setOneHot sn 0
    sn.train training |> ignore
    let x = torch.randn (3L, 4L, 3L, 5L, dtype = dtype) * 2.0 - 1.0
    let g = torch.randn (3L, 4L, 3L, 5L, dtype = dtype)
    let wRef = sn.weight.detach().clone().requires_grad_ (true)
    let bRef = sn.bias.detach().clone().requires_grad_ (true)
    let y1, gx1, gw1, gb1 = step sn.forward x g sn.weight sn.bias

    let y2, gx2, gw2, gb2 =
        step (fun x -> F.instance_norm (x, weight = wRef, bias = bRef, eps = 1e-5)) x g wRef bRef

    let t = tol dtype
    assertClose "output" t y1 y2
    assertClose "grad x" t gx1 gx2
    assertClose "grad weight" t gw1 gw2
    assertClose "grad bias" t gb1 gb2

[<Theory>]
[<InlineData(true)>]
[<InlineData(false)>]
let ``LN one-hot equals layer_norm over (C, H, W) with per-channel affine, train and eval`` (training: bool) =
    seeded 3L
    let dtype = torch.ScalarType.Float64
    let sn = new SwitchNorm2d(4L, dtype = dtype)
    randomAffine sn
    setOneHot sn 1
    sn.train training |> ignore
    let x = torch.randn (3L, 4L, 3L, 5L, dtype = dtype) * 2.0 + 7.0
    let g = torch.randn (3L, 4L, 3L, 5L, dtype = dtype)
    let wRef = sn.weight.detach().clone().requires_grad_ (true)
    let bRef = sn.bias.detach().clone().requires_grad_ (true)

    let lnRef (x: torch.Tensor) =
        F.layer_norm (x, [| 4L; 3L; 5L |], eps = 1e-5) * wRef.view (1L, -1L, 1L, 1L)
        + bRef.view (1L, -1L, 1L, 1L)

    let y1, gx1, gw1, gb1 = step sn.forward x g sn.weight sn.bias
    let y2, gx2, gw2, gb2 = step lnRef x g wRef bRef
    let t = tol dtype
    assertClose "output" t y1 y2
    assertClose "grad x" t gx1 gx2
    assertClose "grad weight" t gw1 gw2
    assertClose "grad bias" t gb1 gb2

[<Fact>]
let ``one-hot reductions hold in float32 against TorchSharp's norms`` () =
    seeded 4L
    let x = torch.randn (2L, 3L, 6L, 6L) * 5.0 + 100.0

    let cases: (int * (torch.Tensor -> torch.Tensor)) list = [
        0, (fun x -> F.instance_norm (x, eps = 1e-5))
        1, (fun x -> F.layer_norm (x, [| 3L; 6L; 6L |], eps = 1e-5))
        2, (fun x -> F.batch_norm (x, null, null, training = true, eps = 1e-5))
    ]

    for (hot, reference) in cases do
        let sn = new SwitchNorm2d(3L, affine = false)
        setOneHot sn hot
        assertClose $"component {hot}" (tol torch.ScalarType.Float32) (sn.forward x) (reference x)
