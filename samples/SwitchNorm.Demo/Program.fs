/// The main job (for now): a small CNN with SwitchNorm2d layers learns a synthetic classification task on
/// generated data for a few steps, then prints its losses, accuracy and the learned mixture per layer.
module Program

open System
open TorchSharp
open SwitchNorm

type F = torch.nn.functional

/// Synthetic data: class k images carry a bright k-th quadrant on noisy backgrounds with per-sample offsets,
/// so the per-sample contrast (what IN and LN capture) matters.
let batch (n: int64) =
    let labels = torch.randint (4L, [| n |])
    let x = torch.randn (n, 1L, 16L, 16L) * 0.5 + torch.randn (n, 1L, 1L, 1L) * 3.0
    use _ = torch.no_grad ()

    for i in 0L .. n - 1L do
        let k = labels[i].item<int64> ()
        let r, c = (k / 2L) * 8L, (k % 2L) * 8L
        x[i].narrow(1L, r, 8L).narrow(2L, c, 8L).add_ (2.0.ToScalar()) |> ignore

    x, labels

[<EntryPoint>]
let main argv =
    let steps = if argv.Length > 0 then int argv[0] else 150
    torch.random.manual_seed 7L |> ignore
    torch.set_num_threads 2

    let model =
        torch.nn.Conv2d(1L, 8L, 3L, padding = 1L)
        >-> new SwitchNorm2d(8L)
        >-> Layer.ofFn "relu" F.relu
        >-> torch.nn.Conv2d(8L, 16L, 3L, stride = 2L, padding = 1L)
        >-> new SwitchNorm2d(16L)
        >-> Layer.ofFn "relu" F.relu
        >-> Layer.ofFn "pool" (fun x -> x.mean ([| 2L; 3L |]))
        >-> torch.nn.Linear(16L, 4L)

    let opt = torch.optim.Adam(model.parameters (), lr = 0.01)
    printfn "Training a 2-layer CNN with SwitchNorm2d on generated data: %d steps of batch 16 (2 threads)" steps

    for step in 1..steps do
        use _ = torch.NewDisposeScope()
        let x, y = batch 16L
        opt.zero_grad ()
        let loss = F.cross_entropy (model.forward x, y)
        loss.backward ()
        opt.step () |> ignore

        if step % 25 = 0 || step = 1 then
            printfn "  step %4d  loss %.4f" step (loss.item<float32> ())

    model.eval () |> ignore

    let acc =
        use _ = torch.no_grad ()
        let x, y = batch 512L
        (model.forward(x).argmax(1L).eq y).to_type(torch.ScalarType.Float32).mean().item<float32> ()

    printfn "Eval accuracy on 512 fresh samples: %.3f" acc
    printfn "Learned mixtures (softmax of mean_weight and var_weight, order IN LN BN):"
    printfn "%s" (Mixture.ofModel model |> Mixture.format)
    0
