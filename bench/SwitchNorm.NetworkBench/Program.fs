/// The network benchmark: TorchVision's resnet18 with BatchNorm2d, with every BatchNorm converted to SwitchNorm2d, with
/// SwitchNorm folded for inference (every layer's selection made one-hot on BN, frozen as SSN's final stage would, then
/// folded into plain BatchNorm2d and fused into the convolutions), and with GroupNorm(32). Training step (zero_grad,
/// forward, cross-entropy, backward, SGD step) and eval forward, float32, at (8,3,224,224) and (32,3,64,64), 1 and 2
/// threads, with glibc's default malloc (as a user's application has it). Subjects alternate within each repetition;
/// ratios are medians of the per-repetition ratios to the BN network.
///   dotnet run -c Release --project bench/SwitchNorm.NetworkBench [-- --reps N] [--threads T] [--shape N,C,H,W] [--mallopt]
module Program

open System
open System.Diagnostics
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

type Net = torch.nn.Module<torch.Tensor, torch.Tensor>

[<System.Runtime.InteropServices.DllImport("libc.so.6")>]
extern int mallopt(int param, int value)

let median (xs: float list) =
    let a = List.sort xs |> Array.ofList
    a[a.Length / 2]

let resnet () : Net =
    torchvision.models.resnet18 (num_classes = 10)

let groupNorm () : Net =
    torchvision.models.resnet18 (
        num_classes = 10,
        norm_layer =
            Func<int, torch.nn.Module<torch.Tensor, torch.Tensor>>(fun c ->
                let g = torch.nn.GroupNorm(32L, int64 c)
                // TorchSharp 0.107's GroupNorm leaves weight and bias uninitialized: set them as PyTorch does
                use _ = torch.no_grad ()
                g.weight.fill_ (1.0) |> ignore
                g.bias.zero_ () |> ignore
                g)
    )

let converted () : Net =
    let m = resnet ()
    Conversion.batchNorm LogitInit.BatchLeaning 8.0 m |> ignore
    m

/// SN with every selection one-hot on BN and frozen, folded to BatchNorm2d and fused into the convolutions (eval only).
let folded () : Net =
    let m = converted ()

    for (_, sn) in Mixture.modules m do
        use _ = torch.no_grad ()
        let k = sn.mean_weight.shape[0]

        let hot =
            torch.tensor (Array.init (int k) (fun i -> if i = int k - 1 then 10.0 else 0.0))

        sn.mean_weight.copy_ hot |> ignore
        sn.var_weight.copy_ hot |> ignore
        sn.SwitchKind <- SwitchKind.Sparsestmax
        sn.Radius <- 1.0
        sn.Freeze() |> ignore

    m.eval () |> ignore
    Folding.forInference m |> ignore
    Folding.fuseConvBn m |> ignore
    m

[<EntryPoint>]
let main argv =
    Workarounds.OneDnn.limitOneDnnToAvx2 () |> ignore

    let reps =
        match Array.tryFindIndex ((=) "--reps") argv with
        | Some i -> int argv[i + 1]
        | None -> 7

    let arg (name: string) =
        Array.tryFindIndex ((=) name) argv |> Option.map (fun i -> argv[i + 1])

    // --mallopt: keep freed memory in the heap (M_TRIM_THRESHOLD 1 GB, M_MMAP_THRESHOLD 32 MB), as the layer benchmark
    // does by default, to see what the first touch of freshly mapped memory costs each network
    let mallopts = Array.contains "--mallopt" argv

    if mallopts then
        mallopt (-1, 1 <<< 30) |> ignore
        mallopt (-3, 32 <<< 20) |> ignore

    let shapes =
        match arg "--shape" with
        | Some s -> [ s.Split ',' |> Array.map int64 ]
        | None -> [ [| 8L; 3L; 224L; 224L |]; [| 32L; 3L; 64L; 64L |] ]

    let threadCounts =
        match arg "--threads" with
        | Some t -> [ int t ]
        | None -> [ 1; 2 ]

    printfn
        "date %s, TorchVision resnet18 (10 classes), float32, CPU (%d logical cores), %s; median of %d repetitions after 2 warm-up rounds; x BN is the median of the per-repetition ratios to the BN network"
        (DateTime.UtcNow.ToString "yyyy-MM-dd")
        Environment.ProcessorCount
        (if mallopts then
             "mallopt: freed memory kept in the heap"
         else
             "glibc's default malloc")
        reps

    printfn ""
    printfn "| threads | input | network | train step ms | x BN | eval forward ms | x BN |"
    printfn "|---|---|---|---|---|---|---|"

    for threads in threadCounts do
        torch.set_num_threads threads

        for shape in shapes do
            torch.random.manual_seed 0L |> ignore
            let x = torch.randn shape
            let y = torch.randint (10L, [| shape[0] |], dtype = torch.ScalarType.Int64)

            let subjects = [
                "BatchNorm2d", Some(resnet ()), resnet ()
                "SwitchNorm2d (converted)", Some(converted ()), converted ()
                "SwitchNorm2d folded (BN selected, fused into conv)", None, folded ()
                "GroupNorm(32)", Some(groupNorm ()), groupNorm ()
            ]

            let optimizers =
                subjects
                |> List.map (fun (_, t, _) ->
                    t
                    |> Option.map (fun (m: Net) -> torch.optim.SGD(m.parameters (), 0.01, momentum = 0.9)))

            let trainStep (m: Net) (opt: torch.optim.Optimizer) () =
                use _ = torch.NewDisposeScope()
                m.train () |> ignore
                opt.zero_grad ()
                let loss = torch.nn.functional.cross_entropy (m.forward x, y)
                loss.backward ()
                opt.step () |> ignore

            let evalForward (m: Net) () =
                use _ = torch.NewDisposeScope()
                m.eval () |> ignore
                use _ = torch.no_grad ()
                m.forward x |> ignore

            let time (f: unit -> unit) =
                let sw = Stopwatch.StartNew()
                f ()
                sw.Elapsed.TotalMilliseconds

            // rounds of every subject, alternating; the first two are warm-up
            let trainTimes =
                Array.init subjects.Length (fun _ -> Collections.Generic.List<float>())

            let evalTimes =
                Array.init subjects.Length (fun _ -> Collections.Generic.List<float>())

            for round in 1 .. reps + 2 do
                subjects
                |> List.iteri (fun i (_, t, e) ->
                    match t, optimizers[i] with
                    | Some m, Some opt ->
                        let ms = time (trainStep m opt)

                        if round > 2 then
                            trainTimes[i].Add ms
                    | _ -> ()

                    let ms = time (evalForward e)

                    if round > 2 then
                        evalTimes[i].Add ms)

            let ratio (times: Collections.Generic.List<float>[]) i =
                if times[i].Count = 0 then
                    nan
                else
                    median [ for r in 0 .. times[i].Count - 1 -> times[i][r] / times[0][r] ]

            let shapeText = "(" + String.Join(",", shape) + ")"

            subjects
            |> List.iteri (fun i (name, _, _) ->
                let train =
                    if trainTimes[i].Count = 0 then
                        "| - | - "
                    else
                        $"| {median (List.ofSeq trainTimes[i]):F1} | {ratio trainTimes i:F2} "

                printfn $"| {threads} | {shapeText} | {name} {train}| {median (List.ofSeq evalTimes[i]):F1} | {ratio evalTimes i:F2} |")

    0
