using System;
using System.Linq;
using FsCheck;
using FsCheck.Fluent;
using TorchSharp;
using Xunit;
using static SwitchNorm.CSharp.nn;
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
    }
}
