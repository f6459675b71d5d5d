using System;
using System.IO;
using System.Linq;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace SwitchNorm.Kernels;

/// <summary>
/// Runs row passes on libtorch's own OpenMP thread team. libtorch parallelizes its operators with the libgomp it ships
/// (libgomp-&lt;hash&gt;.so.1); its workers spin-wait after each operator, so threads of ours would compete with them
/// for the cores. Calling that libgomp's <c>GOMP_parallel</c> with a callback instead runs our passes on the very
/// threads that are spinning, as libtorch's own kernels do. The library is found among the process's mapped files;
/// where it is not (other platforms, another OpenMP runtime), <see cref="Available"/> is false and callers run on the
/// calling thread.
/// </summary>
internal static unsafe class OmpRows
{
    private static readonly delegate* unmanaged<delegate* unmanaged<void*, void>, void*, uint, uint, void> Parallel;
    private static readonly delegate* unmanaged<int> ThreadNum;
    private static readonly delegate* unmanaged<int> NumThreads;

    /// <summary>Whether libtorch's libgomp was found.</summary>
    internal static readonly bool Available;

    static OmpRows()
    {
        try
        {
            if (!OperatingSystem.IsLinux())
                return;
            // the libgomp that libtorch itself loaded: the one in libtorch_cpu.so's folder (TorchSharp's package ships
            // libgomp-<hash>.so.1 beside it), not whichever libgomp another library mapped first
            var files = new System.Collections.Generic.List<string>();
            foreach (var line in File.ReadLines("/proc/self/maps"))
            {
                int at = line.IndexOf('/');
                if (at >= 0) files.Add(line.Substring(at));
            }
            static bool IsGomp(string f)
            {
                var name = Path.GetFileName(f);
                return name.StartsWith("libgomp", StringComparison.Ordinal) && name.Contains(".so");
            }
            var torchDir = files.Where(f => Path.GetFileName(f) == "libtorch_cpu.so").Select(Path.GetDirectoryName).FirstOrDefault();
            string? path = files.FirstOrDefault(f => IsGomp(f) && Path.GetDirectoryName(f) == torchDir)
                ?? files.FirstOrDefault(IsGomp);
            if (path is null || !NativeLibrary.TryLoad(path, out var lib))
                return;
            if (NativeLibrary.TryGetExport(lib, "GOMP_parallel", out var p)
                && NativeLibrary.TryGetExport(lib, "omp_get_thread_num", out var t)
                && NativeLibrary.TryGetExport(lib, "omp_get_num_threads", out var n))
            {
                Parallel = (delegate* unmanaged<delegate* unmanaged<void*, void>, void*, uint, uint, void>)p;
                ThreadNum = (delegate* unmanaged<int>)t;
                NumThreads = (delegate* unmanaged<int>)n;
                Available = true;
            }
        }
        catch (Exception)
        {
            Available = false;
        }
    }

    /// <summary>A pass over rows [lo, hi).</summary>
    internal delegate void RowRange(int lo, int hi);

    private sealed class Job
    {
        internal required RowRange Body;
        internal required int Rows;
        internal Exception? Error;
    }

    [UnmanagedCallersOnly]
    private static void Run(void* data)
    {
        var job = (Job)GCHandle.FromIntPtr((IntPtr)data).Target!;
        try
        {
            int t = ThreadNum(), n = NumThreads();
            long lo = (long)job.Rows * t / n, hi = (long)job.Rows * (t + 1) / n;
            if (lo < hi)
                job.Body((int)lo, (int)hi);
        }
        catch (Exception e)
        {
            job.Error = e;
        }
    }

    /// <summary>
    /// Runs <paramref name="body"/> over rows [0, rows) split into <paramref name="threads"/> contiguous ranges, one per
    /// thread of libtorch's OpenMP team (the calling thread takes the first). Exceptions are rethrown here.
    /// </summary>
    internal static void For(int rows, int threads, RowRange body)
    {
        var job = new Job { Body = body, Rows = rows };
        var handle = GCHandle.Alloc(job);
        try
        {
            Parallel(&Run, (void*)GCHandle.ToIntPtr(handle), (uint)threads, 0);
        }
        finally
        {
            handle.Free();
        }
        if (job.Error is not null)
            ExceptionDispatchInfoThrow(job.Error);
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void ExceptionDispatchInfoThrow(Exception e) =>
        System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e).Throw();
}
