using System;
using System.IO;
using System.Linq;
using System.Reflection;
using TorchSharp;
using Xunit;
using static SwitchNorm.CSharp.Layers;
using static TorchSharp.torch;
using TNN = TorchSharp.torch.nn;

namespace SwitchNorm.CSharp.Tests
{
    public class FacadeTests
    {
        // float32 unit roundoff 6e-8; outputs are O(1) from sums over ≤ 100 values: 2e-5 leaves a wide margin.
        private const double F32 = 2e-5;

        private static void SetOneHot(global::SwitchNorm.SwitchNormNd m, int hot)
        {
            using var _ = torch.no_grad();
            var k = (int)m.mean_weight.shape[0];
            var l = torch.tensor(Enumerable.Range(0, k).Select(i => i == hot ? 0f : -1e4f).ToArray());
            m.mean_weight.copy_(l);
            m.var_weight.copy_(l);
        }

        [Fact]
        public void Renaming_BatchNorm2d_to_SwitchNorm2d_compiles_with_the_same_arguments_and_defaults()
        {
            var bn = TNN.BatchNorm2d(8, 1e-3, 0.2, true, true, null, ScalarType.Float32);
            var sn = SwitchNorm2d(8, 1e-3, 0.2, true, true, null, ScalarType.Float32);
            Assert.Equal(bn.eps, sn.eps);
            Assert.Equal(bn.momentum, sn.momentum);
            var d = SwitchNorm2d(8);
            Assert.Equal(1e-5, d.eps);
            Assert.Equal(0.1, d.momentum);
            Assert.True(d.affine && d.track_running_stats && d.using_bn && !d.last_gamma);
            Assert.Null(SwitchNorm2d(8, momentum: null).momentum);
            Assert.Equal(new[] { "IN", "LN" }, SwitchNorm1d(3, using_bn: false).Components);
            Assert.Equal(0f, SwitchNorm3d(3, last_gamma: true).weight.sum().item<float>());
        }

        [Fact]
        public void BN_one_hot_equals_BatchNorm2d_in_training_and_eval()
        {
            torch.random.manual_seed(5);
            var sn = SwitchNorm2d(4);
            var bn = TNN.BatchNorm2d(4);
            SetOneHot(sn, 2);
            for (int s = 0; s < 3; s++)
            {
                var x = torch.randn(3, 4, 5, 5) * 2 + s;
                var diff = (sn.forward(x) - bn.forward(x)).abs().max().item<float>();
                Assert.True(diff < F32, $"train step {s}: {diff}");
            }
            Assert.True((sn.running_var - bn.running_var!).abs().max().item<float>() < F32);
            sn.eval(); bn.eval();
            var xe = torch.randn(2, 4, 3, 3);
            Assert.True((sn.forward(xe) - bn.forward(xe)).abs().max().item<float>() < F32);
        }

        [Fact]
        public void Errors_name_expected_and_actual()
        {
            var sn = SwitchNorm2d(4);
            var e = Assert.Throws<ArgumentException>(() => sn.forward(torch.randn(2, 4)));
            Assert.Contains("4-D input (N, C, H, W)", e.Message);
            Assert.Contains("[2, 4]", e.Message);
            Assert.Throws<ArgumentOutOfRangeException>(() => SwitchNorm2d(0));
            Assert.Throws<ArgumentOutOfRangeException>(() => SwitchNorm2d(3, momentum: 2.0));
            var tooSmall = Assert.Throws<ArgumentException>(() => sn.forward(torch.randn(1, 4, 1, 1)));
            Assert.Contains("more than 1 value per channel", tooSmall.Message);
            Assert.Equal(0L, sn.num_batches_tracked.item<long>());
        }

        [Fact]
        public void Conversion_recalibration_mixtures_and_checkpoints_from_CSharp()
        {
            torch.random.manual_seed(6);
            var model = TNN.Sequential(
                ("conv", (TNN.Module<Tensor, Tensor>)TNN.Conv2d(1, 3, 3, padding: 1)),
                ("bn", TNN.BatchNorm2d(3)),
                ("relu", TNN.ReLU()));
            SwitchNormTools.ConvertBatchNorm(model, LogitInit.BatchLeaning);
            var mix = SwitchNormTools.Mixtures(model);
            Assert.Single(mix);
            Assert.Equal("bn", mix[0].Name);
            Assert.Equal(1.0, mix[0].Mean.Sum(), 12);
            // the default margin, Defaults.BnLogitMargin = 2: BN weight 1/(1 + 2e^-2), IN and LN e^-2/(1 + 2e^-2) (float32 logits)
            Assert.Equal(2.0, global::SwitchNorm.Defaults.BnLogitMargin);
            Assert.Equal(1.0 / (1.0 + 2.0 * Math.Exp(-2.0)), mix[0].Mean[2], 6);
            Assert.Equal(Math.Exp(-2.0) / (1.0 + 2.0 * Math.Exp(-2.0)), mix[0].Var[0], 6);

            var batches = Enumerable.Range(0, 3).Select(_ => torch.randn(2, 1, 4, 4)).ToList();
            Assert.Equal(3, SwitchNormTools.RecalibrateBatchAverage(model, batches));

            var path = Path.GetTempFileName();
            try
            {
                model.save(path);
                var other = TNN.Sequential(("conv", (TNN.Module<Tensor, Tensor>)TNN.Conv2d(1, 3, 3, padding: 1)), ("bn", SwitchNorm2d(3)), ("relu", TNN.ReLU()));
                SwitchNormTools.LoadCheckpoint(other, path);
                var a = model.state_dict(); var b = other.state_dict();
                foreach (var k in a.Keys) Assert.True(a[k].eq(b[k]).all().item<bool>(), k);
                var wrong = TNN.Sequential(("conv", (TNN.Module<Tensor, Tensor>)TNN.Conv2d(1, 3, 3, padding: 1)), ("bn", SwitchNorm2d(5)));
                var e = Assert.Throws<InvalidDataException>(() => SwitchNormTools.LoadCheckpoint(wrong, path));
                Assert.Contains("bn.weight", e.Message);
            }
            finally { File.Delete(path); }
        }

        [Fact]
        public void No_type_a_CSharp_user_imports_clashes_with_System_or_TorchSharp()
        {
            // the names `using System; using TorchSharp; using static TorchSharp.torch;` bring in
            var taken = typeof(object).Assembly.GetExportedTypes().Where(t => t.Namespace == "System").Select(t => t.Name)
                .Concat(typeof(torch).Assembly.GetExportedTypes().Where(t => t.Namespace == "TorchSharp").Select(t => t.Name))
                .Concat(typeof(torch).GetNestedTypes().Select(t => t.Name))
                .ToHashSet();
            var ours = typeof(SwitchNormTools).Assembly.GetExportedTypes()
                .Concat(typeof(global::SwitchNorm.SwitchNormNd).Assembly.GetExportedTypes().Where(t => t.Namespace == "SwitchNorm"))
                .Where(t => !t.IsNested)
                .Select(t => t.Name.Split('`')[0]);
            Assert.Empty(ours.Where(taken.Contains));
        }

        [Fact]
        public void No_FSharp_types_on_the_CSharp_surface()
        {
            static bool IsFSharp(Type t) =>
                t.Assembly.GetName().Name == "FSharp.Core" || (t.IsGenericType && t.GetGenericArguments().Any(IsFSharp)) || (t.HasElementType && IsFSharp(t.GetElementType()!));

            // everything C# sees: the facade, and every exported type of the core outside its F#-only namespace
            var types = typeof(SwitchNormTools).Assembly.GetExportedTypes()
                .Concat(typeof(global::SwitchNorm.SwitchNormNd).Assembly.GetExportedTypes().Where(t => t.Namespace == "SwitchNorm"))
                .ToArray();
            Assert.Contains(typeof(global::SwitchNorm.SyncSwitchNorm2d), types);
            Assert.Contains(typeof(global::SwitchNorm.InProcessGroup), types);
            var offenders =
                from t in types
                from m in t.GetMembers(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly)
                let sigTypes = m switch
                {
                    MethodBase mb => mb.GetParameters().Select(p => p.ParameterType).Concat(mb is MethodInfo mi ? new[] { mi.ReturnType } : Array.Empty<Type>()),
                    PropertyInfo p => new[] { p.PropertyType },
                    FieldInfo f => new[] { f.FieldType },
                    _ => Array.Empty<Type>()
                }
                where sigTypes.Any(IsFSharp)
                select $"{t.Name}.{m.Name}";
            Assert.Empty(offenders);
        }

        [Fact]
        public void Sparse_switches_are_a_factory_option_with_a_radius_schedule_and_freezing()
        {
            var sn = SwitchNorm2d(4, switch_kind: SwitchKind.Sparsestmax);
            Assert.Equal(SwitchKind.Sparsestmax, sn.SwitchKind);
            Assert.Equal(SwitchKind.Softmax, SwitchNorm2d(4).SwitchKind);
            using (torch.no_grad())
            {
                sn.mean_weight.copy_(torch.tensor(new[] { 0.3f, 0.1f, 0.2f }));
                sn.var_weight.copy_(torch.tensor(new[] { 0.1f, 0.2f, 0.4f }));
            }
            var model = TNN.Sequential(("norm", (TNN.Module<Tensor, Tensor>)sn));
            Assert.Equal(0.0, SwitchNormTools.SparsestmaxRadius(0.0));
            Assert.Equal(1.0, SwitchNormTools.SparsestmaxRadius(0.8));
            Assert.Equal(0, SwitchNormTools.StepSparsestmax(model, 0.0));
            Assert.False(sn.IsFrozen);
            Assert.Equal(1, SwitchNormTools.StepSparsestmax(model, 1.0));
            Assert.True(sn.IsFrozen);
            var mix = SwitchNormTools.Mixtures(model).Single();
            Assert.Equal(new[] { 1.0, 0.0, 0.0 }, mix.Mean);
            Assert.Equal(new[] { 0.0, 0.0, 1.0 }, mix.Var);
            Assert.Throws<ArgumentOutOfRangeException>(() => sn.Radius = 2.0);
            Assert.Equal(1, SwitchNormTools.UseSwitch(TNN.Sequential(("n", (TNN.Module<Tensor, Tensor>)SwitchNorm2d(2))), SwitchKind.Sparsemax));
        }

        [Fact]
        public void SyncSwitchNorm2d_over_two_in_process_ranks_equals_SwitchNorm2d_on_the_whole_batch()
        {
            var x = torch.randn(new long[] { 5, 3, 4, 4 }, dtype: ScalarType.Float64);
            var reference = SwitchNorm2d(3, dtype: ScalarType.Float64);
            var expected = reference.forward(x);
            var shards = new[] { (0L, 2L), (2L, 3L) };
            var outputs = global::SwitchNorm.InProcessGroup.Run(2, comm =>
            {
                var m = SyncSwitchNorm2d(3, comm, dtype: ScalarType.Float64);
                var (start, length) = shards[comm.Rank];
                return (m.forward(x.narrow(0, start, length)), m.running_var.clone());
            });
            var y = torch.cat(outputs.Select(o => o.Item1).ToArray(), 0);
            Assert.True(torch.allclose(y, expected, rtol: 0, atol: 1e-12));
            foreach (var o in outputs)
                Assert.True(torch.allclose(o.Item2, reference.running_var, rtol: 0, atol: 1e-12));
        }
    }
}
