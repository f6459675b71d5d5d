using System;
using System.IO;
using Xunit;

namespace SwitchNorm.CSharp.Tests
{
    public class ReadmeTests
    {
        [Fact]
        public void The_CSharp_example_of_the_README_runs()
        {
            // the example writes a checkpoint in the working directory
            var dir = Directory.CreateTempSubdirectory("switchnorm-readme-");
            var before = Environment.CurrentDirectory;
            try
            {
                Environment.CurrentDirectory = dir.FullName;
                ReadmeExample.Run();
            }
            finally
            {
                Environment.CurrentDirectory = before;
                dir.Delete(true);
            }
        }
    }
}
