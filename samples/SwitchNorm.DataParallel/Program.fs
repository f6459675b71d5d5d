/// Data-parallel SwitchNorm on MPI. Start it with mpirun (see README, "Synchronized SwitchNorm"):
///   check           the synchronized layer on uneven shards (one of size 1, one empty with 4 ranks) against the
///                   whole batch on one rank: outputs, input gradients, summed parameter gradients, running statistics
///   train [--plain] [--out file]  a small CNN trained data-parallel: each rank takes its share of every batch,
///                   the gradients are summed by allreduce; prints (and writes) the loss per step. --plain: one
///                   process, plain SwitchNorm2d, no MPI
///   compare a b     the losses of two train runs agree step by step within float64 rounding
///   mismatch        ranks with different channel counts: every rank gets the same error, and none hangs
///   bench           time per layer call (forward + backward), synchronized against unsynchronized
module Program

open System
open System.Diagnostics
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

type F = torch.nn.functional

let f64 = torch.ScalarType.Float64

/// A communicator of one rank, for --plain runs without MPI.
let single = InProcessGroup(1).Rank 0

let maxDiff (a: torch.Tensor) (b: torch.Tensor) =
    if a.numel () = 0L then
        0.0
    else
        (a.to_type f64 - b.to_type f64).abs().max().item<float> ()

/// Sums a tensor over the ranks (for gradients and losses).
let allreduce (comm: ICommunicator) (t: torch.Tensor) =
    let v = t.detach().to_type(f64).contiguous().data<float>().ToArray()
    comm.AllreduceSum v
    torch.tensor(v, dtype = f64).view(t.shape).to_type t.dtype

/// Rows of a batch of n for each of `size` ranks: uneven on purpose, with a shard of 1 and, from 4 ranks, an empty one.
let shardsOf n size =
    match size with
    | 1 -> [| n |]
    | 2 -> [| 3; n - 3 |]
    | 3 -> [| 1; 4; n - 5 |]
    | _ ->
        let rest = n - 1 - 4

        Array.init size (fun r ->
            if r = 0 then
                1
            elif r = 1 then
                0
            elif r = 2 then
                4
            else
                rest / (size - 3) + (if r = size - 1 then rest % (size - 3) else 0))

/// float64 runs the tensor-operation path (tolerance 1e-10); float32 the row kernels (tolerance 1e-4: values and
/// gradients here are below 30 in size, and float32 sums of up to 225 of them round at about 1e-5).
let check (comm: ICommunicator) (dt: torch.ScalarType) =
    let tolerance = if dt = f64 then 1e-10 else 1e-4
    let n, c = 9, 3
    let shards = shardsOf n comm.Size
    let starts = Array.scan (+) 0 shards

    let x =
        (use g = new torch.Generator(11UL) in torch.randn ([| int64 n; int64 c; 5L; 5L |], dtype = dt, generator = g))
        * 3.0
        + 1.0

    let gy =
        (use g = new torch.Generator(12UL) in torch.randn ([| int64 n; int64 c; 5L; 5L |], dtype = dt, generator = g))

    let reference = new SwitchNorm2d(int64 c, dtype = dt)
    let sync = new SyncSwitchNorm2d(int64 c, comm, dtype = dt)

    for m in [ reference :> SwitchNormNd; sync ] do
        use _ = torch.no_grad ()
        m.mean_weight.copy_ (torch.tensor ([| 0.3; -0.2; 0.5 |], dtype = dt)) |> ignore
        m.var_weight.copy_ (torch.tensor ([| -0.1; 0.4; 0.2 |], dtype = dt)) |> ignore

    let r = comm.Rank
    let mutable worst = 0.0

    for step in 0..2 do
        reference.zero_grad ()
        sync.zero_grad ()
        let xr = (x + float step).requires_grad_ true
        let yr = reference.forward xr
        (yr * gy).sum().backward ()

        let xs =
            (x + float step).narrow(0L, int64 starts[r], int64 shards[r]).detach().requires_grad_ true

        let ys = sync.forward xs
        (ys * gy.narrow (0L, int64 starts[r], int64 shards[r])).sum().backward ()

        let rows (t: torch.Tensor) =
            t.narrow (0L, int64 starts[r], int64 shards[r])

        let diffs = [
            yield "output", maxDiff ys (rows yr)
            yield "input gradient", maxDiff xs.grad (rows xr.grad)
            for (name, ps, pr) in
                [
                    "weight", sync.weight, reference.weight
                    "bias", sync.bias, reference.bias
                    "mean_weight", sync.mean_weight, reference.mean_weight
                    "var_weight", sync.var_weight, reference.var_weight
                ] -> $"{name} gradient (summed)", maxDiff (allreduce comm ps.grad) pr.grad
            yield "running_mean", maxDiff sync.running_mean reference.running_mean
            yield "running_var", maxDiff sync.running_var reference.running_var
        ]

        for (what, d) in diffs do
            worst <- max worst d

            if d > tolerance then
                eprintfn "rank %d, step %d: %s differs by %g" r step what d

    let all = [| worst |]
    // the largest difference on any rank
    let v = Array.init comm.Size (fun i -> if i = r then worst else 0.0)
    comm.AllreduceSum v

    if r = 0 then
        printfn
            "check %A: %d rank(s), shards %A of a batch of %d, 3 training steps; largest difference from the whole batch on one rank: %.2e (tolerance %g)"
            dt
            comm.Size
            shards
            n
            (Array.max v)
            tolerance

    Array.max v <= tolerance && all[0] <= tolerance

/// Ranks that disagree on the channel count: every rank must get the same clear error, and nobody may hang.
let mismatch (comm: ICommunicator) =
    let c = 3L + int64 comm.Rank
    let m = new SyncSwitchNorm2d(c, comm)

    let outcome =
        try
            m.forward (torch.randn (2L, c, 3L, 3L)) |> ignore
            "no error"
        with :? ArgumentException as e ->
            e.Message

    let expected = "ranks disagree on the number of channels (rank 0: 3, rank 1: 4"
    let ok = outcome.Contains expected
    let v = Array.init comm.Size (fun i -> if i = comm.Rank && ok then 1.0 else 0.0)
    comm.AllreduceSum v

    if comm.Rank = 0 then
        printfn "mismatch: %d of %d ranks refused the call with: %s" (int (Array.sum v)) comm.Size outcome

    Array.sum v = float comm.Size

type Net(channels: int64, norm: int64 -> torch.nn.Module<torch.Tensor, torch.Tensor>) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Net")
    let conv1 = torch.nn.Conv2d(1L, channels, 3L, padding = 1L, dtype = f64)
    let norm1 = norm channels

    let conv2 =
        torch.nn.Conv2d(channels, channels, 3L, stride = 2L, padding = 1L, dtype = f64)

    let norm2 = norm channels
    let head = torch.nn.Linear(channels, 10L, dtype = f64)
    do this.RegisterComponents()

    override _.forward x =
        let h = F.relu (norm1.forward (conv1.forward x))
        let h = F.relu (norm2.forward (conv2.forward h))
        head.forward (h.mean ([| 2L; 3L |]))

let train (comm: ICommunicator) (plain: bool) (out: string option) =
    let batch, steps = 16, 12
    torch.random.manual_seed 5L |> ignore

    let norm (c: int64) : torch.nn.Module<torch.Tensor, torch.Tensor> =
        if plain then
            new SwitchNorm2d(c, dtype = f64)
        else
            new SyncSwitchNorm2d(c, comm, dtype = f64)

    let model = new Net(16L, norm)
    let opt = torch.optim.SGD(model.parameters (), 0.05, momentum = 0.9)
    let share = batch / comm.Size
    let r = comm.Rank

    if r = 0 then
        printfn
            "train: %s, %d process(es), global batch %d (%d per rank), float64"
            (if plain then "plain SwitchNorm2d" else "SyncSwitchNorm2d")
            comm.Size
            batch
            share

    let losses = ResizeArray()

    for step in 1..steps do
        use _ = torch.NewDisposeScope()

        let x =
            (use g = new torch.Generator(uint64 (100 + step)) in torch.randn ([| int64 batch; 1L; 12L; 12L |], dtype = f64, generator = g))

        let y =
            (use g = new torch.Generator(uint64 (200 + step)) in torch.randint (10L, [| int64 batch |], generator = g))

        let xs, ys =
            x.narrow (0L, int64 (r * share), int64 share), y.narrow (0L, int64 (r * share), int64 share)

        opt.zero_grad ()
        // each rank's share of the global mean loss, so the sum over ranks is the whole batch's loss
        let loss =
            F.cross_entropy (model.forward xs, ys, reduction = torch.nn.Reduction.Sum)
            / float batch

        loss.backward ()

        for p in model.parameters () do
            if not (isNull p.grad) then
                use s = allreduce comm p.grad
                p.grad.copy_ s |> ignore

        opt.step () |> ignore
        let total = (allreduce comm loss).item<float> ()

        losses.Add total

        if r = 0 then
            printfn "step %2d loss %.17g" step total

    match out with
    | Some path when r = 0 ->
        IO.File.WriteAllLines(
            path,
            losses
            |> Seq.map (fun l -> l.ToString("R", Globalization.CultureInfo.InvariantCulture))
        )
    | _ -> ()

    true

/// Compares two loss files step by step: equal within float64 rounding (relative 1e-12).
let compare (a: string) (b: string) =
    let read (p: string) =
        IO.File.ReadAllLines p
        |> Array.map (fun l -> Double.Parse(l, Globalization.CultureInfo.InvariantCulture))

    let la, lb = read a, read b

    if la.Length <> lb.Length || la.Length = 0 then
        eprintfn "compare: %s has %d losses, %s has %d" a la.Length b lb.Length
        false
    else
        let rel =
            Array.map2 (fun (x: float) y -> abs (x - y) / max (abs x) 1e-300) la lb
            |> Array.max

        printfn "compare: %d steps, largest relative difference of the losses %.2e (tolerance 1e-12)" la.Length rel
        rel <= 1e-12

let bench (comm: ICommunicator) =
    let shape = [| 8L; 64L; 28L; 28L |]
    torch.set_num_threads 1
    let x = torch.randn (shape, dtype = torch.ScalarType.Float32)
    let g = torch.randn (shape, dtype = torch.ScalarType.Float32)
    let fused = new SwitchNorm2d(64L)
    let composed = new SwitchNorm2d(64L)
    composed.Fused <- false
    let sync = new SyncSwitchNorm2d(64L, comm)

    let subjects: (string * SwitchNormNd) list = [ "fused", fused; "composed", composed; "sync", sync ]
    let times = subjects |> List.map (fun (n, _) -> n, ResizeArray<float>()) |> dict

    // subjects take turns within each repetition, so a burst of load on the machine hits all alike
    for rep in 1..70 do
        for (name, m) in subjects do
            use _ = torch.NewDisposeScope()
            // every rank starts each call together, so waits inside the collective are the sync's own
            comm.AllreduceSum [| 0.0 |]
            let sw = Stopwatch.StartNew()
            let xs = x.detach().requires_grad_ true
            (m.forward xs * g).sum().backward ()

            if rep > 10 then
                times[name].Add sw.Elapsed.TotalMilliseconds

    let median name =
        let t = times[name].ToArray() |> Array.sort
        t[t.Length / 2]

    let tf, tc, ts = median "fused", median "composed", median "sync"

    let allreduceUs =
        let v = Array.zeroCreate 64
        comm.AllreduceSum v
        let sw = Stopwatch.StartNew()

        for _ in 1..200 do
            comm.AllreduceSum v

        sw.Elapsed.TotalMilliseconds * 1000.0 / 200.0

    if comm.Rank = 0 then
        printfn
            "bench: %d rank(s), each with a shard of %s float32, 1 libtorch thread per rank; train step (forward + backward), median of 60, interleaved"
            comm.Size
            ("[" + String.Join(", ", shape) + "]")

        printfn "  SwitchNorm2d fused (unsynchronized)     %8.2f ms" tf
        printfn "  SwitchNorm2d composed (unsynchronized)  %8.2f ms" tc
        printfn "  SyncSwitchNorm2d                        %8.2f ms   (%.2f x composed, %.2f x fused)" ts (ts / tc) (ts / tf)
        printfn "  one allreduce of 64 doubles             %8.1f us" allreduceUs

    true

[<EntryPoint>]
let main argv =
    Workarounds.OneDnn.limitOneDnnToAvx2 () |> ignore
    let mode = if argv.Length > 0 then argv[0] else "check"
    let plain = argv |> Array.contains "--plain"

    let out =
        match Array.tryFindIndex ((=) "--out") argv with
        | Some i when i + 1 < argv.Length -> Some argv[i + 1]
        | _ -> None

    if mode = "compare" then
        if argv.Length = 3 && compare argv[1] argv[2] then 0 else 1
    elif plain then
        if train single true out then 0 else 1
    else
        let mpi =
            try
                MpiCommunicator.World()
            with :? InvalidOperationException as e ->
                eprintfn "%s" e.Message
                exit 3

        let comm = mpi :> ICommunicator

        let ok =
            try
                match mode with
                | "check" -> check comm f64 && check comm torch.ScalarType.Float32
                | "mismatch" -> mismatch comm
                | "train" -> train comm false out
                | "bench" -> bench comm
                | other ->
                    eprintfn "unknown mode '%s'; expected check, train [--plain] or bench" other
                    false
            with e ->
                eprintfn "rank %d failed: %s" comm.Rank (e.ToString())
                mpi.Abort 1
                false

        if ok then
            (mpi :> IDisposable).Dispose()
            0
        else
            mpi.Abort 1
            1
