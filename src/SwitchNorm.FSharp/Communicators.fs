namespace SwitchNorm

#nowarn "9" // pinned arrays passed to MPI

open System
open System.Threading
open System.Runtime.InteropServices
open Microsoft.FSharp.NativeInterop

/// <summary>
/// Ranks as threads of one process, for tests and single-machine experiments: <c>InProcessGroup(size)</c> makes a
/// group, <c>group.Rank r</c> the communicator of rank r, and <c>InProcessGroup.Run(size, body)</c> runs body on one
/// thread per rank. Sums are taken in rank order, so every rank gets bitwise the same result. A rank that does not
/// reach a collective within <paramref name="timeoutSeconds"/> (default 60; positive and at most about 24.8 days, else an
/// ArgumentOutOfRangeException) makes the others fail with a TimeoutException instead of waiting for ever.
/// </summary>
type InProcessGroup(size: int, [<Optional; DefaultParameterValue(60.0)>] timeoutSeconds: float) =
    do
        if size < 1 then
            raise (ArgumentOutOfRangeException("size", size, $"InProcessGroup: the size must be at least 1; got {size}."))

        // TimeSpan.FromSeconds of a negative value waits for ever, and a zero timeout fails even when every rank arrives
        // (Barrier takes at most Int32.MaxValue milliseconds, about 24.8 days)
        if not (timeoutSeconds > 0.0 && timeoutSeconds <= float Int32.MaxValue / 1000.0) then
            raise (
                ArgumentOutOfRangeException(
                    "timeoutSeconds",
                    timeoutSeconds,
                    $"InProcessGroup: the timeout must be a positive number of seconds, at most {float Int32.MaxValue / 1000.0}; got {timeoutSeconds}."
                )
            )

    let barrier = new Barrier(size)
    let slots: float[][] = Array.zeroCreate size

    let wait (rank: int) =
        if not (barrier.SignalAndWait(TimeSpan.FromSeconds timeoutSeconds)) then
            raise (TimeoutException($"InProcessGroup: rank {rank} waited {timeoutSeconds} s for the other ranks at a collective."))

    /// The number of ranks.
    member _.Size = size

    /// The communicator of rank r (0 .. Size − 1).
    member this.Rank(rank: int) : ICommunicator =
        if rank < 0 || rank >= size then
            raise (ArgumentOutOfRangeException("rank", rank, $"InProcessGroup: rank must lie in 0 .. {size - 1}."))

        { new ICommunicator with
            member _.Rank = rank
            member _.Size = size
            member _.AllreduceSum values = this.Allreduce(rank, values)
        }

    member internal _.Allreduce(rank: int, values: float[]) =
        slots[rank] <- Array.copy values
        wait rank
        let lengths = slots |> Array.map (fun s -> s.Length)

        if lengths |> Array.exists (fun l -> l <> lengths[0]) then
            // every rank sees the same lengths, so every rank raises
            wait rank

            let text =
                lengths
                |> Array.mapi (fun r l -> sprintf "rank %d: %d" r l)
                |> String.concat ", "

            raise (ArgumentException($"InProcessGroup: ranks called AllreduceSum with different lengths ({text})."))

        let sum = Array.zeroCreate values.Length

        for r in 0 .. size - 1 do
            let s = slots[r]

            for i in 0 .. sum.Length - 1 do
                sum[i] <- sum[i] + s[i]

        // nobody deposits the next call's values before everyone has read these
        wait rank
        Array.blit sum 0 values 0 sum.Length

    /// <summary>
    /// Runs <paramref name="body"/> once per rank, each on its own thread with its rank's communicator, and returns
    /// the results in rank order. If any rank throws, the exceptions are rethrown together (AggregateException).
    /// </summary>
    static member Run<'T>
        (size: int, body: Func<ICommunicator, 'T>, [<Optional; DefaultParameterValue(60.0)>] timeoutSeconds: float)
        : 'T[] =
        let group = InProcessGroup(size, timeoutSeconds)
        let results = Array.zeroCreate size
        let errors: exn[] = Array.zeroCreate size

        let threads =
            Array.init size (fun r ->
                let t =
                    Thread(
                        (fun () ->
                            try
                                results[r] <- body.Invoke(group.Rank r)
                            with e ->
                                errors[r] <- e),
                        16 * 1024 * 1024
                    )

                t.Start()
                t)

        for t in threads do
            t.Join()

        let thrown = errors |> Array.filter (isNull >> not)

        if thrown.Length > 0 then
            raise (AggregateException("InProcessGroup.Run: a rank failed.", thrown))

        results

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal MpiInit = delegate of nativeint * nativeint -> int

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal MpiIntOut = delegate of nativeint -> int

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal MpiCommIntOut = delegate of nativeint * nativeint -> int

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal MpiAllreduce = delegate of nativeint * nativeint * int * nativeint * nativeint * nativeint -> int

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal MpiNoArgs = delegate of unit -> int

[<UnmanagedFunctionPointer(CallingConvention.Cdecl)>]
type internal MpiAbort = delegate of nativeint * int -> int

module internal MpiNative =
    let missing (library: string) (name: string) =
        InvalidOperationException($"MpiCommunicator: {library} has no {name}; it is not OpenMPI's libmpi.so.40.")

    let fn<'D when 'D :> Delegate> (lib: nativeint) (library: string) (name: string) : 'D =
        match NativeLibrary.TryGetExport(lib, name) with
        | true, p -> Marshal.GetDelegateForFunctionPointer<'D> p
        | _ -> raise (missing library name)

    let symbol (lib: nativeint) (library: string) (name: string) =
        match NativeLibrary.TryGetExport(lib, name) with
        | true, p -> p
        | _ -> raise (missing library name)

/// <summary>
/// MPI_COMM_WORLD of OpenMPI (libmpi.so.40, Debian's openmpi-bin), called directly: processes started by
/// <c>mpirun -np K</c> each create one with <c>MpiCommunicator.World()</c>. Sums use MPI_Allreduce with MPI_SUM on
/// MPI_DOUBLE, whose result is the same on every rank. Dispose calls MPI_Finalize; after a failure call Abort instead,
/// since finalizing while other ranks wait in a collective can hang the job.
/// </summary>
type MpiCommunicator private (lib: nativeint, library: string) =
    let symbol = MpiNative.symbol lib library

    // OpenMPI's handles are the addresses of its predefined objects
    let world = symbol "ompi_mpi_comm_world"
    let mpiDouble = symbol "ompi_mpi_double"
    let mpiSum = symbol "ompi_mpi_op_sum"
    let allreduce = MpiNative.fn<MpiAllreduce> lib library "MPI_Allreduce"
    let finalize = MpiNative.fn<MpiNoArgs> lib library "MPI_Finalize"
    let abort = MpiNative.fn<MpiAbort> lib library "MPI_Abort"
    let mutable finalized = false

    let check (what: string) (code: int) =
        if code <> 0 then
            raise (InvalidOperationException($"MpiCommunicator: {what} failed with MPI error code {code}."))

    let intOut (f: nativeint -> int) what =
        let cell = Marshal.AllocHGlobal 4

        try
            check what (f cell)
            Marshal.ReadInt32 cell
        finally
            Marshal.FreeHGlobal cell

    do
        let initialized =
            intOut (fun p -> (MpiNative.fn<MpiIntOut> lib library "MPI_Initialized").Invoke p) "MPI_Initialized"

        if initialized = 0 then
            check "MPI_Init" ((MpiNative.fn<MpiInit> lib library "MPI_Init").Invoke(0n, 0n))

    let commInt name =
        let f = MpiNative.fn<MpiCommIntOut> lib library name
        intOut (fun p -> f.Invoke(world, p)) name

    let rank = commInt "MPI_Comm_rank"
    let size = commInt "MPI_Comm_size"

    /// <summary>
    /// Initializes MPI (once per process) and returns MPI_COMM_WORLD. Raises an InvalidOperationException that says
    /// how to install OpenMPI when <paramref name="library"/> (default libmpi.so.40) cannot be loaded.
    /// </summary>
    static member World([<Optional; DefaultParameterValue("libmpi.so.40")>] library: string) =
        match NativeLibrary.TryLoad library with
        | true, lib -> new MpiCommunicator(lib, library)
        | _ ->
            raise (
                InvalidOperationException(
                    $"MpiCommunicator: MPI is not available: {library} (OpenMPI) could not be loaded. Install it (Debian: apt-get install openmpi-bin), start the program with mpirun, or use InProcessGroup for ranks in one process."
                )
            )

    /// Ends the whole MPI job at once with the given exit code (use it after a failure instead of Dispose).
    member _.Abort(code: int) = abort.Invoke(world, code) |> ignore

    interface ICommunicator with
        member _.Rank = rank
        member _.Size = size

        member _.AllreduceSum values =
            if values.Length > 0 then
                use p = fixed values
                // MPI_IN_PLACE is (void*)1 in OpenMPI
                check "MPI_Allreduce" (allreduce.Invoke(1n, NativePtr.toNativeInt p, values.Length, mpiDouble, mpiSum, world))

    interface IDisposable with
        member _.Dispose() =
            if not finalized then
                finalized <- true
                finalize.Invoke() |> ignore
