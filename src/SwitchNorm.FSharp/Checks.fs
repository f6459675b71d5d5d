namespace SwitchNorm

open System
open TorchSharp

/// Argument and input checks shared by the core and the modules. Every message names what was expected
/// and what arrived.
[<RequireQualifiedAccess>]
module Checks =

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

        if x.size 0 = 0L || x.numel () = 0L then
            raise (ArgumentException($"{layer} expects a non-empty input; got shape {shapeText x.shape}.", "input"))

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
