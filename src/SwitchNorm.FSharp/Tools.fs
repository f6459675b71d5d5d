namespace SwitchNorm

/// How <c>Conversion.batchNorm</c> initialises the mixture logits of the new layers.
type LogitInit =
    /// All logits 1, as in the paper: a uniform mixture.
    | Uniform = 0
    /// BN's logits raised by a margin, so a pretrained network keeps (nearly) its function at first.
    | BatchLeaning = 1

/// What a model surgery did (conversion from BatchNorm, folding for deployment): the model and the layers it replaced.
[<Sealed; AllowNullLiteral>]
type ConversionResult internal (model: TorchSharp.torch.nn.Module, names: string[], count: int) =
    /// The model after the change (the new layer when the model itself was the layer replaced).
    member _.Model = model
    /// The dotted names of the places that held a replaced layer ("" for the model itself); a layer used in several
    /// places appears under each name.
    member _.Names: System.Collections.Generic.IReadOnlyList<string> = names
    /// How many layers were replaced (each by one new layer, however many places it was used in).
    member _.Count = count

    /// "replaced N layer(s): a, b, ...".
    override _.ToString() =
        $"replaced {count} layer(s): " + System.String.Join(", ", names)

namespace SwitchNorm.FSharp

open System
open System.Collections.Generic
open System.IO
open System.Reflection
open TorchSharp
open SwitchNorm

/// The learned mixture of one switchable normalizer in a model.
type MixtureInfo = {
    /// The module's dotted name in the model ("" for the model itself).
    Name: string
    /// Short names of the mixed statistics, in order ("IN", "LN", "BN").
    Components: string[]
    /// Mean weights (the layer's switch applied to its logits), one per component.
    Mean: float[]
    /// Variance weights (the layer's switch applied to its logits), one per component.
    Var: float[]
}

/// Reading the learned mixtures of a model.
[<RequireQualifiedAccess>]
module Mixture =

    /// Every switchable normalizer in the model (the model itself included), with its dotted name.
    [<CompiledName("Modules")>]
    let modules (model: torch.nn.Module) : (string * SwitchNormNd) list = [
        match model with
        | :? SwitchNormNd as s -> yield "", s
        | _ -> ()
        for struct (name, m) in model.named_modules () do
            match m with
            | :? SwitchNormNd as s -> yield name, s
            | _ -> ()
    ]

    /// The learned mean and variance mixtures of every switchable normalizer in the model, by module name.
    [<CompiledName("OfModel")>]
    let ofModel (model: torch.nn.Module) : MixtureInfo[] =
        modules model
        |> List.map (fun (name, s) -> {
            Name = name
            Components = s.Components
            Mean = s.MeanMixture
            Var = s.VarMixture
        })
        |> Array.ofList

    /// A plain-text table of the mixtures: one line per layer, "name  mean[IN LN BN]  var[IN LN BN]".
    [<CompiledName("Format")>]
    let format (mixtures: MixtureInfo seq) =
        let fmt (w: float[]) =
            String.Join(" ", w |> Array.map (fun v -> v.ToString("0.000")))

        [
            for m in mixtures ->
                let comps = String.Join(" ", m.Components)
                let name = if m.Name = "" then "(model)" else m.Name
                $"{name, -24} mean[{comps}] = {fmt m.Mean}   var[{comps}] = {fmt m.Var}"
        ]
        |> String.concat Environment.NewLine

/// Model surgery: BatchNorm → SwitchNorm.
[<RequireQualifiedAccess>]
module Conversion =

    let internal allFields (t: Type) =
        let rec go (t: Type) = [
            if not (isNull t) && t <> typeof<obj> then
                yield!
                    t.GetFields(
                        BindingFlags.Instance
                        ||| BindingFlags.Public
                        ||| BindingFlags.NonPublic
                        ||| BindingFlags.DeclaredOnly
                    )

                yield! go t.BaseType
        ]

        go t

    let internal submodulesField =
        typeof<torch.nn.Module>.GetField("_internal_submodules", BindingFlags.Instance ||| BindingFlags.NonPublic)

    let internal sequentialModulesField =
        typeof<TorchSharp.Modules.Sequential>.GetField("_modules", BindingFlags.Instance ||| BindingFlags.NonPublic)

    /// The element type T of a ModuleList&lt;T&gt; or ModuleDict&lt;T&gt; (or a type derived from one), if the parent is one.
    let internal containerOf (parent: torch.nn.Module) =
        let rec find (t: Type) =
            if isNull t then
                None
            elif
                t.IsGenericType
                && (t.GetGenericTypeDefinition() = typedefof<TorchSharp.Modules.ModuleList<torch.nn.Module>>
                    || t.GetGenericTypeDefinition() = typedefof<TorchSharp.Modules.ModuleDict<torch.nn.Module>>)
            then
                Some(t.GetGenericTypeDefinition(), t.GetGenericArguments()[0])
            else
                find t.BaseType

        find (parent.GetType())

    /// A module's children with their names: the registry's, and a ModuleList's or ModuleDict's own items (which
    /// TorchSharp registers only once the container is itself registered in a parent).
    let internal childrenOf (parent: torch.nn.Module) : (string * torch.nn.Module) list =
        let registered = [ for struct (name, child) in parent.named_children () -> name, child ]

        let own =
            match containerOf parent with
            | Some(def, element) when def = typedefof<TorchSharp.Modules.ModuleList<torch.nn.Module>> ->
                let t = parent.GetType()
                let item = t.GetProperty("Item", element, [| typeof<int> |])
                let count = t.GetProperty("Count").GetValue parent :?> int

                [
                    for i in 0 .. count - 1 -> string i, item.GetValue(parent, [| box i |]) :?> torch.nn.Module
                ]
            | Some(_, element) ->
                let t = parent.GetType()
                let item = t.GetProperty("Item", element, [| typeof<string> |])
                let keys = t.GetMethod("keys").Invoke(parent, [||]) :?> IEnumerable<string>

                [
                    for k in List.ofSeq keys -> k, item.GetValue(parent, [| box k |]) :?> torch.nn.Module
                ]
            | None -> []

        registered
        @ (own
           |> List.filter (fun (n, _) -> not (List.exists (fun (r, _) -> r = n) registered)))

    /// The dtype and device of a BatchNorm's tensors (the defaults when it has none: affine=false without running statistics).
    let private dtypeDevice (bn: TorchSharp.Modules.BatchNorm) =
        let t =
            [ bn.weight :> torch.Tensor; bn.running_mean ]
            |> List.tryFind (fun t -> not (isNull (box t)))

        match t with
        | Some t -> t.dtype, t.device
        | None -> torch.get_default_dtype (), torch.CPU

    /// The SwitchNorm that matches a BatchNorm, carrying over its options, weight, bias, running statistics and counter.
    let private fromBatchNorm (init: LogitInit) (margin: float) (bn: TorchSharp.Modules.BatchNorm) : SwitchNormNd =
        let dt, dev = dtypeDevice bn

        let sn: SwitchNormNd =
            match bn with
            | :? TorchSharp.Modules.BatchNorm1d ->
                new SwitchNorm1d(bn.num_features, bn.eps, Defaults.Momentum, bn.affine, bn.track_running_stats, dev, Nullable dt)
            | :? TorchSharp.Modules.BatchNorm3d ->
                new SwitchNorm3d(bn.num_features, bn.eps, Defaults.Momentum, bn.affine, bn.track_running_stats, dev, Nullable dt)
            | _ -> new SwitchNorm2d(bn.num_features, bn.eps, Defaults.Momentum, bn.affine, bn.track_running_stats, dev, Nullable dt)

        sn.momentum <- bn.momentum
        sn.train bn.training |> ignore
        use _ = torch.no_grad ()

        if bn.affine && not (isNull (box bn.weight)) then
            sn.weight.copy_ (bn.weight) |> ignore
            sn.bias.copy_ (bn.bias) |> ignore

        if bn.track_running_stats && not (isNull bn.running_mean) then
            sn.running_mean.copy_ (bn.running_mean) |> ignore
            sn.running_var.copy_ (bn.running_var) |> ignore
            sn.num_batches_tracked.copy_ (bn.num_batches_tracked) |> ignore

        if init = LogitInit.BatchLeaning then
            // logits [1, 1, 1 + margin]: BN weight = 1 / (1 + 2·exp(−margin)) in both mixtures
            sn.mean_weight[2L].add_ (margin.ToScalar()) |> ignore
            sn.var_weight[2L].add_ (margin.ToScalar()) |> ignore

        sn

    /// One place that refers to a module to replace: its parent and name there.
    type internal Site = {
        Parent: torch.nn.Module
        Name: string
        Path: string
        Old: torch.nn.Module
        Fields: FieldInfo list
    }

    let internal refuseAs (tool: string) (text: string) =
        raise (InvalidOperationException($"{tool}: {text}; nothing was changed."))

    let private refuse = refuseAs "Conversion.batchNorm"

    /// <summary>
    /// Every place in the tree that refers to a module that <paramref name="target"/> picks, with its replacement's type
    /// checked against the parent's fields and container: one that cannot hold it is refused (as <paramref name="tool"/>)
    /// before anything changes.
    /// </summary>
    let internal sites (tool: string) (target: torch.nn.Module -> Type option) (model: torch.nn.Module) =
        let found = List<Site>()

        let rec visit (parent: torch.nn.Module) (path: string) (seen: HashSet<torch.nn.Module>) =
            if seen.Add parent then
                for (name, child) in childrenOf parent do
                    let full = if path = "" then name else path + "." + name

                    match target child with
                    | Some newType ->
                        let fields =
                            allFields (parent.GetType())
                            |> List.filter (fun f -> obj.ReferenceEquals(f.GetValue parent, child))

                        for f in fields do
                            if not (f.FieldType.IsAssignableFrom newType) then
                                refuseAs
                                    tool
                                    $"cannot replace '{full}': field '{f.Name}' of {parent.GetType().Name} is declared as {f.FieldType.Name}; declare it as Module<Tensor, Tensor> (or a base type) to allow the swap"

                        match containerOf parent with
                        | Some(_, element) when not (element.IsAssignableFrom newType) ->
                            refuseAs
                                tool
                                $"cannot replace '{full}': its container {parent.GetType().Name} holds only {element.Name}; make it a ModuleList/ModuleDict of Module<Tensor, Tensor>"
                        | _ -> ()

                        found.Add {
                            Parent = parent
                            Name = name
                            Path = full
                            Old = child
                            Fields = fields
                        }
                    | None -> visit child full seen

        visit model "" (HashSet<torch.nn.Module>(HashIdentity.Reference))
        found

    /// Refuses a margin whose BN logit 1 + margin is not finite in the layer's dtype (1e39 in float32).
    let private checkMargin (init: LogitInit) (margin: float) (bn: TorchSharp.Modules.BatchNorm) (path: string) =
        if init = LogitInit.BatchLeaning then
            let dt, _ = dtypeDevice bn
            use logit = torch.tensor(1.0 + margin, dtype = torch.ScalarType.Float64).to_type dt

            if not (logit.isfinite().item<bool> ()) then
                refuse $"the BN logit 1 + margin = {1.0 + margin} is not finite in {dt} (layer '{path}'); use a smaller margin"

    /// Every place in the tree that refers to a BatchNorm, checked: a field or container that cannot hold a SwitchNorm,
    /// and a dtype in which the margin's logits are not finite, are refused before anything changes.
    let private plan (init: LogitInit) (margin: float) (model: torch.nn.Module) =
        let found =
            sites
                "Conversion.batchNorm"
                (fun m ->
                    match m with
                    | :? TorchSharp.Modules.BatchNorm -> Some typeof<SwitchNorm2d>
                    | _ -> None)
                model

        for s in found do
            checkMargin init margin (s.Old :?> TorchSharp.Modules.BatchNorm) s.Path

        found

    /// Puts sn where the site's module was: the module registry, a Sequential's list, a ModuleList or ModuleDict,
    /// and the parent's fields.
    let internal replace (site: Site) (sn: torch.nn.Module) =
        let parent, bn = site.Parent, site.Old

        match parent with
        | :? TorchSharp.Modules.Sequential as s ->
            let items =
                sequentialModulesField.GetValue s :?> List<torch.nn.IModule<torch.Tensor, torch.Tensor>>

            for i in 0 .. items.Count - 1 do
                if obj.ReferenceEquals(items[i], bn) then
                    items[i] <- (box sn :?> torch.nn.IModule<torch.Tensor, torch.Tensor>)
        | _ -> ()

        match containerOf parent with
        | Some(def, element) when def = typedefof<TorchSharp.Modules.ModuleList<torch.nn.Module>> ->
            let t = parent.GetType()
            let item = t.GetProperty("Item", element, [| typeof<int> |])
            let count = t.GetProperty("Count").GetValue parent :?> int

            for i in 0 .. count - 1 do
                if obj.ReferenceEquals(item.GetValue(parent, [| box i |]), bn) then
                    item.SetValue(parent, sn, [| box i |])
        | Some(_, element) ->
            // ModuleDict<T>: its string indexer keeps the list and the dictionary in step
            let item = parent.GetType().GetProperty("Item", element, [| typeof<string> |])
            item.SetValue(parent, sn, [| box site.Name |])
        | None -> ()

        let dict = submodulesField.GetValue parent

        if not (isNull dict) then
            let item = dict.GetType().GetProperty("Item", [| typeof<string> |])
            let contains = dict.GetType().GetMethod("ContainsKey", [| typeof<string> |])

            if
                not (isNull item)
                && not (isNull contains)
                && (contains.Invoke(dict, [| box site.Name |]) :?> bool)
            then
                item.SetValue(dict, sn, [| box site.Name |])

        for f in site.Fields do
            f.SetValue(parent, sn)

    /// <summary>
    /// Replaces every BatchNorm1d/2d/3d that the model's forward can reach by the matching SwitchNorm1d/2d/3d, in place:
    /// children of any module, inside Sequentials, ModuleLists and ModuleDicts, in fields of custom modules, at any
    /// depth. A BatchNorm used in several places becomes one SwitchNorm used in all of them, so tying is kept. Options
    /// (affine and track_running_stats included), weight, bias, running statistics, num_batches_tracked and the
    /// train/eval mode carry over. <paramref name="init"/> picks the starting logits: Uniform (the paper) or
    /// BatchLeaning, which adds <paramref name="margin"/> to BN's logits (BN weight 1/(1 + 2e^−margin): 0.787 at
    /// Defaults.BnLogitMargin = 2, 0.9993 at 8) so a pretrained network keeps (nearly) its function at first. A margin
    /// above about 4 saturates the softmax: the mixtures then barely move in fine-tuning (Defaults.BnLogitMargin). Anything it cannot do (a field or
    /// container typed for BatchNorm only, a margin whose logits are not finite in the layer's dtype) is refused with
    /// an InvalidOperationException before anything changes. Returns the converted model (the new layer when the
    /// model itself is a BatchNorm) and where the BatchNorms were.
    /// </summary>
    [<CompiledName("BatchNormToSwitchNorm")>]
    let batchNorm (init: LogitInit) (margin: float) (model: torch.nn.Module) : ConversionResult =
        if isNull (box model) then
            nullArg "model"

        if not (Double.IsFinite margin) then
            invalidArg "margin" $"Conversion.batchNorm: the BN logit margin must be finite; got {margin}."

        match model with
        | :? TorchSharp.Modules.BatchNorm as bn ->
            checkMargin init margin bn ""
            ConversionResult(fromBatchNorm init margin bn, [| "" |], 1)
        | _ ->
            let sites = plan init margin model

            let made = Dictionary<torch.nn.Module, SwitchNormNd>(HashIdentity.Reference)

            for site in sites do
                let sn =
                    match made.TryGetValue site.Old with
                    | true, sn -> sn
                    | _ ->
                        let sn = fromBatchNorm init margin (site.Old :?> TorchSharp.Modules.BatchNorm)
                        made[site.Old] <- sn
                        sn

                replace site sn

            ConversionResult(model, [| for s in sites -> s.Path |], made.Count)

/// Batch-average recalibration of the BN running statistics (the paper found it better than a moving average).
[<RequireQualifiedAccess>]
module Recalibrate =

    /// <summary>
    /// Runs the model over <paramref name="batches"/> (training-mode statistics, under no_grad) and sets each
    /// switchable normalizer's running_mean and running_var to the exact mean and unbiased variance of all the values
    /// its BN component saw, by merging per-batch moments (count, mean, M2). Parameters and num_batches_tracked are
    /// untouched, and the model's train/eval mode is restored. Layers without BN or without running statistics are
    /// skipped. Returns the number of batches used.
    /// </summary>
    [<CompiledName("BatchAverage")>]
    let batchAverage (model: torch.nn.Module<torch.Tensor, torch.Tensor>) (batches: torch.Tensor seq) : int =
        let layers =
            Mixture.modules model
            |> List.map snd
            |> List.filter (fun s -> s.using_bn && s.track_running_stats)

        match layers |> List.filter (fun s -> s.semantics = Semantics.Official) with
        | [] -> ()
        | official ->
            raise (
                ArgumentException(
                    $"Recalibrate.batchAverage: {official.Length} layer(s) have Semantics.Official, whose running statistics follow the official code's update (its keep factor or raw sums), not an exact average; recalibration is for Semantics.Default layers. Nothing was changed.",
                    "model"
                )
            )

        let wasTraining = model.training
        let mutable count = 0

        try
            model.train () |> ignore

            for s in layers do
                s.BeginRecalibration()

            use _ = torch.no_grad ()

            for b in batches do
                use scope = torch.NewDisposeScope()
                model.forward b |> ignore
                count <- count + 1

            let results = layers |> List.map (fun s -> s, s.EndRecalibration())

            for (s, r) in results do
                match r with
                | Some m ->
                    s.running_mean.copy_ (m.Mean.view -1L) |> ignore
                    use uv = Moments.unbiasedVariance m
                    s.running_var.copy_ (uv.view -1L) |> ignore
                    m.Mean.Dispose()
                    m.M2.Dispose()
                | None -> ()
        finally
            for s in layers do
                s.EndRecalibration() |> ignore

            model.train wasTraining |> ignore

        count

/// <summary>
/// Sparse switching over a whole model (Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax",
/// CVPR 2019): pick the switch of every switchable normalizer, raise the sparsestmax radius from 0 to 1 over
/// training, and freeze each layer's selection once it is one-hot.
/// </summary>
[<RequireQualifiedAccess>]
module SparseSwitch =

    /// <summary>
    /// The radius schedule: 0 at the start of training, rising linearly to 1 at <paramref name="rampEnd"/> (a fraction of
    /// training in (0, 1]), then 1. <paramref name="progress"/> is the fraction of training done, in [0, 1].
    /// </summary>
    [<CompiledName("RadiusAt")>]
    let radiusAt (rampEnd: float) (progress: float) : float =
        if not (rampEnd > 0.0 && rampEnd <= 1.0) then
            invalidArg "rampEnd" $"SparseSwitch.radiusAt: rampEnd must lie in (0, 1]; got {rampEnd}."

        if not (progress >= 0.0 && progress <= 1.0) then
            invalidArg "progress" $"SparseSwitch.radiusAt: progress must lie in [0, 1]; got {progress}."

        min 1.0 (progress / rampEnd)

    /// Sets the switch of every switchable normalizer in the model (frozen layers keep theirs); returns how many were set.
    [<CompiledName("Use")>]
    let useSwitch (kind: SwitchKind) (model: torch.nn.Module) : int =
        Switch.OfKind(kind, 0.0) |> ignore // refuses an unknown kind before anything changes

        Mixture.modules model
        |> List.filter (fun (_, s) -> not s.IsFrozen)
        |> List.map (fun (_, s) -> s.SwitchKind <- kind)
        |> List.length

    /// <summary>
    /// One step of the schedule: sets <paramref name="radius"/> on every switchable normalizer, then freezes each
    /// sparsestmax layer whose mean and variance mixtures are both one-hot. Returns the number of frozen layers in the
    /// model. A radius outside [0, 1] is refused before anything changes.
    /// </summary>
    [<CompiledName("Step")>]
    let step (radius: float) (model: torch.nn.Module) : int =
        if not (radius >= 0.0 && radius <= 1.0) then
            invalidArg "radius" $"SparseSwitch.step: the radius must lie in [0, 1]; got {radius}."

        let layers = Mixture.modules model |> List.map snd

        for s in layers do
            s.Radius <- radius

            if s.SwitchKind = SwitchKind.Sparsestmax then
                s.Freeze() |> ignore

        layers |> List.filter (fun s -> s.IsFrozen) |> List.length

/// <summary>
/// Folding for deployment: in eval, a SwitchNorm whose mean and variance mixtures are both one-hot on the same
/// statistic computes exactly a plain TorchSharp layer, so it can be replaced by it. SSN's frozen selections are
/// one-hot by construction.
/// </summary>
[<RequireQualifiedAccess>]
module Folding =

    /// The component both mixtures select, when both are one-hot on the same one.
    let private selection (sn: SwitchNormNd) =
        let wm, wv = sn.MeanMixture, sn.VarMixture

        if Mixing.isOneHot wm && Mixing.isOneHot wv then
            let i = wm |> Array.findIndex (fun w -> w > 0.5)
            let j = wv |> Array.findIndex (fun w -> w > 0.5)
            if i = j then Some sn.Components[i] else None
        else
            None

    let private dims (sn: SwitchNormNd) =
        match sn with
        | :? SwitchNorm1d -> 1
        | :? SwitchNorm3d -> 3
        | _ -> 2

    /// <summary>
    /// The plain layer that computes what <paramref name="sn"/> computes in eval, when its selection is one-hot:
    /// BN → BatchNorm1d/2d/3d with the running statistics (eval), IN → InstanceNorm1d/2d/3d with the per-channel affine
    /// (2d and 3d; a 1d layer's (N, C) input has no instance statistics to take), LN → GroupNorm(1, C), which is LN over
    /// (C, *spatial) with a per-channel affine. None when the selection is mixed or has no plain equivalent (with
    /// Semantics.Official only BN has one: the official IN and LN variances are not the biased ones those layers use).
    /// </summary>
    let internal plainOf (sn: SwitchNormNd) : torch.nn.Module<torch.Tensor, torch.Tensor> option =
        let c = sn.num_features
        let dev = sn.mean_weight.device
        let dt = sn.mean_weight.dtype
        let affine = sn.affine

        let copyAffine (w: torch.Tensor) (b: torch.Tensor) =
            if affine then
                use _ = torch.no_grad ()
                w.copy_ (sn.weight) |> ignore
                b.copy_ (sn.bias) |> ignore

        match selection sn with
        | Some "BN" when sn.track_running_stats ->
            let bn: TorchSharp.Modules.BatchNorm =
                match dims sn with
                | 1 -> torch.nn.BatchNorm1d(c, sn.eps, affine = affine, device = dev, dtype = dt)
                | 3 -> torch.nn.BatchNorm3d(c, sn.eps, affine = affine, device = dev, dtype = dt)
                | _ -> torch.nn.BatchNorm2d(c, sn.eps, affine = affine, device = dev, dtype = dt)

            copyAffine bn.weight bn.bias

            (use _ = torch.no_grad ()
             bn.running_mean.copy_ (sn.running_mean) |> ignore
             bn.running_var.copy_ (sn.running_var) |> ignore
             // the official modules have no counter
             if not (isNull sn.num_batches_tracked) then
                 bn.num_batches_tracked.copy_ (sn.num_batches_tracked) |> ignore)

            bn.eval () |> ignore
            Some(bn :> torch.nn.Module<torch.Tensor, torch.Tensor>)
        // with official semantics IN's variance is unbiased and LN's derived from it: InstanceNorm and GroupNorm
        // compute biased ones, so only a BN selection has a plain equivalent
        | Some "IN" when dims sn > 1 && sn.semantics = Semantics.Default ->
            let inorm: torch.nn.Module<torch.Tensor, torch.Tensor> =
                if dims sn = 3 then
                    torch.nn.InstanceNorm3d(c, sn.eps, affine = affine, device = dev, dtype = dt)
                else
                    torch.nn.InstanceNorm2d(c, sn.eps, affine = affine, device = dev, dtype = dt)

            if affine then
                copyAffine (inorm.get_parameter "weight") (inorm.get_parameter "bias")

            inorm.eval () |> ignore
            Some inorm
        | Some "LN" when sn.semantics = Semantics.Default ->
            let gn =
                torch.nn.GroupNorm(1L, c, sn.eps, affine = affine, device = dev, dtype = dt)

            if affine then
                copyAffine gn.weight gn.bias

            gn.eval () |> ignore
            Some(gn :> torch.nn.Module<torch.Tensor, torch.Tensor>)
        | _ -> None

    /// <summary>
    /// Replaces, in place, every SwitchNorm of <paramref name="model"/> (in Sequentials, ModuleLists, ModuleDicts and
    /// fields, at any depth) whose mean and variance mixtures are both one-hot on the same statistic by the plain layer
    /// that computes the same eval output (see plainOf): BatchNorm, InstanceNorm or GroupNorm(1, C). Layers with mixed
    /// selections stay SwitchNorm. The model is put in eval mode: the folded layers compute the eval function only.
    /// A field or container that cannot hold the plain layer is refused before anything changes. Returns the model and
    /// the names of the folded layers.
    /// </summary>
    [<CompiledName("ForInference")>]
    let forInference (model: torch.nn.Module) : ConversionResult =
        if isNull (box model) then
            nullArg "model"

        model.eval () |> ignore

        let plain =
            Dictionary<torch.nn.Module, torch.nn.Module<torch.Tensor, torch.Tensor>>(HashIdentity.Reference)

        let target (m: torch.nn.Module) =
            match m with
            | :? SwitchNormNd as sn ->
                match plain.TryGetValue m with
                | true, p -> Some(p.GetType())
                | _ ->
                    match plainOf sn with
                    | Some p ->
                        plain[m] <- p
                        Some(p.GetType())
                    | None -> None
            | _ -> None

        match model with
        | :? SwitchNormNd as sn ->
            match plainOf sn with
            | Some p -> ConversionResult(p, [| "" |], 1)
            | None -> ConversionResult(model, [||], 0)
        | _ ->
            let found = Conversion.sites "Folding.forInference" target model

            for site in found do
                Conversion.replace site plain[site.Old]

            ConversionResult(model, [| for s in found -> s.Path |], found |> Seq.map (fun s -> s.Old) |> Seq.distinct |> Seq.length)

    /// The running statistics, affine and eps of a BatchNorm in eval, or of a SwitchNorm that selects BN.
    let private batchNormOf (m: torch.nn.Module) =
        match m with
        | :? TorchSharp.Modules.BatchNorm as bn when bn.track_running_stats && not (isNull bn.running_mean) ->
            Some(bn.running_mean, bn.running_var, (bn.weight :> torch.Tensor), (bn.bias :> torch.Tensor), bn.eps)
        | :? SwitchNormNd as sn when sn.track_running_stats && selection sn = Some "BN" ->
            Some(sn.running_mean, sn.running_var, (sn.weight :> torch.Tensor), (sn.bias :> torch.Tensor), sn.eps)
        | _ -> None

    /// <summary>
    /// Fuses, in place and for eval, every Conv1d/2d/3d that a Sequential runs right before a BatchNorm (or a SwitchNorm
    /// that selects BN): with s = γ / sqrt(running_var + eps), the convolution's weight becomes w·s per output channel
    /// and its bias (b − running_mean)·s + β, and the norm is replaced by Identity. TorchSharp has no fuse_conv_bn
    /// (TorchSharp issue #1243). Sequentials are found anywhere in the tree (in lists, dicts and fields); a custom
    /// module's own forward order is unknown, so a conv and a norm held in fields are left alone. The model is put in
    /// eval mode. A convolution used in several places changes in all of them. Returns the model and the names of the
    /// norms fused away.
    /// </summary>
    [<CompiledName("FuseConvBatchNorm")>]
    let fuseConvBn (model: torch.nn.Module) : ConversionResult =
        if isNull (box model) then
            nullArg "model"

        model.eval () |> ignore
        let fused = List<string>()
        let seen = HashSet<torch.nn.Module>(HashIdentity.Reference)

        let rec visit (m: torch.nn.Module) (path: string) =
            if seen.Add m then
                match m with
                | :? TorchSharp.Modules.Sequential as sq ->
                    let children = Conversion.childrenOf sq |> Array.ofList

                    for i in 0 .. children.Length - 2 do
                        let _, conv = children[i]
                        let name, norm = children[i + 1]

                        match conv, batchNormOf norm with
                        | (:? TorchSharp.Modules.Conv1d | :? TorchSharp.Modules.Conv2d | :? TorchSharp.Modules.Conv3d),
                          Some(mean, var, gamma, beta, eps) ->
                            let conv = conv :?> TorchSharp.Modules.Convolution
                            use _ = torch.no_grad ()
                            let f64 = torch.ScalarType.Float64
                            let w = conv.weight
                            let s64 = (var.to_type f64 + eps).rsqrt ()

                            let s64 = if isNull gamma then s64 else s64 * gamma.to_type f64

                            let shape = Array.init (int (w.dim ())) (fun d -> if d = 0 then -1L else 1L)
                            w.copy_ ((w.to_type f64 * s64.view shape).to_type w.dtype) |> ignore

                            let b0 =
                                if isNull (box conv.bias) then
                                    torch.zeros_like (mean, dtype = f64)
                                else
                                    conv.bias.to_type f64

                            let b = (b0 - mean.to_type f64) * s64
                            let b = if isNull beta then b else b + beta.to_type f64
                            conv.bias <- new TorchSharp.Modules.Parameter(b.to_type(w.dtype).``to`` w.device)

                            let full = if path = "" then name else path + "." + name

                            Conversion.replace
                                {
                                    Parent = sq
                                    Name = name
                                    Path = full
                                    Old = norm
                                    Fields = []
                                }
                                (torch.nn.Identity())

                            fused.Add full
                        | _ -> ()
                | _ -> ()

                for (name, child) in Conversion.childrenOf m do
                    visit child (if path = "" then name else path + "." + name)

        visit model ""
        ConversionResult(model, fused.ToArray(), fused.Count)

/// Loading checkpoints and state dicts with every check done before anything is written (all or nothing).
[<RequireQualifiedAccess>]
module Checkpoint =

    /// <summary>
    /// Reads the entries (name, dtype, shape) of a file written by TorchSharp's <c>Module.save</c>, without loading data.
    /// </summary>
    [<CompiledName("ReadEntries")>]
    let readEntries (path: string) : (string * torch.ScalarType * int64[])[] =
        if not (File.Exists path) then
            raise (FileNotFoundException($"Checkpoint: no file at '{path}'.", path))

        use fs = File.OpenRead path

        try
            StateCheck.readEntries fs
        with :? InvalidDataException as e ->
            raise (InvalidDataException($"Checkpoint: '{path}' is {e.Message}."))

    /// <summary>
    /// Loads a checkpoint written by TorchSharp's <c>Module.save</c> into <paramref name="model"/>, after checking
    /// every key first: keys missing from the file, unexpected keys and tensors whose shape or dtype is not exactly the
    /// model's are all listed in one <see cref="T:System.IO.InvalidDataException"/>, and the model is left unchanged.
    /// With <paramref name="allowMissing"/> true, keys absent from the file keep their current values (for example the
    /// mixture logits when loading a BatchNorm checkpoint into a converted model).
    /// </summary>
    [<CompiledName("Load")>]
    let load (allowMissing: bool) (path: string) (model: torch.nn.Module) : unit =
        let entries = readEntries path
        let sd = model.state_dict ()
        // unexpected keys are always problems; missing ones unless allowed
        let problems, missing = StateCheck.problems true null sd entries

        let problems =
            if allowMissing then
                problems |> List.filter (fun p -> not (p.StartsWith "missing key"))
            else
                problems

        StateCheck.refuse $"Checkpoint '{path}' does not match {model.GetType().Name}" problems
        model.load (path, strict = missing.IsEmpty) |> ignore

    /// <summary>
    /// Loads a state dict into <paramref name="model"/> (any module tree) all or nothing, as PyTorch's load_state_dict
    /// refuses a size mismatch: every tensor's shape and dtype must be exactly the model's (TorchSharp's own
    /// load_state_dict broadcasts with copy_ and writes key by key before failing), and with
    /// <paramref name="strict"/> no key may be missing or unexpected. Every problem is listed in one
    /// <see cref="T:System.IO.InvalidDataException"/> and nothing is written. Returns the missing and the unexpected
    /// keys (both empty when strict).
    /// </summary>
    [<CompiledName("LoadStateDict")>]
    let loadStateDict (strict: bool) (source: IDictionary<string, torch.Tensor>) (model: torch.nn.Module) =
        if isNull source then
            nullArg "source"

        let sd = model.state_dict ()

        let problems, missing =
            StateCheck.problems strict null sd (StateCheck.entriesOf source)

        StateCheck.refuse $"{model.GetType().Name}: load_state_dict" problems

        let unexpected =
            source.Keys |> Seq.filter (fun k -> not (sd.ContainsKey k)) |> List.ofSeq

        use _ = torch.no_grad ()

        for kv in source do
            match sd.TryGetValue kv.Key with
            | true, t -> t.copy_ kv.Value |> ignore
            | _ -> ()

        missing, unexpected
