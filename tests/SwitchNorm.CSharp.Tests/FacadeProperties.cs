using System;
using System.Linq;
using FsCheck;
using FsCheck.Fluent;
using TorchSharp;
using Xunit;
using static SwitchNorm.CSharp.Layers;
using static TorchSharp.torch;

namespace SwitchNorm.CSharp.Tests
{
    /// <summary>Property tests of the facade written with FsCheck's fluent (C#) API.</summary>
    public class FacadeProperties
    {
        private static readonly Gen<double[]> Logits =
            Gen.Elements(-30.0, -2.5, 0.0, 1.0, 4.0, 30.0).ArrayOf(3);

        private static readonly Gen<long[]> Shapes =
            from n in Gen.Choose(1, 4)
            from c in Gen.Choose(1, 4)
            from h in Gen.Choose(1, 4)
            from w in Gen.Choose(1, 4)
            where n * h * w > 1
            select new long[] { n, c, h, w };

        [Fact]
        public void Mixtures_are_convex_for_any_logits()
        {
            Prop.ForAll(Arb.From(Logits), Arb.From(Logits), (lm, lv) =>
            {
                var m = SwitchNorm2d(2);
                using (torch.no_grad())
                {
                    m.mean_weight.copy_(torch.tensor(lm.Select(v => (float)v).ToArray()));
                    m.var_weight.copy_(torch.tensor(lv.Select(v => (float)v).ToArray()));
                }
                return m.MeanMixture.Concat(m.VarMixture).All(v => v >= 0 && !double.IsNaN(v))
                    && Math.Abs(m.MeanMixture.Sum() - 1) < 1e-12 && Math.Abs(m.VarMixture.Sum() - 1) < 1e-12;
            }).QuickCheckThrowOnFailure();
        }

        [Fact]
        public void Output_is_invariant_to_a_common_offset()
        {
            Prop.ForAll(Arb.From(Shapes), Arb.From(Gen.Choose(0, 10000)), (shape, seed) =>
            {
                torch.random.manual_seed(seed);
                var x = torch.randn(shape, ScalarType.Float64);
                var m = SwitchNorm2d(shape[1], dtype: ScalarType.Float64);
                // float64 outputs are O(1); 1e-8 absorbs the rounding of the offset's cancellation (u·100 ≈ 1e-14)
                return torch.allclose(m.forward(x), m.forward(x + 100.0), rtol: 0, atol: 1e-8);
            }).QuickCheckThrowOnFailure();
        }

        [Fact]
        public void Batch_one_hot_equals_BatchNorm2d_in_training_and_eval()
        {
            Prop.ForAll(Arb.From(Shapes), Arb.From(Gen.Choose(0, 10000)), (shape, seed) =>
            {
                var x = torch.randn(shape, ScalarType.Float32, generator: new torch.Generator((ulong)seed));
                var sn = SwitchNorm2d(shape[1]);
                var bn = torch.nn.BatchNorm2d(shape[1]);
                using (torch.no_grad())
                {
                    // exp(−1e4) underflows to 0: the mixture is exactly BN
                    var hot = torch.tensor(new float[] { -1e4f, -1e4f, 0f });
                    sn.mean_weight.copy_(hot);
                    sn.var_weight.copy_(hot);
                }
                // float32 outputs are O(1): 2e-5 is about 300 units of float32 rounding
                var train = torch.allclose(sn.forward(x), bn.forward(x), rtol: 0, atol: 2e-5)
                    && torch.allclose(sn.running_var, bn.running_var, rtol: 2e-5, atol: 2e-5);
                sn.eval();
                bn.eval();
                var before = sn.running_mean.clone();
                var eval = torch.allclose(sn.forward(x), bn.forward(x), rtol: 0, atol: 2e-5);
                return train && eval && sn.running_mean.eq(before).all().item<bool>();
            }).QuickCheckThrowOnFailure();
        }

        [Fact]
        public void Fused_and_composed_paths_agree_through_the_facade()
        {
            Prop.ForAll(Arb.From(Shapes), Arb.From(Logits), Arb.From(Gen.Choose(0, 10000)), (shape, logits, seed) =>
            {
                var x = torch.randn(shape, ScalarType.Float64, generator: new torch.Generator((ulong)seed));
                SwitchNormNd Make(bool fused)
                {
                    var m = SwitchNorm2d(shape[1], dtype: ScalarType.Float64);
                    m.Fused = fused;
                    using (torch.no_grad()) m.var_weight.copy_(torch.tensor(logits));
                    return m;
                }
                var (a, b) = (Make(true), Make(false));
                var (xa, xb) = (x.clone().requires_grad_(), x.clone().requires_grad_());
                a.forward(xa).square().sum().backward();
                b.forward(xb).square().sum().backward();
                // float64: 1e-9 leaves room for the different summation orders of the two paths
                return torch.allclose(xa.grad, xb.grad, rtol: 1e-9, atol: 1e-9)
                    && torch.allclose(a.var_weight.grad, b.var_weight.grad, rtol: 1e-9, atol: 1e-9);
            }).QuickCheckThrowOnFailure();
        }
    }
}
