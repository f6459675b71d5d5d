/// The conversion study: the main job's CNN trained with BatchNorm, converted to SwitchNorm with
/// <c>Conversion.batchNorm LogitInit.BatchLeaning margin</c> for several margins, and fine-tuned at a smaller batch.
/// For each margin it measures what the conversion changes at once (the eval logits and accuracy), how far the
/// mixtures move while fine-tuning, and the test accuracy after fine-tuning; BatchNorm fine-tuned the same way is
/// the control. Every margin starts from the same pretrained weights (paired by seed).
module ConversionStudy

open System
open System.Globalization
open System.IO
open System.Threading
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp
open Experiment

/// What the study is asked to do.
type StudySpec = {
    /// BN-leaning margins to compare (0 is the uniform mixture of the paper).
    Margins: float list
    Seeds: int list
    /// Pretraining with BatchNorm: epochs at PretrainBatch.
    PretrainEpochs: int
    PretrainBatch: int
    /// Fine-tuning after conversion: epochs at FineTuneBatch, at the main job's learning rate for that batch.
    FineTuneEpochs: int
    FineTuneBatch: int
    /// A cap on every phase's steps (for smoke runs).
    MaxSteps: int option
    RecalibrationImages: int
}

/// One seed and one margin (Margin = None: the BatchNorm control, fine-tuned without conversion).
type StudyRow = {
    Margin: float option
    Seed: int
    /// Test accuracy of the pretrained BatchNorm network (eval, running statistics).
    PretrainedAccuracy: float
    /// Largest |Δ logit| over the test set in eval, converted against pretrained.
    LogitChange: float
    /// Test accuracy right after conversion (eval).
    ConvertedAccuracy: float
    /// Largest change of any mixture weight (mean or variance, any layer) during fine-tuning.
    MixtureMovement: float
    /// The smallest BN weight of any layer's mean or variance mixture after fine-tuning.
    SmallestBnWeight: float
    /// Test accuracy after fine-tuning, with the moving averages and after batch-average recalibration.
    FineTunedAccuracy: float
    RecalibratedAccuracy: float
    FineTuneSteps: int
}

let private steps (spec: StudySpec) (epochs: int) (batch: int) (train: Data.Split) =
    let full = epochs * (train.Count / batch)

    match spec.MaxSteps with
    | Some m -> min m full
    | None -> full

let private logits (model: Net) (test: Data.Split) =
    model.eval () |> ignore
    use _ = torch.no_grad ()
    model.forward(test.Images).detach ()

/// Mean and variance weights of every SwitchNorm layer, concatenated.
let private weights (model: Net) =
    Mixture.ofModel model |> Array.collect (fun m -> Array.append m.Mean m.Var)

let private smallestBn (model: Net) =
    Mixture.ofModel model
    |> Array.collect (fun m ->
        let bn = Array.IndexOf(m.Components, "BN")
        [| m.Mean[bn]; m.Var[bn] |])
    |> Array.min

/// Runs the study for one seed: pretrain BN, then each margin (and the control) from a copy of it.
let private seedRows (spec: StudySpec) (train: Data.Split) (test: Data.Split) (seed: int) (cancel: CancellationToken) = [
    torch.random.manual_seed (int64 seed) |> ignore
    use pretrained = new Net(BN)

    fit
        pretrained
        BN
        (learningRate spec.PretrainBatch)
        spec.PretrainBatch
        (steps spec spec.PretrainEpochs spec.PretrainBatch train)
        seed
        train
        ignore
        cancel
    |> ignore

    let pretrainedAcc = accuracy pretrained test
    use before = logits pretrained test
    let total = steps spec spec.FineTuneEpochs spec.FineTuneBatch train

    let recal = {
        Normalizer = BN
        BatchSize = spec.FineTuneBatch
        Epochs = spec.FineTuneEpochs
        MaxSteps = spec.MaxSteps
        Seed = seed
        RecalibrationBatches = max 1 (spec.RecalibrationImages / spec.FineTuneBatch)
    }

    for margin in None :: List.map Some spec.Margins do
        if not cancel.IsCancellationRequested then
            use model = new Net(BN)
            model.load_state_dict (pretrained.state_dict ()) |> ignore

            let normalizer =
                match margin with
                | Some m ->
                    Conversion.batchNorm LogitInit.BatchLeaning m model |> ignore
                    SN
                | None -> BN

            use after = logits model test
            use change = (after - before).abs().max ()
            let convertedAcc = accuracy model test
            let w0 = weights model
            // the fine-tuning batches are in the same order for every margin
            let fitted =
                fit model normalizer (learningRate spec.FineTuneBatch) spec.FineTuneBatch total (seed + 1000) train ignore cancel

            let w1 = weights model
            let moving = accuracy model test
            let batches = recalibrationBatches { recal with Normalizer = normalizer } train
            recalibrate model normalizer batches

            for t in batches do
                t.Dispose()

            yield {
                Margin = margin
                Seed = seed
                PretrainedAccuracy = pretrainedAcc
                LogitChange = change.item<float32> () |> float
                ConvertedAccuracy = convertedAcc
                MixtureMovement =
                    (if w0.Length = 0 then
                         nan
                     else
                         Array.map2 (fun a b -> abs (a - b)) w0 w1 |> Array.max)
                SmallestBnWeight = (if w0.Length = 0 then nan else smallestBn model)
                FineTunedAccuracy = moving
                RecalibratedAccuracy = accuracy model test
                FineTuneSteps = fitted.Steps
            }
]

/// Runs the study; onRow is told of each row as it is measured.
let run (spec: StudySpec) (train: Data.Split) (test: Data.Split) (onRow: StudyRow -> unit) (cancel: CancellationToken) = [
    for seed in spec.Seeds do
        for row in seedRows spec train test seed cancel do
            onRow row
            yield row
]

let private inv = CultureInfo.InvariantCulture
let private g (v: float) = v.ToString("G4", inv)

let marginName (m: float option) =
    match m with
    | Some m -> m.ToString("0.##", inv)
    | None -> "BN kept"

/// The BN weight of a fresh conversion at margin m: 1 / (1 + 2·exp(−m)).
let bnWeightAt (m: float) = 1.0 / (1.0 + 2.0 * exp (-m))

/// Mean and 95% t-interval half-width over seeds.
let private meanHalf (xs: float list) =
    let n = xs.Length
    let mean = List.average xs

    if n < 2 then
        mean, nan
    else
        let sd = sqrt ((xs |> List.sumBy (fun x -> (x - mean) ** 2.0)) / float (n - 1))
        mean, Report.tQuantile (n - 1) * sd / sqrt (float n)

let private pctCell (xs: float list) =
    match meanHalf (List.map (fun v -> 100.0 * v) xs) with
    | m, h when Double.IsNaN h -> m.ToString("0.0", inv)
    | m, h -> $"""{m.ToString("0.0", inv)} ± {h.ToString("0.0", inv)}"""

/// The Markdown table: one line per margin, means over seeds (95% intervals on accuracies).
let markdown (spec: StudySpec) (rows: StudyRow list) =
    let groups = rows |> List.groupBy (fun r -> r.Margin)

    let lines = [
        yield
            "| margin | BN weight at conversion | max abs change of eval logits | accuracy right after conversion (%) | largest mixture-weight change in fine-tuning | smallest BN weight after | fine-tuned accuracy (%), moving averages | minus BN kept, same seed (points) | after recalibration (%) |"
        yield "|---|---|---|---|---|---|---|---|---|"
        for margin, rs in groups ->
            let avg f = rs |> List.averageBy f
            let col f = rs |> List.map f

            let bn =
                match margin with
                | Some m -> (bnWeightAt m).ToString("0.0000", inv)
                | None -> "1 (BatchNorm)"

            let mixture f =
                if margin.IsNone then "-" else g (avg f)

            // paired by seed: every margin starts from the same pretrained network and sees the same batches
            let gain =
                rs
                |> List.choose (fun r ->
                    rows
                    |> List.tryFind (fun k -> k.Margin.IsNone && k.Seed = r.Seed)
                    |> Option.map (fun k -> r.FineTunedAccuracy - k.FineTunedAccuracy))

            let gainCell = if margin.IsNone || gain.IsEmpty then "-" else pctCell gain

            $"| {marginName margin} | {bn} | {g (avg (fun r -> r.LogitChange))} | {pctCell (col (fun r -> r.ConvertedAccuracy))} | {mixture (fun r -> r.MixtureMovement)} | {mixture (fun r -> r.SmallestBnWeight)} | {pctCell (col (fun r -> r.FineTunedAccuracy))} | {gainCell} | {pctCell (col (fun r -> r.RecalibratedAccuracy))} |"
    ]

    let pre =
        rows
        |> List.distinctBy (fun r -> r.Seed)
        |> List.map (fun r -> r.PretrainedAccuracy)

    let head =
        $"Pretrained with BatchNorm: {spec.PretrainEpochs} epoch(s) at batch {spec.PretrainBatch}, test accuracy {pctCell pre} %%; "
        + $"then fine-tuned {spec.FineTuneEpochs} epoch(s) at batch {spec.FineTuneBatch} (learning rate {g (learningRate spec.FineTuneBatch)}, cosine); "
        + $"{spec.Seeds.Length} seed(s), mean ± 95%% interval."

    head + "\n\n" + String.Join("\n", lines)

/// conversion.csv: one line per seed and margin.
let writeCsv (path: string) (rows: StudyRow list) =
    let lines = [
        yield
            "margin,seed,pretrained_accuracy,logit_change,converted_accuracy,mixture_movement,smallest_bn_weight,fine_tuned_accuracy,recalibrated_accuracy,fine_tune_steps"
        for r in rows ->
            let m =
                match r.Margin with
                | Some m -> m.ToString("R", inv)
                | None -> "bn"

            String.Join(
                ",",
                [
                    m
                    string r.Seed
                    r.PretrainedAccuracy.ToString("R", inv)
                    r.LogitChange.ToString("R", inv)
                    r.ConvertedAccuracy.ToString("R", inv)
                    r.MixtureMovement.ToString("R", inv)
                    r.SmallestBnWeight.ToString("R", inv)
                    r.FineTunedAccuracy.ToString("R", inv)
                    r.RecalibratedAccuracy.ToString("R", inv)
                    string r.FineTuneSteps
                ]
            )
    ]

    File.WriteAllLines(path, lines)
