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
            // four independent accumulators, so the adds do not wait on each other
            var acc0 = Vector<float>.Zero;
            var acc1 = Vector<float>.Zero;
            var acc2 = Vector<float>.Zero;
            var acc3 = Vector<float>.Zero;

            for (; j + 4 * w <= stop; j += 4 * w)
            {
                acc0 += Unsafe.ReadUnaligned<Vector<float>>(p + j);
                acc1 += Unsafe.ReadUnaligned<Vector<float>>(p + j + w);
                acc2 += Unsafe.ReadUnaligned<Vector<float>>(p + j + 2 * w);
                acc3 += Unsafe.ReadUnaligned<Vector<float>>(p + j + 3 * w);
            }

            for (; j + w <= stop; j += w)
                acc0 += Unsafe.ReadUnaligned<Vector<float>>(p + j);

            double t = Vector.Sum((acc0 + acc1) + (acc2 + acc3));

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
            // two independent pairs of accumulators, so the adds do not wait on each other
            var acc1 = Vector<float>.Zero;
            var acc2 = Vector<float>.Zero;
            var acc1b = Vector<float>.Zero;
            var acc2b = Vector<float>.Zero;

            for (; j + 2 * w <= stop; j += 2 * w)
            {
                var d = Unsafe.ReadUnaligned<Vector<float>>(p + j) - va;
                var e = Unsafe.ReadUnaligned<Vector<float>>(p + j + w) - va;
                acc1 += d;
                acc2 += d * d;
                acc1b += e;
                acc2b += e * e;
            }

            for (; j + w <= stop; j += w)
            {
                var d = Unsafe.ReadUnaligned<Vector<float>>(p + j) - va;
                acc1 += d;
                acc2 += d * d;
            }

            double t1 = Vector.Sum(acc1 + acc1b), t2 = Vector.Sum(acc2 + acc2b);

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

    /// <summary>
    /// The backward's O(N·C) work in one pass over the rows: GradRows (gr, ∂L/∂μ, ∂L/∂σ², dGamma, dBeta), the
    /// gradients of the k mixing weights (dwm[j] = Σ ∂L/∂μ·(meanⱼ − rowMean), dwv[j] = Σ ∂L/∂σ²·varⱼ) and the
    /// per-sample and per-channel sums of ∂L/∂μ and ∂L/∂σ². The same sums, in the same order, as a pass computing
    /// them per row followed by 2k projections and two per-group sums.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradMix(
        int n, int c, int k, int[] kinds, double[][] means, double[][] vars, double[] rowMean,
        double[] sumG, double[] sumGx, float[] centre, double[] mu, double[] r, double[]? gamma,
        double[] gr, double[] dMu, double[] dVar, double[] dGamma, double[] dBeta, double[] dwm, double[] dwv,
        double[] muSample, double[] muChannel, double[] varSample, double[] varChannel)
    {
        Array.Clear(dGamma, 0, c);
        Array.Clear(dBeta, 0, c);
        Array.Clear(dwm, 0, k);
        Array.Clear(dwv, 0, k);
        Array.Clear(muSample, 0, n);
        Array.Clear(muChannel, 0, c);
        Array.Clear(varSample, 0, n);
        Array.Clear(varChannel, 0, c);

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
            {
                int i = a * c + b;
                double gm = gamma is null ? 1.0 : gamma[b];
                double sumGxMu = sumGx[i] + (centre[i] - mu[i]) * sumG[i];
                double gri = r[i] * gm;
                gr[i] = gri;
                dBeta[b] += sumG[i];
                dGamma[b] += r[i] * sumGxMu;
                double dm = -gri * sumG[i];
                double dv = -0.5 * gri * r[i] * r[i] * sumGxMu;
                dMu[i] = dm;
                dVar[i] = dv;

                for (int j = 0; j < k; j++)
                {
                    int kind = kinds[j];
                    int g = kind == 0 ? i : kind == 1 ? a : b;
                    dwm[j] += dm * (means[j][g] - rowMean[i]);
                    dwv[j] += dv * vars[j][g];
                }

                muSample[a] += dm;
                muChannel[b] += dm;
                varSample[a] += dv;
                varChannel[b] += dv;
            }
    }

    /// <summary>
    /// The per-row coefficients of dx = gr·g + q·(x − centre) + c0 in one pass: each live statistic j passes its
    /// gradient on as a mean (wmⱼ·dm/countⱼ per value) and a biased variance (2·wvⱼ·dv·(x − meanⱼ)/countⱼ), where dm
    /// and dv are the gradients reaching it (per row, per sample or per channel). The same sums, in the same order, as
    /// one pass per statistic.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void InputCoefficients(
        int n, int c, int k, int[] kinds, bool[] live, double[] counts, double[] wm, double[] wv, double[][] means,
        double[] dMu, double[] dVar, double[] muSample, double[] muChannel, double[] varSample, double[] varChannel,
        float[] centre, double[] q, double[] c0)
    {
        Span<double> fv = stackalloc double[k], fm = stackalloc double[k];

        for (int j = 0; j < k; j++)
        {
            fv[j] = 2.0 * wv[j] / counts[j];
            fm[j] = wm[j] / counts[j];
        }

        for (int a = 0; a < n; a++)
            for (int b = 0; b < c; b++)
            {
                int i = a * c + b;
                double qi = 0, ci = 0;

                for (int j = 0; j < k; j++)
                {
                    if (!live[j])
                        continue;
                    int kind = kinds[j];
                    int g = kind == 0 ? i : kind == 1 ? a : b;
                    double dm = kind == 0 ? dMu[i] : kind == 1 ? muSample[a] : muChannel[b];
                    double dv = kind == 0 ? dVar[i] : kind == 1 ? varSample[a] : varChannel[b];
                    double dvq = fv[j] * dv;
                    qi += dvq;
                    ci += fm[j] * dm + dvq * (centre[i] - means[j][g]);
                }

                q[i] = qi;
                c0[i] = ci;
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
