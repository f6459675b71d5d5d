namespace SwitchNorm

open System
open System.Collections.Generic
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open SwitchNorm.FSharp

/// <summary>
/// Checks a state dict against a module's own before anything is written, so loading is all or nothing: every
/// unexpected and missing key (when strict), and every tensor whose shape or dtype is not exactly the module's (no
/// broadcasting, no casting), listed together in one exception.
/// </summary>
module internal StateCheck =

    /// The problems of loading entries (key, dtype, shape) into destination, and the keys the destination has that the
    /// entries lack.
    let problems
        (strict: bool)
        (skip: IList<string>)
        (destination: IDictionary<string, torch.Tensor>)
        (entries: (string * torch.ScalarType * int64[]) seq)
        =
        let skipped (k: string) = not (isNull skip) && skip.Contains k
        let found = List<string>()
        let problems = List<string>()

        for (k, dtype, shape) in entries do
            if not (skipped k) then
                found.Add k

                match destination.TryGetValue k with
                | true, t ->
                    if t.shape <> shape then
                        problems.Add(
                            $"size mismatch for '{k}': copying a tensor of shape {Checks.shapeText shape} from the source, the shape in the module is {Checks.shapeText t.shape}"
                        )
                    elif t.dtype <> dtype then
                        problems.Add($"dtype mismatch for '{k}': {dtype} in the source, {t.dtype} in the module")
                | _ ->
                    if strict then
                        problems.Add($"unexpected key '{k}' (not in the module)")

        let missing =
            destination.Keys
            |> Seq.filter (fun k -> not (skipped k) && not (found.Contains k))
            |> List.ofSeq

        if strict then
            for k in missing do
                problems.Add($"missing key '{k}' (in the module, not in the source)")

        List.ofSeq problems, missing

    /// Raises an InvalidDataException listing every problem, when there is one.
    let refuse (what: string) (problems: string list) =
        if not problems.IsEmpty then
            raise (InvalidDataException($"{what}: nothing was loaded: " + String.Join("; ", problems) + "."))

    /// The entries of a state dict.
    let entriesOf (source: IDictionary<string, torch.Tensor>) = [ for kv in source -> kv.Key, kv.Value.dtype, kv.Value.shape ]

    /// <summary>
    /// Reads the entries (name, dtype, shape) of a stream written by TorchSharp's <c>Module.save</c>, without loading
    /// data, and leaves the stream where it was (it must be seekable).
    /// </summary>
    let readEntries (stream: Stream) : (string * torch.ScalarType * int64[])[] =
        let start = stream.Position
        let r = new BinaryReader(stream, Text.Encoding.UTF8, true)

        let decode () =
            let mutable result = 0L
            let mutable shift = 0
            let mutable go = true

            while go do
                let b = r.ReadByte()
                result <- result ||| (int64 (b &&& 0x7Fuy) <<< shift)
                shift <- shift + 7
                go <- (b &&& 0x80uy) <> 0uy

                if shift > 63 then
                    raise (InvalidDataException "malformed length prefix")

            result

        let elementSize (t: torch.ScalarType) =
            match t with
            | torch.ScalarType.Byte
            | torch.ScalarType.Int8
            | torch.ScalarType.Bool -> 1L
            | torch.ScalarType.Int16
            | torch.ScalarType.Float16
            | torch.ScalarType.BFloat16 -> 2L
            | torch.ScalarType.Int32
            | torch.ScalarType.Float32 -> 4L
            | torch.ScalarType.Int64
            | torch.ScalarType.Float64
            | torch.ScalarType.ComplexFloat32 -> 8L
            | torch.ScalarType.ComplexFloat64 -> 16L
            | other -> raise (InvalidDataException $"unsupported dtype {other}")

        try
            try
                let n = decode ()

                if n < 0L || n > 1_000_000L then
                    raise (InvalidDataException $"implausible entry count {n}")

                [|
                    for _ in 1L .. n do
                        let key = r.ReadString()
                        let dtype: torch.ScalarType = LanguagePrimitives.EnumOfValue(sbyte (decode ()))
                        let ndim = decode ()

                        if ndim < 0L || ndim > 64L then
                            raise (InvalidDataException $"implausible rank {ndim} for '{key}'")

                        let shape = [| for _ in 1L .. ndim -> decode () |]
                        let bytes = (Array.fold (*) 1L shape) * elementSize dtype

                        if bytes < 0L || stream.Position + bytes > stream.Length then
                            raise (EndOfStreamException())

                        stream.Seek(bytes, SeekOrigin.Current) |> ignore
                        yield key, dtype, shape
                |]
            with
            | :? EndOfStreamException -> raise (InvalidDataException("the data is truncated or not a TorchSharp state dict"))
            | :? InvalidDataException as e -> raise (InvalidDataException($"not a TorchSharp state dict ({e.Message})"))
        finally
            stream.Position <- start

/// The specs of the SwitchNorm1d/2d/3d constructors.
module internal ModuleSpec =

    /// <summary>
    /// The spec of a dims-dimensional layer: the paper's components ([IN, LN, BN], or [IN, LN] without BN; with
    /// Semantics.Official in 1d, the official [LN, BN] or [LN]), and no moving average (None) unless usingMovingAverage.
    /// </summary>
    let create
        (layer: string)
        (dims: int)
        (usingBn: bool)
        (eps: float)
        (momentum: float)
        (semantics: Semantics)
        (usingMovingAverage: bool)
        =
        if not (Enum.IsDefined semantics) then
            raise (
                ArgumentOutOfRangeException("semantics", semantics, $"{layer}: semantics must be Default or Official; got {int semantics}.")
            )

        let components =
            match semantics, dims, usingBn with
            | Semantics.Official, 1, true -> [ Layer; Batch ]
            | Semantics.Official, 1, false -> [ Layer ]
            | _, _, true -> [ Instance; Layer; Batch ]
            | _, _, false -> [ Instance; Layer ]

        {
            NormSpec.Create(usingBn, eps, Nullable momentum) with
                Components = components
                Momentum = (if usingMovingAverage then Some momentum else None)
                Semantics = semantics
        }

    /// BatchNorm's momentum from the official keep factor (running = keep·running + (1 − keep)·batch): 1 − keep, as the
    /// official code forms its factor; refused unless in [0, 1].
    let fromKeepFactor (layer: string) (keep: float) =
        if not (keep >= 0.0 && keep <= 1.0) then
            raise (
                ArgumentOutOfRangeException(
                    "momentum",
                    keep,
                    $"{layer}: momentum (the official keep factor) must lie in [0, 1]; got {keep}."
                )
            )

        1.0 - keep

/// <summary>
/// Switchable Normalization as a TorchSharp module (Luo et al., "Differentiable Learning-to-Normalize via
/// Switchable Normalization", ICLR 2019). One implementation for every dimension count: the 1d/2d/3d classes
/// differ only in the input rank they accept.
/// </summary>
/// <remarks>
/// Parameters: <c>weight</c> [C] and <c>bias</c> [C] (when affine), <c>mean_weight</c> [K] and
/// <c>var_weight</c> [K], the mixture logits, starting at ones as in the paper (K = 3, order [IN, LN, BN];
/// K = 2 without BN). Buffers (when track_running_stats): <c>running_mean</c> [C], <c>running_var</c> [C],
/// <c>num_batches_tracked</c> (int64), named as in BatchNorm so a BatchNorm checkpoint's keys are a subset
/// of ours. The running statistics are buffers, not parameters: they are averages of the data, not subject
/// to gradient-based optimization.
/// </remarks>
[<AbstractClass>]
type SwitchNormNd
    internal
    (
        layerName: string,
        acceptedRanks: int list,
        shapeText: string,
        spec: NormSpec,
        numFeatures: int64,
        affine: bool,
        trackRunningStats: bool,
        lastGamma: bool,
        device: torch.Device,
        dtype: Nullable<torch.ScalarType>,
        communicator: ICommunicator option
    ) as this =
    // the native backend is loaded (or a clear error raised) before the base constructor's first native call
    inherit
        torch.nn.Module<torch.Tensor, torch.Tensor>(
            (Backend.Load()
             layerName)
        )

    let mutable spec =
        match communicator with
        | Some c when not (isNull (box c)) -> { spec with Scope = Scope.Across c }
        | _ -> spec

    let k = int64 (List.length spec.Components)

    // the official modules keep running statistics only when they mix BN
    let trackRunningStats =
        trackRunningStats && (spec.Semantics = Semantics.Default || spec.UsesBatch)

    let dt =
        if dtype.HasValue then
            dtype.Value
        else
            torch.get_default_dtype ()

    do
        Checks.constructorArgs layerName numFeatures spec.Eps (Option.toNullable spec.Momentum)

        match communicator with
        | Some c when isNull (box c) ->
            raise (ArgumentNullException("communicator", $"{layerName} needs a communicator (InProcessGroup or MpiCommunicator)."))
        | _ -> ()

        if not (Checks.isFloating dt) then
            raise (ArgumentException($"{layerName}: dtype must be a floating-point type; got {dt}.", "dtype"))

        Checks.epsInDtype layerName spec.Eps (Checks.computeDtype dt)

        // Built tensors must outlive any dispose scope the caller has open (register_* does not detach).
        let keep (t: torch.Tensor) = t.DetachFromDisposeScope()

        if affine then
            let w =
                if lastGamma then
                    torch.zeros (numFeatures, dtype = dt, device = device)
                else
                    torch.ones (numFeatures, dtype = dt, device = device)

            this.register_parameter ("weight", keep (new Parameter(w)) :?> Parameter)
            this.register_parameter ("bias", keep (new Parameter(torch.zeros (numFeatures, dtype = dt, device = device))) :?> Parameter)

        this.register_parameter ("mean_weight", keep (new Parameter(torch.ones (k, dtype = dt, device = device))) :?> Parameter)
        this.register_parameter ("var_weight", keep (new Parameter(torch.ones (k, dtype = dt, device = device))) :?> Parameter)

        if trackRunningStats then
            this.register_buffer ("running_mean", keep (torch.zeros (numFeatures, dtype = dt, device = device)))
            // the official modules start running_var at zeros, BatchNorm at ones
            let var0 =
                if spec.Semantics = Semantics.Official then
                    torch.zeros (numFeatures, dtype = dt, device = device)
                else
                    torch.ones (numFeatures, dtype = dt, device = device)

            this.register_buffer ("running_var", keep var0)
            // int64 whatever the dtype, as PyTorch's BatchNorm keeps it; the official SN modules have none
            if spec.Semantics = Semantics.Default then
                this.register_buffer ("num_batches_tracked", keep (torch.tensor (0L, dtype = torch.ScalarType.Int64, device = device)))

    let mutable accumulator: Moments option = None
    let mutable recalibrating = false
    let mutable switchKind = SwitchKind.Softmax
    let mutable radius = 0.0
    let mutable frozen = false

    /// The layer's name in messages, e.g. "SwitchNorm2d".
    member _.LayerName = layerName

    /// Number of channels C.
    member _.num_features = numFeatures

    /// Added to the mixed variance before the square root.
    member _.eps = spec.Eps

    /// Running-average factor of the BN statistics (default 0.1); null means a cumulative average, as with
    /// TorchSharp's BatchNorm, whose constructor also takes a plain double and whose property may be set to null.
    member _.momentum
        with get () = Option.toNullable spec.Momentum
        and set (v: Nullable<float>) =
            Checks.constructorArgs layerName numFeatures spec.Eps v

            spec <- {
                spec with
                    Momentum = Option.ofNullable v
            }

    /// <summary>
    /// True (the default): float32 CPU inputs go through the row kernels with a hand-written backward; other inputs go
    /// through the tensor path. False: every input goes through the tensor path, the composition of tensor operations
    /// differentiated by autograd: slower, but any order of derivatives. Both compute the same function.
    /// </summary>
    member _.Fused
        with get () = spec.Fused
        and set (v: bool) = spec <- { spec with Fused = v }

    /// <summary>
    /// The switch that turns mean_weight and var_weight into mixing weights: <c>Softmax</c> (the paper, the default),
    /// <c>Sparsemax</c>, or <c>Sparsestmax</c> at <see cref="P:SwitchNorm.SwitchNormNd.Radius"/> (Shao et al., "SSN",
    /// CVPR 2019). Refused with an InvalidOperationException once the selection is frozen; nothing changes then.
    /// </summary>
    member _.SwitchKind
        with get () = switchKind
        and set (v: SwitchKind) =
            if frozen then
                raise (
                    InvalidOperationException(
                        $"{layerName}: the selection is frozen (one-hot), so the switch cannot change to {v}; call Unfreeze() first."
                    )
                )

            let sw =
                try
                    Switch.OfKind(v, radius)
                with :? ArgumentException as e ->
                    raise (ArgumentException($"{layerName}: {e.Message}", "value"))

            switchKind <- v
            spec <- { spec with Switch = sw }

    /// <summary>
    /// The sparsestmax radius ρ in [0, 1] (default 0, where sparsestmax equals sparsemax; at 1 the weights are one-hot).
    /// Used only when SwitchKind is Sparsestmax; raise it over training with <c>SparseSwitch.step</c>. A value outside
    /// [0, 1] is refused with an ArgumentOutOfRangeException and the radius is unchanged.
    /// </summary>
    member _.Radius
        with get () = radius
        and set (v: float) =
            if not (v >= 0.0 && v <= 1.0) then
                raise (ArgumentOutOfRangeException("value", v, $"{layerName}: the sparsestmax radius must lie in [0, 1]; got {v}."))

            radius <- v

            if not frozen then
                spec <- {
                    spec with
                        Switch = Switch.OfKind(switchKind, v)
                }

    /// Whether the selection is frozen: one statistic for the mean and one for the variance, fixed (see Freeze).
    member _.IsFrozen = frozen

    /// <summary>
    /// Freezes the selection once it is one-hot (SSN's final stage): when both the mean and the variance mixtures are
    /// one-hot, the switch becomes sparsestmax at radius 1 for good (the same one-hot weights whatever the logits'
    /// later values, since their order is kept), and mean_weight and var_weight stop requiring gradients, so
    /// optimizers leave them alone. Returns whether the layer is frozen; when a mixture is not one-hot, nothing changes
    /// and the result is false. The frozen flag is not part of a checkpoint: after loading, set SwitchKind to
    /// Sparsestmax with Radius 1 (the same weights) and call Freeze again.
    /// </summary>
    member this.Freeze() : bool =
        if
            not frozen
            && Mixing.isOneHot this.MeanMixture
            && Mixing.isOneHot this.VarMixture
        then
            frozen <- true

            spec <- {
                spec with
                    Switch = Switch.Sparsestmax 1.0
            }

            this.mean_weight.requires_grad <- false
            this.var_weight.requires_grad <- false

        frozen

    /// Undoes Freeze: the switch is SwitchKind at Radius again and the logits require gradients.
    member this.Unfreeze() =
        if frozen then
            frozen <- false

            spec <- {
                spec with
                    Switch = Switch.OfKind(switchKind, radius)
            }

            this.mean_weight.requires_grad <- true
            this.var_weight.requires_grad <- true

    /// Whether the layer has a per-channel weight and bias.
    member _.affine = affine

    /// The conventions of the variances and running statistics (Semantics.Default, BatchNorm's, or Semantics.Official,
    /// the official PyTorch code's).
    member _.semantics = spec.Semantics

    /// Whether the running statistics are a moving average (with a momentum): the official using_moving_average. False
    /// means, with Semantics.Default, a cumulative average (momentum null) and, with Semantics.Official, raw sums.
    member _.using_moving_average = spec.Momentum.IsSome

    /// Whether the BN component keeps running statistics.
    member _.track_running_stats = trackRunningStats

    /// Whether the BN component is mixed in.
    member _.using_bn = spec.UsesBatch

    /// Whether the weight started at zero (the last norm of a residual block).
    member _.last_gamma = lastGamma

    /// Short names of the mixed statistics, in logit order: ["IN"; "LN"; "BN"] or ["IN"; "LN"].
    member _.Components =
        spec.Components |> List.map (fun c -> c.ShortName) |> Array.ofList

    // The properties below share their names with the registered parameters and buffers, as in TorchSharp's
    // NormBase: Module.to() replaces tensors through such properties, so each has a setter that re-registers.

    /// Per-channel scale γ, or null when not affine.
    member this.weight
        with get (): Parameter = this.get_parameter "weight"
        and set (v: Parameter) = this.ConditionallyRegisterParameter("weight", v)

    /// Per-channel shift β, or null when not affine.
    member this.bias
        with get (): Parameter = this.get_parameter "bias"
        and set (v: Parameter) = this.ConditionallyRegisterParameter("bias", v)

    /// Logits of the mean mixture, shape [K].
    member this.mean_weight
        with get (): Parameter = this.get_parameter "mean_weight"
        and set (v: Parameter) = this.ConditionallyRegisterParameter("mean_weight", v)

    /// Logits of the variance mixture, shape [K].
    member this.var_weight
        with get (): Parameter = this.get_parameter "var_weight"
        and set (v: Parameter) = this.ConditionallyRegisterParameter("var_weight", v)

    /// Running mean of the BN component, or null when not tracked. Setting a tensor whose length is not num_features
    /// is refused with an ArgumentException; nothing changes then.
    member this.running_mean
        with get (): torch.Tensor = this.get_buffer "running_mean"
        and set (v: torch.Tensor) =
            this.CheckRunning("running_mean", v)
            this.ConditionallyRegisterBuffer("running_mean", v)

    /// Running unbiased variance of the BN component, or null when not tracked. Setting a tensor whose length is not
    /// num_features is refused with an ArgumentException (as PyTorch refuses it in batch_norm); nothing changes then.
    member this.running_var
        with get (): torch.Tensor = this.get_buffer "running_var"
        and set (v: torch.Tensor) =
            this.CheckRunning("running_var", v)
            this.ConditionallyRegisterBuffer("running_var", v)

    member private _.CheckRunning(name: string, v: torch.Tensor) =
        if not (isNull v) then
            Checks.perChannel layerName name numFeatures v

    /// Number of training batches averaged into the running statistics (int64 scalar), or null when not tracked.
    member this.num_batches_tracked
        with get (): torch.Tensor = this.get_buffer "num_batches_tracked"
        and set (v: torch.Tensor) = this.ConditionallyRegisterBuffer("num_batches_tracked", v)

    /// The mean mixture: the switch (SwitchKind, or the frozen selection) applied to mean_weight, as doubles in component order.
    member this.MeanMixture: float[] =
        use _ = torch.no_grad ()

        use w =
            spec.Switch.Apply(this.mean_weight.detach().to_type torch.ScalarType.Float64)

        w.data<float>().ToArray()

    /// The variance mixture: the switch (SwitchKind, or the frozen selection) applied to var_weight, as doubles in component order.
    member this.VarMixture: float[] =
        use _ = torch.no_grad ()
        use w = spec.Switch.Apply(this.var_weight.detach().to_type torch.ScalarType.Float64)
        w.data<float>().ToArray()

    member internal _.Spec = spec

    /// The communicator whose ranks share the BN statistics (synchronized layers only).
    member internal _.Communicator =
        match spec.Scope with
        | Scope.Across c -> Some c
        | Scope.Local -> None

    member internal this.Params: NormParams = {
        Weight =
            if affine then
                Some(this.get_parameter "weight" :> torch.Tensor)
            else
                None
        Bias =
            if affine then
                Some(this.get_parameter "bias" :> torch.Tensor)
            else
                None
        MeanLogits = this.get_parameter "mean_weight"
        VarLogits = this.get_parameter "var_weight"
    }

    member internal this.Running: RunningStats option =
        if trackRunningStats then
            Some {
                Mean = this.get_buffer "running_mean"
                Var = this.get_buffer "running_var"
                BatchesTracked =
                    let t = this.get_buffer "num_batches_tracked"
                    // read in place on the CPU: item() goes through a TensorAccessor, several native calls
                    if isNull t then
                        0L
                    elif t.device_type = DeviceType.CPU && t.dtype = torch.ScalarType.Int64 then
                        Runtime.InteropServices.MemoryMarshal.Cast<byte, int64>(t.bytes)[0]
                    else
                        // a buffer on a device without data (meta) is refused by the state checks that follow
                        try
                            t.item<int64> ()
                        with _ ->
                            0L
            }
        else
            None

    /// Starts collecting the exact BN moments of every training batch instead of updating running statistics.
    member internal _.BeginRecalibration() =
        accumulator <- None
        recalibrating <- true

    /// Stops collecting and returns the merged moments (None when no batch was seen).
    member internal _.EndRecalibration() =
        recalibrating <- false
        let a = accumulator
        accumulator <- None
        a

    /// Checks the input's rank against the ranks this class accepts.
    member _.CheckRank(x: torch.Tensor) =
        if not (List.contains (int (x.dim ())) acceptedRanks) then
            raise (ArgumentException($"{layerName} expects {shapeText}; got shape {Checks.shapeText x.shape} ({x.dim ()}-D).", "input"))

    /// Checks that every parameter and buffer is on the input's device, and the floating ones have a compatible dtype.
    member this.CheckState(x: torch.Tensor) =
        Checks.floatingInput layerName x
        // the input's device and dtype are read once: each read is a native call
        let xType, xIndex, xDtype = x.device_type, x.device_index, x.dtype

        let check (name: string) (t: torch.Tensor) (dtypeToo: bool) =
            if not (isNull t) then
                if t.device_type <> xType || t.device_index <> xIndex then
                    raise (ArgumentException($"{layerName}: the input is on device {x.device} but {name} is on {t.device}.", "input"))

                if dtypeToo then
                    let d = t.dtype

                    if not (d = xDtype || (Checks.isHalf xDtype && d = torch.ScalarType.Float32)) then
                        Checks.compatible layerName name x t // raises with the message

        for name in [ "weight"; "bias"; "mean_weight"; "var_weight" ] do
            check name (this.get_parameter name) true

        for name in [ "running_mean"; "running_var" ] do
            check name (this.get_buffer name) true

        check "num_batches_tracked" (this.get_buffer "num_batches_tracked") false

    /// <summary>
    /// Loads a state dict all or nothing: every key, exact shape (no broadcasting) and dtype is checked first, and any
    /// problem is reported in one InvalidDataException with nothing written. Otherwise as TorchSharp's
    /// <c>load_state_dict</c>: with strict, missing and unexpected keys are problems too; without, they are returned.
    /// For a model that contains SwitchNorm layers, use <c>Checkpoint.loadStateDict</c>, which checks the whole model
    /// the same way (TorchSharp's own load_state_dict of a parent writes key by key and broadcasts).
    /// </summary>
    override this.load_state_dict
        (
            source: Dictionary<string, torch.Tensor>,
            [<Optional; DefaultParameterValue(true)>] strict: bool,
            [<Optional; DefaultParameterValue(null: IList<string>)>] skip: IList<string>
        ) =
        if isNull source then
            nullArg "source"

        let problems, _ =
            StateCheck.problems strict skip (this.state_dict ()) (StateCheck.entriesOf source)

        StateCheck.refuse $"{layerName}.load_state_dict" problems
        base.load_state_dict (source, strict, skip)

    /// <summary>
    /// Loads a file written by <c>save</c> all or nothing: every entry's key, shape and dtype is checked against the
    /// module before any is read (TorchSharp's own <c>load</c> writes entry by entry).
    /// </summary>
    override this.load
        (
            location: string,
            [<Optional; DefaultParameterValue(true)>] strict: bool,
            [<Optional; DefaultParameterValue(null: IList<string>)>] skip: IList<string>,
            [<Optional; DefaultParameterValue(null: Dictionary<string, bool>)>] loadedParameters: Dictionary<string, bool>
        ) =
        if not (File.Exists location) then
            raise (FileNotFoundException($"{layerName}.load: no file at '{location}'.", location))

        let entries =
            use fs = File.OpenRead location

            try
                StateCheck.readEntries fs
            with :? InvalidDataException as e ->
                raise (InvalidDataException($"{layerName}.load: '{location}' is {e.Message}; nothing was loaded."))

        let problems, _ = StateCheck.problems strict skip (this.state_dict ()) entries
        StateCheck.refuse $"{layerName}.load('{location}')" problems
        base.load (location, strict, skip, loadedParameters)

    /// <summary>
    /// Loads from a reader over a stream written by <c>save</c>, all or nothing when the stream is seekable (the entries
    /// are checked first, then the stream is read from where it was).
    /// </summary>
    override this.load
        (
            reader: BinaryReader,
            [<Optional; DefaultParameterValue(true)>] strict: bool,
            [<Optional; DefaultParameterValue(null: IList<string>)>] skip: IList<string>,
            [<Optional; DefaultParameterValue(null: Dictionary<string, bool>)>] loadedParameters: Dictionary<string, bool>
        ) =
        if not (isNull reader) && reader.BaseStream.CanSeek then
            let entries =
                try
                    StateCheck.readEntries reader.BaseStream
                with :? InvalidDataException as e ->
                    raise (InvalidDataException($"{layerName}.load: the stream is {e.Message}; nothing was loaded."))

            let problems, _ = StateCheck.problems strict skip (this.state_dict ()) entries
            StateCheck.refuse $"{layerName}.load" problems

        base.load (reader, strict, skip, loadedParameters)

    /// <summary>Normalizes x; in training mode also updates the BN running statistics.</summary>
    override this.forward(x: torch.Tensor) : torch.Tensor =
        let running = if recalibrating then None else this.Running

        let options = {
            Layer = layerName
            LocalChecks =
                fun x ->
                    this.CheckRank x
                    this.CheckState x
            CheckTensors = false
            WantMoments = recalibrating
        }

        let mode = if this.training then Mode.Train else Mode.Eval
        let result = Functional.forwardCore options spec this.Params running mode x

        if recalibrating then
            match result.BatchMoments with
            | Some b ->
                let keep (m: Moments) = {
                    m with
                        Mean = m.Mean.DetachFromDisposeScope()
                        M2 = m.M2.DetachFromDisposeScope()
                }

                accumulator <-
                    match accumulator with
                    | None -> Some(keep b)
                    | Some a ->
                        let merged = keep (Moments.merge a b)
                        a.Mean.Dispose()
                        a.M2.Dispose()
                        Some merged
            | None -> ()
        else
            match result.Running with
            | RunningUpdate.Updated after ->
                use _ = torch.no_grad ()
                this.running_mean.copy_ (after.Mean) |> ignore
                this.running_var.copy_ (after.Var) |> ignore
                let tracked = this.num_batches_tracked

                if not (isNull tracked) then
                    tracked.fill_ (after.BatchesTracked) |> ignore

                after.Mean.Dispose()
                after.Var.Dispose()
            | RunningUpdate.Unchanged -> ()

        result.Output

/// <summary>Switchable Normalization over (N, C) or (N, C, L) inputs; a (N, C) input counts as (N, C, 1),
/// so its IN mean is x and its IN variance 0 (with Semantics.Official: (N, C) only, mixing [LN, BN] as the
/// official SwitchNorm1d). Same parameters as torch.nn.BatchNorm1d, plus using_bn and
/// last_gamma.
/// <para>momentum: the running-average factor of the BN statistics, running = (1 − momentum)·running + momentum·batch,
/// default 0.1 (with Semantics.Official this is 1 − the official keep factor: the official defaults are 0.1 in 2d and
/// 0.003 in 1d and 3d, which the static Official factory uses). semantics: Semantics.Default (BatchNorm's conventions,
/// the default) or Semantics.Official (the official PyTorch code's: see Semantics). using_moving_average: default
/// true; false means a cumulative average (Default) or the official raw sums (Official).</para></summary>
type SwitchNorm1d
    (
        num_features: int64,
        [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
        [<Optional; DefaultParameterValue(Defaults.Momentum)>] momentum: float,
        [<Optional; DefaultParameterValue(true)>] affine: bool,
        [<Optional; DefaultParameterValue(true)>] track_running_stats: bool,
        [<Optional>] device: torch.Device,
        [<Optional>] dtype: Nullable<torch.ScalarType>,
        [<Optional; DefaultParameterValue(true)>] using_bn: bool,
        [<Optional; DefaultParameterValue(false)>] last_gamma: bool,
        [<Optional; DefaultParameterValue(Semantics.Default)>] semantics: Semantics,
        [<Optional; DefaultParameterValue(true)>] using_moving_average: bool
    ) =
    inherit
        SwitchNormNd(
            "SwitchNorm1d",
            (if semantics = Semantics.Official then [ 2 ] else [ 2; 3 ]),
            (if semantics = Semantics.Official then
                 "a 2-D (N, C) input (official semantics, as the official SwitchNorm1d)"
             else
                 "a 2-D (N, C) or 3-D (N, C, L) input"),
            ModuleSpec.create "SwitchNorm1d" 1 using_bn eps momentum semantics using_moving_average,
            num_features,
            affine,
            track_running_stats,
            last_gamma,
            device,
            dtype,
            None
        )

    /// <summary>
    /// SwitchNorm1d with the official PyTorch code's semantics (Semantics.Official) and its constructor's parameters and
    /// defaults (switchablenorms/Switchable-Normalization's SwitchNorm1d): momentum is the official keep factor, running =
    /// momentum·running + (1 − momentum)·batch (default 0.997); using_moving_average = false accumulates raw sums.
    /// </summary>
    static member Official
        (
            num_features: int64,
            [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
            [<Optional; DefaultParameterValue(0.997)>] momentum: float,
            [<Optional; DefaultParameterValue(true)>] using_moving_average: bool,
            [<Optional; DefaultParameterValue(true)>] using_bn: bool,
            [<Optional; DefaultParameterValue(false)>] last_gamma: bool,
            [<Optional>] device: torch.Device,
            [<Optional>] dtype: Nullable<torch.ScalarType>
        ) =
        new SwitchNorm1d(
            num_features,
            eps,
            ModuleSpec.fromKeepFactor "SwitchNorm1d.Official" momentum,
            true,
            true,
            device,
            dtype,
            using_bn,
            last_gamma,
            Semantics.Official,
            using_moving_average
        )

/// <summary>Switchable Normalization over (N, C, H, W) inputs: a drop-in for torch.nn.BatchNorm2d, with the same
/// parameters plus using_bn (false drops the BN component) and last_gamma (weight starts at 0).
/// <para>momentum: the running-average factor of the BN statistics, running = (1 − momentum)·running + momentum·batch,
/// default 0.1 (with Semantics.Official this is 1 − the official keep factor: the official defaults are 0.1 in 2d and
/// 0.003 in 1d and 3d, which the static Official factory uses). semantics: Semantics.Default (BatchNorm's conventions,
/// the default) or Semantics.Official (the official PyTorch code's: see Semantics). using_moving_average: default
/// true; false means a cumulative average (Default) or the official raw sums (Official).</para></summary>
type SwitchNorm2d
    (
        num_features: int64,
        [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
        [<Optional; DefaultParameterValue(Defaults.Momentum)>] momentum: float,
        [<Optional; DefaultParameterValue(true)>] affine: bool,
        [<Optional; DefaultParameterValue(true)>] track_running_stats: bool,
        [<Optional>] device: torch.Device,
        [<Optional>] dtype: Nullable<torch.ScalarType>,
        [<Optional; DefaultParameterValue(true)>] using_bn: bool,
        [<Optional; DefaultParameterValue(false)>] last_gamma: bool,
        [<Optional; DefaultParameterValue(Semantics.Default)>] semantics: Semantics,
        [<Optional; DefaultParameterValue(true)>] using_moving_average: bool
    ) =
    inherit
        SwitchNormNd(
            "SwitchNorm2d",
            [ 4 ],
            "a 4-D input (N, C, H, W)",
            ModuleSpec.create "SwitchNorm2d" 2 using_bn eps momentum semantics using_moving_average,
            num_features,
            affine,
            track_running_stats,
            last_gamma,
            device,
            dtype,
            None
        )

    /// <summary>
    /// SwitchNorm2d with the official PyTorch code's semantics (Semantics.Official) and its constructor's parameters and
    /// defaults (switchablenorms/Switchable-Normalization's SwitchNorm2d): momentum is the official keep factor, running =
    /// momentum·running + (1 − momentum)·batch (default 0.9); using_moving_average = false accumulates raw sums.
    /// </summary>
    static member Official
        (
            num_features: int64,
            [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
            [<Optional; DefaultParameterValue(0.9)>] momentum: float,
            [<Optional; DefaultParameterValue(true)>] using_moving_average: bool,
            [<Optional; DefaultParameterValue(true)>] using_bn: bool,
            [<Optional; DefaultParameterValue(false)>] last_gamma: bool,
            [<Optional>] device: torch.Device,
            [<Optional>] dtype: Nullable<torch.ScalarType>
        ) =
        new SwitchNorm2d(
            num_features,
            eps,
            ModuleSpec.fromKeepFactor "SwitchNorm2d.Official" momentum,
            true,
            true,
            device,
            dtype,
            using_bn,
            last_gamma,
            Semantics.Official,
            using_moving_average
        )

/// <summary>Switchable Normalization over (N, C, D, H, W) inputs; same parameters as torch.nn.BatchNorm3d, plus
/// using_bn and last_gamma.
/// <para>momentum: the running-average factor of the BN statistics, running = (1 − momentum)·running + momentum·batch,
/// default 0.1 (with Semantics.Official this is 1 − the official keep factor: the official defaults are 0.1 in 2d and
/// 0.003 in 1d and 3d, which the static Official factory uses). semantics: Semantics.Default (BatchNorm's conventions,
/// the default) or Semantics.Official (the official PyTorch code's: see Semantics). using_moving_average: default
/// true; false means a cumulative average (Default) or the official raw sums (Official).</para></summary>
type SwitchNorm3d
    (
        num_features: int64,
        [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
        [<Optional; DefaultParameterValue(Defaults.Momentum)>] momentum: float,
        [<Optional; DefaultParameterValue(true)>] affine: bool,
        [<Optional; DefaultParameterValue(true)>] track_running_stats: bool,
        [<Optional>] device: torch.Device,
        [<Optional>] dtype: Nullable<torch.ScalarType>,
        [<Optional; DefaultParameterValue(true)>] using_bn: bool,
        [<Optional; DefaultParameterValue(false)>] last_gamma: bool,
        [<Optional; DefaultParameterValue(Semantics.Default)>] semantics: Semantics,
        [<Optional; DefaultParameterValue(true)>] using_moving_average: bool
    ) =
    inherit
        SwitchNormNd(
            "SwitchNorm3d",
            [ 5 ],
            "a 5-D input (N, C, D, H, W)",
            ModuleSpec.create "SwitchNorm3d" 3 using_bn eps momentum semantics using_moving_average,
            num_features,
            affine,
            track_running_stats,
            last_gamma,
            device,
            dtype,
            None
        )

    /// <summary>
    /// SwitchNorm3d with the official PyTorch code's semantics (Semantics.Official) and its constructor's parameters and
    /// defaults (switchablenorms/Switchable-Normalization's SwitchNorm3d): momentum is the official keep factor, running =
    /// momentum·running + (1 − momentum)·batch (default 0.997); using_moving_average = false accumulates raw sums.
    /// </summary>
    static member Official
        (
            num_features: int64,
            [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
            [<Optional; DefaultParameterValue(0.997)>] momentum: float,
            [<Optional; DefaultParameterValue(true)>] using_moving_average: bool,
            [<Optional; DefaultParameterValue(true)>] using_bn: bool,
            [<Optional; DefaultParameterValue(false)>] last_gamma: bool,
            [<Optional>] device: torch.Device,
            [<Optional>] dtype: Nullable<torch.ScalarType>
        ) =
        new SwitchNorm3d(
            num_features,
            eps,
            ModuleSpec.fromKeepFactor "SwitchNorm3d.Official" momentum,
            true,
            true,
            device,
            dtype,
            using_bn,
            last_gamma,
            Semantics.Official,
            using_moving_average
        )

/// <summary>
/// Synchronized Switchable Normalization over (N, C) or (N, C, L) inputs: SwitchNorm1d whose BN statistics are those
/// of the global batch split across the ranks of <paramref name="communicator"/> (see SyncSwitchNorm2d).
/// </summary>
type SyncSwitchNorm1d
    (
        num_features: int64,
        communicator: ICommunicator,
        [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
        [<Optional; DefaultParameterValue(Defaults.Momentum)>] momentum: float,
        [<Optional; DefaultParameterValue(true)>] affine: bool,
        [<Optional; DefaultParameterValue(true)>] track_running_stats: bool,
        [<Optional>] device: torch.Device,
        [<Optional>] dtype: Nullable<torch.ScalarType>,
        [<Optional; DefaultParameterValue(true)>] using_bn: bool,
        [<Optional; DefaultParameterValue(false)>] last_gamma: bool
    ) =
    inherit
        SwitchNormNd(
            "SyncSwitchNorm1d",
            [ 2; 3 ],
            "a 2-D (N, C) or 3-D (N, C, L) input",
            NormSpec.Create(using_bn, eps, Nullable momentum),
            num_features,
            affine,
            track_running_stats,
            last_gamma,
            device,
            dtype,
            Some communicator
        )


/// <summary>
/// Synchronized Switchable Normalization over (N, C, H, W) inputs, for data-parallel training: a SwitchNorm2d whose BN
/// component uses the statistics of the global batch, split across the ranks of <paramref name="communicator"/> in
/// shards of any sizes (one may be empty). Per channel, the counts, sums and centred sums of squares are allreduced,
/// so the statistics are exactly the full batch's; IN and LN stay per sample. The backward allreduces the gradient
/// terms through the BN mean and variance, and the running statistics update identically on every rank. In training
/// every rank must call forward, and then backward on a loss that depends on the output; in eval with running
/// statistics nothing is exchanged. Ranks that disagree on C or dtype get an ArgumentException on every rank.
/// </summary>
type SyncSwitchNorm2d
    (
        num_features: int64,
        communicator: ICommunicator,
        [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
        [<Optional; DefaultParameterValue(Defaults.Momentum)>] momentum: float,
        [<Optional; DefaultParameterValue(true)>] affine: bool,
        [<Optional; DefaultParameterValue(true)>] track_running_stats: bool,
        [<Optional>] device: torch.Device,
        [<Optional>] dtype: Nullable<torch.ScalarType>,
        [<Optional; DefaultParameterValue(true)>] using_bn: bool,
        [<Optional; DefaultParameterValue(false)>] last_gamma: bool
    ) =
    inherit
        SwitchNormNd(
            "SyncSwitchNorm2d",
            [ 4 ],
            "a 4-D input (N, C, H, W)",
            NormSpec.Create(using_bn, eps, Nullable momentum),
            num_features,
            affine,
            track_running_stats,
            last_gamma,
            device,
            dtype,
            Some communicator
        )


/// <summary>
/// Synchronized Switchable Normalization over (N, C, D, H, W) inputs: SwitchNorm3d whose BN statistics are those of
/// the global batch split across the ranks of <paramref name="communicator"/> (see SyncSwitchNorm2d).
/// </summary>
type SyncSwitchNorm3d
    (
        num_features: int64,
        communicator: ICommunicator,
        [<Optional; DefaultParameterValue(Defaults.Eps)>] eps: float,
        [<Optional; DefaultParameterValue(Defaults.Momentum)>] momentum: float,
        [<Optional; DefaultParameterValue(true)>] affine: bool,
        [<Optional; DefaultParameterValue(true)>] track_running_stats: bool,
        [<Optional>] device: torch.Device,
        [<Optional>] dtype: Nullable<torch.ScalarType>,
        [<Optional; DefaultParameterValue(true)>] using_bn: bool,
        [<Optional; DefaultParameterValue(false)>] last_gamma: bool
    ) =
    inherit
        SwitchNormNd(
            "SyncSwitchNorm3d",
            [ 5 ],
            "a 5-D input (N, C, D, H, W)",
            NormSpec.Create(using_bn, eps, Nullable momentum),
            num_features,
            affine,
            track_running_stats,
            last_gamma,
            device,
            dtype,
            Some communicator
        )
