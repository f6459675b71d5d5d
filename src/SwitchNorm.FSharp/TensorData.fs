namespace SwitchNorm

#nowarn "9" // native pointers: the row path reads and writes tensor memory directly

open System.Runtime.CompilerServices
open System.Runtime.InteropServices
open Microsoft.FSharp.NativeInterop
open TorchSharp

/// <summary>
/// Tensor ↔ array interop, the only place that reads or makes tensors from .NET arrays. Small tensors (weights,
/// logits, running statistics) are read straight from their memory when they are contiguous float32 or float64 CPU
/// tensors: TorchSharp's data&lt;T&gt;().ToArray() costs several native calls per read.
/// </summary>
module internal TensorData =

    /// A small tensor's values as float64.
    let read (t: torch.Tensor) : float[] =
        let direct = t.device_type = DeviceType.CPU && t.is_contiguous ()

        if direct && t.dtype = torch.ScalarType.Float64 then
            MemoryMarshal.Cast<byte, float>(t.bytes).ToArray()
        elif direct && t.dtype = torch.ScalarType.Float32 then
            let src = MemoryMarshal.Cast<byte, float32>(t.bytes)
            let a = Array.zeroCreate src.Length

            for i in 0 .. src.Length - 1 do
                a[i] <- float src[i]

            a
        else
            use d = t.detach().to_type(torch.ScalarType.Float64).cpu().contiguous ()
            MemoryMarshal.Cast<byte, float>(d.bytes).ToArray()

    /// A small tensor's values as float64, or None for a null tensor.
    let readOption (t: torch.Tensor) : float[] option = if isNull t then None else Some(read t)

    /// A CPU tensor of the given dtype holding the float64 values v, made directly when the dtype is float32 or float64.
    let tensorOf (dtype: torch.ScalarType) (v: float[]) =
        match dtype with
        | torch.ScalarType.Float32 -> torch.tensor (Array.map float32 v)
        | torch.ScalarType.Float64 -> torch.tensor (v, dtype = torch.ScalarType.Float64)
        | other -> torch.tensor(v, dtype = torch.ScalarType.Float64).to_type other

    /// A tensor of like's dtype and device holding the float64 values v (made directly on the CPU).
    let tensorLike (like: torch.Tensor) (v: float[]) =
        let t = tensorOf like.dtype v

        if like.device_type = DeviceType.CPU then
            t
        else
            t.``to`` like.device

    /// The address of a contiguous CPU tensor's first element, as float32.
    let pointer (t: torch.Tensor) : nativeptr<float32> =
        let bytes = t.bytes
        NativePtr.ofVoidPtr (Unsafe.AsPointer(&MemoryMarshal.GetReference bytes))
