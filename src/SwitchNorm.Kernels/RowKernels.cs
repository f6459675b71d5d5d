using System;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

[assembly: InternalsVisibleTo("SwitchNorm.FSharp")]

namespace SwitchNorm.Kernels;

/// <summary>
/// How a mixed statistic is grouped over the rows (n, c), and so how it is stored and how its gradient is pooled:
/// IN per row (N·C values), LN per sample (N values), BN per channel (C values, from the batch or the running
/// statistics). Shared by the F# core's statistics table and these kernels.
/// </summary>
internal enum StatGroup
{
    /// <summary>One value per row (n, c): instance normalization.</summary>
    PerRow = 0,
    /// <summary>One value per sample n: layer normalization.</summary>
    PerSample = 1,
    /// <summary>One value per channel c: batch normalization.</summary>
    PerChannel = 2,
}

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
    internal static void Stats(float* x, int s, double[] centre, double[] mean, double[] m2, int lo, int hi)
    {
        if (s <= Block && Avx.IsSupported)
        {
            StatsShort(x, s, centre, mean, m2, lo, hi);
            return;
        }

        double inv = 1.0 / s;

        for (int i = lo; i < hi; i++)
        {
            float* p = x + (long)i * s;
            float a = (float)(Sum(p, s) * inv);
            Centred(p, s, a, out double s1, out double s2);

            if (!double.IsFinite(s2))
            {
                StatsRow64(p, s, out centre[i], out mean[i], out m2[i]);
                continue;
            }

            centre[i] = a;
            mean[i] = a + s1 * inv;
            m2[i] = Math.Max(0.0, s2 - s1 * s1 * inv);
        }
    }

    /// <summary>
    /// <see cref="Stats"/> of one row accumulated in float64, for rows whose float32 block sums overflow: a spread of
    /// about 1.8e19 already overflows a float32 square. Every float32 value is finite in float64 squares, so rows of
    /// any finite values get their exact statistics; the fast path costs one finiteness test per row.
    /// </summary>
    private static void StatsRow64(float* p, int s, out double centre, out double mean, out double m2)
    {
        double inv = 1.0 / s, sum = 0;

        for (int j = 0; j < s; j++)
            sum += p[j];

        float a = (float)(sum * inv);
        double s1 = 0, s2 = 0;

        for (int j = 0; j < s; j++)
        {
            double d = (double)p[j] - a;
            s1 += d;
            s2 += d * d;
        }

        centre = a;
        mean = a + s1 * inv;
        m2 = Math.Max(0.0, s2 - s1 * s1 * inv);
    }

    /// <summary>
    /// <see cref="Stats"/> for rows of at most one block, four rows at a time so that the rows' dependency chains
    /// (a sum, its horizontal reduction, the centre, the centred sums) overlap instead of running one after another:
    /// short rows are otherwise bound by latency, not by data. A row's result does not depend on its place in a group
    /// of four (a group past <paramref name="hi"/> repeats the last row), so it is the same for any split into ranges.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void StatsShort(float* x, int s, double[] centre, double[] mean, double[] m2, int lo, int hi)
    {
        double inv = 1.0 / s;
        var vinv = Vector256.Create(inv);
        int body = s & ~7;

        for (int i = lo; i < hi; i += 4)
        {
            float* p0 = x + (long)i * s;
            float* p1 = x + (long)Math.Min(i + 1, hi - 1) * s;
            float* p2 = x + (long)Math.Min(i + 2, hi - 1) * s;
            float* p3 = x + (long)Math.Min(i + 3, hi - 1) * s;
            var a0 = Vector256<float>.Zero;
            var a1 = Vector256<float>.Zero;
            var a2 = Vector256<float>.Zero;
            var a3 = Vector256<float>.Zero;

            for (int j = 0; j < body; j += 8)
            {
                a0 += Avx.LoadVector256(p0 + j);
                a1 += Avx.LoadVector256(p1 + j);
                a2 += Avx.LoadVector256(p2 + j);
                a3 += Avx.LoadVector256(p3 + j);
            }

            var sums = Avx.ConvertToVector256Double(Sum4(a0, a1, a2, a3));

            if (body < s)
            {
                double t0 = 0, t1 = 0, t2 = 0, t3 = 0;

                for (int j = body; j < s; j++)
                {
                    t0 += p0[j];
                    t1 += p1[j];
                    t2 += p2[j];
                    t3 += p3[j];
                }

                sums += Vector256.Create(t0, t1, t2, t3);
            }

            var centres = Avx.ConvertToVector128Single(sums * vinv);
            var vc = Avx.ConvertToVector256Double(centres);
            var c0 = Vector256.Create(centres.GetElement(0));
            var c1 = Vector256.Create(centres.GetElement(1));
            var c2 = Vector256.Create(centres.GetElement(2));
            var c3 = Vector256.Create(centres.GetElement(3));
            var s10 = Vector256<float>.Zero;
            var s11 = Vector256<float>.Zero;
            var s12 = Vector256<float>.Zero;
            var s13 = Vector256<float>.Zero;
            var s20 = Vector256<float>.Zero;
            var s21 = Vector256<float>.Zero;
            var s22 = Vector256<float>.Zero;
            var s23 = Vector256<float>.Zero;

            for (int j = 0; j < body; j += 8)
            {
                var d0 = Avx.LoadVector256(p0 + j) - c0;
                var d1 = Avx.LoadVector256(p1 + j) - c1;
                var d2 = Avx.LoadVector256(p2 + j) - c2;
                var d3 = Avx.LoadVector256(p3 + j) - c3;
                s10 += d0;
                s11 += d1;
                s12 += d2;
                s13 += d3;
                s20 = MulAdd(d0, d0, s20);
                s21 = MulAdd(d1, d1, s21);
                s22 = MulAdd(d2, d2, s22);
                s23 = MulAdd(d3, d3, s23);
            }

            var s1 = Avx.ConvertToVector256Double(Sum4(s10, s11, s12, s13));
            var s2 = Avx.ConvertToVector256Double(Sum4(s20, s21, s22, s23));

            if (body < s)
            {
                double u0 = 0, u1 = 0, u2 = 0, u3 = 0, v0 = 0, v1 = 0, v2 = 0, v3 = 0;
                float e0 = centres.GetElement(0), e1 = centres.GetElement(1), e2 = centres.GetElement(2), e3 = centres.GetElement(3);

                for (int j = body; j < s; j++)
                {
                    double d0 = p0[j] - e0, d1 = p1[j] - e1, d2 = p2[j] - e2, d3 = p3[j] - e3;
                    u0 += d0;
                    u1 += d1;
                    u2 += d2;
                    u3 += d3;
                    v0 += d0 * d0;
                    v1 += d1 * d1;
                    v2 += d2 * d2;
                    v3 += d3 * d3;
                }

                s1 += Vector256.Create(u0, u1, u2, u3);
                s2 += Vector256.Create(v0, v1, v2, v3);
            }

            var vm = vc + s1 * vinv;
            var vm2 = Vector256.Max(Vector256<double>.Zero, s2 - s1 * s1 * vinv);
            Store4(vc, centre, i, hi);
            Store4(vm, mean, i, hi);
            Store4(vm2, m2, i, hi);

            // a row whose float32 sums overflowed (or any NaN) is redone in float64; finite rows pass one test per group
            var finite = Vector256.LessThan(Vector256.Abs(s2 + vm), Vector256.Create(double.PositiveInfinity));

            if (Vector256.ExtractMostSignificantBits(finite) != 0xFu)
            {
                for (int r = 0; r < Math.Min(4, hi - i); r++)
                    if (!double.IsFinite(m2[i + r]) || !double.IsFinite(mean[i + r]) || !double.IsFinite(s2.GetElement(r)))
                        StatsRow64(x + (long)(i + r) * s, s, out centre[i + r], out mean[i + r], out m2[i + r]);
            }
        }
    }

    /// <summary>The lanes of v for rows i .. min(i + 4, hi) − 1 into dst[i ..].</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store4(Vector256<double> v, double[] dst, int i, int hi)
    {
        if (i + 4 <= hi)
        {
            v.StoreUnsafe(ref dst[i]);
        }
        else
        {
            for (int r = 0; r < hi - i; r++)
                dst[i + r] = v.GetElement(r);
        }
    }

    /// <summary>a·b + c, fused where the CPU has FMA (one rounding instead of two).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> MulAdd(Vector256<float> a, Vector256<float> b, Vector256<float> c) =>
        Fma.IsSupported ? Fma.MultiplyAdd(a, b, c) : a * b + c;

    /// <summary>The lane sums of four vectors: [Σa, Σb, Σc, Σd], the same reduction tree for each.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<float> Sum4(Vector256<float> a, Vector256<float> b, Vector256<float> c, Vector256<float> d)
    {
        var h = Avx.HorizontalAdd(Avx.HorizontalAdd(a, b), Avx.HorizontalAdd(c, d));
        return h.GetLower() + h.GetUpper();
    }

    /// <summary>
    /// Per row i = n·C + c: y = (x − centre) · scale + shift, with scale = r·γ_c and shift = β_c + (centre − μ)·scale
    /// computed in float64 for the row (γ and β may be null: 1 and 0).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Affine(
        float* x, float* y, int c, int s, double[] centre, double[] r, double[] mu, double[]? gamma, double[]? beta, int lo, int hi)
    {
        int w = Vector<float>.Count;
        int ch = lo % c;

        for (int i = lo; i < hi; i++, ch = ch + 1 == c ? 0 : ch + 1)
        {
            float* px = x + (long)i * s;
            float* py = y + (long)i * s;
            double scd = gamma is null ? r[i] : r[i] * gamma[ch];
            double shd = (beta is null ? 0.0 : beta[ch]) + (centre[i] - mu[i]) * scd;
            float a = (float)centre[i], sc = (float)scd, sh = (float)shd;
            var va = new Vector<float>(a);
            var vs = new Vector<float>(sc);
            var vb = new Vector<float>(sh);
            int j = 0;

            if (Fma.IsSupported && w == 8)
            {
                var fa = Vector256.Create(a);
                var fs = Vector256.Create(sc);
                var fb = Vector256.Create(sh);

                for (; j + 8 <= s; j += 8)
                    Avx.Store(py + j, Fma.MultiplyAdd(Avx.LoadVector256(px + j) - fa, fs, fb));
            }

            for (; j + w <= s; j += w)
                Unsafe.WriteUnaligned(py + j, (Unsafe.ReadUnaligned<Vector<float>>(px + j) - va) * vs + vb);

            for (; j < s; j++)
                py[j] = (px[j] - a) * sc + sh;
        }
    }

    /// <summary>Per row: Σ g and Σ g · (x − centre).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradSums(float* g, float* x, int s, double[] centre, double[] sumG, double[] sumGx, int lo, int hi)
    {
        if (s <= Block && Fma.IsSupported)
        {
            GradSumsShort(g, x, s, centre, sumG, sumGx, lo, hi);
            return;
        }

        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* pg = g + (long)i * s;
            float* px = x + (long)i * s;
            float a = (float)centre[i];
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

    /// <summary>
    /// <see cref="GradSums"/> for rows of at most one block, four rows at a time (as <see cref="StatsShort"/>, and with
    /// the same independence of a row's result from its place in a group).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void GradSumsShort(float* g, float* x, int s, double[] centre, double[] sumG, double[] sumGx, int lo, int hi)
    {
        int body = s & ~7;

        for (int i = lo; i < hi; i += 4)
        {
            // a group past hi repeats the last row
            int r1 = Math.Min(i + 1, hi - 1), r2 = Math.Min(i + 2, hi - 1), r3 = Math.Min(i + 3, hi - 1);
            long o0 = (long)i * s, o1 = (long)r1 * s, o2 = (long)r2 * s, o3 = (long)r3 * s;
            float e0 = (float)centre[i], e1 = (float)centre[r1], e2 = (float)centre[r2], e3 = (float)centre[r3];
            var c0 = Vector256.Create(e0);
            var c1 = Vector256.Create(e1);
            var c2 = Vector256.Create(e2);
            var c3 = Vector256.Create(e3);
            var a0 = Vector256<float>.Zero;
            var a1 = Vector256<float>.Zero;
            var a2 = Vector256<float>.Zero;
            var a3 = Vector256<float>.Zero;
            var b0 = Vector256<float>.Zero;
            var b1 = Vector256<float>.Zero;
            var b2 = Vector256<float>.Zero;
            var b3 = Vector256<float>.Zero;

            for (int j = 0; j < body; j += 8)
            {
                var g0 = Avx.LoadVector256(g + o0 + j);
                var g1 = Avx.LoadVector256(g + o1 + j);
                var g2 = Avx.LoadVector256(g + o2 + j);
                var g3 = Avx.LoadVector256(g + o3 + j);
                a0 += g0;
                a1 += g1;
                a2 += g2;
                a3 += g3;
                b0 = Fma.MultiplyAdd(g0, Avx.LoadVector256(x + o0 + j) - c0, b0);
                b1 = Fma.MultiplyAdd(g1, Avx.LoadVector256(x + o1 + j) - c1, b1);
                b2 = Fma.MultiplyAdd(g2, Avx.LoadVector256(x + o2 + j) - c2, b2);
                b3 = Fma.MultiplyAdd(g3, Avx.LoadVector256(x + o3 + j) - c3, b3);
            }

            var s1 = Avx.ConvertToVector256Double(Sum4(a0, a1, a2, a3));
            var s2 = Avx.ConvertToVector256Double(Sum4(b0, b1, b2, b3));

            if (body < s)
            {
                double u0 = 0, u1 = 0, u2 = 0, u3 = 0, v0 = 0, v1 = 0, v2 = 0, v3 = 0;

                for (int j = body; j < s; j++)
                {
                    u0 += g[o0 + j];
                    u1 += g[o1 + j];
                    u2 += g[o2 + j];
                    u3 += g[o3 + j];
                    v0 += (double)g[o0 + j] * (x[o0 + j] - e0);
                    v1 += (double)g[o1 + j] * (x[o1 + j] - e1);
                    v2 += (double)g[o2 + j] * (x[o2 + j] - e2);
                    v3 += (double)g[o3 + j] * (x[o3 + j] - e3);
                }

                s1 += Vector256.Create(u0, u1, u2, u3);
                s2 += Vector256.Create(v0, v1, v2, v3);
            }

            Store4(s1, sumG, i, hi);
            Store4(s2, sumGx, i, hi);
        }
    }

    /// <summary>Per row: dx = p · g + q · (x − centre) + r.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradInput(float* g, float* x, float* dx, int s, double[] centre, double[] p, double[] q, double[] r, int lo, int hi)
    {
        int w = Vector<float>.Count;

        for (int i = lo; i < hi; i++)
        {
            float* pg = g + (long)i * s;
            float* px = x + (long)i * s;
            float* pd = dx + (long)i * s;
            float a = (float)centre[i], pi = (float)p[i], qi = (float)q[i], ri = (float)r[i];
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
    // StatGroup.PerRow (N·C values), PerSample (N) or PerChannel (C). Every loop runs per sample over its C rows,
    // vectorized across channels (Vector<double>), with the kind dispatched once per sample and statistic: seen by
    // a sample's rows, a per-row statistic is the sample's slice, a per-channel one the whole array, and a per-sample
    // one a constant (a scratch row filled with it).

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
        double inv = 1.0 / k, count = k * s, invCount = 1.0 / count;

        if (bySample)
        {
            for (int a = 0; a < n; a++)
            {
                var m = rowMean.AsSpan(a * c, c);
                double g = Sum(m) * inv;
                mean[a] = g;
                var[a] = (Sum(rowM2.AsSpan(a * c, c)) + s * SumSquaredDiff(m, g)) * invCount;
            }
        }
        else
        {
            var mg = mean.AsSpan(0, c);
            var vg = var.AsSpan(0, c);
            mg.Clear();
            vg.Clear();

            for (int a = 0; a < n; a++)
                AddScaled(mg, rowMean.AsSpan(a * c, c), inv);

            for (int a = 0; a < n; a++)
                AddPooledSquares(vg, rowM2.AsSpan(a * c, c), rowMean.AsSpan(a * c, c), mg, s);

            for (int g = 0; g < groups; g++)
                var[g] *= invCount;
        }

        return count;
    }

    /// <summary>
    /// The mixture of every row: mu[i] = Σⱼ wmⱼ·(meanⱼ − rowMean[i]) + rowMean[i] and r[i] = 1/sqrt(Σⱼ wvⱼ·varⱼ + eps),
    /// over the k statistics, each stored per group of its kind (per row, per sample or per channel: StatGroup); varⱼ is the
    /// stored value times varScale[j] (1/S for a per-row statistic stored as its M2, 1 otherwise).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void MixAll(
        int n, int c, int k, StatGroup[] kinds, double[][] means, double[][] vars, double[] varScale, double[] wm, double[] wv,
        double[] rowMean, double eps, double[] mu, double[] r)
    {
        var scratchM = new double[c];
        var scratchV = new double[c];

        for (int a = 0; a < n; a++)
        {
            var rm = rowMean.AsSpan(a * c, c);
            var m = mu.AsSpan(a * c, c);
            var v = r.AsSpan(a * c, c);
            m.Clear();
            v.Clear();

            for (int j = 0; j < k; j++)
            {
                AddScaledDiff(m, Seen(kinds[j], means[j], a, c, scratchM), rm, wm[j]);
                AddScaledProduct(v, Seen(kinds[j], vars[j], a, c, scratchV), varScale[j], wv[j]);
            }

            Add(m, rm);
            InvSqrt(v, eps);
        }
    }

    /// <summary>
    /// The mixture of one sample's c rows in one pass, without intermediate arrays: PerRow is the row's own statistic
    /// (its mean and M2·invS), PerSample the sample's (<paramref name="sampleMean"/>, <paramref name="sampleVar"/>), PerChannel
    /// a per-channel one (<paramref name="channelMean"/>, <paramref name="channelVar"/>). The same operations, in the
    /// same order, as Scale and MixAll, so the results are bitwise theirs.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void MixSample(
        int c, int k, StatGroup[] kinds, double[] rowMean, double[] rowM2, double invS, double sampleMean, double sampleVar,
        double[]? channelMean, double[]? channelVar, double[] wm, double[] wv, double eps, double[] mu, double[] r)
    {
        int w = Vector<double>.Count, b = 0;
        var vInvS = new Vector<double>(invS);
        var vSampleMean = new Vector<double>(sampleMean);
        var vSampleVar = new Vector<double>(sampleVar);
        var ve = new Vector<double>(eps);

        for (; b + w <= c; b += w)
        {
            var rm = new Vector<double>(rowMean, b);
            var m = Vector<double>.Zero;
            var v = Vector<double>.Zero;

            for (int j = 0; j < k; j++)
            {
                Vector<double> mean, var;

                switch (kinds[j])
                {
                    case StatGroup.PerRow:
                        mean = rm;
                        var = new Vector<double>(rowM2, b) * vInvS;
                        break;
                    case StatGroup.PerSample:
                        mean = vSampleMean;
                        var = vSampleVar;
                        break;
                    default:
                        mean = new Vector<double>(channelMean!, b);
                        var = new Vector<double>(channelVar!, b);
                        break;
                }

                m += new Vector<double>(wm[j]) * (mean - rm);
                v += new Vector<double>(wv[j]) * var;
            }

            (m + rm).CopyTo(mu, b);
            (Vector<double>.One / Vector.SquareRoot(v + ve)).CopyTo(r, b);
        }

        for (; b < c; b++)
        {
            double rm = rowMean[b], m = 0, v = 0;

            for (int j = 0; j < k; j++)
            {
                StatGroup kind = kinds[j];
                double mean = kind == StatGroup.PerRow ? rm : kind == StatGroup.PerSample ? sampleMean : channelMean![b];
                double var = kind == StatGroup.PerRow ? rowM2[b] * invS : kind == StatGroup.PerSample ? sampleVar : channelVar![b];
                m += wm[j] * (mean - rm);
                v += wv[j] * var;
            }

            mu[b] = m + rm;
            r[b] = 1.0 / Math.Sqrt(v + eps);
        }
    }

    /// <summary>
    /// The backward's O(N·C) work: per row gr = r·γ, ∂L/∂μ = −gr·Σg and ∂L/∂σ² = −½·gr·r²·Σg(x − μ); dGamma and dBeta;
    /// the gradients of the k mixing weights (dwm[j] = Σ ∂L/∂μ·(meanⱼ − rowMean), dwv[j] = Σ ∂L/∂σ²·varⱼ); and the
    /// per-sample and per-channel sums of ∂L/∂μ and ∂L/∂σ².
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void GradMix(
        int n, int c, int k, StatGroup[] kinds, double[][] means, double[][] vars, double[] varScale, double[] rowMean,
        double[] sumG, double[] sumGx, double[] centre, double[] mu, double[] r, double[]? gamma,
        double[] gr, double[] dMu, double[] dVar, double[] dGamma, double[] dBeta, double[] dwm, double[] dwv,
        double[] muSample, double[] muChannel, double[] varSample, double[] varChannel)
    {
        Array.Clear(dGamma, 0, c);
        Array.Clear(dBeta, 0, c);
        Array.Clear(dwm, 0, k);
        Array.Clear(dwv, 0, k);
        Array.Clear(muChannel, 0, c);
        Array.Clear(varChannel, 0, c);
        var scratch = new double[c];
        int w = Vector<double>.Count;
        var half = new Vector<double>(-0.5);

        for (int a = 0; a < n; a++)
        {
            int row0 = a * c, b = 0;
            var sm = Vector<double>.Zero;
            var sv = Vector<double>.Zero;

            for (; b + w <= c; b += w)
            {
                int i = row0 + b;
                var vr = new Vector<double>(r, i);
                var vsg = new Vector<double>(sumG, i);
                var sumGxMu = new Vector<double>(sumGx, i) + (new Vector<double>(centre, i) - new Vector<double>(mu, i)) * vsg;
                var gri = gamma is null ? vr : vr * new Vector<double>(gamma, b);
                var dm = -gri * vsg;
                var dv = half * gri * vr * vr * sumGxMu;
                gri.CopyTo(gr, i);
                dm.CopyTo(dMu, i);
                dv.CopyTo(dVar, i);
                (new Vector<double>(dBeta, b) + vsg).CopyTo(dBeta, b);
                (new Vector<double>(dGamma, b) + vr * sumGxMu).CopyTo(dGamma, b);
                (new Vector<double>(muChannel, b) + dm).CopyTo(muChannel, b);
                (new Vector<double>(varChannel, b) + dv).CopyTo(varChannel, b);
                sm += dm;
                sv += dv;
            }

            double tm = Vector.Sum(sm), tv = Vector.Sum(sv);

            for (; b < c; b++)
            {
                int i = row0 + b;
                double sumGxMu = sumGx[i] + (centre[i] - mu[i]) * sumG[i];
                double gri = gamma is null ? r[i] : r[i] * gamma[b];
                double dm = -gri * sumG[i];
                double dv = -0.5 * gri * r[i] * r[i] * sumGxMu;
                gr[i] = gri;
                dMu[i] = dm;
                dVar[i] = dv;
                dBeta[b] += sumG[i];
                dGamma[b] += r[i] * sumGxMu;
                muChannel[b] += dm;
                varChannel[b] += dv;
                tm += dm;
                tv += dv;
            }

            muSample[a] = tm;
            varSample[a] = tv;

            var rm = rowMean.AsSpan(row0, c);
            var dmRow = dMu.AsSpan(row0, c);
            var dvRow = dVar.AsSpan(row0, c);

            for (int j = 0; j < k; j++)
            {
                dwm[j] += DotDiff(dmRow, Seen(kinds[j], means[j], a, c, scratch), rm);
                dwv[j] += DotScaled(dvRow, Seen(kinds[j], vars[j], a, c, scratch), varScale[j]);
            }
        }
    }

    /// <summary>
    /// The per-row coefficients of dx = gr·g + q·(x − centre) + c0: each live statistic j passes its gradient on as a
    /// mean (wmⱼ·dm/countⱼ per value) and a variance, where dm and dv are the gradients reaching it (per row, per sample
    /// or per channel). A variance is Σ_rows [κ·M2_row + S·(rowMean − meanⱼ)²] / Dⱼ over its group (the statistics
    /// table's estimator: κ = 1 and Dⱼ = countⱼ for biased variances; κ = S/(S − 1) for unbiased rows; Dⱼ = countⱼ − 1
    /// for a group's unbiased variance), so its gradient is 2·wvⱼ·dv·[κ·(x − rowMean) + (rowMean − meanⱼ)]/Dⱼ, which for
    /// κ = 1 is 2·wvⱼ·dv·(x − meanⱼ)/Dⱼ.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void InputCoefficients(
        int n, int c, int k, StatGroup[] kinds, bool[] live, double[] counts, double[] varCounts, double kappa,
        double[] wm, double[] wv, double[][] means, double[] rowMean,
        double[] dMu, double[] dVar, double[] muSample, double[] muChannel, double[] varSample, double[] varChannel,
        double[] centre, double[] q, double[] c0)
    {
        var s1 = new double[c];
        var s2 = new double[c];
        var s3 = new double[c];

        for (int a = 0; a < n; a++)
        {
            int row0 = a * c;
            var qRow = q.AsSpan(row0, c);
            var cRow = c0.AsSpan(row0, c);
            var centreRow = centre.AsSpan(row0, c);
            qRow.Clear();
            cRow.Clear();

            for (int j = 0; j < k; j++)
            {
                if (!live[j])
                    continue;

                // the gradients reaching statistic j, as seen by this sample's rows
                StatGroup kind = kinds[j];
                var dm = kind == StatGroup.PerRow ? dMu.AsSpan(row0, c) : kind == StatGroup.PerSample ? Filled(s1, muSample[a]) : muChannel.AsSpan(0, c);
                var dv = kind == StatGroup.PerRow ? dVar.AsSpan(row0, c) : kind == StatGroup.PerSample ? Filled(s2, varSample[a]) : varChannel.AsSpan(0, c);
                var mean = Seen(kind, means[j], a, c, s3);

                if (kappa == 1.0)
                    Coefficients(qRow, cRow, dm, dv, centreRow, mean, 2.0 * wv[j] / varCounts[j], wm[j] / counts[j]);
                else
                    CoefficientsWithin(qRow, cRow, dm, dv, centreRow, rowMean.AsSpan(row0, c), mean, kappa, 2.0 * wv[j] / varCounts[j], wm[j] / counts[j]);
            }
        }
    }

    /// <summary>A statistic stored per group of its kind, as seen by the C rows of sample a.</summary>
    private static Span<double> Seen(StatGroup kind, double[] stat, int a, int c, double[] scratch) =>
        kind switch
        {
            StatGroup.PerRow => stat.AsSpan(a * c, c),
            StatGroup.PerSample => Filled(scratch, stat[a]),
            _ => stat.AsSpan(0, c),
        };

    private static Span<double> Filled(double[] scratch, double value)
    {
        scratch.AsSpan().Fill(value);
        return scratch;
    }

    // Element-wise helpers over spans of equal length: a vectorized body and a scalar tail doing the same operations.

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static double Sum(ReadOnlySpan<double> x)
    {
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x);
        var acc = Vector<double>.Zero;

        for (int v = 0; v < vx.Length; v++)
            acc += vx[v];

        double t = Vector.Sum(acc);

        for (int i = vx.Length * Vector<double>.Count; i < x.Length; i++)
            t += x[i];

        return t;
    }

    /// <summary>Σ (x − g)².</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static double SumSquaredDiff(ReadOnlySpan<double> x, double g)
    {
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x);
        var vg = new Vector<double>(g);
        var acc = Vector<double>.Zero;

        for (int v = 0; v < vx.Length; v++)
        {
            var d = vx[v] - vg;
            acc += d * d;
        }

        double t = Vector.Sum(acc);

        for (int i = vx.Length * Vector<double>.Count; i < x.Length; i++)
        {
            double d = x[i] - g;
            t += d * d;
        }

        return t;
    }

    /// <summary>Σ d·(x·s).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static double DotScaled(ReadOnlySpan<double> d, ReadOnlySpan<double> x, double s)
    {
        var vd = MemoryMarshal.Cast<double, Vector<double>>(d);
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x[..d.Length]);
        var vs = new Vector<double>(s);
        var acc = Vector<double>.Zero;

        for (int v = 0; v < vd.Length; v++)
            acc += vd[v] * (vx[v] * vs);

        double t = Vector.Sum(acc);

        for (int i = vd.Length * Vector<double>.Count; i < d.Length; i++)
            t += d[i] * (x[i] * s);

        return t;
    }

    /// <summary>Σ d·(x − y).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static double DotDiff(ReadOnlySpan<double> d, ReadOnlySpan<double> x, ReadOnlySpan<double> y)
    {
        var vd = MemoryMarshal.Cast<double, Vector<double>>(d);
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x[..d.Length]);
        var vy = MemoryMarshal.Cast<double, Vector<double>>(y[..d.Length]);
        var acc = Vector<double>.Zero;

        for (int v = 0; v < vd.Length; v++)
            acc += vd[v] * (vx[v] - vy[v]);

        double t = Vector.Sum(acc);

        for (int i = vd.Length * Vector<double>.Count; i < d.Length; i++)
            t += d[i] * (x[i] - y[i]);

        return t;
    }

    /// <summary>acc += x.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Add(Span<double> acc, ReadOnlySpan<double> x)
    {
        var va = MemoryMarshal.Cast<double, Vector<double>>(acc);
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x[..acc.Length]);

        for (int v = 0; v < va.Length; v++)
            va[v] += vx[v];

        for (int i = va.Length * Vector<double>.Count; i < acc.Length; i++)
            acc[i] += x[i];
    }

    /// <summary>acc += f·x.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddScaled(Span<double> acc, ReadOnlySpan<double> x, double f)
    {
        var va = MemoryMarshal.Cast<double, Vector<double>>(acc);
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x[..acc.Length]);
        var vf = new Vector<double>(f);

        for (int v = 0; v < va.Length; v++)
            va[v] += vf * vx[v];

        for (int i = va.Length * Vector<double>.Count; i < acc.Length; i++)
            acc[i] += f * x[i];
    }

    /// <summary>acc += f·(x·s).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddScaledProduct(Span<double> acc, ReadOnlySpan<double> x, double s, double f)
    {
        var va = MemoryMarshal.Cast<double, Vector<double>>(acc);
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x[..acc.Length]);
        var vs = new Vector<double>(s);
        var vf = new Vector<double>(f);

        for (int v = 0; v < va.Length; v++)
            va[v] += vf * (vx[v] * vs);

        for (int i = va.Length * Vector<double>.Count; i < acc.Length; i++)
            acc[i] += f * (x[i] * s);
    }

    /// <summary>acc += f·(x − y).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddScaledDiff(Span<double> acc, ReadOnlySpan<double> x, ReadOnlySpan<double> y, double f)
    {
        var va = MemoryMarshal.Cast<double, Vector<double>>(acc);
        var vx = MemoryMarshal.Cast<double, Vector<double>>(x[..acc.Length]);
        var vy = MemoryMarshal.Cast<double, Vector<double>>(y[..acc.Length]);
        var vf = new Vector<double>(f);

        for (int v = 0; v < va.Length; v++)
            va[v] += vf * (vx[v] - vy[v]);

        for (int i = va.Length * Vector<double>.Count; i < acc.Length; i++)
            acc[i] += f * (x[i] - y[i]);
    }

    /// <summary>acc += m2 + s·(mean − pooled)², the law of total variance per channel.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddPooledSquares(Span<double> acc, ReadOnlySpan<double> m2, ReadOnlySpan<double> mean, ReadOnlySpan<double> pooled, int s)
    {
        var va = MemoryMarshal.Cast<double, Vector<double>>(acc);
        var v2 = MemoryMarshal.Cast<double, Vector<double>>(m2[..acc.Length]);
        var vm = MemoryMarshal.Cast<double, Vector<double>>(mean[..acc.Length]);
        var vp = MemoryMarshal.Cast<double, Vector<double>>(pooled[..acc.Length]);
        var vs = new Vector<double>((double)s);

        for (int v = 0; v < va.Length; v++)
        {
            var d = vm[v] - vp[v];
            va[v] += v2[v] + vs * d * d;
        }

        for (int i = va.Length * Vector<double>.Count; i < acc.Length; i++)
        {
            double d = mean[i] - pooled[i];
            acc[i] += m2[i] + s * d * d;
        }
    }

    /// <summary>v = 1/sqrt(v + eps).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void InvSqrt(Span<double> v, double eps)
    {
        var vv = MemoryMarshal.Cast<double, Vector<double>>(v);
        var ve = new Vector<double>(eps);

        for (int j = 0; j < vv.Length; j++)
            vv[j] = Vector<double>.One / Vector.SquareRoot(vv[j] + ve);

        for (int i = vv.Length * Vector<double>.Count; i < v.Length; i++)
            v[i] = 1.0 / Math.Sqrt(v[i] + eps);
    }

    /// <summary>q += fv·dv and c0 += fm·dm + fv·dv·(centre − mean).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Coefficients(
        Span<double> q, Span<double> c0, ReadOnlySpan<double> dm, ReadOnlySpan<double> dv, ReadOnlySpan<double> centre,
        ReadOnlySpan<double> mean, double fv, double fm)
    {
        int len = q.Length;
        var vq = MemoryMarshal.Cast<double, Vector<double>>(q);
        var vc = MemoryMarshal.Cast<double, Vector<double>>(c0);
        var vdm = MemoryMarshal.Cast<double, Vector<double>>(dm[..len]);
        var vdv = MemoryMarshal.Cast<double, Vector<double>>(dv[..len]);
        var vce = MemoryMarshal.Cast<double, Vector<double>>(centre[..len]);
        var vme = MemoryMarshal.Cast<double, Vector<double>>(mean[..len]);
        var ffv = new Vector<double>(fv);
        var ffm = new Vector<double>(fm);

        for (int v = 0; v < vq.Length; v++)
        {
            var dvq = ffv * vdv[v];
            vq[v] += dvq;
            vc[v] += ffm * vdm[v] + dvq * (vce[v] - vme[v]);
        }

        for (int i = vq.Length * Vector<double>.Count; i < len; i++)
        {
            double dvq = fv * dv[i];
            q[i] += dvq;
            c0[i] += fm * dm[i] + dvq * (centre[i] - mean[i]);
        }
    }

    /// <summary>
    /// <see cref="Coefficients"/> for unbiased rows (κ ≠ 1): q += fv·κ·dv and
    /// c0 += fm·dm + fv·dv·[κ·(centre − rowMean) + (rowMean − mean)].
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void CoefficientsWithin(
        Span<double> q, Span<double> c0, ReadOnlySpan<double> dm, ReadOnlySpan<double> dv, ReadOnlySpan<double> centre,
        ReadOnlySpan<double> rowMean, ReadOnlySpan<double> mean, double kappa, double fv, double fm)
    {
        for (int i = 0; i < q.Length; i++)
        {
            double dvq = fv * dv[i];
            q[i] += dvq * kappa;
            c0[i] += fm * dm[i] + dvq * (kappa * (centre[i] - rowMean[i]) + (rowMean[i] - mean[i]));
        }
    }
}
