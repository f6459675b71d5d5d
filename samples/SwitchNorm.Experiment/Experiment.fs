/// The small-batch experiment: a small CNN trained on Fashion-MNIST with each normalizer at each batch size.
module Experiment

open System
open System.Diagnostics
open System.Threading
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

type F = torch.nn.functional
type TModule = torch.nn.Module<torch.Tensor, torch.Tensor>

/// The normalizers the experiment compares.
type Normalizer =
    /// torch.nn.BatchNorm2d
    | BN
    /// torch.nn.GroupNorm with 8 groups
    | GN
    /// SwitchNorm2d with the paper's softmax switch
    | SN
    /// SwitchNorm2d with the sparsestmax switch, its radius rising from 0 to 1 over the first 80% of training
    | SSN
    /// SwitchNorm2d without BN (using_bn = false: IN and LN only), the paper's (8,1) setting for one image per step
    | SNInLn

    member this.Name =
        match this with
        | BN -> "bn"
        | GN -> "gn"
        | SN -> "sn"
        | SSN -> "ssn"
        | SNInLn -> "sn-inln"

    member this.Label =
        match this with
        | BN -> "BatchNorm"
        | GN -> "GroupNorm (8 groups)"
        | SN -> "SwitchNorm"
        | SSN -> "SwitchNorm (sparsestmax)"
        | SNInLn -> "SwitchNorm, IN + LN (using_bn = false)"

    /// Whether the normalizer keeps running statistics, so its evaluation can be recalibrated.
    member this.Recalibrates = this <> GN && this <> SNInLn

    static member Parse(s: string) =
        match s.Trim().ToLowerInvariant() with
        | "bn" -> Ok BN
        | "gn" -> Ok GN
        | "sn" -> Ok SN
        | "ssn" -> Ok SSN
        | "sn-inln" -> Ok SNInLn
        | other -> Error $"unknown normalizer '{other}'; expected bn, gn, sn, ssn or sn-inln"

/// <summary>
/// A normalization layer with a recorder: while recording, it merges the exact per-channel moments (count, mean,
/// M2) of everything it sees, in float64, so a BatchNorm's running statistics can be set to the batch average
/// (the same recalibration <c>Recalibrate.batchAverage</c> does for SwitchNorm).
/// </summary>
type NormSlot(name: string, inner: TModule) as this =
    inherit TModule(name)
    let norm = inner
    let mutable recording = false
    let mutable count = 0.0
    let mutable mean: torch.Tensor = null
    let mutable m2: torch.Tensor = null
    do this.RegisterComponents()

    member _.Inner = norm

    member _.StartRecording() =
        recording <- true
        count <- 0.0

        for t in [ mean; m2 ] do
            if not (isNull t) then
                t.Dispose()

        mean <- null
        m2 <- null

    /// Stops recording; returns the merged mean and unbiased variance per channel, or None if nothing was seen.
    member _.StopRecording() =
        recording <- false

        if isNull mean || count < 2.0 then
            None
        else
            Some(mean.DetachFromDisposeScope(), (m2 / (count - 1.0)).DetachFromDisposeScope())

    override _.forward x =
        if recording then
            use _ = torch.no_grad ()
            let x64 = x.detach().to_type torch.ScalarType.Float64
            let dims = [| 0L; 2L; 3L |]
            let n = float (x.numel () / x.size 1)
            let bm = x64.mean (dims)
            let bm2 = (x64 - bm.view (1L, -1L, 1L, 1L)).square().sum (dims)

            if isNull mean then
                mean <- bm.DetachFromDisposeScope()
                m2 <- bm2.DetachFromDisposeScope()
            else
                // Chan et al.'s merge of two sets of moments
                let total = count + n
                let delta = bm - mean
                let newMean = (mean + delta * (n / total)).DetachFromDisposeScope()

                let newM2 =
                    (m2 + bm2 + delta.square () * (count * n / total)).DetachFromDisposeScope()

                mean.Dispose()
                m2.Dispose()
                mean <- newMean
                m2 <- newM2

            count <- count + n

        norm.forward x

/// The CNN: three 3×3 convolutions (16, 32 and 64 channels), each followed by the normalizer and a ReLU, max-pooling
/// after the first two, then global average pooling and a linear classifier. About 24,000 weights.
type Net(normalizer: Normalizer) as this =
    inherit TModule("Net")

    let makeNorm (c: int64) : TModule =
        match normalizer with
        | BN -> torch.nn.BatchNorm2d(c)
        | GN ->
            // TorchSharp 0.107's GroupNorm leaves weight and bias uninitialized (torch.empty): set them as PyTorch does.
            let g = torch.nn.GroupNorm(8L, c)
            use _ = torch.no_grad ()
            g.weight.fill_ (1.0) |> ignore
            g.bias.zero_ () |> ignore
            g
        | SN -> new SwitchNorm2d(c)
        | SSN ->
            let s = new SwitchNorm2d(c)
            s.SwitchKind <- SwitchKind.Sparsestmax
            s
        | SNInLn -> new SwitchNorm2d(c, using_bn = false)

    let conv1 = torch.nn.Conv2d(1L, 16L, 3L, padding = 1L)
    let norm1 = new NormSlot("norm1", makeNorm 16L)
    let conv2 = torch.nn.Conv2d(16L, 32L, 3L, padding = 1L)
    let norm2 = new NormSlot("norm2", makeNorm 32L)
    let conv3 = torch.nn.Conv2d(32L, 64L, 3L, padding = 1L)
    let norm3 = new NormSlot("norm3", makeNorm 64L)
    let head = torch.nn.Linear(64L, 10L)
    do this.RegisterComponents()

    member _.Slots = [ norm1; norm2; norm3 ]

    override _.forward x =
        let h1 = F.max_pool2d (F.relu (norm1.forward (conv1.forward x)), 2L)
        let h2 = F.max_pool2d (F.relu (norm2.forward (conv2.forward h1)), 2L)
        let h3 = F.relu (norm3.forward (conv3.forward h2))
        head.forward (h3.mean ([| 2L; 3L |]))

/// What one training run is asked to do.
type RunSpec = {
    Normalizer: Normalizer
    BatchSize: int
    Epochs: int
    /// A cap on the steps (for smoke runs); None trains every epoch in full.
    MaxSteps: int option
    Seed: int
    /// Training batches (of BatchSize) used for batch-average recalibration.
    RecalibrationBatches: int
}

/// What one run measured.
type RunResult = {
    Normalizer: string
    BatchSize: int
    Seed: int
    Epochs: int
    Steps: int
    LearningRate: float
    FinalTrainLoss: float
    /// Test accuracy as evaluated: after batch-average recalibration for BN and SN, as trained for GN.
    TestAccuracy: float
    /// Test accuracy with the moving-average running statistics (before recalibration); NaN for GN.
    MovingAverageAccuracy: float
    Seconds: float
    /// The step at which the training loss became NaN or infinite (the run stopped there), or 0.
    DivergedAtStep: int
    Mixtures: MixtureInfo[]
}

/// Learning rate of SGD (momentum 0.9) for a batch size: 0.1 at batch 32, scaled linearly (Goyal et al., 2017).
let learningRate (batchSize: int) = 0.1 * float batchSize / 32.0

let accuracy (model: Net) (data: Data.Split) =
    model.eval () |> ignore
    use _ = torch.no_grad ()
    let mutable correct = 0L
    let chunk = 500L

    for start in 0L .. chunk .. int64 data.Count - 1L do
        use _ = torch.NewDisposeScope()
        let len = min chunk (int64 data.Count - start)
        let x = data.Images.narrow (0L, start, len)
        let y = data.Labels.narrow (0L, start, len)
        correct <- correct + model.forward(x).argmax(1L).eq(y).sum().item<int64> ()

    float correct / float data.Count

/// Batches of the training set in a fixed random order (the same for every normalizer at a batch size).
let recalibrationBatches (spec: RunSpec) (train: Data.Split) =
    use g = new torch.Generator(uint64 (spec.Seed + 7919))
    let order = torch.randperm (int64 train.Count, generator = g)
    let b = int64 spec.BatchSize
    let count = min spec.RecalibrationBatches (train.Count / spec.BatchSize)

    [
        for i in 0L .. int64 count - 1L -> train.Images.index_select (0L, order.narrow (0L, i * b, b))
    ]

/// Batch-average recalibration: BN and SN running statistics set to the exact mean and unbiased variance of what
/// each layer's batch statistic saw over the given training batches (in training mode, without gradients).
let recalibrate (model: Net) (normalizer: Normalizer) (batches: torch.Tensor list) =
    match normalizer with
    | GN -> ()
    | SNInLn -> ()
    | SN
    | SSN -> Recalibrate.batchAverage model batches |> ignore
    | BN ->
        let wasTraining = model.training
        model.train () |> ignore

        for s in model.Slots do
            s.StartRecording()

        (use _ = torch.no_grad ()

         for b in batches do
             use _ = torch.NewDisposeScope()
             model.forward b |> ignore)

        for s in model.Slots do
            match s.StopRecording(), s.Inner with
            | Some(mean, var), (:? Modules.BatchNorm as bn) ->
                use _ = torch.no_grad ()
                bn.running_mean.copy_ (mean) |> ignore
                bn.running_var.copy_ (var) |> ignore
                mean.Dispose()
                var.Dispose()
            | _ -> ()

        model.train wasTraining |> ignore

/// Steps a run will take.
let stepsOf (spec: RunSpec) (train: Data.Split) =
    let full = spec.Epochs * (train.Count / spec.BatchSize)

    match spec.MaxSteps with
    | Some m -> min m full
    | None -> full

/// What a training loop did: the steps taken, the mean loss over the last tenth of them, and the step at which the
/// loss became NaN or infinite (the loop stopped there), or 0.
type Fit = {
    Steps: int
    FinalTrainLoss: float
    DivergedAtStep: int
}

/// <summary>
/// Trains <paramref name="model"/> in place for <paramref name="total"/> steps of <paramref name="batchSize"/> images:
/// SGD with momentum 0.9 at learning rate <paramref name="lr"/>, cosine decay to 0, the batches in a random order
/// drawn from <paramref name="seed"/>. SSN's sparsestmax radius rises from 0 to 1 over the first 80% of the steps.
/// Reports progress through onStep (steps done) and stops early when cancelled.
/// </summary>
let fit
    (model: Net)
    (normalizer: Normalizer)
    (lr: float)
    (batchSize: int)
    (total: int)
    (seed: int)
    (train: Data.Split)
    (onStep: int -> unit)
    (cancel: CancellationToken)
    =
    use opt = torch.optim.SGD(model.parameters (), lr, momentum = 0.9)
    let sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    use g = new torch.Generator(uint64 seed)
    let b = int64 batchSize
    let perEpoch = train.Count / batchSize
    let mutable step = 0
    let mutable lossSum = 0.0
    let mutable lossCount = 0
    let mutable diverged = 0

    if normalizer = SSN then
        SparseSwitch.useSwitch SwitchKind.Sparsestmax model |> ignore

    model.train () |> ignore

    while step < total && diverged = 0 && not cancel.IsCancellationRequested do
        use order = torch.randperm (int64 train.Count, generator = g)
        let mutable i = 0

        while i < perEpoch
              && step < total
              && diverged = 0
              && not cancel.IsCancellationRequested do
            use _ = torch.NewDisposeScope()

            if normalizer = SSN then
                SparseSwitch.step (SparseSwitch.radiusAt 0.8 (float step / float total)) model
                |> ignore

            let idx = order.narrow (0L, int64 i * b, b)
            let x = train.Images.index_select (0L, idx)
            let y = train.Labels.index_select (0L, idx)
            opt.zero_grad ()
            let loss = F.cross_entropy (model.forward x, y)
            let l = loss.item<float32> () |> float

            if Double.IsNaN l || Double.IsInfinity l then
                diverged <- step + 1
            else
                loss.backward ()
                opt.step () |> ignore
                sched.step ()
                step <- step + 1
                i <- i + 1

                // the mean loss over the last tenth of training
                if step > total - max 1 (total / 10) then
                    lossSum <- lossSum + l
                    lossCount <- lossCount + 1

                onStep step

    {
        Steps = step
        FinalTrainLoss =
            (if diverged > 0 then
                 nan
             else
                 lossSum / float (max 1 lossCount))
        DivergedAtStep = diverged
    }

/// Trains one model; reports progress through onStep (steps done), and stops early when cancelled (None then).
let run (spec: RunSpec) (train: Data.Split) (test: Data.Split) (onStep: int -> unit) (cancel: CancellationToken) =
    torch.random.manual_seed (int64 spec.Seed) |> ignore
    use model = new Net(spec.Normalizer)
    let lr = learningRate spec.BatchSize
    let watch = Stopwatch.StartNew()

    let fitted =
        fit model spec.Normalizer lr spec.BatchSize (stepsOf spec train) spec.Seed train onStep cancel

    let diverged = fitted.DivergedAtStep

    if cancel.IsCancellationRequested then
        None
    else
        let moving, acc =
            if diverged > 0 then
                nan, nan
            else
                let moving =
                    if spec.Normalizer.Recalibrates then
                        accuracy model test
                    else
                        nan

                let batches =
                    if spec.Normalizer.Recalibrates then
                        recalibrationBatches spec train
                    else
                        []

                recalibrate model spec.Normalizer batches

                for t in batches do
                    t.Dispose()

                moving, accuracy model test

        Some {
            Normalizer = spec.Normalizer.Name
            BatchSize = spec.BatchSize
            Seed = spec.Seed
            Epochs = spec.Epochs
            Steps = fitted.Steps
            LearningRate = lr
            FinalTrainLoss = fitted.FinalTrainLoss
            TestAccuracy = acc
            MovingAverageAccuracy = moving
            Seconds = watch.Elapsed.TotalSeconds
            DivergedAtStep = diverged
            Mixtures = Mixture.ofModel model
        }
