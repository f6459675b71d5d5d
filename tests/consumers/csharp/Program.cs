using TorchSharp;
using static TorchSharp.torch;
using SwitchNorm;
using SwitchNorm.CSharp;

// A converted TorchVision resnet18: train a few steps, save, load into a fresh converted copy, same outputs.
torch.manual_seed(1);
var model = torchvision.models.resnet18(num_classes: 10);
var converted = model.ConvertBatchNorm(LogitInit.BatchLeaning);
Console.WriteLine(converted.ToString().Split(':')[0]);
if (converted.Count != 20)
    throw new Exception($"expected 20 BatchNorm2d in resnet18, converted {converted.Count}");

var optimizer = optim.SGD(model.parameters(), 0.01, momentum: 0.9);
model.train();
for (int step = 0; step < 3; step++)
{
    using var scope = NewDisposeScope();
    optimizer.zero_grad();
    var x = randn(4, 3, 64, 64);
    var target = randint(0, 10, new long[] { 4 });
    var loss = nn.functional.cross_entropy(model.call(x), target);
    loss.backward();
    optimizer.step();
    Console.WriteLine($"step {step}: loss {loss.item<float>():F4}");
}

model.eval();
var path = Path.Combine(Path.GetTempPath(), $"consumer-{Environment.ProcessId}.bin");
model.save(path);
var again = torchvision.models.resnet18(num_classes: 10);
again.ConvertBatchNorm();
again.LoadCheckpoint(path);
again.eval();
File.Delete(path);

using (no_grad())
{
    var x = randn(2, 3, 64, 64);
    var a = model.call(x);
    var b = again.call(x);
    if (!a.allclose(b, rtol: 0, atol: 1e-6))
        throw new Exception("the loaded model gives other outputs");
}

foreach (var m in model.Mixtures().Take(2))
    Console.WriteLine(m);
Console.WriteLine("consumer ok");
