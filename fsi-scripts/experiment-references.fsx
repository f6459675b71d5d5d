// References for mixture-plot.fsx, which runs the experiment's own model and plotting code, and for the scripts in
// bench/ (a folder with projects, where a nuget.config naming the local feed would take part in their restore): the assemblies and native
// libraries that `dotnet build -c Release samples/SwitchNorm.Experiment` puts in its output folder, so that the
// experiment's assembly and the library it was built against are the same files. (The other scripts take the
// package: references.fsx.)
//
// The native libraries are loaded by full path before TorchSharp initialises, so TorchSharp's own
// lookup finds them already loaded (their libLibTorchSharp.so was made loadable on Debian 12 by the
// build; see build/LibTorchSharpGlibcxxFix.targets), and no system-wide libtorch can be picked up instead.
#r "../samples/SwitchNorm.Experiment/bin/Release/net10.0/TorchSharp.dll"
#r "../samples/SwitchNorm.Experiment/bin/Release/net10.0/SwitchNorm.FSharp.dll"

open System.IO
open System.Runtime.InteropServices

let private nativeDir =
    Path.Combine(__SOURCE_DIRECTORY__, "../samples/SwitchNorm.Experiment/bin/Release/net10.0/runtimes/linux-x64/native")

if RuntimeInformation.IsOSPlatform OSPlatform.Linux then
    if not (Directory.Exists nativeDir) then
        failwithf "Native libraries not found in %s: run `dotnet build -c Release samples/SwitchNorm.Experiment` first." nativeDir

    for lib in [ "libc10.so"; "libtorch_cpu.so"; "libtorch.so"; "libLibTorchSharp.so" ] do
        NativeLibrary.Load(Path.Combine(nativeDir, lib)) |> ignore

// libtorch's oneDNN convolutions have an AVX-512 defect on some CPUs (NaN input gradients); see OneDnn.fs.
#load "../samples/Shared/OneDnn.fs"
Workarounds.OneDnn.limitOneDnnToAvx2 () |> ignore
