/// A dedicated timing program (BenchmarkDotNet's process model and libtorch's thread pool do not mix well):
/// SwitchNorm2d against TorchSharp's BatchNorm2d in the same process and run, with the thread count stated.
/// Usage: dotnet run -c Release --project bench/SwitchNorm.Bench [-- --quick]
module Program

open System
open System.Diagnostics
open TorchSharp

let median (xs: float list) =
    let a = List.sort xs |> Array.ofList
    a[a.Length / 2]

/// Median wall time in ms of f over `reps` runs, after `warm` warm-up runs; each run in its own dispose scope.
let time (warm: int) (reps: int) (f: unit -> unit) =
    for _ in 1..warm do
        use _ = torch.NewDisposeScope()
        f ()

    [
        for _ in 1..reps ->
            use _ = torch.NewDisposeScope()
            let sw = Stopwatch.StartNew()
            f ()
            sw.Elapsed.TotalMilliseconds
    ]
    |> median

[<EntryPoint>]
let main argv =
    let quick = Array.contains "--quick" argv
    let reps = if quick then 5 else 15

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

    printfn
        "date %s, float32, CPU, median of %d runs; ratios are SwitchNorm2d / BatchNorm2d in the same run"
        (DateTime.UtcNow.ToString "yyyy-MM-dd")
        reps

    printfn "| threads | shape | copy ms | BN train ms | SN train ms | train ratio | BN eval ms | SN eval ms | eval ratio |"
    printfn "|---|---|---|---|---|---|---|---|---|"

    for threads in [ 1; 2 ] do
        torch.set_num_threads threads

        for shape in shapes do
            torch.random.manual_seed 0L |> ignore
            let c = shape[1]
            let x = torch.randn shape
            let g = torch.randn shape
            let bn = torch.nn.BatchNorm2d(c)
            let sn = new SwitchNorm.SwitchNorm2d(c)

            let trainStep (m: torch.nn.Module<torch.Tensor, torch.Tensor>) () =
                let xr = x.detach().requires_grad_ (true)
                (m.forward xr * g).sum().backward ()
                m.zero_grad ()

            let evalFwd (m: torch.nn.Module<torch.Tensor, torch.Tensor>) () =
                use _ = torch.no_grad ()
                m.forward x |> ignore

            let copy = time 2 reps (fun () -> x.clone () |> ignore)
            bn.train () |> ignore
            sn.train () |> ignore
            let bnT = time 2 reps (trainStep bn)
            let snT = time 2 reps (trainStep sn)
            bn.eval () |> ignore
            sn.eval () |> ignore
            let bnE = time 2 reps (evalFwd bn)
            let snE = time 2 reps (evalFwd sn)
            let shapeText = "(" + String.Join(",", shape) + ")"

            printfn
                "| %d | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |"
                threads
                shapeText
                copy
                bnT
                snT
                (snT / bnT)
                bnE
                snE
                (snE / bnE)

    0
