namespace SwitchNorm

open System
open System.IO
open System.Runtime.InteropServices
open System.Text
open TorchSharp

/// <summary>
/// Loads TorchSharp's native backend before the first SwitchNorm layer is made, so that an application or a
/// <c>dotnet fsi</c> script either gets a working TorchSharp or a message that says what to add. On Linux it loads
/// libtorch's libraries by full path from where the application's build put them, or, in a script, from the
/// libtorch-cpu-linux-x64 package that <c>#r "nuget: ..."</c> restored, so that no system-wide libtorch (python3-torch)
/// is picked up instead. When TorchSharp 0.107.0's libLibTorchSharp.so asks for GLIBCXX_3.4.32 and the system's
/// libstdc++ lacks it (Debian 12), it loads a copy patched as the package's build step patches the output's copy (the
/// one version need marked weak; see buildTransitive/SwitchNorm.FSharp.targets), kept in a cache folder of the user's;
/// the NuGet folder is never edited.
/// </summary>
[<AbstractClass; Sealed>]
type Backend private () =

    static let versionName = "GLIBCXX_3.4.32"
    static let mutable loaded = false
    static let gate = obj ()

    /// Whether the bytes contain the null-terminated ASCII string s.
    static let contains (bytes: byte[]) (s: string) =
        let needle = Encoding.ASCII.GetBytes(s + "\000")
        let mutable found = false
        let mutable i = 0

        while not found && i + needle.Length <= bytes.Length do
            let mutable k = 0

            while k < needle.Length && bytes[i + k] = needle[k] do
                k <- k + 1

            found <- k = needle.Length
            i <- i + 1

        found

    /// Whether the system's libstdc++ defines the version (then TorchSharp's library loads as it is).
    static let systemHasVersion () =
        [
            "/usr/lib/x86_64-linux-gnu"
            "/lib/x86_64-linux-gnu"
            "/usr/lib64"
            "/lib64"
            "/usr/lib"
        ]
        |> List.map (fun d -> Path.Combine(d, "libstdc++.so.6"))
        |> List.tryFind File.Exists
        |> Option.map (fun lib -> contains (File.ReadAllBytes lib) versionName)
        |> Option.defaultValue true

    /// <summary>
    /// Sets VER_FLG_WEAK on the ELF version need named <paramref name="name"/> in the file's bytes; returns whether a
    /// strong need was found (the bytes are changed then).
    /// </summary>
    static let markWeak (b: byte[]) (name: string) =
        let u16 (o: int64) = int (BitConverter.ToUInt16(b, int o))
        let u32 (o: int64) = int64 (BitConverter.ToUInt32(b, int o))
        let i64 (o: int64) = BitConverter.ToInt64(b, int o)

        if
            b.Length < 64
            || b[0] <> 0x7fuy
            || b[1] <> byte 'E'
            || b[4] <> 2uy
            || b[5] <> 1uy
        then
            false
        else
            let shoff = i64 0x28L
            let shentsize, shnum = u16 0x3AL, u16 0x3CL
            let header i = shoff + int64 i * int64 shentsize
            let mutable changed = false

            for i in 0 .. shnum - 1 do
                if u32 (header i + 4L) = 0x6ffffffeL then
                    let strOff = i64 (header (int (u32 (header i + 40L))) + 24L)
                    let mutable vn = i64 (header i + 24L)
                    let mutable k = 0L

                    while k < u32 (header i + 44L) do
                        let cnt = u16 (vn + 2L)
                        let mutable va = vn + u32 (vn + 8L)
                        let next = u32 (vn + 12L)
                        let mutable a = 0

                        while a < cnt do
                            let flags = u16 (va + 4L)
                            let nameOff = strOff + u32 (va + 8L)
                            let mutable e = int nameOff

                            while b[e] <> 0uy do
                                e <- e + 1

                            if
                                Encoding.ASCII.GetString(b, int nameOff, e - int nameOff) = name
                                && flags &&& 2 = 0
                            then
                                let nf = flags ||| 2
                                b[int va + 4] <- byte (nf &&& 0xff)
                                b[int va + 5] <- byte (nf >>> 8)
                                changed <- true

                            let vnext = u32 (va + 12L)
                            va <- va + vnext
                            a <- if vnext = 0L then cnt else a + 1

                        vn <- vn + next
                        k <- if next = 0L then Int64.MaxValue else k + 1L

            changed

    /// The folders that may hold the native libraries, best first: the application's own, then, for a script
    /// (TorchSharp.dll inside the NuGet folder), the packages beside TorchSharp's.
    static let candidates () =
        let rid = "runtimes/linux-x64/native"
        let app = AppContext.BaseDirectory
        let torchSharpDir = Path.GetDirectoryName(typeof<torch>.Assembly.Location)
        // a script: .../packages/torchsharp/0.107.0/lib/net6.0/TorchSharp.dll, so the packages are beside it; an
        // application has its own copies and nothing else is looked at (a forgotten backend must not be rescued by
        // whatever another project left in the NuGet folder)
        let packages =
            if
                not (String.IsNullOrEmpty torchSharpDir)
                && torchSharpDir.Replace('\\', '/').ToLowerInvariant().Contains "/torchsharp/"
                && torchSharpDir.Contains "lib"
            then
                [ Path.GetFullPath(Path.Combine(torchSharpDir, "..", "..", "..", "..")) ]
            else
                []

        let torchSharp = [
            Path.Combine(app, rid)
            app
            if not (String.IsNullOrEmpty torchSharpDir) then
                Path.GetFullPath(Path.Combine(torchSharpDir, "..", "..", rid))
        ]

        let libtorch = [
            Path.Combine(app, rid)
            app
            for p in packages do
                let dir = Path.Combine(p, "libtorch-cpu-linux-x64")

                if Directory.Exists dir then
                    for v in Directory.GetDirectories dir |> Array.sortDescending do
                        Path.Combine(v, rid)
        ]

        torchSharp, libtorch

    static let missing (cause: exn) =
        InvalidOperationException(
            "SwitchNorm: TorchSharp's native backend could not be loaded. The application (or script) needs a libtorch "
            + "backend: add <PackageReference Include=\"libtorch-cpu-linux-x64\" Version=\"2.10.0\" /> (Linux, CPU), or "
            + "reference TorchSharp-cpu 0.107.0 instead of TorchSharp (every platform); in dotnet fsi, "
            + "#r \"nuget: libtorch-cpu-linux-x64, 2.10.0\" next to #r \"nuget: SwitchNorm.FSharp\". The cause: "
            + cause.Message,
            cause
        )

    /// Whether the process has mapped a library of that file name already (TorchSharp loaded it its own way).
    static let mapped (file: string) =
        try
            File.ReadLines "/proc/self/maps"
            |> Seq.exists (fun line ->
                let at = line.IndexOf '/'
                at >= 0 && Path.GetFileName(line.Substring at) = file)
        with _ ->
            false

    static let loadLinux () =
        let torchSharpDirs, libtorchDirs = candidates ()

        let inDir (file: string) (dirs: string list) =
            dirs |> List.tryFind (fun d -> File.Exists(Path.Combine(d, file)))

        match inDir "libtorch_cpu.so" libtorchDirs with
        | Some dir ->
            // by full path, so a system-wide libtorch cannot be picked up by name
            for lib in [ "libc10.so"; "libtorch_cpu.so"; "libtorch.so" ] do
                let path = Path.Combine(dir, lib)

                if File.Exists path then
                    NativeLibrary.Load path |> ignore
        | None -> ()

        match inDir "libLibTorchSharp.so" torchSharpDirs with
        | Some dir ->
            let path = Path.Combine(dir, "libLibTorchSharp.so")
            let bytes = File.ReadAllBytes path

            if not (systemHasVersion ()) && markWeak bytes versionName then
                // a patched copy in the user's cache, named for the file it came from
                let stamp = $"{bytes.Length}-{File.GetLastWriteTimeUtc(path).Ticks}"

                let cache =
                    Path.Combine(
                        Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData, Environment.SpecialFolderOption.Create),
                        "switchnorm",
                        $"libtorchsharp-{stamp}"
                    )

                let copy = Path.Combine(cache, "libLibTorchSharp.so")

                if not (File.Exists copy) then
                    Directory.CreateDirectory cache |> ignore
                    let temp = copy + $".{Environment.ProcessId}.tmp"
                    File.WriteAllBytes(temp, bytes)
                    File.Move(temp, copy, true)

                NativeLibrary.Load copy |> ignore
            else
                NativeLibrary.Load path |> ignore
        | None -> ()

    /// <summary>
    /// Loads TorchSharp's native backend (once per process) as described for the type, and raises an
    /// InvalidOperationException that says which package to add when it cannot be loaded. Every SwitchNorm layer's
    /// constructor calls it; in a script, call it before the first use of <c>torch</c>.
    /// </summary>
    static member Load() =
        if not loaded then
            lock gate (fun () ->
                if not loaded then
                    let prepared =
                        // once TorchSharp has loaded its libraries its own way, a second copy must not be loaded
                        if
                            RuntimeInformation.IsOSPlatform OSPlatform.Linux
                            && not (mapped "libLibTorchSharp.so")
                        then
                            try
                                loadLinux ()
                                None
                            with e ->
                                Some e
                        else
                            None

                    try
                        torch.InitializeDeviceType DeviceType.CPU
                    with e ->
                        raise (missing (defaultArg prepared e))

                    loaded <- true)
