/// FsCheck properties over random shapes (batch and spatial sizes including 1), logits and seeds. The same
/// properties run under FsCheck.Xunit ([<Property>]) and in an Expecto tree (Expecto.FsCheck), bridged into
/// `dotnet test` by one fact. A failing property prints FsCheck's replay seed and the shrunk case.
module Properties

open System
open FsCheck
open FsCheck.FSharp
open global.FsCheck.Xunit
open TorchSharp
open global.Xunit
open SwitchNorm
open SwitchNorm.FSharp

let private f64 = torch.ScalarType.Float64

open Generators


let private input (Shape4 s) (seed: int) =
    TestUtil.randnSeeded (int64 seed) s f64 * 3.0 + 1.0

let private layer (c: int64) (Logits3 lm) (Logits3 lv) =
    let m = new SwitchNorm2d(c, dtype = f64)
    use _ = torch.no_grad ()
    m.mean_weight.copy_ (torch.tensor (lm, dtype = f64)) |> ignore
    m.var_weight.copy_ (torch.tensor (lv, dtype = f64)) |> ignore
    m

let private close (atol: float) (a: torch.Tensor) (b: torch.Tensor) =
    a.shape = b.shape && torch.allclose (a, b, rtol = 0.0, atol = atol)

/// Softmax weights are non-negative, sum to 1 within float64 rounding, and never NaN.
let convexWeights (Logits3 l) =
    let w = Mixing.softmax (torch.tensor (l, dtype = f64))
    let a = w.data<float>().ToArray()

    a |> Array.forall (fun v -> v >= 0.0 && not (Double.IsNaN v))
    && abs (Array.sum a - 1.0) < 1e-12

/// Merging the moments of two parts of a batch equals the moments of the whole batch.
let mergeEqualsWhole (Shape4 s) (seed: int) (cut: PositiveInt) =
    let x = input (Shape4 s) seed
    let x3 = x.reshape (s[0], s[1], -1L)
    let whole = Moments.reduce 0L (Moments.ofRows x3)
    let rows = x3.transpose(0L, 1L).reshape (1L, s[1], -1L) // [1, C, N·S]: each channel one row
    let len = rows.shape[2]
    let k = 1L + int64 cut.Get % (len - 1L)
    let a = Moments.ofRows (rows.narrow (2L, 0L, k))
    let b = Moments.ofRows (rows.narrow (2L, k, len - k))
    let m = Moments.merge a b

    m.Count = whole.Count
    && close 1e-10 m.Mean whole.Mean
    && close 1e-8 m.M2 whole.M2

/// Adding one constant to the whole input leaves the output unchanged.
let translationInvariant (Shape4 s) (seed: int) (lm: Logits3) (lv: Logits3) =
    let x = input (Shape4 s) seed
    let m = layer s[1] lm lv
    close 1e-8 (m.forward x) (m.forward (x + 123.25))

/// In training, permuting the batch permutes the output.
let batchPermutationEquivariant (Shape4 s) (seed: int) (lm: Logits3) (lv: Logits3) =
    let x = input (Shape4 s) seed
    let m = layer s[1] lm lv
    let perm = TestUtil.randpermSeeded (int64 seed) s[0]
    close 1e-10 (m.forward (x.index_select (0L, perm))) ((m.forward x).index_select (0L, perm))

/// IN-only with weight 1 and bias 0: every (n, c) slice has mean 0 and variance var/(var + eps).
let instanceSlicesNormalized (Shape4 s) (seed: int) =
    let x = input (Shape4 s) seed
    let hot = Logits3 [| 0.0; -1e4; -1e4 |]
    let m = layer s[1] hot hot
    let y = (m.forward x).reshape (s[0], s[1], -1L)
    let v = x.reshape(s[0], s[1], -1L).var (2L, unbiased = false)
    let expected = v / (v + 1e-5)

    close 1e-10 (y.mean [| 2L |]) (torch.zeros_like v)
    && close 1e-8 (y.var (2L, unbiased = false)) expected

open PropertySuite

[<Properties(Arbitrary = [| typeof<Arbs>; typeof<SuiteArbs>; typeof<SparseArbs> |], MaxTest = 60)>]
module XunitRunner =
    [<Property>]
    let ``convex weights`` l = convexWeights l

    [<Property>]
    let ``merge of a split equals the whole`` s seed cut = mergeEqualsWhole s seed cut

    [<Property>]
    let ``translation invariance`` s seed lm lv = translationInvariant s seed lm lv

    [<Property>]
    let ``batch permutation equivariance`` s seed lm lv =
        batchPermutationEquivariant s seed lm lv

    [<Property>]
    let ``IN slices are normalized`` s seed = instanceSlicesNormalized s seed

    // float64 takes the tensor path whatever Fused says, so only float32 has two paths to compare
    [<Property>]
    let ``row path equals tensor path, float32`` c = fusedEqualsComposed f32 c

    [<Property>]
    let ``agrees with the float64 array reference, float64`` c = referenceAgreement f64 c

    [<Property>]
    let ``agrees with the float64 array reference, float32`` c = referenceAgreement f32 c

    [<Property>]
    let ``sample-by-sample output is the same with and without a graph`` c = evalSameWithAndWithoutGraph c

    [<Property>]
    let ``gradients agree with finite differences of the reference`` c = referenceGradients c

    [<Property>]
    let ``one-component outputs are normalized per group`` c = normalizedSlices c

    [<Property>]
    let ``scaling the input equals dividing eps by s squared`` c s = scalingIsEps c s

    [<Property>]
    let ``batch permutation and translation`` c = batchSymmetries c

    [<Property>]
    let ``train and eval consistency, buffers untouched in eval`` c = trainEvalConsistency c

    [<Property>]
    let ``running statistics follow the closed form`` c k = runningClosedForm c k

    [<Property>]
    let ``moment merging laws`` c a b = mergeLaws c a b

    [<Property>]
    let ``gradient flow`` c = gradientFlow c

    [<Property>]
    let ``a single value per channel is refused`` c = singleValueRefused c

    [<Property>]
    let ``float16 within rounding of float32`` c big =
        halfPrecision torch.ScalarType.Float16 c big

    [<Property>]
    let ``bfloat16 within rounding of float32`` c big =
        halfPrecision torch.ScalarType.BFloat16 c big

    [<Property>]
    let ``NaN and Inf inputs, float64`` c w p = nonFiniteInput f64 c w p

    [<Property>]
    let ``NaN and Inf inputs, float32`` c w p = nonFiniteInput f32 c w p

    [<Property>]
    let ``second derivatives equal the composition's, float64`` c training = doubleBackward f64 c training

    [<Property>]
    let ``second derivatives equal the composition's, float32`` c training = doubleBackward f32 c training

    [<Property>]
    let ``sparsemax and sparsestmax switches`` c = sparseSwitches c

    [<Property>]
    let ``a sparsemax layer: fused equals composed`` c = sparsemaxLayer c

module ExpectoRunner =
    open Expecto

    /// Cases per property: 60, or SWITCHNORM_PROPERTY_CASES for a longer hunt (e.g. 2000 before a release).
    let private cases =
        match Int32.TryParse(Environment.GetEnvironmentVariable "SWITCHNORM_PROPERTY_CASES") with
        | true, n when n > 0 -> n
        | _ -> 60

    let private config = {
        FsCheckConfig.defaultConfig with
            arbitrary = [ typeof<Arbs>; typeof<SuiteArbs>; typeof<SparseArbs> ]
            maxTest = cases
    }

    let tests =
        testList "SwitchNorm properties" [
            testPropertyWithConfig config "convex weights" convexWeights
            testPropertyWithConfig config "merge of a split equals the whole" mergeEqualsWhole
            testPropertyWithConfig config "translation invariance" translationInvariant
            testPropertyWithConfig config "batch permutation equivariance" batchPermutationEquivariant
            testPropertyWithConfig config "IN slices are normalized" instanceSlicesNormalized
            testPropertyWithConfig config "row path equals tensor path, float32" (fusedEqualsComposed f32)
            testPropertyWithConfig config "agrees with the float64 array reference, float64" (referenceAgreement f64)
            testPropertyWithConfig config "agrees with the float64 array reference, float32" (referenceAgreement f32)
            testPropertyWithConfig config "sample-by-sample output is the same with and without a graph" evalSameWithAndWithoutGraph
            testPropertyWithConfig config "gradients agree with finite differences of the reference" referenceGradients
            testPropertyWithConfig config "one-component outputs are normalized per group" normalizedSlices
            testPropertyWithConfig config "scaling the input equals dividing eps by s squared" scalingIsEps
            testPropertyWithConfig config "batch permutation and translation" batchSymmetries
            testPropertyWithConfig config "train and eval consistency, buffers untouched in eval" trainEvalConsistency
            testPropertyWithConfig config "running statistics follow the closed form" runningClosedForm
            testPropertyWithConfig config "moment merging laws" mergeLaws
            testPropertyWithConfig config "gradient flow" gradientFlow
            testPropertyWithConfig config "a single value per channel is refused" singleValueRefused
            testPropertyWithConfig config "float16 within rounding of float32" (halfPrecision torch.ScalarType.Float16)
            testPropertyWithConfig config "bfloat16 within rounding of float32" (halfPrecision torch.ScalarType.BFloat16)
            testPropertyWithConfig config "NaN and Inf inputs, float64" (nonFiniteInput f64)
            testPropertyWithConfig config "NaN and Inf inputs, float32" (nonFiniteInput f32)
            testPropertyWithConfig config "second derivatives equal the composition's, float64" (doubleBackward f64)
            testPropertyWithConfig config "second derivatives equal the composition's, float32" (doubleBackward f32)
            testPropertyWithConfig config "sparsemax and sparsestmax switches" sparseSwitches
            testPropertyWithConfig config "a sparsemax layer: fused equals composed" sparsemaxLayer
        ]

    /// `dotnet test` has no Expecto adapter here, so this fact runs the Expecto tree and requires exit code 0.
    [<Fact>]
    let ``Expecto tree passes`` () =
        Assert.Equal(0, runTestsWithCLIArgs [ CLIArguments.Sequenced ] [||] tests)
