/// SyncSwitchNorm: the synchronized BN statistics over ranks (in-process communicator), against the unsplit batch.
module SyncTests

open System
open FsCheck
open FsCheck.FSharp
open global.FsCheck.Xunit
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private f64 = torch.ScalarType.Float64

open Generators


let private setUp (m: SwitchNormNd) (c: SyncCase) =
    use _ = torch.no_grad ()
    let dt = m.mean_weight.dtype
    m.mean_weight.copy_ (torch.tensor (c.MeanLogits, dtype = dt)) |> ignore
    m.var_weight.copy_ (torch.tensor (c.VarLogits, dtype = dt)) |> ignore
    m.momentum <- Option.toNullable c.Momentum

    if c.Affine then
        m.weight.copy_ (randnSeeded (int64 c.Seed + 1L) [| c.Shape[1] |] dt) |> ignore
        m.bias.copy_ (randnSeeded (int64 c.Seed + 2L) [| c.Shape[1] |] dt) |> ignore

let private grads (m: SwitchNormNd) =
    [ m.weight; m.bias; m.mean_weight; m.var_weight ]
    |> List.filter (isNull >> not)
    |> List.map (fun p ->
        if isNull p.grad then
            torch.zeros_like p
        else
            p.grad.clone ())

/// Two training steps of the synchronized layer on the shards equal those of SwitchNorm2d on the whole batch:
/// outputs, input gradients, parameter gradients summed over ranks, and the running statistics on every rank.
/// float64 runs the tensor-operation path, float32 the row kernels (with the fused path of SwitchNorm2d as reference).
let syncEqualsUnsplit (dt: torch.ScalarType) (c: SyncCase) =
    let x = randnSeeded (int64 c.Seed) c.Shape dt * 2.0 + 0.5
    let g = randnSeeded (int64 c.Seed + 3L) c.Shape dt
    let starts = Array.scan (+) 0 c.Shards

    // the reference: one rank, the whole batch, the plain module
    let reference = new SwitchNorm2d(c.Shape[1], dtype = dt, affine = c.Affine)
    setUp reference c
    let refSteps = ResizeArray()

    for step in 0..1 do
        reference.zero_grad ()
        let xr = (x + float step).requires_grad_ true
        let y = reference.forward xr
        (y * g).sum().backward ()
        refSteps.Add(y.detach (), xr.grad.clone (), grads reference)

    let perRank =
        InProcessGroup.Run(
            c.Shards.Length,
            fun comm ->
                let m = new SyncSwitchNorm2d(c.Shape[1], comm, dtype = dt, affine = c.Affine)
                setUp m c

                let steps = [
                    for step in 0..1 ->
                        m.zero_grad ()
                        let r = comm.Rank

                        let xs =
                            (x + float step).narrow(0L, int64 starts[r], int64 c.Shards[r]).detach().requires_grad_ true

                        let y = m.forward xs
                        (y * g.narrow (0L, int64 starts[r], int64 c.Shards[r])).sum().backward ()
                        y.detach (), xs.grad.clone (), grads m
                ]

                steps, m.running_mean.clone (), m.running_var.clone (), m.num_batches_tracked.item<int64> ()
        )

    let tol = tol dt

    for step in 0..1 do
        let yRef, dxRef, gRef = refSteps[step]

        let at (r: int) =
            (let s, _, _, _ = perRank[r] in s[step])

        let y =
            torch.cat ([| for r in 0 .. c.Shards.Length - 1 -> (let y, _, _ = at r in y) |], 0L)

        let dx =
            torch.cat ([| for r in 0 .. c.Shards.Length - 1 -> (let _, d, _ = at r in d) |], 0L)

        assertClose $"step {step} output" tol y yRef
        // an input gradient is gr·g + q·(x − centre) + c0, whose terms carry r = 1/sqrt(var + eps) and can cancel:
        // rounding is relative to the largest term, not to the result. The mixed variance is at least the smallest
        // instance variance, so r ≤ rMax (as in PropertySuite.compareObserved); e.g. one value per row gives
        // r = 1/sqrt(eps) ≈ 316 and terms of that size cancelling to O(1).
        let minInstance =
            (x + float step).to_type(f64).reshape(c.Shape[0], c.Shape[1], -1L).var(2L, unbiased = false).min().item<float> ()

        let rMax = 1.0 / sqrt (1e-5 + max 0.0 minInstance)
        let scale = max 1.0 (max rMax (dxRef.abs().max().to_type(f64).item<float> ()))
        assertClose $"step {step} input gradient" (tol * scale) dx dxRef

        gRef
        |> List.iteri (fun i gr ->
            let summed =
                [ for r in 0 .. c.Shards.Length - 1 -> (let _, _, gs = at r in gs[i]) ]
                |> List.reduce (+)
            // a parameter gradient sums up to N·C·H·W terms of size ~|x|·|g| (|x| ≤ 2·4 + 0.5 here), in a different
            // order on each side: its rounding grows like √(count)·|term| against the unit tolerance of one output
            let terms = float (x.numel ())
            assertClose $"step {step} parameter gradient {i}" (tol * sqrt terms * 10.0) summed gr)

    for (_, rm, rv, tracked) in perRank do
        assertClose "running_mean" tol rm reference.running_mean
        assertClose "running_var" tol rv reference.running_var

        if tracked <> reference.num_batches_tracked.item<int64> () then
            failwith $"num_batches_tracked {tracked}"

[<Property(Arbitrary = [| typeof<SyncArbs> |], MaxTest = 60)>]
let ``synchronized statistics over any split equal the unsplit batch (float64)`` (c: SyncCase) = syncEqualsUnsplit f64 c

[<Property(Arbitrary = [| typeof<SyncArbs> |], MaxTest = 60)>]
let ``synchronized statistics over any split equal the unsplit batch (float32, row kernels)`` (c: SyncCase) =
    syncEqualsUnsplit torch.ScalarType.Float32 c

let private expectEveryRank<'E when 'E :> exn> (size: int) (body: ICommunicator -> unit) (expected: int -> string) =
    let e =
        Assert.Throws<AggregateException>(fun () ->
            InProcessGroup.Run(
                size,
                (fun comm ->
                    body comm
                    0),
                20.0
            )
            |> ignore)

    Assert.Equal(size, e.InnerExceptions.Count)

    for inner in e.InnerExceptions do
        Assert.IsAssignableFrom<'E>(inner) |> ignore

    e.InnerExceptions
    |> Seq.iteri (fun r inner -> Assert.Contains(expected r, inner.Message))

[<Fact>]
let ``ranks that disagree on the channels or the dtype fail on every rank, naming each rank's value`` () =
    expectEveryRank<ArgumentException>
        2
        (fun comm ->
            let c = 3L + int64 comm.Rank
            let m = new SyncSwitchNorm2d(c, comm)
            m.forward (torch.randn (2L, c, 3L, 3L)) |> ignore)
        (fun _ -> "ranks disagree on the number of channels (rank 0: 3, rank 1: 4)")

    expectEveryRank<ArgumentException>
        2
        (fun comm ->
            let dt = if comm.Rank = 0 then torch.ScalarType.Float32 else f64
            let m = new SyncSwitchNorm2d(3L, comm, dtype = dt)
            m.forward (torch.randn (2L, 3L, 3L, 3L, dtype = dt)) |> ignore)
        (fun _ -> "ranks disagree on the dtype (rank 0: Float32, rank 1: Float64)")

[<Fact>]
let ``a bad input on one rank fails there with its own message and on the others without waiting`` () =
    let e =
        Assert.Throws<AggregateException>(fun () ->
            InProcessGroup.Run(
                2,
                (fun comm ->
                    let m = new SyncSwitchNorm2d(3L, comm)

                    let x =
                        if comm.Rank = 1 then
                            torch.randn (2L, 3L, 3L)
                        else
                            torch.randn (2L, 3L, 3L, 3L)

                    m.forward x |> ignore
                    0),
                20.0
            )
            |> ignore)

    let messages =
        e.InnerExceptions
        |> Seq.map (fun x -> x.GetType().Name, x.Message)
        |> List.ofSeq

    Assert.Equal(2, messages.Length)
    Assert.Contains(messages, fun (t, m) -> t = "ArgumentException" && m.Contains "expects a 4-D input")
    Assert.Contains(messages, fun (t, m) -> t = "InvalidOperationException" && m.Contains "rank(s) 1 refused their input")

[<Fact>]
let ``a global batch with one value per channel is refused on every rank, and the buffers stay`` () =
    let e =
        Assert.Throws<AggregateException>(fun () ->
            InProcessGroup.Run(
                2,
                (fun comm ->
                    let m = new SyncSwitchNorm2d(2L, comm)
                    let n = if comm.Rank = 0 then 1L else 0L

                    try
                        m.forward (torch.randn (n, 2L, 1L, 1L)) |> ignore
                    finally
                        Assert.Equal(0L, m.num_batches_tracked.item<int64> ())

                    0),
                20.0
            )
            |> ignore)

    for inner in e.InnerExceptions do
        Assert.Contains("expected more than 1 value per channel across all ranks", inner.Message)
        Assert.Contains("got 1 (rank 0: 1, rank 1: 0)", inner.Message)

[<Fact>]
let ``an empty shard gets an empty output, adds nothing to the statistics and takes part in the backward`` () =
    let x = randnSeeded 9L [| 3L; 2L; 4L; 4L |] f64
    let reference = new SwitchNorm2d(2L, dtype = f64)
    let yRef = reference.forward x

    let outs =
        InProcessGroup.Run(
            2,
            fun comm ->
                let m = new SyncSwitchNorm2d(2L, comm, dtype = f64)
                let xs = (if comm.Rank = 0 then x else x.narrow (0L, 0L, 0L)).requires_grad_ true
                let y = m.forward xs
                y.sum().backward ()
                y.detach (), m.weight.grad.clone (), m.running_mean.clone ()
        )

    let y1, g1, rm1 = outs[1]
    Assert.Equal<int64[]>([| 0L; 2L; 4L; 4L |], y1.shape)
    Assert.True(exactEq g1 (torch.zeros_like g1))
    assertClose "rank 0 output" (tol f64) (let y, _, _ = outs[0] in y) yRef
    assertClose "running mean on the empty rank" (tol f64) rm1 reference.running_mean

[<Fact>]
let ``eval with running statistics exchanges nothing`` () =
    // one rank of a group of two calls forward alone: a collective would time out
    let group = InProcessGroup(2, 5.0)
    let m = new SyncSwitchNorm2d(3L, group.Rank 0)
    m.eval () |> ignore
    let y = m.forward (torch.randn (1L, 3L, 2L, 2L))
    Assert.Equal<int64[]>([| 1L; 3L; 2L; 2L |], y.shape)

[<Fact>]
let ``asking for MPI where it is missing says so`` () =
    let e =
        Assert.Throws<InvalidOperationException>(fun () -> MpiCommunicator.World "libmpi-not-installed.so.40" |> ignore)

    Assert.Contains("MPI is not available", e.Message)
    Assert.Contains("apt-get install openmpi-bin", e.Message)

[<Fact>]
let ``the synchronized module is a SwitchNorm for the model tools`` () =
    let group = InProcessGroup(1)

    let model =
        torch.nn.Sequential(torch.nn.Conv2d(1L, 4L, 3L), new SyncSwitchNorm2d(4L, group.Rank 0))

    Assert.Equal(1, (Mixture.ofModel model).Length)

[<Fact>]
let ``a synchronized layer without a communicator is refused at construction`` () =
    let e =
        Assert.Throws<ArgumentNullException>(fun () -> new SyncSwitchNorm2d(4L, Unchecked.defaultof<ICommunicator>) |> ignore)

    Assert.Contains("SyncSwitchNorm2d needs a communicator", e.Message)
