/// The main job: does SwitchNorm keep working when the batch gets small, where BatchNorm collapses? Trains a small
/// CNN on Fashion-MNIST with BatchNorm, GroupNorm and SwitchNorm at several batch sizes, then prints and writes the
/// test accuracies, the effect of batch-average recalibration, and the mixture each SwitchNorm layer learned.
module Program

open System
open System.IO
open System.Threading
open Argu
open Spectre.Console
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp
open Experiment

type Args =
    | [<AltCommandLine("-d")>] Data_Dir of path: string
    | [<AltCommandLine("-n")>] Normalizers of names: string list
    | [<AltCommandLine("-b")>] Batch_Sizes of sizes: int list
    | [<AltCommandLine("-e")>] Epochs of count: int
    | [<AltCommandLine("-s")>] Seed of seed: int
    | Seeds of count: int
    | Train_Images of count: int
    | [<AltCommandLine("-o")>] Output of dir: string
    | Quick
    | Max_Steps of steps: int
    | Recalibration_Images of count: int
    | Threads of count: int
    | No_Plots
    | Conversion_Study
    | Margins of margins: float list
    | Fine_Tune_Batch of size: int
    | Fine_Tune_Epochs of count: int

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Data_Dir _ ->
                "a directory with the four Fashion-MNIST idx files (.gz or plain), e.g. /usr/share/datasets/fashion-mnist; default: the embedded subset (6,000 train, 2,000 test)"
            | Normalizers _ ->
                "normalizers to compare, among bn, gn, sn, ssn, sn-inln (default: bn gn sn ssn; at batch size 1, bn, sn and ssn are replaced by sn-inln, SwitchNorm without BN)"
            | Batch_Sizes _ -> "per-step batch sizes (default: 1 8 32)"
            | Epochs _ -> "epochs per run (default: 3)"
            | Seed _ -> "the first random seed, for initialisation and batch order (default: 1)"
            | Seeds _ -> "seeds per configuration: seed, seed + 1, ... (default: 3)"
            | Train_Images _ -> "train on the first N training images (default: 3000; 0 for all of them)"
            | Output _ -> "folder for results.json, results.csv, mixtures.csv and the PNG plots (default: results)"
            | Quick -> "a quick look (about 20 s): one seed, one epoch on 1000 training images (options given explicitly win)"
            | Max_Steps _ -> "stop each run after this many steps (for a quick check)"
            | Recalibration_Images _ ->
                "training images used for batch-average recalibration, in batches of the run's batch size (default: 3000)"
            | Threads _ -> "libtorch threads (default: the number of cores)"
            | No_Plots -> "do not write the PNG plots"
            | Conversion_Study ->
                "instead of the comparison: train with BatchNorm (--epochs at batch 32), convert to SwitchNorm with each BN-leaning margin, fine-tune at a smaller batch, and write conversion.md and conversion.csv"
            | Margins _ -> "with --conversion-study: the BN-leaning margins (default: 0 1 2 3 4 6 8; 0 is the uniform mixture)"
            | Fine_Tune_Batch _ -> "with --conversion-study: the fine-tuning batch size (default: 4)"
            | Fine_Tune_Epochs _ -> "with --conversion-study: fine-tuning epochs (default: 1)"

/// A bad option: the message says which and why.
exception UsageError of string

let private validate (r: ParseResults<Args>) =
    let positive name v =
        if v < 1 then
            raise (UsageError $"{name} must be at least 1; got {v}")

    let norms =
        r.GetResult(Normalizers, [ "bn"; "gn"; "sn"; "ssn" ])
        |> List.map (fun s ->
            match Normalizer.Parse s with
            | Ok n -> n
            | Error e -> raise (UsageError e))
        |> List.distinct

    if norms.IsEmpty then
        raise (UsageError "--normalizers needs at least one of bn, gn, sn, ssn, sn-inln")

    let quick = r.Contains Quick
    let sizes = r.GetResult(Batch_Sizes, [ 1; 8; 32 ]) |> List.distinct |> List.sort

    if sizes.IsEmpty then
        raise (UsageError "--batch-sizes needs at least one size")

    for b in sizes do
        positive "a batch size" b

    let epochs = r.GetResult(Epochs, (if quick then 1 else 3))
    positive "--epochs" epochs
    r.TryGetResult Max_Steps |> Option.iter (positive "--max-steps")
    let recal = r.GetResult(Recalibration_Images, 3000)
    positive "--recalibration-images" recal
    let threads = r.GetResult(Threads, Environment.ProcessorCount)
    positive "--threads" threads
    let seeds = r.GetResult(Seeds, (if quick then 1 else 3))
    positive "--seeds" seeds
    let trainImages = r.GetResult(Train_Images, (if quick then 1000 else 3000))

    if trainImages < 0 then
        raise (UsageError $"--train-images must be 0 (all) or more; got {trainImages}")

    norms, sizes, epochs, recal, threads, seeds, trainImages

/// <summary>
/// The normalizers run at batch size b. At batch size 1, BN's batch statistics in training are one image's own
/// (instance) statistics, while eval uses their running averages: the train/eval mismatch the paper avoids by
/// dropping BN from SN there (its (8,1) models). So BN is skipped, and SN and SSN run as SwitchNorm without BN
/// (sn-inln).
/// </summary>
let normalizersAt (b: int) (norms: Normalizer list) =
    if b > 1 then
        norms
    else
        norms
        |> List.choose (fun n ->
            match n with
            | BN -> None
            | SN
            | SSN -> Some SNInLn
            | other -> Some other)
        |> List.distinct

/// --conversion-study: the margins' trade-off (ConversionStudy), printed and written to conversion.md and .csv.
let private conversionStudy
    (r: ParseResults<Args>)
    (train: Data.Split)
    (test: Data.Split)
    (seeds: int list)
    (epochs: int)
    (recal: int)
    (outDir: string)
    =
    let margins =
        r.GetResult(Margins, [ 0.0; 1.0; 2.0; 3.0; 4.0; 6.0; 8.0 ]) |> List.distinct

    for m in margins do
        if not (Double.IsFinite m) || m < 0.0 then
            raise (UsageError $"a margin must be finite and at least 0; got {m}")

    let fineBatch = r.GetResult(Fine_Tune_Batch, 4)
    let fineEpochs = r.GetResult(Fine_Tune_Epochs, 1)

    for name, v in [ "--fine-tune-batch", fineBatch; "--fine-tune-epochs", fineEpochs ] do
        if v < 1 then
            raise (UsageError $"{name} must be at least 1; got {v}")

    let spec: ConversionStudy.StudySpec = {
        Margins = margins
        Seeds = seeds
        PretrainEpochs = epochs
        PretrainBatch = 32
        FineTuneEpochs = fineEpochs
        FineTuneBatch = fineBatch
        MaxSteps = r.TryGetResult Max_Steps
        RecalibrationImages = recal
    }

    AnsiConsole.MarkupLine(
        $"[bold]Conversion study[/]: {train.Count} training and {test.Count} test images; seeds {List.head seeds}..{List.last seeds}; margins {String.Join(' ', margins)}"
    )

    let rows =
        ConversionStudy.run
            spec
            train
            test
            (fun row ->
                AnsiConsole.MarkupLine(
                    $"seed {row.Seed} margin {ConversionStudy.marginName row.Margin}: logits change {row.LogitChange:G3}, mixture moves {row.MixtureMovement:G3}, fine-tuned {100.0 * row.FineTunedAccuracy:F1}%%"
                ))
            CancellationToken.None

    let md = ConversionStudy.markdown spec rows
    printfn "%s" md
    File.WriteAllText(Path.Combine(outDir, "conversion.md"), md + "\n")
    ConversionStudy.writeCsv (Path.Combine(outDir, "conversion.csv")) rows
    AnsiConsole.MarkupLine($"Wrote conversion.md and conversion.csv to {Markup.Escape outDir}")
    0

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Args>(programName = "switchnorm-fashion")

    try
        let r = parser.ParseCommandLine(argv, raiseOnUsage = true)
        let norms, sizes, epochs, recal, threads, seedCount, trainImages = validate r
        let seed = r.GetResult(Seed, 1)
        let seeds = [ seed .. seed + seedCount - 1 ]
        let outDir = Path.GetFullPath(r.GetResult(Output, "results"))

        // libtorch's oneDNN convolutions have an AVX-512 defect on some CPUs: NaN input gradients (samples/Shared/OneDnn.fs).
        Workarounds.OneDnn.limitOneDnnToAvx2 () |> ignore
        torch.set_num_threads threads

        let train, test =
            match r.TryGetResult Data_Dir with
            | Some d -> Data.fromDirectory d
            | None -> Data.embedded ()

        let train =
            if trainImages > 0 && trainImages < train.Count then
                Data.take trainImages train
            else
                train

        Directory.CreateDirectory outDir |> ignore

        if r.Contains Conversion_Study then
            conversionStudy r train test seeds epochs recal outDir
        else

            let source =
                match r.TryGetResult Data_Dir with
                | Some d -> d
                | None -> "the embedded subset"

            AnsiConsole.MarkupLine(
                $"[bold]Fashion-MNIST[/] from {Markup.Escape source}: {train.Count} training and {test.Count} test images; "
                + $"{threads} libtorch thread(s), seeds {seed}..{seed + seedCount - 1}, {epochs} epoch(s) per run"
            )

            if List.contains 1 sizes && List.contains BN norms then
                AnsiConsole.MarkupLine(
                    "At batch size 1, BatchNorm is skipped and SwitchNorm runs without BN (sn-inln): one image's batch statistics are its instance statistics in training but running averages in eval, the mismatch the paper's (8,1) models avoid."
                )

            use cts = new CancellationTokenSource()

            Console.CancelKeyPress.Add(fun e ->
                // the first Ctrl-C stops after the current step and keeps what is done; a second one ends at once
                if not cts.IsCancellationRequested then
                    e.Cancel <- true
                    cts.Cancel())

            let specs = [
                for s in seeds do
                    for b in sizes do
                        for n in normalizersAt b norms ->
                            {
                                Normalizer = n
                                BatchSize = b
                                Epochs = epochs
                                MaxSteps = r.TryGetResult Max_Steps
                                Seed = s
                                RecalibrationBatches = max 1 (recal / b)
                            }
            ]

            let results = Collections.Generic.List<RunResult>()

            AnsiConsole
                .Progress()
                .AutoClear(false)
                .Columns(
                    TaskDescriptionColumn(),
                    ProgressBarColumn(),
                    PercentageColumn(),
                    ElapsedTimeColumn(),
                    RemainingTimeColumn(),
                    SpinnerColumn()
                )
                .Start(fun ctx ->
                    let tasks =
                        specs
                        |> List.map (fun s ->
                            let t =
                                ctx.AddTask(
                                    $"{s.Normalizer.Name, -7} batch {s.BatchSize, -3} seed {s.Seed}",
                                    autoStart = false,
                                    maxValue = float (stepsOf s train)
                                )

                            s, t)

                    for (s, t) in tasks do
                        if not cts.IsCancellationRequested then
                            t.StartTask()

                            match Experiment.run s train test (fun step -> t.Value <- float step) cts.Token with
                            | Some res when res.DivergedAtStep > 0 ->
                                results.Add res

                                t.Description <-
                                    $"{s.Normalizer.Name, -7} batch {s.BatchSize, -3} seed {s.Seed} diverged at step {res.DivergedAtStep}"

                                t.StopTask()
                            | Some res ->
                                results.Add res

                                t.Description <-
                                    $"{s.Normalizer.Name, -7} batch {s.BatchSize, -3} seed {s.Seed} {100.0 * res.TestAccuracy:F1}%%"

                                t.StopTask()
                            | None -> t.StopTask())

            let results = List.ofSeq results

            if cts.IsCancellationRequested then
                AnsiConsole.MarkupLine($"[yellow]Stopped by Ctrl-C[/]: {results.Length} of {specs.Length} runs finished; writing those.")

            if not results.IsEmpty then
                AnsiConsole.Write(Report.accuracyTable results)
                AnsiConsole.Write(Report.recalibrationTable results)

                if results |> List.exists (fun r -> r.Mixtures.Length > 0) then
                    AnsiConsole.Write(Report.mixtureTable (Report.firstSeed results))

                let settings = {|
                    data = source
                    train_images = train.Count
                    test_images = test.Count
                    epochs = epochs
                    max_steps = r.TryGetResult Max_Steps |> Option.toNullable
                    seeds = seeds
                    batch_sizes = sizes
                    normalizers = norms |> List.map (fun n -> n.Name)
                    at_batch_size_1 = "bn skipped; sn and ssn run as sn-inln (SwitchNorm without BN)"
                    threads = threads
                    recalibration_images = recal
                    optimizer = "SGD, momentum 0.9, learning rate 0.1 x batch/32, cosine decay to 0, no weight decay"
                |}

                Report.writeJson (Path.Combine(outDir, "results.json")) settings results
                Report.writeCsv outDir results
                File.WriteAllText(Path.Combine(outDir, "accuracy.md"), Report.markdown results + "\n")

                let plots =
                    if r.Contains No_Plots then
                        []
                    else
                        Report.plotAccuracy (Path.Combine(outDir, "accuracy.png")) results

                        Path.Combine(outDir, "accuracy.png")
                        :: Report.plotMixtures outDir (Report.firstSeed results)

                AnsiConsole.MarkupLine(
                    $"Wrote results.json, results.csv, summary.csv, mixtures.csv, accuracy.md and {plots.Length} plot(s) to {Markup.Escape outDir}"
                )

            if cts.IsCancellationRequested then 130 else 0
    with
    | :? ArguParseException as e ->
        // --help lands here too, with exit code 0
        if e.ErrorCode = ErrorCode.HelpText then
            printfn "%s" e.Message
            0
        else
            eprintfn "%s" e.Message
            2
    | UsageError m ->
        eprintfn "error: %s\n\n%s" m (parser.PrintUsage())
        2
    | Data.DataError m ->
        eprintfn "error: %s" m
        2
