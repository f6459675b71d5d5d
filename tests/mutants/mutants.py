#!/usr/bin/env python3
"""Deliberate faults in the core, one per mutant. `mutants.py list` prints their names; `mutants.py apply NAME
ROOT` applies one to a copy of the repository at ROOT and fails loudly if any edit no longer matches the source,
so a refactoring cannot silently turn a mutant into a no-op."""
import sys, pathlib

F = "src/SwitchNorm.FSharp/"
K = "src/SwitchNorm.Kernels/RowKernels.cs"

MUTANTS = {
    # Unbiased M2/(n−1) where normalization needs the biased M2/n: every statistic of the tensor path, and the
    # per-row, pooled and synchronized variances of the float32 row path.
    "unbiased-variance": [
        (F + "Moments.fs", "let variance (m: Moments) = m.M2 / m.Count", "let variance (m: Moments) = m.M2 / (m.Count - 1.0)"),
        # the table's divisor (Estimator.Divisor) serves the per-row scale of both schedules of the row path, the
        # tensor path's variances and the pooled ones
        (F + "Statistics.fs", "        | Biased\n        | UnbiasedRows -> count", "        | Biased -> count - 1.0\n        | UnbiasedRows -> count"),
        (K, "var[g] *= invCount;", "var[g] /= count - 1;"),
        (K, "(Sum(rowM2.AsSpan(a * c, c)) + s * SumSquaredDiff(m, g)) * invCount;", "(Sum(rowM2.AsSpan(a * c, c)) + s * SumSquaredDiff(m, g)) / (count - 1);"),
        (F + "RowPath.fs", "total, meanG, m2 |> Array.map (fun v -> v / total)", "total, meanG, m2 |> Array.map (fun v -> v / (total - 1.0))"),
    ],
    # Semantics.Official with biased rows: the official unbiased IN variance (κ = S/(S − 1)) dropped.
    "official-biased-rows": [
        (F + "Statistics.fs", "| UnbiasedRows -> float s / float (s - 1)", "| UnbiasedRows -> 1.0"),
    ],
    # The official keep factor applied the wrong way round: keep·batch + (1 − keep)·running.
    "official-keep-reversed": [
        (F + "Statistics.fs", "Mean = apply r.Mean (fun o i -> (1.0 - f) * o + f * mean[i])", "Mean = apply r.Mean (fun o i -> f * o + (1.0 - f) * mean[i])"),
        (F + "Statistics.fs", "Var = apply r.Var (fun o i -> (1.0 - f) * o + f * var[i])", "Var = apply r.Var (fun o i -> f * o + (1.0 - f) * var[i])"),
    ],
    # The row path's backward forgets κ on the within-row term of an official variance.
    "official-kappa-backward": [
        (K, "q[i] += dvq * kappa;", "q[i] += dvq;"),
    ],
    # running = f·running + (1 − f)·batch instead of (1 − f)·running + f·batch (one update for both paths).
    "momentum-reversed": [
        (F + "Statistics.fs", "let v = Array.map2 (fun o b -> (1.0 - f) * o + f * b) (TensorData.read old) b", "let v = Array.map2 (fun o b -> f * o + (1.0 - f) * b) (TensorData.read old) b"),
    ],
    # One softmax (of the mean logits) shared by the mean and the variance mixtures.
    "shared-softmax": [
        (F + "RowPath.fs", "let wMean, wVar = weights wm, weights wv", "let wMean, wVar = weights wm, weights wm"),
        (F + "RowPath.fs", "(weights w.Var)", "(weights w.Mean)"),
        (F + "RowPath.fs", "(weights wv)", "(weights wm)"),
        (F + "Functional.fs", "Var = p.VarLogits\n", "Var = p.MeanLogits\n"),
        (F + "Functional.fs", "Var = switchWeights o.Layer spec p.VarLogits torch.ScalarType.Float64", "Var = switchWeights o.Layer spec p.MeanLogits torch.ScalarType.Float64"),
        (F + "Functional.fs", "let wVar = switchWeights o.Layer spec p.VarLogits cd", "let wVar = switchWeights o.Layer spec p.MeanLogits cd"),
    ],
    # 1/(sqrt(var) + eps) instead of 1/sqrt(var + eps).
    "eps-outside-sqrt": [
        (K, "v[i] = 1.0 / Math.Sqrt(v[i] + eps);", "v[i] = 1.0 / (Math.Sqrt(v[i]) + eps);"),
        (K, "vv[j] = Vector<double>.One / Vector.SquareRoot(vv[j] + ve);", "vv[j] = Vector<double>.One / (Vector.SquareRoot(vv[j]) + ve);"),
        (K, "(Vector<double>.One / Vector.SquareRoot(v + ve)).CopyTo(r, b);", "(Vector<double>.One / (Vector.SquareRoot(v) + ve)).CopyTo(r, b);"),
        (K, "r[b] = 1.0 / Math.Sqrt(v + eps);", "r[b] = 1.0 / (Math.Sqrt(v) + eps);"),
        (F + "TensorPath.fs", "let r = (var + eps).rsqrt().expand (n, c)", "let r = (var.sqrt () + eps).reciprocal().expand (n, c)"),
    ],
    # M2 = Σx² − n·mean² (accumulated in the input's precision) instead of the centred two-pass sum.
    "naive-variance": [
        (K, "var centres = Avx.ConvertToVector128Single(sums * vinv);", "var centres = Vector128<float>.Zero;"),
        (K, "Centred(p, s, a, out double s1, out double s2);",
         "double s1 = 0; float sq = 0; for (int j = 0; j < s; j++) sq += p[j] * p[j]; double s2 = sq - (double)s * a * a;"),
        (F + "Moments.fs", "use centred = x3 - mean\n        use sq = centred.square ()", "use centred = x3 - mean\n        use sq = x3.square () - mean.square ()"),
    ],
    # Eval uses and updates the batch statistics like training.
    "running-updated-in-eval": [
        (F + "Functional.fs", "let batchFromInput = spec.UsesBatch && (training || running.IsNone)", "let batchFromInput = spec.UsesBatch"),
        (F + "Functional.fs", "| Some r, Some b when training ->", "| Some r, Some b ->"),
    ],
    # No gradient reaches var_weight (the variance logits).
    "var-logits-detached": [
        (F + "RowPath.fs", "weightGrad sv.WVar dwv", "torch.zeros_like (weightGrad sv.WVar dwv)"),
        (F + "Functional.fs", "Var = p.VarLogits\n", "Var = p.VarLogits.detach ()\n"),
        (F + "Functional.fs", "Var = switchWeights o.Layer spec p.VarLogits torch.ScalarType.Float64", "Var = switchWeights o.Layer spec (p.VarLogits.detach ()) torch.ScalarType.Float64"),
        (F + "Functional.fs", "let wVar = switchWeights o.Layer spec p.VarLogits cd", "let wVar = switchWeights o.Layer spec (p.VarLogits.detach ()) cd"),
    ],
    # Float32 statistics that overflow are not redone in float64 (the row kernels' fallback, the tensor path's float64).
    "float32-overflow": [
        (K, "if (!double.IsFinite(s2))\n            {\n                StatsRow64", "if (false)\n            {\n                StatsRow64"),
        (K, "if (Vector256.ExtractMostSignificantBits(finite) != 0xFu)", "if (false)"),
        (F + "TensorPath.fs", "if x3.dtype = torch.ScalarType.Float32 then\n                torch.ScalarType.Float64", "if false then\n                torch.ScalarType.Float64"),
    ],
    # A second backward through the same graph without retain_graph runs again (and doubles the gradients).
    "second-backward-accepted": [
        (F + "Autograd.fs", "if not (KeepGraph.Now()) then", "if false then"),
    ],
    # Loading accepts a tensor of another shape (which copy_ broadcasts).
    "loading-broadcasts": [
        (F + "Modules.fs", "if t.shape <> shape then", "if false then"),
    ],
    # Conversion leaves a ModuleList's own items alone (the registry shows SwitchNorm, the forward runs BatchNorm).
    "conversion-skips-lists": [
        (F + "Tools.fs", "item.SetValue(parent, sn, [| box i |])", "()"),
    ],
}

def apply(name, root):
    root = pathlib.Path(root)
    for path, old, new in MUTANTS[name]:
        f = root / path
        text = f.read_text()
        count = text.count(old)
        if count == 0:
            sys.exit(f"mutant {name}: '{old}' not found in {path}; update tests/mutants/mutants.py")
        f.write_text(text.replace(old, new))

if __name__ == "__main__":
    if sys.argv[1] == "list":
        print("\n".join(MUTANTS))
    else:
        apply(sys.argv[2], sys.argv[3])
