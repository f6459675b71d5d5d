/// A dedicated timing program (BenchmarkDotNet's process model and libtorch's thread pool do not mix well):
/// SwitchNorm2d against TorchSharp's BatchNorm2d and the other norms in the same process and run, with the
/// thread count stated. Usage: dotnet run -c Release --project bench/SwitchNorm.Bench [-- --quick] [--default-malloc]
module Program

open System
open System.Diagnostics
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

type Module = torch.nn.Module<torch.Tensor, torch.Tensor>

[<System.Runtime.InteropServices.DllImport("libc.so.6")>]
extern int mallopt(int param, int value)

/// <summary>
/// Keeps glibc's malloc from returning freed memory to the OS between calls (M_TRIM_THRESHOLD 1 GB, M_MMAP_THRESHOLD
/// 32 MB, its maximum). Otherwise whether a layer's fresh output lands in recycled or in newly mapped, page-faulting
/// memory depends on the heap's history: a cold heap (the quick mode's first shapes) made the same training step up to
/// 7× slower for every subject, unevenly. Both subjects of every ratio run under the same setting; --default-malloc
/// leaves glibc's defaults.
/// </summary>
let keepFreedMemory () =
    if OperatingSystem.IsLinux() then
        try
            mallopt (-1, 1 <<< 30) |> ignore
            mallopt (-3, 32 <<< 20) |> ignore
        with _ ->
            ()

let median (xs: float list) =
    let a = List.sort xs |> Array.ofList
    a[a.Length / 2]

/// Runs every code path enough times for .NET's tiered JIT to promote it to optimized code, so the timings
/// below measure the steady state of a training loop rather than the first calls.
let warmUp () =
    let x = torch.randn (4L, 8L, 6L, 6L)

    for fused in [ true; false ] do
        let sn = new SwitchNorm2d(8L)
        sn.Fused <- fused

        for _ in 1..300 do
            use _ = torch.NewDisposeScope()
            sn.train () |> ignore
            (sn.forward (x.detach().requires_grad_ (true))).sum().backward ()
            sn.eval () |> ignore
            use _ = torch.no_grad ()
            sn.forward x |> ignore

    Threading.Thread.Sleep 500

/// A loop of calls, for a profiler (perf with DOTNET_PerfMapEnabled=1): where the time per call goes.
/// Usage: --overhead-loop eval|eval-grad|train|train-forward [N,C,H,W] [--threads T] (default 1). Prints the time per call of SwitchNorm2d and, for comparison, of
/// BatchNorm2d on the same input (after a warm-up of a tenth of the iterations): on a tiny input this is the fixed
/// cost per call, the checks and bookkeeping around the passes.
let overheadLoop (mode: string) (shape: int64[]) (iterations: int) (threads: int) =
    torch.set_num_threads threads
    let x = torch.randn shape
    let g = torch.randn shape
    let sn = new SwitchNorm2d(shape[1])
    let bn = torch.nn.BatchNorm2d(shape[1])

    let run (m: Module) n =
        for _ in 1..n do
            use _ = torch.NewDisposeScope()

            if mode = "train" then
                // as the benchmark's training step: forward, backward of sum(y · g), zero_grad
                m.train () |> ignore
                (m.forward (x.detach().requires_grad_ (true)) * g).sum().backward ()
                m.zero_grad ()
            elif mode = "train-forward" then
                m.train () |> ignore
                m.forward (x.detach().requires_grad_ (true)) |> ignore
            elif mode = "eval-grad" then
                // eval with grad mode on, as a validation loop without no_grad runs it
                m.eval () |> ignore
                m.forward x |> ignore
            else
                m.eval () |> ignore
                use _ = torch.no_grad ()
                m.forward x |> ignore

    for (name, m) in [ "SwitchNorm2d", sn :> Module; "BatchNorm2d", bn :> Module ] do
        run m (iterations / 10)
        let gcs = GC.CollectionCount 0
        let paused = GC.GetTotalPauseDuration()
        let sw = Stopwatch.StartNew()
        run m iterations
        let gcs = GC.CollectionCount 0 - gcs

        let paused =
            (GC.GetTotalPauseDuration() - paused).TotalMilliseconds * 1000.0
            / float iterations

        printfn
            "%s %s %s: %.1f us per call (%d calls, %d thread(s), %d gen0 GCs, GC pauses %.1f us per call)"
            name
            mode
            ("[" + String.Join(", ", shape) + "]")
            (sw.Elapsed.TotalMilliseconds * 1000.0 / float iterations)
            iterations
            threads
            gcs
            paused

[<EntryPoint>]
let main argv =
    let quick = Array.contains "--quick" argv

    if not (Array.contains "--default-malloc" argv) then
        keepFreedMemory ()

    match Array.tryFindIndex ((=) "--overhead-loop") argv with
    | Some i ->
        let mode = if argv.Length > i + 1 then argv[i + 1] else "eval"

        let threads =
            match Array.tryFindIndex ((=) "--threads") argv with
            | Some t -> int argv[t + 1]
            | None -> 1

        if argv.Length > i + 2 && not (argv[i + 2].StartsWith "--") then
            overheadLoop mode (argv[i + 2].Split ',' |> Array.map int64) 20000 threads
        else
            overheadLoop mode [| 2L; 4L; 2L; 2L |] 200000 threads

        exit 0
    | None -> ()

    let reps = if quick then 11 else 21
    let warm = 3

    let shapes =
        if quick then
            [ [| 8L; 64L; 28L; 28L |]; [| 8L; 256L; 14L; 14L |] ]
        else
            [
                [| 32L; 64L; 56L; 56L |]
                [| 8L; 256L; 14L; 14L |]
                [| 128L; 64L; 8L; 8L |]
                [| 2L; 64L; 112L; 112L |]
            ]

    warmUp ()

    printfn
        "date %s, float32, CPU (%d logical cores), median of %d repetitions after warm-up (a repetition times each subject over about 2 ms of calls); × BN is the median of the ratios to BatchNorm2d within each repetition"
        (DateTime.UtcNow.ToString "yyyy-MM-dd")
        Environment.ProcessorCount
        reps

    printfn ""
    printfn "| threads | shape | subject | train step ms | × BN | train fwd ms | × BN | fwd × copy | eval ms | × BN | eval × copy |"

    printfn "|---|---|---|---|---|---|---|---|---|---|---|"

    for threads in [ 1; 2 ] do
        torch.set_num_threads threads

        for shape in shapes do
            torch.random.manual_seed 0L |> ignore
            let c = shape[1]
            let x = torch.randn shape
            let g = torch.randn shape
            let fused = new SwitchNorm2d(c)
            let composed = new SwitchNorm2d(c)
            composed.Fused <- false

            // TorchSharp 0.107's GroupNorm leaves weight and bias uninitialized (torch.empty): set them as PyTorch does.
            let groupNorm (groups: int64) (channels: int64) =
                let g = torch.nn.GroupNorm(groups, channels)
                use _ = torch.no_grad ()
                g.weight.fill_ (1.0) |> ignore
                g.bias.zero_ () |> ignore
                g

            let subjects: (string * Module) list = [
                "BatchNorm2d", torch.nn.BatchNorm2d(c)
                "SwitchNorm2d", fused
                // right after the default semantics: a subject that follows the slow composed path pays for its cache
                // and heap traffic
                "SwitchNorm2d official", SwitchNorm2d.Official(c)
                "SwitchNorm2d composed", composed
                "InstanceNorm2d", torch.nn.InstanceNorm2d(c, affine = true)
                "LayerNorm", torch.nn.LayerNorm([| c; shape[2]; shape[3] |])
                "GroupNorm(32)", groupNorm 32L c
            ]

            let shapeText = "(" + String.Join(",", shape) + ")"

            let trainStep (m: Module) () =
                m.train () |> ignore
                let xr = x.detach().requires_grad_ (true)
                (m.forward xr * g).sum().backward ()
                m.zero_grad ()

            let trainForward (m: Module) () =
                m.train () |> ignore
                let xr = x.detach().requires_grad_ (true)
                m.forward xr |> ignore

            let evalForward (m: Module) () =
                m.eval () |> ignore
                use _ = torch.no_grad ()
                m.forward x |> ignore

            // Subjects take turns within each repetition, so a burst of load on this shared machine hits all of
            // them alike. A sample times enough calls to last about 2 ms (counted after the warm-up), so short calls
            // are not single timer readings; each call has its own dispose scope. Per subject: the samples (ms per
            // call) of every repetition, in order, for medians and for ratios paired within a repetition.
            let interleaved (fs: (unit -> unit) list) =
                let call (f: unit -> unit) =
                    use _ = torch.NewDisposeScope()
                    f ()

                // warm-up: rounds of every subject for at least `warm` rounds and 300 ms, so one-time costs (the
                // first parallel region at a new thread count, tiered JIT) are behind us
                let warmClock = Stopwatch.StartNew()
                let mutable rounds = 0

                while rounds < warm || warmClock.ElapsedMilliseconds < 300L do
                    for f in fs do
                        call f

                    rounds <- rounds + 1

                // calls per sample from the median of three timed calls
                let counts =
                    fs
                    |> List.map (fun f ->
                        let one () =
                            let sw = Stopwatch.StartNew()
                            call f
                            sw.Elapsed.TotalMilliseconds

                        let t = median [ one (); one (); one () ]
                        max 1 (int (ceil (2.0 / max 1e-3 t))))

                let samples = fs |> List.map (fun _ -> ResizeArray<float>())

                for _ in 1..reps do
                    for ((f, n), acc) in List.zip (List.zip fs counts) samples do
                        let sw = Stopwatch.StartNew()

                        for _ in 1..n do
                            call f

                        acc.Add(sw.Elapsed.TotalMilliseconds / float n)

                samples |> List.map List.ofSeq

            /// The median of the per-repetition ratios a/b: both timed within the same repetition.
            let pairedRatio (a: float list) (b: float list) = List.map2 (/) a b |> median

            let modules = subjects |> List.map snd
            let steps = interleaved (modules |> List.map trainStep)
            // the copy takes its turn with the forwards, for the eval ÷ copy ratio
            let fwdsAndCopy =
                interleaved ((fun () -> x.clone () |> ignore) :: (modules |> List.map trainForward))

            let copy, fwds = fwdsAndCopy.Head, fwdsAndCopy.Tail
            let evals = interleaved (modules |> List.map evalForward)
            let bnStep, bnFwd, bnEval = steps.Head, fwds.Head, evals.Head

            for (((name, _), step), (fwd, ev)) in List.zip (List.zip subjects steps) (List.zip fwds evals) do
                printfn
                    "| %d | %s | %s | %.3f | %.2f | %.3f | %.2f | %.2f | %.3f | %.2f | %.2f |"
                    threads
                    shapeText
                    name
                    (median step)
                    (pairedRatio step bnStep)
                    (median fwd)
                    (pairedRatio fwd bnFwd)
                    (median fwd / median copy)
                    (median ev)
                    (pairedRatio ev bnEval)
                    (median ev / median copy)

            printfn "| %d | %s | copy (x.clone) | | | %.3f | | | | | |" threads shapeText (median copy)

    0
