// An application that forgot the libtorch backend: the first SwitchNorm call must say what to add.
try
{
    var norm = SwitchNorm.CSharp.Layers.SwitchNorm2d(4);
    Console.WriteLine("unexpected: the layer was made without a backend");
    return 1;
}
catch (InvalidOperationException e) when (e.Message.Contains("<PackageReference Include=\"libtorch-cpu-linux-x64\""))
{
    Console.WriteLine("clear message: " + e.Message.Split(" The cause:")[0]);
    return 0;
}
