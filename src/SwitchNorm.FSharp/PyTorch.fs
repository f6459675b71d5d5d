namespace SwitchNorm

/// How SavePyTorch lays out a model's SwitchNorm tensors.
type PyTorchLayout =
    /// The module's own state dict: per-channel tensors [C], num_batches_tracked where the layer has one.
    | Module = 0
    /// <summary>
    /// The official code's: SwitchNorm weight and bias (1, C, 1, 1) in 2d, (1, C, 1, 1, 1) in 3d, (1, C) in 1d; running
    /// statistics (1, C, 1) in 2d and 3d, (1, C) in 1d; so the file loads into the official modules. Only for layers with
    /// Semantics.Official.
    /// </summary>
    | Official = 1

namespace SwitchNorm.FSharp

open System
open System.Collections
open System.Collections.Generic
open System.IO
open TorchSharp
open SwitchNorm

/// What a PyTorch load did.
type PyTorchLoadResult = {
    /// Keys of the model the file did not have (allowed: num_batches_tracked, and any key when not strict).
    MissingKeys: string list
    /// Keys of the file the model does not have (empty when strict).
    UnexpectedKeys: string list
}

/// <summary>
/// Reading and writing PyTorch files (<c>torch.save</c> zip files, .pt/.pth, and .safetensors) through
/// TorchSharp.PyBridge, for models with SwitchNorm layers, including checkpoints of the official PyTorch code.
/// </summary>
[<RequireQualifiedAccess>]
module PyTorch =

    let private resave =
        "re-save it once with PyTorch ≥ 1.6: python3 -c \"import torch; torch.save(torch.load('OLD.pth', map_location='cpu'), 'NEW.pth')\""

    /// What a file is, from its first bytes.
    type private Format =
        | Zip
        | Legacy
        | Safetensors
        | Unknown

    let private formatOf (path: string) =
        use fs = File.OpenRead path
        let head = Array.zeroCreate<byte> 9
        let n = fs.Read(head, 0, 9)
        // safetensors: an 8-byte little-endian header length that fits the file, then the JSON header's '{'
        let headerLength = if n >= 8 then BitConverter.ToUInt64(head, 0) else 0UL

        let format =
            if
                n >= 4
                && head[0] = 0x50uy
                && head[1] = 0x4Buy
                && head[2] = 0x03uy
                && head[3] = 0x04uy
            then
                Zip
            elif
                n = 9
                && head[8] = byte '{'
                && headerLength >= 2UL
                && headerLength <= uint64 (fs.Length - 8L)
            then
                Safetensors
            // the legacy format starts with the pickled magic number: PROTO 2, LONG1 of 10 bytes
            elif
                n >= 4
                && head[0] = 0x80uy
                && head[1] = 0x02uy
                && head[2] = 0x8Auy
                && head[3] = 0x0Auy
            then
                Legacy
            else
                Unknown

        format, BitConverter.ToString(head, 0, n)

    /// Disposes every tensor in an unpickled object graph.
    let rec private disposeAll (o: obj) =
        match o with
        | :? torch.Tensor as t -> t.Dispose()
        | :? IDictionary as d ->
            for v in d.Values do
                disposeAll v
        | :? string -> ()
        | :? IEnumerable as e ->
            for v in e do
                disposeAll v
        | _ -> ()

    /// <summary>
    /// The state dict in a PyTorch file: a flat dict of tensors, or a checkpoint dict holding one under
    /// <c>state_dict</c> or <c>model</c> (the rest, such as the optimizer's state, is read and dropped), with a
    /// the keys as the file has them (<c>load</c> strips a DataParallel <c>module.</c> prefix). The tensors are the
    /// caller's to dispose.
    /// </summary>
    /// <exception cref="T:System.IO.InvalidDataException">A legacy (pre-1.6) file (with the re-save recipe), a pickled
    /// whole model, a file that is not a PyTorch file, or a dict without a state dict.</exception>
    [<CompiledName("ReadStateDict")>]
    let readStateDict (path: string) : Dictionary<string, torch.Tensor> =
        Backend.Load()

        if isNull path then
            nullArg "path"

        if not (File.Exists path) then
            raise (FileNotFoundException($"PyTorch.readStateDict: no file at '{path}'.", path))

        let format, firstBytes = formatOf path

        let flat: Dictionary<string, torch.Tensor> =
            match format with
            | Legacy ->
                raise (
                    InvalidDataException(
                        $"'{path}' was written by torch.save in the legacy format of PyTorch before 1.6 (as the official SN checkpoints of 2018 are), which TorchSharp.PyBridge cannot read; {resave}."
                    )
                )
            | Unknown ->
                raise (
                    InvalidDataException(
                        $"'{path}' is neither a torch.save zip file (.pt, .pth) nor a .safetensors file (an 8-byte header length, then '{{'); its first bytes are {firstBytes}."
                    )
                )
            | Safetensors ->
                try
                    TorchSharp.PyBridge.Safetensors.LoadStateDict path
                with e ->
                    raise (InvalidDataException($"'{path}' is not a readable .safetensors file: {e.Message}", e))
            | Zip ->
                let root =
                    try
                        (use stream = File.OpenRead path
                         box (TorchSharp.PyBridge.PyTorchUnpickler.UnpickleStateDict(stream, true)))
                    with
                    | :? NotImplementedException as e when e.Message.Contains "entire model" ->
                        raise (
                            InvalidDataException(
                                $"'{path}' holds a pickled whole model (torch.save(model)), not a state dict; in Python, save its state dict instead: torch.save(model.state_dict(), 'NEW.pth').",
                                e
                            )
                        )
                    | :? InvalidCastException as e ->
                        raise (
                            InvalidDataException(
                                $"'{path}' holds a pickled object that is not a dict (a whole model, torch.save(model)?); save a state dict instead: torch.save(model.state_dict(), 'NEW.pth').",
                                e
                            )
                        )
                    | e -> raise (InvalidDataException($"'{path}' could not be unpickled as a PyTorch state dict: {e.Message}", e))

                let table = root :?> Hashtable

                let isStateDict (h: Hashtable) =
                    h.Count > 0
                    && h.Values |> Seq.cast<obj> |> Seq.forall (fun v -> v :? torch.Tensor)

                let inner =
                    [ "state_dict"; "model" ]
                    |> List.tryPick (fun k ->
                        match table[k] with
                        | :? Hashtable as h -> Some(k, h)
                        | _ -> None)

                let chosen =
                    match inner with
                    | Some(_, h) -> h
                    | None when isStateDict table -> table
                    | None when table.Count = 0 -> raise (InvalidDataException($"'{path}' holds an empty dict: no state dict to load."))
                    | None ->
                        let keys =
                            table.Keys
                            |> Seq.cast<obj>
                            |> Seq.map string
                            |> Seq.truncate 8
                            |> String.concat ", "

                        disposeAll table

                        raise (
                            InvalidDataException(
                                $"'{path}' holds a dict with neither tensors only nor a 'state_dict' or 'model' entry (its keys: {keys})."
                            )
                        )

                let d = Dictionary<string, torch.Tensor>()
                let others = List<string>()

                let nonTensors = List<obj>()

                for k in chosen.Keys do
                    match chosen[k] with
                    | :? torch.Tensor as t -> d[string k] <- t
                    | v ->
                        others.Add(string k)
                        nonTensors.Add v

                // the rest of a checkpoint (optimizer state, epoch, ...) is not loaded
                if not (obj.ReferenceEquals(table, chosen)) then
                    for k in table.Keys |> Seq.cast<obj> |> List.ofSeq do
                        if not (obj.ReferenceEquals(table[k], chosen)) then
                            disposeAll table[k]

                if others.Count > 0 then
                    for t in d.Values do
                        t.Dispose()

                    for v in nonTensors do
                        disposeAll v

                    raise (
                        InvalidDataException(
                            (let names = String.Join(", ", others) in
                             $"'{path}': the state dict holds entries that are not tensors: {names}.")
                        )
                    )

                d

        flat

    /// <summary>
    /// The source with a DataParallel <c>module.</c> prefix removed, when every source key has it and no key of the
    /// target does (as PyTorch's consume_prefix_in_state_dict_if_present), else the source itself.
    /// </summary>
    let private withoutPrefix (target: IDictionary<string, torch.Tensor>) (source: Dictionary<string, torch.Tensor>) =
        let prefix = "module."

        if
            source.Count > 0
            && source.Keys |> Seq.forall (fun k -> k.StartsWith prefix)
            && not (target.Keys |> Seq.exists (fun k -> k.StartsWith prefix))
        then
            let d = Dictionary<string, torch.Tensor>()

            for kv in source do
                d[kv.Key.Substring prefix.Length] <- kv.Value

            d
        else
            source

    /// The SwitchNorm layers of a model by key prefix ("" for the model itself).
    let private switchNormLayers (model: torch.nn.Module) = [
        match model with
        | :? SwitchNormNd as m -> yield "", m
        | _ -> ()
        for struct (name, m) in model.named_modules () do
            match m with
            | :? SwitchNormNd as sn when name <> "" -> yield name + ".", sn
            | _ -> ()
    ]

    /// The official shape of a SwitchNorm tensor of a layer of the given class.
    let private officialShape (layer: SwitchNormNd) (tensor: string) =
        let c = layer.num_features

        match layer, tensor with
        | :? SwitchNorm1d, ("weight" | "bias" | "running_mean" | "running_var") -> Some [| 1L; c |]
        | (:? SwitchNorm2d | :? SwitchNorm3d), ("running_mean" | "running_var") -> Some [| 1L; c; 1L |]
        | :? SwitchNorm3d, ("weight" | "bias") -> Some [| 1L; c; 1L; 1L; 1L |]
        | :? SwitchNorm2d, ("weight" | "bias") -> Some [| 1L; c; 1L; 1L |]
        | _ -> None

    /// <summary>
    /// Loads a PyTorch file (see <c>readStateDict</c>) into <paramref name="model"/>, all or nothing: the official
    /// SwitchNorm shapes ((1, C, 1, 1), (1, C, 1), (1, C), (1, C, 1, 1, 1)) are mapped onto the module's [C] for layers
    /// with Semantics.Official, a missing num_batches_tracked keeps its value, and every key, shape and dtype is
    /// checked before anything is written; every problem is listed in one InvalidDataException. An official checkpoint
    /// loaded into layers with Semantics.Default is refused with what to build instead. With
    /// <paramref name="strict"/> false, missing and unexpected keys are returned instead of refused.
    /// </summary>
    [<CompiledName("Load")>]
    let load (strict: bool) (path: string) (model: torch.nn.Module) : PyTorchLoadResult =
        if isNull model then
            nullArg "model"

        let raw = readStateDict path
        let reshaped = List<torch.Tensor>()

        try
            let target = model.state_dict ()
            let source = withoutPrefix target raw
            let problems = List<string>()
            let layers = switchNormLayers model
            let mapped = Dictionary<string, torch.Tensor>()
            let officialInDefault = List<string>()

            for kv in source do
                let layer =
                    layers
                    |> List.tryFind (fun (p, _) -> kv.Key.StartsWith p && not (kv.Key.Substring(p.Length).Contains '.'))

                let value =
                    match layer, target.TryGetValue kv.Key with
                    | Some(p, sn), (true, t) when kv.Value.shape <> t.shape ->
                        let name = kv.Key.Substring p.Length

                        match officialShape sn name with
                        | Some shape when shape = kv.Value.shape ->
                            if sn.semantics = Semantics.Official then
                                let r = kv.Value.reshape t.shape
                                reshaped.Add r
                                r
                            else
                                officialInDefault.Add(p.TrimEnd '.')
                                kv.Value
                        | _ -> kv.Value
                    | _ -> kv.Value

                mapped[kv.Key] <- value

            if officialInDefault.Count > 0 then
                let names =
                    officialInDefault
                    |> Seq.distinct
                    |> Seq.map (fun n -> if n = "" then "(the model)" else n)
                    |> Seq.truncate 6
                    |> String.concat ", "

                raise (
                    InvalidDataException(
                        $"'{path}' is an official-code checkpoint (SwitchNorm tensors of shape (1, C, ...)) but the layers {names} have Semantics.Default, whose statistics differ from the official ones; build the model with official semantics (SwitchNorm2d.Official, Layers.OfficialSwitchNorm2d, or the models zoo: resnetv1sn50, ...). Nothing was loaded."
                    )
                )

            let found, missing =
                StateCheck.problems strict null target (StateCheck.entriesOf mapped)

            // num_batches_tracked may be missing (the official modules and older PyTorch files have none)
            let tolerated (p: string) =
                p.StartsWith "missing key '"
                && p.EndsWith "num_batches_tracked' (in the module, not in the source)"

            problems.AddRange(found |> List.filter (tolerated >> not))
            StateCheck.refuse $"PyTorch.load('{path}')" (List.ofSeq problems)

            use _ = torch.no_grad ()

            for kv in mapped do
                match target.TryGetValue kv.Key with
                | true, t -> t.copy_ kv.Value |> ignore
                | _ -> ()

            {
                MissingKeys = missing
                UnexpectedKeys = mapped.Keys |> Seq.filter (fun k -> not (target.ContainsKey k)) |> List.ofSeq
            }
        finally
            for t in Seq.append raw.Values reshaped do
                t.Dispose()

    /// <summary>
    /// Writes <paramref name="model"/>'s state dict as a PyTorch file that Python's <c>torch.load</c> (or
    /// <c>safetensors.torch.load_file</c>) reads: a .safetensors file when the path ends so, else a torch.save zip file
    /// (.pt, .pth) holding a plain dict. With PyTorchLayout.Official, SwitchNorm tensors take the official shapes and
    /// the file loads into the official modules (every SwitchNorm layer must have Semantics.Official). With
    /// <paramref name="prefix"/> (e.g. "module."), every key gets it, as DataParallel writes them.
    /// </summary>
    [<CompiledName("Save")>]
    let save (layout: PyTorchLayout) (prefix: string) (path: string) (model: torch.nn.Module) : unit =
        if isNull model then
            nullArg "model"

        if isNull path then
            nullArg "path"

        if not (Enum.IsDefined layout) then
            raise (ArgumentOutOfRangeException("layout", layout, $"PyTorch.save: layout must be Module or Official; got {int layout}."))

        Backend.Load()
        let layers = switchNormLayers model

        if layout = PyTorchLayout.Official then
            let defaults =
                layers
                |> List.filter (fun (_, sn) -> sn.semantics <> Semantics.Official)
                |> List.map fst

            let generic =
                layers
                |> List.filter (fun (_, sn) -> not (sn :? SwitchNorm1d || sn :? SwitchNorm2d || sn :? SwitchNorm3d))
                |> List.map fst

            if not generic.IsEmpty then
                let names =
                    generic
                    |> List.truncate 6
                    |> List.map (fun p -> p.TrimEnd '.')
                    |> String.concat ", "

                raise (
                    ArgumentException(
                        $"PyTorch.save: the official layout has shapes for SwitchNorm1d, SwitchNorm2d and SwitchNorm3d only (the official modules); these layers are of another class: {names}.",
                        "layout"
                    )
                )

            if not defaults.IsEmpty then
                let names =
                    defaults
                    |> List.truncate 6
                    |> List.map (fun p -> p.TrimEnd '.')
                    |> String.concat ", "

                raise (
                    ArgumentException(
                        $"PyTorch.save: the official layout is for layers with Semantics.Official, whose statistics the official code computes; these have Semantics.Default: {names}.",
                        "layout"
                    )
                )

        let prefix = if isNull prefix then "" else prefix
        use scope = torch.NewDisposeScope()
        let d = Dictionary<string, torch.Tensor>()

        for kv in model.state_dict () do
            let t = kv.Value.detach().cpu().contiguous ()

            let t =
                match layout with
                | PyTorchLayout.Official ->
                    let layer =
                        layers
                        |> List.tryFind (fun (p, _) -> kv.Key.StartsWith p && not (kv.Key.Substring(p.Length).Contains '.'))

                    match layer with
                    | Some(p, sn) ->
                        match officialShape sn (kv.Key.Substring p.Length) with
                        | Some shape -> t.reshape(shape).contiguous ()
                        | None -> t
                    | None -> t
                | _ -> t

            d[prefix + kv.Key] <- t.clone ()

        let dir = Path.GetDirectoryName(Path.GetFullPath path)

        if not (Directory.Exists dir) then
            raise (DirectoryNotFoundException($"PyTorch.save: the folder '{dir}' does not exist."))

        // write to a temporary file first, so a failure leaves no half-written file at path
        let tmp =
            Path.Combine(dir, $".{Path.GetFileName path}.{Path.GetRandomFileName()}.tmp")

        try
            // through a stream of our own: PyBridge's path overloads do not truncate an existing file
            (use fs = File.Create tmp

             if path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) then
                 TorchSharp.PyBridge.Safetensors.SaveStateDict(fs, d, true)
             else
                 TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(fs, d, true))

            File.Move(tmp, path, true)
        finally
            if File.Exists tmp then
                File.Delete tmp
