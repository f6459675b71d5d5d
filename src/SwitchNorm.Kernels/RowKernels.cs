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
        double inv = 1.0 / s;

        for (int i = lo; i < hi; i++)
        {
            float* p = x + (long)i * s;
            float a = (float)(Sum(p, s) * inv);
            Centred(p, s, a, out double s1, out double s2);
            centre[i] = a;
            mean[i] = a + s1 * inv;
            m2[i] = Math.Max(0.0, s2 - s1 * s1 * inv);
        }
    }

    /// <summary>
    /// Per row i = n·C + c: y = (x − centre) · scale + shift, with scale = r·γ_c and shift = β_c + (centre − μ)·scale
    /// computed in float64 for the row (γ and β may be null: 1 and 0).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Affine(
        float* x, float* y, int c, int s, float[] centre, double[] r, double[] mu, double[]? gamma, double[]? beta, int lo, int hi)
    {
        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* px = x + (long)i * s;
            float* py = y + (long)i * s;
            int ch = i % c;
            double scd = gamma is null ? r[i] : r[i] * gamma[ch];
            double shd = (beta is null ? 0.0 : beta[ch]) + (centre[i] - mu[i]) * scd;
            float a = centre[i], sc = (float)scd, sh = (float)shd;
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
    internal static void GradInput(float* g, float* x, float* dx, int s, float[] centre, double[] p, double[] q, double[] r, int lo, int hi)
    {
        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* pg = g + (long)i * s;
            float* px = x + (long)i * s;
            float* pd = dx + (long)i * s;
            float a = centre[i], pi = (float)p[i], qi = (float)q[i], ri = (float)r[i];
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

    // The O(N·C) work between the passes, over rows i = n·C + c. A statistic is stored per group of its kind:
    // kind 0 per row (N·C values), 1 per sample (N), 2 per channel (C). Loops are split by kind so no row pays
    // for a branch or a division.

    /// <summary>
    /// Pools per-row moments per sample (<paramref name="bySample"/>) or per channel by the law of total
    /// variance: M2 = Σ M2ᵢ + S · Σ (meanᵢ − mean)². Writes each group's mean and biased variance; returns the
    /// number of values behind each group.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static double Pool(int n, int c, int s, double[] rowMean, double[] rowM2, bool bySample, double[] mean, double[] var)
    {
        int groups = bySample ? n : c;
        double k = bySample ? c : n;
        Array.Clear(mean, 0, groups);
        Array.Clear(var, 0, groups);

        double inv = 1.0 / k;

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
                mean[bySample ? a : b] += rowMean[a * c + b] * inv;

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
            {
                int i = a * c + b, g = bySample ? a : b;
                double d = rowMean[i] - mean[g];
                var[g] += rowM2[i] + s * d * d;
            }

        double count = k * s, invCount = 1.0 / count;

        for (int g = 0; g < groups; g++)
            var[g] *= invCount;

        return count;
    }

    /// <summary>
    /// The mixture of every row in one pass: mu[i] = Σⱼ wmⱼ·(meanⱼ − rowMean[i]) + rowMean[i] and
    /// r[i] = 1/sqrt(Σⱼ wvⱼ·varⱼ + eps), over the k statistics, each stored per group of its kind (0 per row,
    /// 1 per sample, 2 per channel). The same sums, in the same order, as k Accumulate passes and FinishMixture.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void MixAll(
        int n, int c, int k, int[] kinds, double[][] means, double[][] vars, double[] wm, double[] wv, double[] rowMean,
        double eps, double[] mu, double[] r)
    {
        for (int a = 0; a < n; a++)
        {
            int row0 = a * c;

            for (int b = 0; b < c; b++)
            {
                int i = row0 + b;
                double rm = rowMean[i], m = 0, v = 0;

                for (int j = 0; j < k; j++)
                {
                    int kind = kinds[j];
                    int g = kind == 0 ? i : kind == 1 ? a : b;
                    m += wm[j] * (means[j][g] - rm);
                    v += wv[j] * vars[j][g];
                }

                mu[i] = m + rm;
                r[i] = 1.0 / Math.Sqrt(v + eps);
            }
        }
    }

    /// <summary>Σᵢ d[i] · (value of the statistic at row i − (centre?[i] ?? 0)).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static double Project(int n, int c, int kind, double[] d, double[] values, double[]? centre)
    {
        double acc = 0;

        for (int a = 0; a < n; a++)
        {
            int row0 = a * c;

            for (int b = 0; b < c; b++)
            {
                int i = row0 + b;
                double v = kind == 0 ? values[i] : kind == 1 ? values[a] : values[b];
                acc += d[i] * (centre is null ? v : v - centre[i]);
            }
        }

        return acc;
    }

    /// <summary>
    /// The backward's per-row coefficients from Σ g and Σ g·(x − centre): gr = r·γ, ∂L/∂μ, ∂L/∂σ², and the
    /// per-channel gradients of γ and β (accumulated into dGamma, dBeta).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradRows(
        int n, int c, double[] sumG, double[] sumGx, float[] centre, double[] mu, double[] r, double[]? gamma,
        double[] gr, double[] dMu, double[] dVar, double[] dGamma, double[] dBeta)
    {
        Array.Clear(dGamma, 0, c);
        Array.Clear(dBeta, 0, c);

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
            {
                int i = a * c + b;
                double gm = gamma is null ? 1.0 : gamma[b];
                double sumGxMu = sumGx[i] + (centre[i] - mu[i]) * sumG[i];
                gr[i] = r[i] * gm;
                dBeta[b] += sumG[i];
                dGamma[b] += r[i] * sumGxMu;
                dMu[i] = -gr[i] * sumG[i];
                dVar[i] = -0.5 * gr[i] * r[i] * r[i] * sumGxMu;
            }
    }

    /// <summary>Sums a per-row array per sample and per channel.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void SumGroups(int n, int c, double[] d, double[] perSample, double[] perChannel)
    {
        Array.Clear(perSample, 0, n);
        Array.Clear(perChannel, 0, c);

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
            {
                double v = d[a * c + b];
                perSample[a] += v;
                perChannel[b] += v;
            }
    }

    /// <summary>
    /// Adds one statistic's share of dx = gr·g + q·(x − centre) + c0: a mean passes its gradient dm on as
    /// dm/count per value, a biased variance its gradient dv as 2·dv·(x − its mean)/count. dm and dv are the
    /// gradients reaching the statistic (stored per group of its kind), already multiplied by its weights.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradInputCoefficients(
        int n, int c, int kind, double count, double wMean, double wVar, double[] dm, double[] dv, double[] mean,
        float[] centre, double[] q, double[] c0)
    {
        double fv = 2.0 * wVar / count, fm = wMean / count;

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
            {
                int i = a * c + b;
                int g = kind == 0 ? i : kind == 1 ? a : b;
                double dvq = fv * dv[g];
                q[i] += dvq;
                c0[i] += fm * dm[g] + dvq * (centre[i] - mean[g]);
            }
    }

    /// <summary>dst[i] = src[i] · factor for i &lt; n.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Scale(int n, double[] src, double factor, double[] dst)
    {
        int w = Vector<double>.Count, i = 0;

        for (; i + w <= n; i += w)
            (new Vector<double>(src, i) * factor).CopyTo(dst, i);

        for (; i < n; i++)
            dst[i] = src[i] * factor;
    }
}
