namespace SwitchNorm

open System
open TorchSharp
open SwitchNorm.FSharp

/// <summary>
/// A switchable normalizer built from any spec (components, switch, eps, momentum); accepts inputs of rank 2
/// to 5. <see cref="T:SwitchNorm.SwitchNorm2d"/> and its siblings are the paper's spec with a fixed rank.
/// </summary>
type SwitchNormLayer
    internal
    (
        spec: NormSpec,
        numFeatures: int64,
        affine: bool,
        trackRunningStats: bool,
        lastGamma: bool,
        device: torch.Device,
        dtype: Nullable<torch.ScalarType>
    ) =
    inherit
        SwitchNormNd(
            "SwitchNorm",
            [ 2; 3; 4; 5 ],
            "an input of shape (N, C, *spatial) with 0 to 3 spatial dimensions",
            spec,
            numFeatures,
            affine,
            trackRunningStats,
            lastGamma,
            device,
            dtype,
            None
        )

/// A module that applies an F# function (no parameters); see <c>Layer.ofFn</c>.
type FnLayer internal (name: string, f: torch.Tensor -> torch.Tensor) =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>(name)

    /// Applies the function.
    override _.forward(x) = f x

namespace SwitchNorm.FSharp

open System
open TorchSharp
open SwitchNorm

/// <summary>
/// The F# combinator API: build normalizers from statistic estimators and a switch, apply them as pure
/// functions, and compose layers in pipelines without casts.
/// </summary>
/// <example>
/// <code>
/// let norm = Norm.paper |> Norm.withEps 1e-3
/// let block = conv &gt;-&gt; Norm.layer norm 64L &gt;-&gt; Layer.ofFn "relu" torch.nn.functional.relu
/// </code>
/// </example>
[<RequireQualifiedAccess>]
module Norm =

    /// The paper's normalizer: softmax mixture of [IN; LN; BN], eps = 1e-5, momentum = 0.1.
    let paper: NormSpec = Functional.paper

    /// A softmax mixture of the given statistics, in logit order.
    let ofComponents (components: Component list) : NormSpec =
        if List.isEmpty components then
            invalidArg "components" "Norm.ofComponents: at least one statistic is needed."

        if List.distinct components <> components then
            invalidArg "components" $"Norm.ofComponents: each statistic may appear once; got {components}."

        { paper with Components = components }

    /// IN and LN only: no batch dependence, so any batch size (including 1) trains and evaluates alike.
    let instanceLayer: NormSpec = ofComponents [ Instance; Layer ]

    /// Replaces the switch (logits → convex weights).
    let withSwitch (switch: Switch) (spec: NormSpec) = { spec with Switch = switch }

    /// Replaces eps (must be positive).
    let withEps (eps: float) (spec: NormSpec) =
        Checks.constructorArgs "Norm.withEps" 1L eps (Nullable Defaults.Momentum)
        { spec with Eps = eps }

    /// Replaces the momentum; None means a cumulative average.
    let withMomentum (momentum: float option) (spec: NormSpec) =
        Checks.constructorArgs "Norm.withMomentum" 1L Defaults.Eps (Option.toNullable momentum)
        { spec with Momentum = momentum }

    /// <summary>
    /// BN pools over the ranks of <paramref name="communicator"/> (Scope.Across): what SyncSwitchNorm does, for the
    /// functional API. Collective when BN uses the batch: every rank must apply the normalizer, then call backward.
    /// </summary>
    let across (communicator: ICommunicator) (spec: NormSpec) =
        if isNull (box communicator) then
            nullArg "communicator"

        {
            spec with
                Scope = Scope.Across communicator
        }

    /// Applies the normalizer as a pure function (see <c>Functional.forward</c>).
    let apply (spec: NormSpec) (p: NormParams) (running: RunningStats option) (mode: Mode) (x: torch.Tensor) =
        Functional.forward spec p running mode x

    /// Fresh parameters for C channels: weight 1, bias 0, logits at ones (as in the paper).
    let initParams (spec: NormSpec) (numFeatures: int64) : NormParams =
        Backend.Load()
        let k = int64 (List.length spec.Components)

        {
            Weight = Some(torch.ones numFeatures)
            Bias = Some(torch.zeros numFeatures)
            MeanLogits = torch.ones k
            VarLogits = torch.ones k
        }

    /// Fresh running statistics for C channels: mean 0, variance 1, no batch tracked.
    let initRunning (numFeatures: int64) : RunningStats =
        Backend.Load()

        {
            Mean = torch.zeros numFeatures
            Var = torch.ones numFeatures
            BatchesTracked = 0L
        }

    /// A module for C channels from a spec: affine, tracking running statistics, default dtype, CPU.
    let layer (spec: NormSpec) (numFeatures: int64) : torch.nn.Module<torch.Tensor, torch.Tensor> =
        new SwitchNormLayer(spec, numFeatures, true, true, false, null, Nullable()) :> _

/// Helpers to build and compose TorchSharp layers from F#.
[<RequireQualifiedAccess>]
module Layer =

    /// Wraps a function as a parameterless module (ocaml-torch's of_fn).
    let ofFn (name: string) (f: torch.Tensor -> torch.Tensor) : torch.nn.Module<torch.Tensor, torch.Tensor> = new FnLayer(name, f) :> _

    let private items (m: torch.nn.Module<torch.Tensor, torch.Tensor>) =
        match m with
        | :? TorchSharp.Modules.Sequential as s -> [
            for struct (_, c) in s.named_children () -> c :?> torch.nn.Module<torch.Tensor, torch.Tensor>
          ]
        | _ -> [ m ]

    /// A Sequential of the given layers, named "0", "1", ... in order.
    let sequential (layers: torch.nn.Module<torch.Tensor, torch.Tensor> seq) : torch.nn.Module<torch.Tensor, torch.Tensor> =
        torch.nn.Sequential(layers |> Seq.mapi (fun i l -> struct (string i, l)) |> Array.ofSeq) :> _

    /// Composes two layers (flattening Sequentials), so pipelines need no casts.
    let compose (a: torch.nn.Module<torch.Tensor, torch.Tensor>) (b: torch.nn.Module<torch.Tensor, torch.Tensor>) =
        sequential (items a @ items b)

/// Operators for composing layers.
[<AutoOpen>]
module LayerOperators =

    /// <summary>Composes two layers of any concrete module types: <c>conv &gt;-&gt; norm &gt;-&gt; relu</c>.</summary>
    let inline (>->) (a: #torch.nn.Module<torch.Tensor, torch.Tensor>) (b: #torch.nn.Module<torch.Tensor, torch.Tensor>) =
        Layer.compose (a :> torch.nn.Module<torch.Tensor, torch.Tensor>) (b :> torch.nn.Module<torch.Tensor, torch.Tensor>)
