namespace SwitchNorm

/// <summary>
/// A group of processes (ranks) that can sum small float64 arrays across all its members: what a synchronized
/// normalizer needs from a transport. <c>AllreduceSum</c> is collective: every rank calls it, in the same order, with
/// arrays of the same length, and each gets the elementwise sum over all ranks, identical on every rank.
/// Implementations: <see cref="T:SwitchNorm.InProcessGroup"/> (threads of one process, for tests) and
/// <see cref="T:SwitchNorm.MpiCommunicator"/> (OpenMPI processes started by mpirun).
/// </summary>
type ICommunicator =
    /// This process's rank, 0 .. Size − 1.
    abstract Rank: int
    /// The number of ranks.
    abstract Size: int
    /// Replaces values, on every rank, by their elementwise sum over all ranks (collective).
    abstract AllreduceSum: values: float[] -> unit

namespace SwitchNorm.FSharp

open SwitchNorm

/// <summary>
/// Over which rows the BN statistic is pooled: this process's batch (<c>Local</c>), or the global batch split across
/// the ranks of a communicator (<c>Across</c>, what SyncSwitchNorm uses). IN and LN are per sample, so local either
/// way. As Equinox's BatchNorm takes an axis name, this is a parameter of the one normalizer, not a second one.
/// </summary>
[<RequireQualifiedAccess>]
type Scope =
    /// The batch of this process.
    | Local
    /// The global batch: per channel, the counts, sums and centred sums of squares are summed over the ranks.
    | Across of ICommunicator
