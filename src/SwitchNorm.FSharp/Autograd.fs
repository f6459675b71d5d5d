namespace SwitchNorm

open System
open System.Collections.Generic
open System.IO
open System.Reflection
open System.Runtime.InteropServices
open TorchSharp
open SwitchNorm.FSharp

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal KeepGraphFn = delegate of unit -> byte

/// <summary>
/// Whether the backward running on this thread keeps its graph (retain_graph), read from libtorch's engine through
/// its exported <c>torch::autograd::get_current_graph_task_keep_graph()</c>, which TorchSharp does not wrap. Found in the
/// libtorch_cpu.so this process loaded (by full path from /proc/self/maps, never a system copy). The symbol is
/// Itanium-mangled, so this works on Linux; where it is missing, <c>Known</c> is false and a second backward cannot be
/// told from a retained one. Checked with libtorch 2.10 (TorchSharp 0.107.0).
/// </summary>
type internal KeepGraph private () =
    static let query: (unit -> bool) option =
        try
            if not (OperatingSystem.IsLinux()) then
                None
            else
                File.ReadLines "/proc/self/maps"
                |> Seq.choose (fun line ->
                    let at = line.IndexOf '/'

                    if at >= 0 && Path.GetFileName(line.Substring at) = "libtorch_cpu.so" then
                        Some(line.Substring at)
                    else
                        None)
                |> Seq.tryHead
                |> Option.bind (fun path ->
                    match NativeLibrary.TryLoad path with
                    | true, lib ->
                        match NativeLibrary.TryGetExport(lib, "_ZN5torch8autograd33get_current_graph_task_keep_graphEv") with
                        | true, p ->
                            let f = Marshal.GetDelegateForFunctionPointer<KeepGraphFn> p
                            Some(fun () -> f.Invoke() <> 0uy)
                        | _ -> None
                    | _ -> None)
        with _ ->
            None

    /// Whether the engine can be asked.
    static member Known = query.IsSome

    /// Whether the current backward keeps its graph (true when it cannot be told).
    static member Now() =
        match query with
        | Some f -> f ()
        | None -> true

/// <summary>
/// How an exception inside a custom backward reaches the caller of <c>backward()</c>. An exception thrown in TorchSharp's
/// native autograd callback aborts the process, so the backward catches it, keeps it on this thread, and returns a
/// gradient on the meta device, which libtorch's engine refuses with a c10::Error; TorchSharp turns that into an
/// ExternalException on the <c>backward()</c> call. When that exception is raised, its message is replaced by the
/// cause's and its InnerException set to the cause, so the caller sees, for example, the TimeoutException of a rank that
/// never called backward. The engine and the module stay usable.
/// </summary>
type internal BackwardFailure private () =
    [<ThreadStatic; DefaultValue>]
    static val mutable private pending: exn

    static let messageField =
        typeof<Exception>.GetField("_message", BindingFlags.Instance ||| BindingFlags.NonPublic)

    static let innerField =
        typeof<Exception>.GetField("_innerException", BindingFlags.Instance ||| BindingFlags.NonPublic)

    static let install =
        lazy
            (AppDomain.CurrentDomain.FirstChanceException.Add(fun args ->
                match args.Exception with
                | :? ExternalException as x when not (isNull BackwardFailure.pending) && x.Message.Contains "CSharpNode" ->
                    let cause = BackwardFailure.pending
                    BackwardFailure.pending <- null

                    if not (isNull messageField) then
                        messageField.SetValue(x, cause.Message)

                    if not (isNull innerField) then
                        innerField.SetValue(x, cause)
                | _ -> ()))

    /// Keeps the cause for the ExternalException that the engine is about to raise on this thread.
    static member Raise(cause: exn) =
        install.Force()
        BackwardFailure.pending <- cause

/// <summary>
/// Gradient tensors a custom backward hands to libtorch, which copies them when the backward returns; their
/// managed handles are released at the next backward on the same thread, so at most one set stays alive per
/// thread whether or not the caller has a dispose scope open.
/// </summary>
type internal GradHandOver private () =
    [<ThreadStatic; DefaultValue>]
    static val mutable private handedOver: List<torch.Tensor>

    /// Disposes the handles of the previous backward on this thread.
    static member Release() =
        let l = GradHandOver.handedOver

        if not (isNull l) then
            for t in l do
                t.Dispose()

            l.Clear()

    /// Takes the handles out of any dispose scope; they are disposed at the next Release.
    static member Keep(ts: torch.Tensor list) =
        if isNull GradHandOver.handedOver then
            GradHandOver.handedOver <- List<torch.Tensor>()

        for t in ts do
            if not (isNull t) then
                t.DetachFromDisposeScope() |> ignore
                GradHandOver.handedOver.Add t

/// What a custom function records at forward about its arguments, to fail safely in its backward.
type internal Arguments = {
    /// Per argument: whether it is a tensor that needs a gradient.
    NeedGrad: bool[]
}

/// Plumbing shared by the custom autograd functions.
module internal Autograd =

    let private argumentsKey = "switchnorm.arguments"
    let private consumedKey = "switchnorm.consumed"

    /// Records the arguments at forward (for Guarded).
    let record (ctx: torch.autograd.AutogradContext) (vars: obj[]) =
        let need =
            vars
            |> Array.map (fun v ->
                match v with
                | :? torch.Tensor as t -> t.requires_grad
                | _ -> false)

        ctx.save_data (argumentsKey, box { NeedGrad = need })

    /// <summary>
    /// Runs a custom backward so that nothing it throws crosses the native boundary: on an exception, the cause is handed
    /// to BackwardFailure and libtorch gets, at the first argument that needs a gradient, a 0-dim meta-device tensor,
    /// which it refuses for every argument here (all have at least one dimension, so the shape cannot match). A second backward through the same graph without retain_graph is refused as PyTorch refuses it, since
    /// TorchSharp's nodes never release what they saved.
    /// </summary>
    let guarded (layer: string) (ctx: torch.autograd.AutogradContext) (body: unit -> List<torch.Tensor>) : List<torch.Tensor> =
        let args = ctx.get_data argumentsKey :?> Arguments

        try
            if not (isNull (ctx.get_data consumedKey)) then
                raise (
                    InvalidOperationException(
                        $"{layer}: trying to backward through the graph a second time (or directly access saved tensors after they have already been freed). Saved intermediate values of the graph are freed when you call .backward() or autograd.grad(). Specify retain_graph=true if you need to backward through the graph a second time."
                    )
                )

            if not (KeepGraph.Now()) then
                ctx.save_data (consumedKey, box true)

            body ()
        with e ->
            GradHandOver.Release()
            BackwardFailure.Raise e
            let mutable poisoned = false
            let grads = List<torch.Tensor>()

            for need in args.NeedGrad do
                if need && not poisoned then
                    poisoned <- true
                    let t = torch.empty (Array.empty<int64>, device = torch.device "meta")
                    GradHandOver.Keep [ t ]
                    grads.Add t
                else
                    grads.Add null

            grads

    /// The tensor at position i of an autograd function's arguments, or null when that argument is not a tensor.
    let tensorAt (vars: obj[]) (i: int) : torch.Tensor =
        match vars[i] with
        | :? torch.Tensor as t -> t
        | _ -> null

    /// Whether any of the tensors (null ones ignored) needs a gradient while grad mode is on.
    let needsGraph (ts: torch.Tensor list) =
        torch.is_grad_enabled ()
        && ts |> List.exists (fun t -> not (isNull t) && t.requires_grad)

    /// <summary>
    /// Gradients of Σ grad·y with respect to each input (null where an input is null or needs no gradient), with
    /// a graph, for create_graph.
    /// </summary>
    let differentiableGrads (inputs: torch.Tensor list) (y: torch.Tensor) (grad: torch.Tensor) =
        let needs (t: torch.Tensor) = not (isNull t) && t.requires_grad
        let targets = inputs |> List.filter needs |> Array.ofList

        let grads =
            torch.autograd.grad ([| y |], targets, [| grad |], retain_graph = true, create_graph = true, allow_unused = true)

        let mutable next = 0

        inputs
        |> List.map (fun t ->
            if needs t then
                let g = grads[next]
                next <- next + 1
                g
            else
                null)
