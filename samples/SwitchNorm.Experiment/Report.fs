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

/// Student's t quantile t(0.975, df), for 95% intervals of a mean over df + 1 seeds.
let tQuantile (df: int) =
    let table = [| 12.706; 4.303; 3.182; 2.776; 2.571; 2.447; 2.365; 2.306; 2.262; 2.228 |]

    if df < 1 then nan
    elif df <= table.Length then table[df - 1]
    else 1.96

/// The runs of one normalizer at one batch size, over seeds.
type Summary = {
    Normalizer: string
    BatchSize: int
    /// Seeds whose run finished without diverging.
    N: int
    Diverged: int
    /// Mean test accuracy (as evaluated) over the N runs.
    Mean: float
    /// Sample standard deviation over the N runs (NaN for one run).
    Std: float
    /// Half-width of the 95% interval of the mean, t(0.975, N − 1)·Std/sqrt(N) (NaN for one run).
    Half: float
    /// Mean test accuracy with the moving-average running statistics (NaN where there are none).
    MovingMean: float
}

/// Mean, standard deviation and 95% interval per normalizer and batch size, in the order of the runs.
let summarize (results: RunResult list) : Summary list = [
    for n in normalizers results do
        for b in sortedSizes results do
            let rs = results |> List.filter (fun r -> r.Normalizer = n && r.BatchSize = b)

            if not rs.IsEmpty then
                let ok = rs |> List.filter (fun r -> r.DivergedAtStep = 0)
                let accs = ok |> List.map (fun r -> r.TestAccuracy)
                let k = accs.Length
                let mean = if k > 0 then List.average accs else nan

                let std =
                    if k > 1 then
                        sqrt ((accs |> List.sumBy (fun a -> (a - mean) ** 2.0)) / float (k - 1))
                    else
                        nan

                let moving =
                    ok
                    |> List.map (fun r -> r.MovingAverageAccuracy)
                    |> List.filter (Double.IsNaN >> not)

                yield {
                    Normalizer = n
                    BatchSize = b
                    N = k
                    Diverged = rs.Length - k
                    Mean = mean
                    Std = std
                    Half = tQuantile (k - 1) * std / sqrt (float k)
                    MovingMean = if moving.IsEmpty then nan else List.average moving
                }
]

/// "91.2 ± 0.4" (mean and 95% half-width, in %), or the mean alone for one run.
let private interval (s: Summary) =
    let div = if s.Diverged > 0 then $" ({s.Diverged} diverged)" else ""

    if s.N = 0 then $"diverged ({s.Diverged})"
    elif Double.IsNaN s.Half then pct s.Mean + div
    else $"{pct s.Mean} ± {pct s.Half}{div}"

/// The runs of the first seed, for the per-run tables and plots (mixtures).
let firstSeed (results: RunResult list) =
    match results with
    | [] -> []
    | _ ->
        let s = results |> List.map (fun r -> r.Seed) |> List.min
        results |> List.filter (fun r -> r.Seed = s)

/// An empty Spectre table with the given title, a normalizer column and one right-aligned column per batch size.
let private bySizeTable (title: string) (sizes: int list) =
    let t = Table()
    t.Title <- TableTitle(title)
    t.AddColumn("normalizer") |> ignore

    for b in sizes do
        t.AddColumn(TableColumn($"batch {b}").RightAligned()) |> ignore

    t

/// Test accuracy (%) per normalizer and batch size over the seeds, mean ± 95% interval, as a Spectre table.
let accuracyTable (results: RunResult list) =
    let sizes = sortedSizes results
    let sums = summarize results
    let seeds = results |> List.map (fun r -> r.Seed) |> List.distinct |> List.length

    let t =
        bySizeTable
            $"Test accuracy (%%), mean ± 95%% interval over {seeds} seed(s), after batch-average recalibration for BN, SN and SSN"
            sizes

    for n in normalizers results do
        let cells =
            sizes
            |> List.map (fun b ->
                match sums |> List.tryFind (fun s -> s.Normalizer = n && s.BatchSize = b) with
                | Some s -> interval s
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

/// Plain Markdown of the accuracy table, for the README: mean ± 95% interval over the seeds (and, in parentheses, the
/// mean with the moving-average statistics, before recalibration).
let markdown (results: RunResult list) =
    let sizes = sortedSizes results
    let sums = summarize results

    [
        yield
            "| normalizer | "
            + (sizes |> List.map (fun b -> $"batch {b}") |> String.concat " | ")
            + " |"
        yield "|---|" + (sizes |> List.map (fun _ -> "---:") |> String.concat "|") + "|"
        for n in normalizers results do
            let cell b =
                match sums |> List.tryFind (fun s -> s.Normalizer = n && s.BatchSize = b) with
                | Some s when not (Double.IsNaN s.MovingMean) -> $"{interval s} ({pct s.MovingMean})"
                | Some s -> interval s
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
        seed = r.Seed
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
                summary =
                    summarize results
                    |> List.map (fun s -> {|
                        normalizer = s.Normalizer
                        batch_size = s.BatchSize
                        runs = s.N
                        diverged = s.Diverged
                        mean_test_accuracy = nullable s.Mean
                        std = nullable s.Std
                        ci95_low = nullable (s.Mean - s.Half)
                        ci95_high = nullable (s.Mean + s.Half)
                        mean_moving_average_accuracy = nullable s.MovingMean
                    |})
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
            "normalizer,batch_size,seed,epochs,steps,learning_rate,final_train_loss,test_accuracy,moving_average_accuracy,seconds,diverged_at_step"
        for r in results ->
            String.Join(
                ",",
                [|
                    r.Normalizer
                    string r.BatchSize
                    string r.Seed
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

    let opt (v: float) = if Double.IsNaN v then "" else f v

    let summary = [
        yield "normalizer,batch_size,runs,diverged,mean_test_accuracy,std,ci95_low,ci95_high,mean_moving_average_accuracy"
        for s in summarize results ->
            String.Join(
                ",",
                [|
                    s.Normalizer
                    string s.BatchSize
                    string s.N
                    string s.Diverged
                    opt s.Mean
                    opt s.Std
                    opt (s.Mean - s.Half)
                    opt (s.Mean + s.Half)
                    opt s.MovingMean
                |]
            )
    ]

    File.WriteAllLines(Path.Combine(dir, "summary.csv"), summary)

    let mixtures = [
        yield "normalizer,batch_size,seed,layer,statistic,IN,LN,BN"
        for r in results do
            for m in r.Mixtures do
                for (stat, w) in [ "mean", m.Mean; "var", m.Var ] do
                    let padded = Array.init 3 (fun i -> if i < w.Length then f w[i] else "")

                    yield
                        String.Join(
                            ",",
                            [| r.Normalizer; string r.BatchSize; string r.Seed; layerName m; stat |]
                            |> Array.append
                            <| padded
                        )
    ]

    File.WriteAllLines(Path.Combine(dir, "mixtures.csv"), mixtures)

let private palette = [|
    ScottPlot.Color.FromHex "#1f77b4"
    ScottPlot.Color.FromHex "#ff7f0e"
    ScottPlot.Color.FromHex "#2ca02c"
    ScottPlot.Color.FromHex "#d62728"
    ScottPlot.Color.FromHex "#9467bd"
|]

/// accuracy.png: mean test accuracy against batch size (log scale), one line per normalizer, with 95% intervals over
/// the seeds as error bars.
let plotAccuracy (path: string) (results: RunResult list) =
    let plt = ScottPlot.Plot()
    let sizes = sortedSizes results
    let sums = summarize results |> List.filter (fun s -> s.N > 0)

    normalizers results
    |> List.iteri (fun i n ->
        let ss =
            sums
            |> List.filter (fun s -> s.Normalizer = n)
            |> List.sortBy (fun s -> s.BatchSize)
        // a little apart along x, so that intervals at the same batch size do not hide each other
        let xs =
            ss
            |> List.map (fun s -> Math.Log2(float s.BatchSize) + 0.04 * float (i - 2))
            |> Array.ofList

        let ys = ss |> List.map (fun s -> 100.0 * s.Mean) |> Array.ofList

        let es =
            ss
            |> List.map (fun s -> if Double.IsNaN s.Half then 0.0 else 100.0 * s.Half)
            |> Array.ofList

        let color = palette[i % palette.Length]
        let s = plt.Add.Scatter(xs, ys)
        s.LegendText <- n
        s.Color <- color
        s.LineWidth <- 2.0f
        s.MarkerSize <- 8.0f
        let e = plt.Add.ErrorBar(xs, ys, es)
        e.Color <- color)

    let ticks = sizes |> List.map (fun b -> Math.Log2(float b)) |> Array.ofList
    plt.Axes.Bottom.SetTicks(ticks, sizes |> List.map string |> Array.ofList)
    plt.XLabel "batch size per step"
    plt.YLabel "test accuracy (%), mean and 95% interval over seeds"
    plt.Title "Fashion-MNIST: accuracy against batch size"
    // lower left: the small-batch runs sit high on the left, the large-batch ones on the right
    plt.ShowLegend(ScottPlot.Alignment.LowerLeft) |> ignore
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
