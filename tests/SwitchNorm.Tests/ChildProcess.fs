/// Failures inside a backward, each run in a child process (this test assembly started with `probe NAME`), so that
/// a regression that kills the process shows as a failed test, not a dead test runner.
module ChildProcess

open System
open System.Diagnostics
open System.Runtime.InteropServices
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private f32 = torch.ScalarType.Float32
let private f64 = torch.ScalarType.Float64

/// Runs f, which must throw; returns the exception (fails when nothing is thrown).
let private caught (what: string) (f: unit -> unit) : exn =
    let e =
        try
            f ()
            null
        with e ->
            e

    if isNull e then
        failwith $"{what}: expected an exception, got none"

    e

let private expectMessage (what: string) (e: exn) (fragment: string) =
    let text =
        e.Message
        + " "
        + (if isNull e.InnerException then
               ""
           else
               e.InnerException.Message)

    if not (text.Contains fragment) then
        failwith $"{what}: expected a message containing '{fragment}'; got {e.GetType().Name}: {e.Message}"

/// A module and input of the dtype; float32 takes the row path, float64 the tensor path.
let private setUp (dtype: torch.ScalarType) =
    let m = new SwitchNorm2d(3L, dtype = dtype)
    let x = randnSeeded 3L [| 4L; 3L; 5L; 5L |] dtype
    m, x

/// The module still trains after a refusal: one more forward and backward give finite gradients.
let private stillWorks (what: string) (m: SwitchNorm2d) (x: torch.Tensor) =
    m.zero_grad ()
    let xr = x.detach().requires_grad_ true
    (m.forward xr).square().sum().backward ()

    if not (xr.grad.isfinite().all().item<bool> ()) then
        failwith $"{what}: the module gives non-finite gradients after the refusal"

let private probes: Map<string, unit -> string> =
    Map [
        "inplace-input",
        fun () ->
            // the row path keeps x for its backward, so it refuses as libtorch does
            let m, x = setUp f32
            let xr = x.detach().requires_grad_ true
            let h = xr * 1.0
            let y = m.forward h

            (use _ = torch.no_grad ()
             h.add_ ((1.0).ToScalar()) |> ignore)

            let e = caught "float32" (fun () -> y.sum().backward ())
            expectMessage "float32" e "modified by an inplace operation"
            stillWorks "float32" m x
            // the tensor path keeps only values derived from x, so its gradient stays right: the same as unmodified
            let m, x = setUp f64

            let gradOf (modify: bool) =
                m.zero_grad ()
                let xr = x.detach().requires_grad_ true
                let h = xr * 1.0
                let y = m.forward h

                if modify then
                    use _ = torch.no_grad ()
                    h.add_ ((1.0).ToScalar()) |> ignore

                (y * y * y).sum().backward ()
                xr.grad.clone ()

            assertClose "float64 after an in-place change" (tol f64) (gradOf true) (gradOf false)
            "an input changed in place before backward is refused on the row path and harmless on the tensor path"

        "inplace-weight",
        fun () ->
            for dtype in [ f32; f64 ] do
                let m, x = setUp dtype
                let y = m.forward (x.detach().requires_grad_ true)
                // an optimizer step before backward
                (use _ = torch.no_grad ()
                 m.weight.add_ ((0.5).ToScalar()) |> ignore)

                let e = caught $"{dtype}" (fun () -> (y * y).sum().backward ())
                expectMessage $"{dtype}" e "modified by an inplace operation"
                stillWorks $"{dtype}" m x

            "a weight changed in place before backward is refused, float32 and float64"

        "second-backward",
        fun () ->
            for dtype in [ f32; f64 ] do
                let m, x = setUp dtype
                let y = m.forward (x.detach().requires_grad_ true)
                // sum() keeps no tensor for its backward, so only the layer's own node can refuse
                let loss = y.sum ()
                loss.backward ()
                let once = m.weight.grad.clone ()
                let e = caught $"{dtype}" (fun () -> loss.backward ())
                expectMessage $"{dtype}" e "a second time"

                if not (exactEq once m.weight.grad) then
                    failwith $"{dtype}: the refused second backward changed the gradients"

                // retain_graph keeps working: twice the gradient
                m.zero_grad ()
                let y = m.forward (x.detach().requires_grad_ true)
                let loss = y.sum () + (y * y).sum ()
                loss.backward (retain_graph = true)
                let first = m.weight.grad.clone ()
                loss.backward ()
                assertClose $"{dtype}: retained second backward" (tol dtype) m.weight.grad (first * 2.0)
                stillWorks $"{dtype}" m x

            "a second backward is refused, and retain_graph still works, float32 and float64"

        "sync-rank-skips-backward",
        fun () ->
            for dtype in [ f32; f64 ] do
                let results =
                    InProcessGroup.Run(
                        2,
                        (fun comm ->
                            let m = new SyncSwitchNorm2d(3L, comm, dtype = dtype)
                            let x = randnSeeded (int64 comm.Rank) [| 2L; 3L; 4L; 4L |] dtype
                            let y = m.forward (x.detach().requires_grad_ true)

                            if comm.Rank = 0 then
                                let e = caught $"{dtype}" (fun () -> (y * y).sum().backward ())
                                expectMessage $"{dtype}" e "waited"

                                if not (e.InnerException :? TimeoutException) then
                                    failwith $"{dtype}: expected a TimeoutException inside; got {e}"

                            true),
                        2.0
                    )

                if results |> Array.exists not then
                    failwith "a rank failed"

            "a rank that never calls backward makes the other rank's backward throw (TimeoutException inside)"

        "sync-create-graph",
        fun () ->
            let results =
                InProcessGroup.Run(
                    2,
                    fun comm ->
                        let m = new SyncSwitchNorm2d(3L, comm)
                        let x = randnSeeded (int64 comm.Rank + 7L) [| 2L; 3L; 4L; 4L |] f32
                        let xr = x.detach().requires_grad_ true
                        let y = m.forward xr

                        let g =
                            torch.autograd.grad([| (y * y * y).sum () |], [| xr |], retain_graph = true, create_graph = true)[0]

                        g.square().sum().backward ()
                        xr.grad.isfinite().all().item<bool> ()
                )

            if results |> Array.exists not then
                failwith "non-finite second derivatives"

            "create_graph through SyncSwitchNorm2d on the row path gives second derivatives"
    ]

/// Runs one probe in this process (the child side).
let runProbe (name: string) =
    match probes.TryFind name with
    | Some f ->
        try
            let text = f ()
            printfn "ok: %s" text
            0
        with e ->
            printfn "FAILED: %s" (e.ToString())
            1
    | None ->
        printfn "unknown probe '%s'" name
        2

/// Starts this test assembly as a child process running one probe.
let private child (name: string) =
    let self = Reflection.Assembly.GetExecutingAssembly().Location
    let psi = ProcessStartInfo("dotnet", $"exec \"{self}\" probe {name}")
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.UseShellExecute <- false
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()

    if not (p.WaitForExit 120_000) then
        p.Kill true
        failwith $"probe {name}: no answer within 120 s"

    let text = out.Result + err.Result
    Assert.True(p.ExitCode = 0, $"probe {name} exited with {p.ExitCode}:\n{text}")
    Assert.Contains("ok: ", text)

[<Theory>]
[<InlineData("inplace-input")>]
[<InlineData("inplace-weight")>]
[<InlineData("second-backward")>]
[<InlineData("sync-rank-skips-backward")>]
[<InlineData("sync-create-graph")>]
let ``a failure inside backward is a catchable exception, and the process and module survive`` (name: string) = child name

[<EntryPoint>]
let main argv =
    match argv with
    | [| "probe"; name |] ->
        Workarounds.OneDnn.limitOneDnnToAvx2 () |> ignore
        runProbe name
    | _ ->
        printfn "usage: SwitchNorm.Tests probe NAME"
        2
