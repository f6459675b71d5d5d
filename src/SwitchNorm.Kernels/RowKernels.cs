using System;
using System.Numerics;
using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("SwitchNorm.FSharp")]

namespace SwitchNorm.Kernels;

/// <summary>
/// Per-row passes of the fused normalizer over contiguous float32 data laid out as rows of <c>s</c> values
/// (one row per (n, c)), for the rows <c>[lo, hi)</c>. Vectorized with <see cref="Vector{T}"/>; each row is
/// summed in float32 lanes over blocks of 1024 values and the block sums are added in float64, so the float32
/// rounding of a sum is that of one block, never of a whole row. Every loop is compiled fully optimized at
/// once: left to tiered compilation, such loops can stay in unoptimized tier-0 code, about 5 to 10 times slower.
/// </summary>
internal static unsafe class RowKernels
{
    private const int Block = 1024;

    /// <summary>
    /// Per row: the mean rounded to float32 (<paramref name="centre"/>, the centre of every later pass), the mean
    /// (<paramref name="mean"/>) and the centred sum of squares (<paramref name="m2"/>). Two passes per row: a sum,
    /// then Σ (x − centre) and Σ (x − centre)², the second pass mostly from cache. The mean is corrected by the
    /// centred sum, so no precision is lost to a common offset (no E[x²] − E[x]²).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Stats(float* x, int s, float[] centre, double[] mean, double[] m2, int lo, int hi)
    {
        for (int i = lo; i < hi; i++)
        {
            float* p = x + (long)i * s;
            float a = (float)(Sum(p, s) / s);
            Centred(p, s, a, out double s1, out double s2);
            centre[i] = a;
            mean[i] = a + s1 / s;
            m2[i] = Math.Max(0.0, s2 - s1 * s1 / s);
        }
    }

    /// <summary>Per row: y = (x − centre) · scale + shift.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Affine(float* x, float* y, int s, float[] centre, float[] scale, float[] shift, int lo, int hi)
    {
        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* px = x + (long)i * s;
            float* py = y + (long)i * s;
            float a = centre[i], sc = scale[i], sh = shift[i];
            var va = new Vector<float>(a);
            var vs = new Vector<float>(sc);
            var vb = new Vector<float>(sh);
            int j = 0;

            for (; j + w <= s; j += w)
                Unsafe.WriteUnaligned(py + j, (Unsafe.ReadUnaligned<Vector<float>>(px + j) - va) * vs + vb);

            for (; j < s; j++)
                py[j] = (px[j] - a) * sc + sh;
        }
    }

    /// <summary>Per row: Σ g and Σ g · (x − centre).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradSums(float* g, float* x, int s, float[] centre, double[] sumG, double[] sumGx, int lo, int hi)
    {
        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* pg = g + (long)i * s;
            float* px = x + (long)i * s;
            float a = centre[i];
            var va = new Vector<float>(a);
            double s1 = 0, s2 = 0;
            int j = 0;

            while (j < s)
            {
                int stop = Math.Min(s, j + Block);
                var acc1 = Vector<float>.Zero;
                var acc2 = Vector<float>.Zero;

                for (; j + w <= stop; j += w)
                {
                    var gv = Unsafe.ReadUnaligned<Vector<float>>(pg + j);
                    acc1 += gv;
                    acc2 += gv * (Unsafe.ReadUnaligned<Vector<float>>(px + j) - va);
                }

                double t1 = Vector.Sum(acc1), t2 = Vector.Sum(acc2);

                for (; j < stop; j++)
                {
                    t1 += pg[j];
                    t2 += (double)pg[j] * (px[j] - a);
                }

                s1 += t1;
                s2 += t2;
            }

            sumG[i] = s1;
            sumGx[i] = s2;
        }
    }

    /// <summary>Per row: dx = p · g + q · (x − centre) + r.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradInput(float* g, float* x, float* dx, int s, float[] centre, float[] p, float[] q, float[] r, int lo, int hi)
    {
        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* pg = g + (long)i * s;
            float* px = x + (long)i * s;
            float* pd = dx + (long)i * s;
            float a = centre[i], pi = p[i], qi = q[i], ri = r[i];
            var va = new Vector<float>(a);
            var vp = new Vector<float>(pi);
            var vq = new Vector<float>(qi);
            var vr = new Vector<float>(ri);
            int j = 0;

            for (; j + w <= s; j += w)
            {
                var gv = Unsafe.ReadUnaligned<Vector<float>>(pg + j);
                var xv = Unsafe.ReadUnaligned<Vector<float>>(px + j);
                Unsafe.WriteUnaligned(pd + j, vp * gv + vq * (xv - va) + vr);
            }

            for (; j < s; j++)
                pd[j] = pi * pg[j] + qi * (px[j] - a) + ri;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static double Sum(float* p, int len)
    {
        int w = Vector<float>.Count;
        double total = 0;
        int j = 0;

        while (j < len)
        {
            int stop = Math.Min(len, j + Block);
            var acc0 = Vector<float>.Zero;
            var acc1 = Vector<float>.Zero;

            for (; j + 2 * w <= stop; j += 2 * w)
            {
                acc0 += Unsafe.ReadUnaligned<Vector<float>>(p + j);
                acc1 += Unsafe.ReadUnaligned<Vector<float>>(p + j + w);
            }

            for (; j + w <= stop; j += w)
                acc0 += Unsafe.ReadUnaligned<Vector<float>>(p + j);

            double t = Vector.Sum(acc0 + acc1);

            for (; j < stop; j++)
                t += p[j];

            total += t;
        }

        return total;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Centred(float* p, int len, float a, out double s1, out double s2)
    {
        int w = Vector<float>.Count;
        var va = new Vector<float>(a);
        s1 = 0;
        s2 = 0;
        int j = 0;

        while (j < len)
        {
            int stop = Math.Min(len, j + Block);
            var acc1 = Vector<float>.Zero;
            var acc2 = Vector<float>.Zero;

            for (; j + w <= stop; j += w)
            {
                var d = Unsafe.ReadUnaligned<Vector<float>>(p + j) - va;
                acc1 += d;
                acc2 += d * d;
            }

            double t1 = Vector.Sum(acc1), t2 = Vector.Sum(acc2);

            for (; j < stop; j++)
            {
                double d = p[j] - a;
                t1 += d;
                t2 += d * d;
            }

            s1 += t1;
            s2 += t2;
        }
    }
}
