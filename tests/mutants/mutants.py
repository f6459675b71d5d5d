#!/usr/bin/env python3
"""Deliberate faults in the core, one per mutant. `mutants.py list` prints their names; `mutants.py apply NAME
ROOT` applies one to a copy of the repository at ROOT and fails loudly if any edit no longer matches the source,
so a refactoring cannot silently turn a mutant into a no-op."""
import sys, pathlib

F = "src/SwitchNorm.FSharp/"
K = "src/SwitchNorm.Kernels/RowKernels.cs"

MUTANTS = {
    # Unbiased M2/(n−1) where normalization needs the biased M2/n: every statistic of the tensor paths, and the
    # per-row and pooled variances of the float32 row kernels.
    "unbiased-variance": [
        (F + "Moments.fs", "let variance (m: Moments) = m.M2 / m.Count", "let variance (m: Moments) = m.M2 / (m.Count - 1.0)"),
        (F + "Kernel.fs", "VarScale = 1.0 / float st.S", "VarScale = 1.0 / float (st.S - 1)"),
        (K, "var[g] *= invCount;", "var[g] /= count - 1;"),
        (K, "(Sum(rowM2.AsSpan(a * c, c)) + s * SumSquaredDiff(m, g)) * invCount;", "(Sum(rowM2.AsSpan(a * c, c)) + s * SumSquaredDiff(m, g)) / (count - 1);"),
        (F + "Kernel.fs", "1.0 / float s,\n", "1.0 / float (s - 1),\n"),
        (F + "Sync.fs", "let varG = m2 |> Array.map (fun v -> v / total)", "let varG = m2 |> Array.map (fun v -> v / (total - 1.0))"),
        (F + "Sync.fs", "let varG = ((m2 / total).to_type cd)", "let varG = ((m2 / (total - 1.0)).to_type cd)"),
    ],
    # running = f·running + (1 − f)·batch instead of (1 − f)·running + f·batch.
    "momentum-reversed": [
        (F + "Functional.fs", "let v = Array.map2 (fun o b -> (1.0 - f) * o + f * b) (KernelNorm.read old) b", "let v = Array.map2 (fun o b -> f * o + (1.0 - f) * b) (KernelNorm.read old) b"),
        (F + "Functional.fs", "let m' = r.Mean * (1.0 - f) + bMean * f", "let m' = r.Mean * f + bMean * (1.0 - f)"),
        (F + "Functional.fs", "let v' = r.Var * (1.0 - f) + bVar * f", "let v' = r.Var * f + bVar * (1.0 - f)"),
    ],
    # One softmax (of the mean logits) shared by the mean and the variance mixtures.
    "shared-softmax": [
        (F + "Kernel.fs", "let wMean, wVar = weights wm, weights wv", "let wMean, wVar = weights wm, weights wm"),
        (F + "Functional.fs", "(weights wMean) (weights wVar)", "(weights wMean) (weights wMean)"),
        (F + "Functional.fs", "switched p.MeanLogits torch.ScalarType.Float64, switched p.VarLogits torch.ScalarType.Float64",
         "switched p.MeanLogits torch.ScalarType.Float64, switched p.MeanLogits torch.ScalarType.Float64"),
        (F + "Functional.fs", "let wVar = switched p.VarLogits cd", "let wVar = switched p.MeanLogits cd"),
        (F + "Sync.fs", "                p.MeanLogits, p.VarLogits\n", "                p.MeanLogits, p.MeanLogits\n"),
        (F + "Sync.fs", "switched p.MeanLogits, switched p.VarLogits", "switched p.MeanLogits, switched p.MeanLogits"),
        (F + "Functional.fs", "Mixing.mix (switchWeights layer spec p.VarLogits cd)", "Mixing.mix (switchWeights layer spec p.MeanLogits cd)"),
    ],
    # 1/(sqrt(var) + eps) instead of 1/sqrt(var + eps).
    "eps-outside-sqrt": [
        (K, "v[i] = 1.0 / Math.Sqrt(v[i] + eps);", "v[i] = 1.0 / (Math.Sqrt(v[i]) + eps);"),
        (K, "vv[j] = Vector<double>.One / Vector.SquareRoot(vv[j] + ve);", "vv[j] = Vector<double>.One / (Vector.SquareRoot(vv[j]) + ve);"),
        (K, "(Vector<double>.One / Vector.SquareRoot(v + ve)).CopyTo(r, b);", "(Vector<double>.One / (Vector.SquareRoot(v) + ve)).CopyTo(r, b);"),
        (K, "r[b] = 1.0 / Math.Sqrt(v + eps);", "r[b] = 1.0 / (Math.Sqrt(v) + eps);"),
        (F + "Functional.fs", "let invStd = ((var + spec.Eps).rsqrt ())", "let invStd = ((var.sqrt () + spec.Eps).reciprocal ())"),
        (F + "Fused.fs", "use varEps = var + st.Eps", "use varEps = (var.sqrt () + st.Eps).square ()"),
    ],
    # M2 = Σx² − n·mean² (accumulated in the input's precision) instead of the centred two-pass sum.
    "naive-variance": [
        (K, "var centres = Avx.ConvertToVector128Single(sums * vinv);", "var centres = Vector128<float>.Zero;"),
        (K, "Centred(p, s, a, out double s1, out double s2);",
         "double s1 = 0; float sq = 0; for (int j = 0; j < s; j++) sq += p[j] * p[j]; double s2 = sq - (double)s * a * a;"),
        (F + "Fused.fs", "mean.squeeze 2L, centred, norm.square ()",
         "mean.squeeze 2L, centred, x3.square().sum ([| 2L |]) - mean.squeeze(2L).square () * float x3.shape[2]"),
        (F + "Moments.fs", "use centred = x3 - mean\n        use sq = centred.square ()", "use centred = x3 - mean\n        use sq = x3.square () - mean.square ()"),
    ],
    # Eval uses and updates the batch statistics like training.
    "running-updated-in-eval": [
        (F + "Functional.fs", "let bnFromBatch = spec.UsesBatch && (training || running.IsNone)", "let bnFromBatch = spec.UsesBatch"),
        (F + "Functional.fs", "| Some r, Some(count, mean, var) when training ->", "| Some r, Some(count, mean, var) ->"),
        (F + "Functional.fs", "| None, Some r, Some b when training ->", "| None, Some r, Some b ->"),
        (F + "Modules.fs", "spec.UsesBatch && (this.training || recalibrating || not trackRunningStats)", "spec.UsesBatch"),
        (F + "Sync.fs", "| Some r when training ->", "| Some r ->"),
    ],
    # No gradient reaches var_weight (the variance logits).
    "var-logits-detached": [
        (F + "Kernel.fs", "weightGrad sv.WVar dwv", "torch.zeros_like (weightGrad sv.WVar dwv)"),
        (F + "Fused.fs", "let dwv = torch.stack [ for v in vars -> (dVar * v).sum () ]", "let dwv = torch.zeros_like (torch.stack [ for v in vars -> (dVar * v).sum () ])"),
        (F + "Functional.fs", "let wVar = switched p.VarLogits cd", "let wVar = switched (p.VarLogits.detach ()) cd"),
        (F + "Sync.fs", "                p.MeanLogits, p.VarLogits\n", "                p.MeanLogits, p.VarLogits.detach ()\n"),
        (F + "Functional.fs", "Mixing.mix (switchWeights layer spec p.VarLogits cd)", "Mixing.mix (switchWeights layer spec (p.VarLogits.detach ()) cd)"),
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
