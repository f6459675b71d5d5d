namespace SwitchNorm

open System
open TorchSharp

/// The C# facade and the test projects see the internal checks (the facade validates its factories' arguments with
/// the same rules and messages as the modules).
module internal AssemblyInfo =
    [<assembly: System.Runtime.CompilerServices.InternalsVisibleTo("SwitchNorm.CSharp")>]
    [<assembly: System.Runtime.CompilerServices.InternalsVisibleTo("SwitchNorm.Tests")>]
    do ()

/// Argument and input checks shared by the core and the modules. Every message names what was expected
/// and what arrived.
[<RequireQualifiedAccess>]
module internal Checks =

    /// Formats a tensor shape as "[2, 3, 4]".
    let shapeText (shape: int64[]) = "[" + String.Join(", ", shape) + "]"

    /// True for the floating-point dtypes the layer accepts.
    let isFloating (dtype: torch.ScalarType) =
        match dtype with
        | torch.ScalarType.Float16
        | torch.ScalarType.BFloat16
        | torch.ScalarType.Float32
        | torch.ScalarType.Float64 -> true
        | _ -> false

    /// True for float16 and bfloat16, whose statistics are accumulated in float32.
    let isHalf (dtype: torch.ScalarType) =
        dtype = torch.ScalarType.Float16 || dtype = torch.ScalarType.BFloat16

    /// Checks a layer's constructor arguments (the rules of torch.nn.BatchNorm2d plus ours).
    let constructorArgs (layer: string) (numFeatures: int64) (eps: float) (momentum: Nullable<float>) =
        if numFeatures <= 0L then
            raise (ArgumentOutOfRangeException("num_features", numFeatures, $"{layer}: num_features must be positive; got {numFeatures}."))

        if not (eps > 0.0) || Double.IsInfinity eps then
            raise (ArgumentOutOfRangeException("eps", eps, $"{layer}: eps must be a positive finite number; got {eps}."))

        if momentum.HasValue && not (momentum.Value >= 0.0 && momentum.Value <= 1.0) then
            raise (
                ArgumentOutOfRangeException(
                    "momentum",
                    momentum.Value,
                    $"{layer}: momentum must lie in [0, 1] (or be null for a cumulative average); got {momentum.Value}."
                )
            )

    /// The dtype the statistics are computed in: float32 for float16/bfloat16 inputs, else the input's own.
    let computeDtype (dtype: torch.ScalarType) =
        if isHalf dtype then torch.ScalarType.Float32 else dtype

    /// Checks the input's dtype is floating point.
    let floatingInput (layer: string) (x: torch.Tensor) =
        if not (isFloating x.dtype) then
            raise (
                ArgumentException(
                    $"{layer} expects a floating-point input (float16, bfloat16, float32 or float64); got {x.dtype}.",
                    "input"
                )
            )

    /// Checks the input carries numFeatures channels in dimension 1 and has at least two dimensions.
    let channels (layer: string) (numFeatures: int64) (x: torch.Tensor) =
        if x.dim () < 2L then
            raise (ArgumentException($"{layer} expects an input of shape (N, C, *spatial); got shape {shapeText x.shape}.", "input"))

        if x.size 1 <> numFeatures then
            raise (
                ArgumentException(
                    $"{layer} expects {numFeatures} channels in dimension 1; got {x.size 1} (input shape {shapeText x.shape}).",
                    "input"
                )
            )

    /// <summary>
    /// Checks that a per-channel tensor (weight, bias, running_mean, running_var) holds exactly C values in one
    /// dimension, as PyTorch's batch_norm does ("running_var should contain 4 elements not 5"): no broadcasting.
    /// </summary>
    let perChannel (layer: string) (what: string) (numFeatures: int64) (t: torch.Tensor) =
        if t.dim () <> 1L || t.size 0 <> numFeatures then
            let got =
                if t.dim () = 1L then
                    $"{t.size 0}"
                else
                    $"{t.numel ()} (shape {shapeText t.shape})"

            raise (ArgumentException($"{layer}: {what} should contain {numFeatures} elements not {got}.", what))

    /// <summary>
    /// Checks that eps is not zero once rounded to the dtype the statistics are computed in: an eps of 1e-300 is a
    /// positive double but 0 in float32, and would give NaN on a constant input.
    /// </summary>
    let epsInDtype (layer: string) (eps: float) (dtype: torch.ScalarType) =
        if dtype = torch.ScalarType.Float32 && float32 eps = 0.0f then
            raise (
                ArgumentOutOfRangeException(
                    "eps",
                    eps,
                    $"{layer}: eps = {eps} is 0 in float32, the dtype the statistics are computed in; use at least 1.5e-45 (1e-5 is the default)."
                )
            )

    /// Checks that a parameter lives on the input's device and has a dtype the input can be combined with:
    /// the same dtype, or float32 parameters with a float16/bfloat16 input (mixed precision).
    let compatible (layer: string) (what: string) (x: torch.Tensor) (p: torch.Tensor) =
        if p.device_type <> x.device_type || p.device_index <> x.device_index then
            raise (ArgumentException($"{layer}: the input is on device {x.device} but {what} is on {p.device}.", "input"))

        let ok = p.dtype = x.dtype || (isHalf x.dtype && p.dtype = torch.ScalarType.Float32)

        if not ok then
            raise (
                ArgumentException(
                    $"{layer}: the input has dtype {x.dtype} but {what} has dtype {p.dtype}; convert one of them (module.to(dtype) or input.to(dtype)).",
                    "input"
                )
            )
