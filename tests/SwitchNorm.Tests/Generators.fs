/// The generators every property file shares, with shrinkers: shapes shrink toward 1 in every dimension, inputs
/// toward Normal, logits toward equal ones, options toward the defaults.
module Generators

open System
open FsCheck
open FsCheck.FSharp
open TorchSharp
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

/// How the input values are drawn.
type InputKind =
    /// Standard normal.
    | Normal
    /// A common offset plus standard normal noise (1e3 ± 1, 1e4 ± 1).
    | Offset of float
    /// Standard normal times 1e-3 (variance 1e-6, not far from eps).
    | Tiny
    /// Normal, except one channel is constant (zero variance).
    | ConstantChannel

/// One generated case: shape, input, logits and module options.
type Case = {
    Shape: int64[]
    Input: InputKind
    Seed: int
    MeanLogits: float[]
    VarLogits: float[]
    Affine: bool
    Track: bool
    Momentum: float option
    UsingBn: bool
    LastGamma: bool
} with

    member c.N = c.Shape[0]
    member c.C = c.Shape[1]
    member c.Spatial = c.Shape |> Array.skip 2 |> Array.fold (*) 1L

    override c.ToString() =
        $"shape {Checks.shapeText c.Shape}, input {c.Input}, seed {c.Seed}, mean logits %A{c.MeanLogits}, var logits %A{c.VarLogits}, affine {c.Affine}, track {c.Track}, momentum {c.Momentum}, using_bn {c.UsingBn}, last_gamma {c.LastGamma}"

/// A logit vector of length k: random, extreme (±30), all equal, or exactly one-hot.
let logitsGen (k: int) =
    let normal =
        Gen.arrayOfLength k (Gen.choose (-4000, 4000) |> Gen.map (fun i -> float i / 1000.0))

    let extreme = Gen.arrayOfLength k (Gen.elements [ -30.0; 30.0; 0.0 ])
    let equal = Gen.elements [ -5.0; 0.0; 1.0; 30.0 ] |> Gen.map (Array.create k)

    let oneHot =
        Gen.choose (0, k - 1)
        |> Gen.map (fun h -> Array.init k (fun i -> if i = h then 0.0 else -1e4))

    Gen.frequency [ 4, normal; 1, extreme; 1, equal; 2, oneHot ]

let caseGen =
    gen {
        let! rank = Gen.choose (2, 5)
        let! n = Gen.frequency [ 2, Gen.constant 1; 5, Gen.choose (2, 4) ]
        let! c = Gen.frequency [ 1, Gen.constant 1; 4, Gen.choose (2, 4) ]
        let! spatial = Gen.arrayOfLength (rank - 2) (Gen.choose (1, 3))

        let! input =
            Gen.frequency [
                5, Gen.constant Normal
                1, Gen.elements [ Offset 1e3; Offset 1e4 ]
                1, Gen.constant Tiny
                1, Gen.constant ConstantChannel
            ]

        let! seed = Gen.choose (0, 1_000_000)
        let! usingBn = Gen.frequency [ 4, Gen.constant true; 1, Gen.constant false ]
        let k = if usingBn then 3 else 2
        let! lm = logitsGen k
        let! lv = logitsGen k
        let! affine = Gen.frequency [ 4, Gen.constant true; 1, Gen.constant false ]
        let! track = Gen.frequency [ 4, Gen.constant true; 1, Gen.constant false ]
        let! momentum = Gen.elements [ Some 0.1; Some 0.3; None ]
        let! lastGamma = Gen.frequency [ 6, Gen.constant false; 1, Gen.constant true ]

        return {
            Shape = Array.append [| int64 n; int64 c |] (Array.map int64 spatial)
            Input = input
            Seed = seed
            MeanLogits = lm
            VarLogits = lv
            Affine = affine
            Track = track
            Momentum = momentum
            UsingBn = usingBn
            LastGamma = lastGamma
        }
    }
    // BN on batch statistics needs more than one value per channel
    |> Gen.filter (fun c -> not c.UsingBn || c.N * c.Spatial > 1L)

/// Logits shrink toward equal ones (all 0: the uniform mixture), then toward rounder values.
let shrinkLogits (l: float[]) =
    seq {
        if l |> Array.exists (fun v -> v <> 0.0) then
            yield Array.zeroCreate l.Length

            let rounded = l |> Array.map (fun v -> Math.Round v)

            if rounded <> l then
                yield rounded
    }

/// A shape shrinks dimension by dimension toward 1 (halving first), keeping what valid allows.
let shrinkShape (valid: int64[] -> bool) (shape: int64[]) =
    seq {
        for d in 0 .. shape.Length - 1 do
            if shape[d] > 1L then
                for v in List.distinct [ 1L; shape[d] / 2L; shape[d] - 1L ] do
                    let s = Array.copy shape
                    s[d] <- max 1L v

                    if s <> shape && valid s then
                        yield s
    }

/// A case shrinks toward a small shape, a normal input, equal logits and the default options.
let shrinkCase (c: Case) =
    let valid (s: int64[]) =
        not c.UsingBn || s[0] * (s |> Array.skip 2 |> Array.fold (*) 1L) > 1L

    seq {
        for s in shrinkShape valid c.Shape -> { c with Shape = s }

        if c.Input <> Normal then
            yield { c with Input = Normal }

        for l in shrinkLogits c.MeanLogits -> { c with MeanLogits = l }
        for l in shrinkLogits c.VarLogits -> { c with VarLogits = l }

        if not c.Affine then
            yield { c with Affine = true }

        if not c.Track then
            yield { c with Track = true }

        if c.Momentum <> Some 0.1 then
            yield { c with Momentum = Some 0.1 }

        if c.LastGamma then
            yield { c with LastGamma = false }
    }

/// Arbitraries of the suite, as named types; they shrink (FsCheck's Arb.fromGen never does).
type SuiteArbs =
    static member Case() : Arbitrary<Case> = Arb.fromGenShrink (caseGen, shrinkCase)

/// K logits (2 to 5) drawn like the suite's (random, extreme, equal, one-hot), and a sparsestmax radius in [0, 1].
type SparseCase = { Logits: float[]; Radius: float }

type SparseArbs =
    static member SparseCase() : Arbitrary<SparseCase> =
        gen {
            let! k = Gen.choose (2, 5)
            let! logits = logitsGen k

            let! radius =
                Gen.frequency [
                    1, Gen.constant 0.0
                    1, Gen.constant 1.0
                    4, Gen.choose (0, 1000) |> Gen.map (fun i -> float i / 1000.0)
                ]

            return { Logits = logits; Radius = radius }
        }
        |> fun g ->
            Arb.fromGenShrink (
                g,
                fun c ->
                    seq {
                        for l in shrinkLogits c.Logits -> { c with Logits = l }

                        if c.Radius <> 0.0 && c.Radius <> 1.0 then
                            yield { c with Radius = Math.Round c.Radius }
                    }
            )

/// A 2d input shape (N, C, H, W) with every size in 1..4 and N × H × W > 1 (trainable with BN).
type Shape4 =
    | Shape4 of int64[]

    override this.ToString() =
        let (Shape4 s) = this
        Checks.shapeText s

/// A logit vector of length 3: random, extreme (±30), all equal, or exactly one-hot.
type Logits3 = Logits3 of float[]

type Arbs =
    static member Shape4() : Arbitrary<Shape4> =
        gen {
            let! n = Gen.choose (1, 4)
            let! c = Gen.choose (1, 4)
            let! h = Gen.choose (1, 4)
            let! w = Gen.choose (1, 4)
            return [| int64 n; int64 c; int64 h; int64 w |]
        }
        |> Gen.filter (fun s -> s[0] * s[2] * s[3] > 1L)
        |> Gen.map Shape4
        |> fun g -> Arb.fromGenShrink (g, (fun (Shape4 s) -> shrinkShape (fun s -> s[0] * s[2] * s[3] > 1L) s |> Seq.map Shape4))

    static member Logits3() : Arbitrary<Logits3> =
        let normal =
            Gen.arrayOfLength 3 (Gen.choose (-4000, 4000) |> Gen.map (fun i -> float i / 1000.0))

        let extreme = Gen.arrayOfLength 3 (Gen.elements [ -30.0; 30.0; 0.0 ])
        let equal = Gen.elements [ -5.0; 0.0; 1.0; 30.0 ] |> Gen.map (Array.create 3)

        let oneHot =
            Gen.choose (0, 2)
            |> Gen.map (fun k -> Array.init 3 (fun i -> if i = k then 0.0 else -1e4))

        Arb.fromGenShrink (
            Gen.oneof [ normal; extreme; equal; oneHot ] |> Gen.map Logits3,
            (fun (Logits3 l) -> shrinkLogits l |> Seq.map Logits3)
        )

/// A batch (N, C, H, W) split into 1–4 shards of any sizes (0 and 1 included, uneven), with parameters and options.
type SyncCase = {
    Shape: int64[]
    Shards: int[]
    MeanLogits: float[]
    VarLogits: float[]
    Momentum: float option
    Affine: bool
    Seed: int
} with

    override this.ToString() =
        $"shape {Checks.shapeText this.Shape}, shards %A{this.Shards}, logits %A{this.MeanLogits}/%A{this.VarLogits}, momentum %A{this.Momentum}, affine {this.Affine}, seed {this.Seed}"

type SyncArbs =
    static member SyncCase() : Arbitrary<SyncCase> =
        gen {
            let! n = Gen.choose (1, 8)
            let! c = Gen.choose (1, 4)
            let! h = Gen.choose (1, 3)
            let! w = Gen.choose (1, 3)
            let! ranks = Gen.choose (1, 4)
            // ranks − 1 cut points in 0..n, sorted: shard sizes may be 0, 1, uneven
            let! cuts = Gen.arrayOfLength (ranks - 1) (Gen.choose (0, n))
            let bounds = Array.concat [ [| 0 |]; Array.sort cuts; [| n |] ]
            let shards = Array.init ranks (fun r -> bounds[r + 1] - bounds[r])
            let logit = Gen.choose (-3000, 3000) |> Gen.map (fun i -> float i / 1000.0)
            let! ml = Gen.arrayOfLength 3 logit
            let! vl = Gen.arrayOfLength 3 logit
            let! momentum = Gen.elements [ Some 0.1; Some 0.7; None ]
            let! affine = Gen.elements [ true; false ]
            let! seed = Gen.choose (0, 100000)

            return {
                Shape = [| int64 n; int64 c; int64 h; int64 w |]
                Shards = shards
                MeanLogits = ml
                VarLogits = vl
                Momentum = momentum
                Affine = affine
                Seed = seed
            }
        }
        |> Gen.filter (fun c -> c.Shape[0] * c.Shape[2] * c.Shape[3] > 1L)
        |> fun g ->
            Arb.fromGenShrink (
                g,
                fun c ->
                    seq {
                        for l in shrinkLogits c.MeanLogits -> { c with MeanLogits = l }
                        for l in shrinkLogits c.VarLogits -> { c with VarLogits = l }

                        if c.Momentum <> Some 0.1 then
                            yield { c with Momentum = Some 0.1 }
                    }
            )
