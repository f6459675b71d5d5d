module Smoke
open Xunit
open TorchSharp
[<Fact>]
let ``torch loads`` () =
    let x = torch.randn(3L, 4L)
    Assert.Equal(12L, x.numel())
