/// Tables, files and plots of the experiment's results.
module Report

open System
open System.Globalization
open System.IO
open System.Text.Json
open Spectre.Console
open SwitchNorm
open SwitchNorm.FSharp
open Experiment

let private inv = CultureInfo.InvariantCulture

let private pct (v: float) =
    if Double.IsNaN v then
        "-"
    else
        (100.0 * v).ToString("0.0", inv)

/// "norm1.norm" → "norm1"
let layerName (m: MixtureInfo) = m.Name.Replace(".norm", "")

let private sortedSizes (results: RunResult list) =
    results |> List.map (fun r -> r.BatchSize) |> List.distinct |> List.sort

let private normalizers (results: RunResult list) =
    results |> List.map (fun r -> r.Normalizer) |> List.distinct

let private find (results: RunResult list) n b =
    results |> List.tryFind (fun r -> r.Normalizer = n && r.BatchSize = b)

/// An empty Spectre table with the given title, a normalizer column and one right-aligned column per batch size.
let private bySizeTable (title: string) (sizes: int list) =
    let t = Table()
    t.Title <- TableTitle(title)
    t.AddColumn("normalizer") |> ignore

    for b in sizes do
        t.AddColumn(TableColumn($"batch {b}").RightAligned()) |> ignore

    t

/// Test accuracy (%) per normalizer and batch size, as a Spectre table.
let accuracyTable (results: RunResult list) =
    let sizes = sortedSizes results

    let t =
        bySizeTable "Test accuracy (%), after batch-average recalibration for BN and SN" sizes

    for n in normalizers results do
        let cells =
            sizes
            |> List.map (fun b ->
                match find results n b with
                | Some r when r.DivergedAtStep > 0 -> $"diverged at step {r.DivergedAtStep}"
                | Some r -> pct r.TestAccuracy
                | None -> "-")

        t.AddRow(Array.ofList (n :: cells)) |> ignore

    t

/// The difference recalibration made: accuracy with moving averages → recalibrated, per run that has running statistics.
let recalibrationTable (results: RunResult list) =
    let sizes = sortedSizes results

    let t =
        bySizeTable "Batch-average recalibration: test accuracy (%) with moving averages → recalibrated" sizes

    for n in normalizers results do
        let rs = sizes |> List.map (find results n)

        if
            rs
            |> List.exists (fun r -> r.IsSome && not (Double.IsNaN r.Value.MovingAverageAccuracy))
        then
            let cells =
                rs
                |> List.map (fun r ->
                    match r with
                    | Some r when not (Double.IsNaN r.MovingAverageAccuracy) ->
                        let d =
                            (100.0 * (r.TestAccuracy - r.MovingAverageAccuracy)).ToString("+0.0;-0.0;0.0", inv)

                        $"{pct r.MovingAverageAccuracy} → {pct r.TestAccuracy} ({d})"
                    | _ -> "-")

            t.AddRow(Array.ofList (n :: cells)) |> ignore

    t

/// The learned mixtures of every SwitchNorm layer, per run.
let mixtureTable (results: RunResult list) =
    let t = Table()
    t.Title <- TableTitle("Learned mixtures per SwitchNorm layer (weights of IN, LN, BN)")

    for c in [ "normalizer"; "batch"; "layer"; "mean IN LN BN"; "var IN LN BN" ] do
        t.AddColumn(c) |> ignore

    let fmt (w: float[]) =
        w |> Array.map (fun v -> v.ToString("0.00", inv)) |> String.concat " "

    for r in results do
        for m in r.Mixtures do
            t.AddRow(r.Normalizer, string r.BatchSize, layerName m, fmt m.Mean, fmt m.Var)
            |> ignore

    t

/// Plain Markdown of the accuracy table, for the README.
let markdown (results: RunResult list) =
    let sizes = sortedSizes results

    [
        yield
            "| normalizer | "
            + (sizes |> List.map (fun b -> $"batch {b}") |> String.concat " | ")
            + " |"
        yield "|---|" + (sizes |> List.map (fun _ -> "---:") |> String.concat "|") + "|"
        for n in normalizers results do
            let cell b =
                match find results n b with
                | Some r when r.DivergedAtStep > 0 -> $"diverged at step {r.DivergedAtStep}"
                | Some r when not (Double.IsNaN r.MovingAverageAccuracy) -> $"{pct r.TestAccuracy} ({pct r.MovingAverageAccuracy})"
                | Some r -> pct r.TestAccuracy
                | None -> "-"

            yield $"| {n} | " + (sizes |> List.map cell |> String.concat " | ") + " |"
    ]
    |> String.concat "\n"

let private nullable (v: float) =
    if Double.IsNaN v then Nullable() else Nullable v

/// results.json: the settings, then every run with its accuracies (null where there is none), timing and mixtures.
let writeJson (path: string) (settings: obj) (results: RunResult list) =
    let run (r: RunResult) = {|
        normalizer = r.Normalizer
        batch_size = r.BatchSize
        epochs = r.Epochs
        steps = r.Steps
        learning_rate = r.LearningRate
        final_train_loss = nullable r.FinalTrainLoss
        test_accuracy = nullable r.TestAccuracy
        moving_average_accuracy = nullable r.MovingAverageAccuracy
        seconds = Math.Round(r.Seconds, 1)
        diverged_at_step =
            (if r.DivergedAtStep > 0 then
                 Nullable r.DivergedAtStep
             else
                 Nullable())
        mixtures =
            r.Mixtures
            |> Array.map (fun m -> {|
                layer = layerName m
                components = m.Components
                mean = m.Mean
                var = m.Var
            |})
    |}

    let o = JsonSerializerOptions(WriteIndented = true)

    File.WriteAllText(
        path,
        JsonSerializer.Serialize(
            {|
                settings = settings
                runs = List.map run results
            |},
            o
        )
    )

/// results.csv: one row per run (accuracies and timings), and mixtures.csv: one row per SwitchNorm layer and run.
let writeCsv (dir: string) (results: RunResult list) =
    let f (v: float) = v.ToString("R", inv)

    let runs = [
        yield
            "normalizer,batch_size,epochs,steps,learning_rate,final_train_loss,test_accuracy,moving_average_accuracy,seconds,diverged_at_step"
        for r in results ->
            String.Join(
                ",",
                [|
                    r.Normalizer
                    string r.BatchSize
                    string r.Epochs
                    string r.Steps
                    f r.LearningRate
                    f r.FinalTrainLoss
                    f r.TestAccuracy
                    (if Double.IsNaN r.MovingAverageAccuracy then
                         ""
                     else
                         f r.MovingAverageAccuracy)
                    r.Seconds.ToString("0.0", inv)
                    string r.DivergedAtStep
                |]
            )
    ]

    File.WriteAllLines(Path.Combine(dir, "results.csv"), runs)

    let mixtures = [
        yield "normalizer,batch_size,layer,statistic,IN,LN,BN"
        for r in results do
            for m in r.Mixtures do
                for (stat, w) in [ "mean", m.Mean; "var", m.Var ] do
                    let padded = Array.init 3 (fun i -> if i < w.Length then f w[i] else "")

                    yield
                        String.Join(
                            ",",
                            [| r.Normalizer; string r.BatchSize; layerName m; stat |] |> Array.append
                            <| padded
                        )
    ]

    File.WriteAllLines(Path.Combine(dir, "mixtures.csv"), mixtures)

let private palette = [|
    ScottPlot.Color.FromHex "#1f77b4"
    ScottPlot.Color.FromHex "#ff7f0e"
    ScottPlot.Color.FromHex "#2ca02c"
    ScottPlot.Color.FromHex "#d62728"
|]

/// accuracy.png: test accuracy against batch size (log scale), one line per normalizer.
let plotAccuracy (path: string) (results: RunResult list) =
    let plt = ScottPlot.Plot()
    let sizes = sortedSizes results

    normalizers results
    |> List.iteri (fun i n ->
        let rs = sizes |> List.choose (find results n)
        let rs = rs |> List.filter (fun r -> r.DivergedAtStep = 0)
        let xs = rs |> List.map (fun r -> Math.Log2(float r.BatchSize)) |> Array.ofList
        let ys = rs |> List.map (fun r -> 100.0 * r.TestAccuracy) |> Array.ofList
        let s = plt.Add.Scatter(xs, ys)
        s.LegendText <- n
        s.Color <- palette[i % palette.Length]
        s.LineWidth <- 2.0f
        s.MarkerSize <- 8.0f)

    let ticks = sizes |> List.map (fun b -> Math.Log2(float b)) |> Array.ofList
    plt.Axes.Bottom.SetTicks(ticks, sizes |> List.map string |> Array.ofList)
    plt.XLabel "batch size per step"
    plt.YLabel "test accuracy (%)"
    plt.Title "Fashion-MNIST: accuracy against batch size"
    plt.ShowLegend(ScottPlot.Alignment.LowerRight) |> ignore
    plt.SavePng(path, 800, 500) |> ignore

/// mixture-b{B}.png for each batch size with SwitchNorm runs: stacked bars of the IN/LN/BN weights of each layer's
/// mean and variance, like the paper's figure.
let plotMixtures (dir: string) (results: RunResult list) = [
    for r in results do
        if r.Mixtures.Length > 0 then
            let plt = ScottPlot.Plot()
            let bars = Collections.Generic.List<ScottPlot.Bar>()
            let positions = Collections.Generic.List<float>()
            let labels = Collections.Generic.List<string>()

            r.Mixtures
            |> Array.iteri (fun li m ->
                for (si, (stat, w)) in [ 0, ("mean", m.Mean); 1, ("var", m.Var) ] do
                    let x = float (li * 3 + si)
                    positions.Add x
                    labels.Add $"{layerName m} {stat}"
                    let mutable b = 0.0

                    w
                    |> Array.iteri (fun k v ->
                        bars.Add(ScottPlot.Bar(Position = x, ValueBase = b, Value = b + v, FillColor = palette[k]))
                        b <- b + v))

            plt.Add.Bars(bars) |> ignore

            for (k, name) in [ 0, "IN"; 1, "LN"; 2, "BN" ] do
                plt.Legend.ManualItems.Add(ScottPlot.LegendItem(LabelText = name, FillColor = palette[k]))

            plt.Axes.Bottom.SetTicks(positions.ToArray(), labels.ToArray())
            plt.Axes.SetLimitsY(0.0, 1.0)
            plt.YLabel "mixture weight"
            plt.Title $"Learned mixtures: {r.Normalizer}, batch size {r.BatchSize}"
            plt.ShowLegend(ScottPlot.Alignment.UpperRight) |> ignore
            let path = Path.Combine(dir, $"mixture-{r.Normalizer}-b{r.BatchSize}.png")
            plt.SavePng(path, 800, 450) |> ignore
            yield path
]
