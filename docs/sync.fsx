(**
# SyncSwitchNorm

With a batch split across processes, `SyncSwitchNorm2d(c, communicator)` uses the BN statistics of the global batch:
the same module as SwitchNorm2d with its statistics scope set to `Scope.Across communicator`. Here the ranks are
threads of one process (`InProcessGroup`); under mpirun, `MpiCommunicator.World()` is the communicator. The test
command runs this page as a script.
*)
(*** hide ***)
#load "../fsi-scripts/references.fsx"
(** *)
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp

let x = torch.randn (6L, 4L, 5L, 5L, dtype = torch.ScalarType.Float64)
let whole = new SwitchNorm2d(4L, dtype = torch.ScalarType.Float64)
let expected = whole.forward x
(**
Two ranks take 2 and 4 samples; each gets its part of the whole batch's output:
*)
let parts =
    InProcessGroup.Run(
        2,
        fun comm ->
            let m = new SyncSwitchNorm2d(4L, comm, dtype = torch.ScalarType.Float64)
            let shard = if comm.Rank = 0 then x[torch.TensorIndex.Slice(0L, 2L)] else x[torch.TensorIndex.Slice(2L, 6L)]
            (m.forward shard).detach ()
    )

let difference = (torch.cat (parts, 0L) - expected).abs().max().item<float> ()
printfn "largest difference from the unsplit batch: %.2g" difference

if difference > 1e-10 then
    failwith "the ranks do not reproduce the whole batch"
