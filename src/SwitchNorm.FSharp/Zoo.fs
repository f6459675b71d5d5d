namespace SwitchNorm

open System
open TorchSharp
open TorchSharp.Modules

/// The official model zoo's building blocks (switchablenorms/Switchable-Normalization, imagenet/models), with the
/// official module names, so that state-dict keys are exactly the official ones.
module internal ZooBlocks =

    let conv3x3 (inPlanes: int64) (outPlanes: int64) (stride: int64) =
        torch.nn.Conv2d(inPlanes, outPlanes, 3L, stride = stride, padding = 1L, bias = false)

    let conv1x1 (inPlanes: int64) (outPlanes: int64) (stride: int64) =
        torch.nn.Conv2d(inPlanes, outPlanes, 1L, stride = stride, bias = false)

    /// An official-semantics SwitchNorm2d as the zoo builds it: the official default momentum (keep factor 0.9).
    let sn (channels: int64) (usingMovingAverage: bool) (usingBn: bool) (lastGamma: bool) =
        SwitchNorm2d.Official(channels, using_moving_average = usingMovingAverage, using_bn = usingBn, last_gamma = lastGamma)

    let relu (x: torch.Tensor) = torch.nn.functional.relu x

/// Options shared by the blocks of one network.
type internal ZooOptions = {
    UsingMovingAverage: bool
    UsingBn: bool
    LastGamma: bool
}

/// The official v1 (post-activation) BasicBlock: conv1, sn1, relu, conv2, sn2 (last_gamma), + downsample(x), relu.
type internal BasicBlockV1
    (inPlanes: int64, planes: int64, stride: int64, downsample: torch.nn.Module<torch.Tensor, torch.Tensor>, o: ZooOptions) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("BasicBlock")
    let conv1 = ZooBlocks.conv3x3 inPlanes planes stride
    let sn1 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn false
    let conv2 = ZooBlocks.conv3x3 planes planes 1L
    let sn2 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn o.LastGamma

    do
        this.register_module ("conv1", conv1)
        this.register_module ("sn1", sn1)
        this.register_module ("conv2", conv2)
        this.register_module ("sn2", sn2)

        if not (isNull downsample) then
            this.register_module ("downsample", downsample)

    override _.forward(x) =
        use scope = torch.NewDisposeScope()

        let out =
            x
            |> conv1.forward
            |> sn1.forward
            |> ZooBlocks.relu
            |> conv2.forward
            |> sn2.forward

        let residual = if isNull downsample then x else downsample.forward x
        ZooBlocks.relu(out + residual).MoveToOuterDisposeScope()

/// The official v1 Bottleneck: 1×1 conv1/sn1, 3×3 conv2 (the stride)/sn2, 1×1 conv3 (×4)/sn3 (last_gamma).
type internal BottleneckV1
    (inPlanes: int64, planes: int64, stride: int64, downsample: torch.nn.Module<torch.Tensor, torch.Tensor>, o: ZooOptions) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Bottleneck")
    let conv1 = ZooBlocks.conv1x1 inPlanes planes 1L
    let sn1 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn false
    let conv2 = ZooBlocks.conv3x3 planes planes stride
    let sn2 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn false
    let conv3 = ZooBlocks.conv1x1 planes (planes * 4L) 1L
    let sn3 = ZooBlocks.sn (planes * 4L) o.UsingMovingAverage o.UsingBn o.LastGamma

    do
        this.register_module ("conv1", conv1)
        this.register_module ("sn1", sn1)
        this.register_module ("conv2", conv2)
        this.register_module ("sn2", sn2)
        this.register_module ("conv3", conv3)
        this.register_module ("sn3", sn3)

        if not (isNull downsample) then
            this.register_module ("downsample", downsample)

    override _.forward(x) =
        use scope = torch.NewDisposeScope()

        let out =
            x
            |> conv1.forward
            |> sn1.forward
            |> ZooBlocks.relu
            |> conv2.forward
            |> sn2.forward
            |> ZooBlocks.relu
            |> conv3.forward
            |> sn3.forward

        let residual = if isNull downsample then x else downsample.forward x
        ZooBlocks.relu(out + residual).MoveToOuterDisposeScope()

/// The official v2 (pre-activation) BasicBlock: sn1, relu (the pre-activation), conv1, sn2, relu, conv2, +
/// downsample(pre-activation) or x.
type internal BasicBlockV2
    (inPlanes: int64, planes: int64, stride: int64, downsample: torch.nn.Module<torch.Tensor, torch.Tensor>, o: ZooOptions) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("BasicBlock")
    let sn1 = ZooBlocks.sn inPlanes o.UsingMovingAverage o.UsingBn false
    let conv1 = ZooBlocks.conv3x3 inPlanes planes stride
    let sn2 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn false
    let conv2 = ZooBlocks.conv3x3 planes planes 1L

    do
        this.register_module ("sn1", sn1)
        this.register_module ("conv1", conv1)
        this.register_module ("sn2", sn2)
        this.register_module ("conv2", conv2)

        if not (isNull downsample) then
            this.register_module ("downsample", downsample)

    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let pre = x |> sn1.forward |> ZooBlocks.relu
        let out = pre |> conv1.forward |> sn2.forward |> ZooBlocks.relu |> conv2.forward
        let residual = if isNull downsample then x else downsample.forward pre
        (out + residual).MoveToOuterDisposeScope()

/// The official v2 Bottleneck: sn1, relu (the pre-activation), 1×1 conv1, sn2, relu, 3×3 conv2 (the stride), sn3,
/// relu, 1×1 conv3 (×4), + downsample(pre-activation) or x.
type internal BottleneckV2
    (inPlanes: int64, planes: int64, stride: int64, downsample: torch.nn.Module<torch.Tensor, torch.Tensor>, o: ZooOptions) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Bottleneck")
    let sn1 = ZooBlocks.sn inPlanes o.UsingMovingAverage o.UsingBn false
    let conv1 = ZooBlocks.conv1x1 inPlanes planes 1L
    let sn2 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn false
    let conv2 = ZooBlocks.conv3x3 planes planes stride
    let sn3 = ZooBlocks.sn planes o.UsingMovingAverage o.UsingBn false
    let conv3 = ZooBlocks.conv1x1 planes (planes * 4L) 1L

    do
        this.register_module ("sn1", sn1)
        this.register_module ("conv1", conv1)
        this.register_module ("sn2", sn2)
        this.register_module ("conv2", conv2)
        this.register_module ("sn3", sn3)
        this.register_module ("conv3", conv3)

        if not (isNull downsample) then
            this.register_module ("downsample", downsample)

    override _.forward(x) =
        use scope = torch.NewDisposeScope()
        let pre = x |> sn1.forward |> ZooBlocks.relu

        let out =
            pre
            |> conv1.forward
            |> sn2.forward
            |> ZooBlocks.relu
            |> conv2.forward
            |> sn3.forward
            |> ZooBlocks.relu
            |> conv3.forward

        let residual = if isNull downsample then x else downsample.forward pre
        (out + residual).MoveToOuterDisposeScope()

/// Which residual block a network uses.
type internal BlockKind =
    | Basic
    | Bottleneck

    member this.Expansion =
        match this with
        | Basic -> 1L
        | Bottleneck -> 4L

/// The four stages shared by both official ResNets.
module internal ZooStages =

    type private Module = torch.nn.Module<torch.Tensor, torch.Tensor>

    /// <summary>
    /// layer1..layer4 (64, 128, 256, 512 planes; stride 1, 2, 2, 2), as the official _make_layer builds them: a
    /// stage's first block gets <paramref name="downsample"/> (in, out, stride) when its stride or width changes,
    /// the others none; <paramref name="make"/> (in, planes, stride, downsample) builds one block.
    /// </summary>
    let build
        (block: BlockKind)
        (layers: int list)
        (downsample: int64 -> int64 -> int64 -> Module)
        (make: int64 -> int64 -> int64 -> Module -> Module)
        =
        List.zip3 [ 64L; 128L; 256L; 512L ] layers [ 1L; 2L; 2L; 2L ]
        |> List.mapFold
            (fun inPlanes (planes, blocks, stride) ->
                let out = planes * block.Expansion

                let ds =
                    if stride <> 1L || inPlanes <> out then
                        downsample inPlanes out stride
                    else
                        null

                let first = make inPlanes planes stride ds
                let rest = [ for _ in 2..blocks -> make out planes 1L null ]

                torch.nn.Sequential((first :: rest) |> List.mapi (fun i m -> struct (string i, m)) |> Array.ofList), out)
            64L
        |> fst

/// <summary>
/// The official ResNet v1 with Switchable Normalization (imagenet/models/resnet_v1_sn.py's ResNetV1SN): conv1 (7×7,
/// stride 2), sn1, relu, maxpool (3×3, stride 2), layer1..layer4, avgpool (7×7, stride 1, so 224×224 inputs),
/// dropout 0.5 (named <c>drouput</c>, as officially), fc. Every SN layer has Semantics.Official; state-dict keys are
/// exactly the official model's without the DataParallel prefix. Build it with the <c>resnetv1sn*</c> factories.
/// </summary>
type ResNetV1SN internal (block: BlockKind, layers: int list, numClasses: int64, o: ZooOptions) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("ResNetV1SN")
    let conv1 = torch.nn.Conv2d(3L, 64L, 7L, stride = 2L, padding = 3L, bias = false)
    let sn1 = ZooBlocks.sn 64L o.UsingMovingAverage o.UsingBn false
    let maxpool = torch.nn.MaxPool2d(3L, stride = 2L, padding = 1L)

    let layer1, layer2, layer3, layer4 =
        let downsample (inp: int64) (out: int64) (stride: int64) : torch.nn.Module<torch.Tensor, torch.Tensor> =
            torch.nn.Sequential(
                [|
                    struct ("0", ZooBlocks.conv1x1 inp out stride :> torch.nn.Module<torch.Tensor, torch.Tensor>)
                    struct ("1", ZooBlocks.sn out o.UsingMovingAverage o.UsingBn false :> torch.nn.Module<torch.Tensor, torch.Tensor>)
                |]
            )

        let make inp planes s ds : torch.nn.Module<torch.Tensor, torch.Tensor> =
            match block with
            | Basic -> new BasicBlockV1(inp, planes, s, ds, o)
            | Bottleneck -> new BottleneckV1(inp, planes, s, ds, o)

        match ZooStages.build block layers downsample make with
        | [ a; b; c; d ] -> a, b, c, d
        | _ -> invalidOp "unreachable: four stages"

    let avgpool = torch.nn.AvgPool2d(7L, stride = 1L)
    let dropout = torch.nn.Dropout(0.5)
    let fc = torch.nn.Linear(512L * block.Expansion, numClasses)

    do
        for (name, m) in
            [
                "conv1", conv1 :> torch.nn.Module
                "sn1", sn1
                "maxpool", maxpool
                "layer1", layer1
                "layer2", layer2
                "layer3", layer3
                "layer4", layer4
                "avgpool", avgpool
                "drouput", dropout
                "fc", fc
            ] do
            this.register_module (name, m)

        Zoo.initConvolutions this

    override _.forward(x) =
        use scope = torch.NewDisposeScope()

        let x =
            x
            |> conv1.forward
            |> sn1.forward
            |> ZooBlocks.relu
            |> maxpool.forward
            |> layer1.forward
            |> layer2.forward
            |> layer3.forward
            |> layer4.forward
            |> avgpool.forward

        x.view (x.size 0, -1L)
        |> dropout.forward
        |> fc.forward
        |> _.MoveToOuterDisposeScope()

/// <summary>
/// The official pre-activation ResNet v2 with Switchable Normalization (imagenet/models/resnet_v2_sn.py's
/// ResNetV2SN): conv1, sn1, relu, maxpool, layer1..layer4 (pre-activation blocks; downsample a bare 1×1 convolution of
/// the pre-activation), sn_out, relu, avgpool (7×7), dropout 0.5 (<c>drouput</c>), fc. Every SN layer has
/// Semantics.Official; keys are exactly the official ones. Build it with the <c>resnetv2sn*</c> factories.
/// </summary>
and ResNetV2SN internal (block: BlockKind, layers: int list, numClasses: int64, o: ZooOptions) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("ResNetV2SN")
    let conv1 = torch.nn.Conv2d(3L, 64L, 7L, stride = 2L, padding = 3L, bias = false)
    let sn1 = ZooBlocks.sn 64L o.UsingMovingAverage o.UsingBn false
    let maxpool = torch.nn.MaxPool2d(3L, stride = 2L, padding = 1L)

    let layer1, layer2, layer3, layer4 =
        let downsample (inp: int64) (out: int64) (stride: int64) : torch.nn.Module<torch.Tensor, torch.Tensor> =
            ZooBlocks.conv1x1 inp out stride

        let make inp planes s ds : torch.nn.Module<torch.Tensor, torch.Tensor> =
            match block with
            | Basic -> new BasicBlockV2(inp, planes, s, ds, o)
            | Bottleneck -> new BottleneckV2(inp, planes, s, ds, o)

        match ZooStages.build block layers downsample make with
        | [ a; b; c; d ] -> a, b, c, d
        | _ -> invalidOp "unreachable: four stages"

    let snOut =
        ZooBlocks.sn (512L * block.Expansion) o.UsingMovingAverage o.UsingBn false

    let avgpool = torch.nn.AvgPool2d(7L, stride = 1L)
    let dropout = torch.nn.Dropout(0.5)
    let fc = torch.nn.Linear(512L * block.Expansion, numClasses)

    do
        for (name, m) in
            [
                "conv1", conv1 :> torch.nn.Module
                "sn1", sn1
                "maxpool", maxpool
                "layer1", layer1
                "layer2", layer2
                "layer3", layer3
                "layer4", layer4
                "sn_out", snOut
                "avgpool", avgpool
                "drouput", dropout
                "fc", fc
            ] do
            this.register_module (name, m)

        Zoo.initConvolutions this

    override _.forward(x) =
        use scope = torch.NewDisposeScope()

        let x =
            x
            |> conv1.forward
            |> sn1.forward
            |> ZooBlocks.relu
            |> maxpool.forward
            |> layer1.forward
            |> layer2.forward
            |> layer3.forward
            |> layer4.forward
            |> snOut.forward
            |> ZooBlocks.relu
            |> avgpool.forward

        x.view (x.size 0, -1L)
        |> dropout.forward
        |> fc.forward
        |> _.MoveToOuterDisposeScope()

/// The zoo's shared construction.
and internal Zoo =

    /// The official initialisation of the convolutions: normal(0, sqrt(2 / (k·k·out_channels))).
    static member initConvolutions(m: torch.nn.Module) =
        use _ = torch.no_grad ()

        for struct (_, child) in m.named_modules () do
            match child with
            | :? Conv2d as c ->
                let k = c.weight.shape
                let n = float (k[2] * k[3] * k[0])
                c.weight.normal_ (0.0, sqrt (2.0 / n)) |> ignore
            | _ -> ()

    static member Layers(depth: int) =
        match depth with
        | 18 -> Basic, [ 2; 2; 2; 2 ]
        | 34 -> Basic, [ 3; 4; 6; 3 ]
        | 50 -> Bottleneck, [ 3; 4; 6; 3 ]
        | 101 -> Bottleneck, [ 3; 4; 23; 3 ]
        | 152 -> Bottleneck, [ 3; 8; 36; 3 ]
        | d -> raise (ArgumentOutOfRangeException("depth", d, $"the official ResNets have depth 18, 34, 50, 101 or 152; got {d}."))

    static member Check(name: string, numClasses: int64) =
        Backend.Load()

        if numClasses <= 0L then
            raise (ArgumentOutOfRangeException("num_classes", numClasses, $"{name}: num_classes must be positive; got {numClasses}."))

    static member V1(depth: int, numClasses: int64, usingBn: bool, usingMovingAverage: bool, lastGamma: bool) =
        Zoo.Check($"resnetv1sn{depth}", numClasses)
        let block, layers = Zoo.Layers depth

        new ResNetV1SN(
            block,
            layers,
            numClasses,
            {
                UsingMovingAverage = usingMovingAverage
                UsingBn = usingBn
                LastGamma = lastGamma
            }
        )

    static member V2(depth: int, numClasses: int64, usingBn: bool, usingMovingAverage: bool, lastGamma: bool) =
        Zoo.Check($"resnetv2sn{depth}", numClasses)

        if lastGamma then
            raise (
                ArgumentException(
                    $"resnetv2sn{depth}: the official ResNetV2SN has no last_gamma (its pre-activation blocks end with a convolution, not an SN layer); use last_gamma = false.",
                    "last_gamma"
                )
            )

        let block, layers = Zoo.Layers depth

        new ResNetV2SN(
            block,
            layers,
            numClasses,
            {
                UsingMovingAverage = usingMovingAverage
                UsingBn = usingBn
                LastGamma = false
            }
        )

namespace SwitchNorm.FSharp

open TorchSharp
open SwitchNorm

/// The options of the official ResNet constructors.
type ResNetOptions = {
    /// Classes of the final fc layer (official default 1000).
    NumClasses: int64
    /// Whether every SN layer mixes BN (official default true; false gives the (8,1) models' IN + LN).
    UsingBn: bool
    /// Whether the running statistics are a moving average (official default true; false: raw sums).
    UsingMovingAverage: bool
    /// Whether each v1 block's last SN weight starts at 0 (official ResNetV1SN default true; v2 has none).
    LastGamma: bool
} with

    /// The official ResNetV1SN defaults: 1000 classes, BN, moving average, last_gamma.
    static member V1 = {
        NumClasses = 1000L
        UsingBn = true
        UsingMovingAverage = true
        LastGamma = true
    }

    /// The official ResNetV2SN defaults: 1000 classes, BN, moving average (no last_gamma).
    static member V2 = {
        ResNetOptions.V1 with
            LastGamma = false
    }

/// <summary>
/// The official Switchable Normalization model zoo (switchablenorms/Switchable-Normalization, imagenet/models), as
/// TorchVision's models are for TorchSharp: ResNet v1 and v2 of depth 18, 34, 50, 101 and 152, with the official
/// module names (state-dict keys exactly the official ones, without the DataParallel prefix) and Semantics.Official in
/// every SN layer, so official checkpoints load with <c>PyTorch.load</c> and compute the official numbers. Inputs are
/// (N, 3, 224, 224): the final average pooling is the official 7×7. Pipelines read
/// <c>Models.resnetv1sn50 { ResNetOptions.V1 with NumClasses = 10L }</c>.
/// </summary>
[<RequireQualifiedAccess>]
module Models =

    let private v1 depth (o: ResNetOptions) : torch.nn.Module<torch.Tensor, torch.Tensor> =
        Zoo.V1(depth, o.NumClasses, o.UsingBn, o.UsingMovingAverage, o.LastGamma)

    let private v2 depth (o: ResNetOptions) : torch.nn.Module<torch.Tensor, torch.Tensor> =
        Zoo.V2(depth, o.NumClasses, o.UsingBn, o.UsingMovingAverage, o.LastGamma)

    /// ResNet-18 v1 with SN (BasicBlock, [2, 2, 2, 2]).
    let resnetv1sn18 o = v1 18 o
    /// ResNet-34 v1 with SN (BasicBlock, [3, 4, 6, 3]).
    let resnetv1sn34 o = v1 34 o
    /// ResNet-50 v1 with SN (Bottleneck, [3, 4, 6, 3]).
    let resnetv1sn50 o = v1 50 o
    /// ResNet-101 v1 with SN (Bottleneck, [3, 4, 23, 3]).
    let resnetv1sn101 o = v1 101 o
    /// ResNet-152 v1 with SN (Bottleneck, [3, 8, 36, 3]).
    let resnetv1sn152 o = v1 152 o
    /// Pre-activation ResNet-18 v2 with SN (BasicBlock, [2, 2, 2, 2]); LastGamma must be false.
    let resnetv2sn18 o = v2 18 o
    /// Pre-activation ResNet-34 v2 with SN (BasicBlock, [3, 4, 6, 3]); LastGamma must be false.
    let resnetv2sn34 o = v2 34 o
    /// Pre-activation ResNet-50 v2 with SN (Bottleneck, [3, 4, 6, 3]); LastGamma must be false.
    let resnetv2sn50 o = v2 50 o
    /// Pre-activation ResNet-101 v2 with SN (Bottleneck, [3, 4, 23, 3]); LastGamma must be false.
    let resnetv2sn101 o = v2 101 o
    /// Pre-activation ResNet-152 v2 with SN (Bottleneck, [3, 8, 36, 3]); LastGamma must be false.
    let resnetv2sn152 o = v2 152 o
