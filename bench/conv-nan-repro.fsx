// A platform defect, not ours: on this machine (libtorch 2.10 CPU via TorchSharp 0.107, 2 cores, no NNPACK support),
// Conv2d's input gradient contains NaN in many calls for small channel counts, with no normalizer involved.
// Build once, then: dotnet fsi bench/conv-nan-repro.fsx
// Measured 2026-11-30: (cin 1, cout 4, N 4, 6x6) 153/200 calls with NaN; (4, 4, 2, 12x12) 58/200; (8, 8, 2, 12x12),
// (16, 32, 2, 14x14) and (1, 16, 32, 28x28) 0/200. Weight and bias gradients were always finite.
#load "../fsi-scripts/experiment-references.fsx"

open TorchSharp

torch.random.manual_seed 7L |> ignore

let test (cin: int64) (cout: int64) (n: int64) (hw: int64) =
    let conv = torch.nn.Conv2d(cin, cout, 3L, padding = 1L)
    let mutable bad = 0

    for _ in 1..200 do
        use _ = torch.NewDisposeScope()
        let x = torch.randn([| n; cin; hw; hw |]).requires_grad_ true
        let y = conv.forward x
        (y * y).mean().backward ()

        if x.grad.isnan().any().item<bool> () then
            bad <- bad + 1

    printfn "Conv2d(%d, %d, 3, padding=1) on (%d, %d, %d, %d): NaN in the input gradient in %d of 200 calls" cin cout n cin hw hw bad

for (cin, cout, n, hw) in
    [
        1L, 4L, 4L, 6L
        4L, 4L, 2L, 12L
        8L, 8L, 2L, 12L
        16L, 32L, 2L, 14L
        1L, 16L, 32L, 28L
    ] do
    test cin cout n hw
