using System;
using System.IO;
using System.Linq;
using TorchSharp;
using Xunit;
using static SwitchNorm.CSharp.Layers;
using static TorchSharp.torch;

namespace SwitchNorm.CSharp.Tests
{
    /// <summary>The PyTorch interop and the model zoo from C# (the files of the real PyTorch are tested in F#).</summary>
    public class InteropTests
    {
        [Fact]
        public void Zoo_models_have_the_official_key_counts_and_official_semantics()
        {
            // counts of the official state dicts (python3-torch, tests/interop/official_sn.py): 373 and 355 for -50
            var v1 = models.resnetv1sn50();
            Assert.Equal(373, v1.state_dict().Count);
            Assert.Equal(355, models.resnetv2sn50().state_dict().Count);
            Assert.All(v1.modules().OfType<SwitchNormNd>(), m => Assert.Equal(Semantics.Official, m.semantics));
            Assert.DoesNotContain(v1.state_dict().Keys, k => k.EndsWith("num_batches_tracked"));
            Assert.Throws<ArgumentException>(() => models.resnetv2sn18(last_gamma: true));
            Assert.Throws<ArgumentOutOfRangeException>(() => models.resnetv1sn18(num_classes: 0));
        }

        [Fact]
        public void Official_factories_take_the_official_keep_factor()
        {
            var sn = OfficialSwitchNorm2d(8);
            Assert.Equal(Semantics.Official, sn.semantics);
            Assert.Equal(1 - 0.9, sn.momentum!.Value, 15);
            Assert.Equal(1 - 0.997, OfficialSwitchNorm3d(8).momentum!.Value, 15);
            Assert.False(OfficialSwitchNorm1d(8, using_moving_average: false).using_moving_average);
            Assert.Throws<ArgumentOutOfRangeException>(() => OfficialSwitchNorm2d(8, momentum: 1.5));
        }

        [Fact]
        public void SavePyTorch_and_LoadPyTorch_round_trip_in_both_formats_and_layouts()
        {
            var dir = Directory.CreateTempSubdirectory("switchnorm-cs-interop").FullName;
            var net = models.resnetv1sn18(num_classes: 10);
            net.train();
            using (no_grad()) net.forward(randn(2, 3, 224, 224));
            net.eval();
            var x = randn(1, 3, 224, 224);
            Tensor y;
            using (no_grad()) y = net.forward(x);

            foreach (var (name, layout, prefix) in new[] { ("a.pt", PyTorchLayout.Module, ""), ("b.pth", PyTorchLayout.Official, "module."), ("c.safetensors", PyTorchLayout.Official, "") })
            {
                var path = Path.Combine(dir, name);
                net.SavePyTorch(path, layout, prefix);
                var again = models.resnetv1sn18(num_classes: 10);
                var (missing, unexpected) = again.LoadPyTorch(path);
                Assert.Empty(missing);
                Assert.Empty(unexpected);
                again.eval();
                using (no_grad()) Assert.True(again.forward(x).eq(y).all().item<bool>(), name);
            }

            // a smaller file written over a larger one is complete (PyBridge's own path overloads do not truncate)
            var small = OfficialSwitchNorm2d(8);
            small.SavePyTorch(Path.Combine(dir, "a.pt.over"));
            net.SavePyTorch(Path.Combine(dir, "over.pt"));
            small.SavePyTorch(Path.Combine(dir, "over.pt"));
            var reread = OfficialSwitchNorm2d(8);
            Assert.Empty(reread.LoadPyTorch(Path.Combine(dir, "over.pt")).missing_keys);

            // all or nothing: a file of another architecture changes nothing
            var other = models.resnetv2sn18(num_classes: 10);
            var before = other.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
            var e = Assert.Throws<InvalidDataException>(() => other.LoadPyTorch(Path.Combine(dir, "a.pt")));
            Assert.Contains("nothing was loaded", e.Message);
            Assert.All(other.state_dict(), kv => Assert.True(kv.Value.eq(before[kv.Key]).all().item<bool>(), kv.Key));
        }
    }
}
