namespace SwitchNorm

open System
open TorchSharp
open SwitchNorm.FSharp

/// What every rank of a Scope.Across call agreed on.
type internal Agreement = {
    /// The global number of values per channel.
    Total: float
    /// Whether every rank takes the row path (all ranks must take the same one: the two exchange different gradient
    /// terms in the backward).
    RowPath: bool
}

/// <summary>
/// The collective protocol of a Scope.Across call that pools BN over the ranks, and nothing else: before any
/// statistic is exchanged, one allreduce of a header in which each rank states whether its input passed its local
/// checks, its channel count, its dtype, its values per channel and whether the row path can take its shard. A rank's
/// local refusal is relayed this way, so every rank raises instead of leaving the others waiting.
/// </summary>
module internal Collective =

    let private fields = 5

    /// <summary>
    /// Exchanges the header and raises on every rank when a rank refused its input (that rank with its own error),
    /// the ranks disagree on C or the dtype, or the global batch has at most one value per channel.
    /// </summary>
    let agree (layer: string) (comm: ICommunicator) (localError: exn option) (x: torch.Tensor) (rowOk: bool) : Agreement =
        let size, rank = comm.Size, comm.Rank

        let channels = if x.dim () >= 2L then x.size 1 else -1L

        let values =
            if x.dim () >= 2L then
                x.numel () / max 1L (x.size 1)
            else
                0L

        let header = Array.zeroCreate (fields * size)
        header[fields * rank] <- (if localError.IsNone then 1.0 else 0.0)
        header[fields * rank + 1] <- float channels
        header[fields * rank + 2] <- float (int x.dtype)
        header[fields * rank + 3] <- float values
        header[fields * rank + 4] <- (if rowOk then 1.0 else 0.0)
        comm.AllreduceSum header

        let field i =
            Array.init size (fun r -> header[fields * r + i])

        let perRank (vals: float[]) (show: float -> string) =
            vals |> Array.mapi (fun r v -> $"rank {r}: {show v}") |> String.concat ", "

        match localError with
        | Some e -> raise e
        | None -> ()

        let failed =
            field 0
            |> Array.indexed
            |> Array.filter (fun (_, ok) -> ok = 0.0)
            |> Array.map fst

        if failed.Length > 0 then
            let which = failed |> Array.map string |> String.concat ", "
            raise (InvalidOperationException($"{layer}: rank(s) {which} refused their input; see the error on that rank."))

        let agreeOn (what: string) (values: float[]) (show: float -> string) =
            if values |> Array.exists (fun v -> v <> values[0]) then
                raise (ArgumentException($"{layer}: ranks disagree on {what} ({perRank values show}).", "input"))

        agreeOn "the number of channels" (field 1) (fun c -> string (int64 c))
        agreeOn "the dtype" (field 2) (fun d -> string (LanguagePrimitives.EnumOfValue<sbyte, torch.ScalarType>(sbyte d)))

        let counts = field 3
        let total = Array.sum counts

        if total <= 1.0 then
            raise (
                ArgumentException(
                    $"{layer}: expected more than 1 value per channel across all ranks when using batch statistics; got {total} ({perRank counts (fun c -> string (int64 c))}).",
                    "input"
                )
            )

        {
            Total = total
            RowPath = field 4 |> Array.forall (fun ok -> ok = 1.0)
        }
