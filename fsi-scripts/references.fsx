// Shared references for the scripts in this folder and in docs/: SwitchNorm from its package, as a script of your own
// gets it. The package comes from the local feed that this command makes at the root (the test command runs it):
//
//     dotnet pack -c Release -o artifacts/feed -p:VersionSuffix=local.$(date +%s)
//
// found through the nuget.config beside the scripts ("../artifacts/feed"); the version range takes the newest local
// pack, so a repack is always seen. libtorch's CPU backend is the application's choice, as with TorchSharp itself.
#r "nuget: SwitchNorm.FSharp, 0.3.0-local.*"
#r "nuget: libtorch-cpu-linux-x64, 2.10.0"

// Loads the native backend (on Debian 12, TorchSharp 0.107.0's libLibTorchSharp.so needs GLIBCXX_3.4.32: Backend.Load
// loads a patched copy kept in ~/.local/share/switchnorm) before the first use of torch.
SwitchNorm.Backend.Load()

// libtorch's oneDNN convolutions have an AVX-512 defect on some CPUs (NaN input gradients); see OneDnn.fs.
#load "../samples/Shared/OneDnn.fs"
Workarounds.OneDnn.limitOneDnnToAvx2 () |> ignore
