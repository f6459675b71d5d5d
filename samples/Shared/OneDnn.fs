/// <summary>
/// A workaround for a libtorch defect, not library API: compiled into the samples, the benchmark and the tests, and
/// loaded by the fsi scripts. It applies to libtorch 2.10 (TorchSharp 0.107.0) on AVX-512 AMD EPYC CPUs; remove it
/// once bench/conv-nan-repro.fsx finds no NaN with the libtorch in use.
/// </summary>
module Workarounds.OneDnn

open System
open System.Runtime.InteropServices

[<DllImport("libc", EntryPoint = "setenv")>]
extern int private setenv(string name, string value, int overwrite)

/// <summary>
/// Limits oneDNN (libtorch's CPU convolution library) to AVX2 kernels by setting <c>ONEDNN_MAX_CPU_ISA=AVX2</c>
/// in the native environment, unless the variable is already set. On AVX-512 AMD EPYC machines, libtorch 2.10's
/// Conv2d backward returns NaN input gradients in many calls for small channel counts (for example 44 of 200 calls
/// of Conv2d(4, 4, 3) on (2, 4, 12, 12); none with AVX2 kernels; see bench/conv-nan-repro.fsx). oneDNN reads the
/// variable once, at its first use, so call this before any convolution runs. Returns whether the limit is in
/// force. Has no effect on Windows, where it returns false.
/// </summary>
let limitOneDnnToAvx2 () : bool =
    let current = Environment.GetEnvironmentVariable "ONEDNN_MAX_CPU_ISA"

    if not (String.IsNullOrEmpty current) then
        String.Equals(current, "AVX2", StringComparison.OrdinalIgnoreCase)
    elif RuntimeInformation.IsOSPlatform OSPlatform.Windows then
        false
    else
        // .NET's Environment.SetEnvironmentVariable does not reach the native environment on Unix.
        let ok = setenv ("ONEDNN_MAX_CPU_ISA", "AVX2", 0) = 0

        if ok then
            Environment.SetEnvironmentVariable("ONEDNN_MAX_CPU_ISA", "AVX2")

        ok
