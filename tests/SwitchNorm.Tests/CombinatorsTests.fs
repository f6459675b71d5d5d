/// The F# combinators: Layer.ofFn, Layer.sequential, Layer.compose and >->, and the Norm spec builders.
module CombinatorsTests

open System
open TorchSharp
open Xunit
open SwitchNorm
open SwitchNorm.FSharp
open TestUtil

let private f64 = torch.ScalarType.Float64

[<Fact>]
let ``Layer.ofFn applies its function and has no parameters`` () =
    let double = Layer.ofFn "double" (fun x -> x * 2.0)
    let x = randnSeeded 1L [| 2L; 3L |] f64
    assertClose "ofFn" (tol f64) (double.forward x) (x * 2.0)
    Assert.Empty(double.parameters ())

[<Fact>]
let ``Layer.sequential names its layers 0, 1, ... and runs them in order`` () =
    let s =
        Layer.sequential [ Layer.ofFn "add" (fun x -> x + 1.0); Layer.ofFn "mul" (fun x -> x * 3.0) ]

    Assert.Equal<string list>([ "0"; "1" ], [ for struct (n, _) in s.named_children () -> n ])
    let x = randnSeeded 2L [| 4L |] f64
    assertClose "in order" (tol f64) (s.forward x) ((x + 1.0) * 3.0)

[<Fact>]
let ``>-> composes any module types without casts, flattening Sequentials, as the manual composition`` () =
    let conv = torch.nn.Conv2d(3L, 4L, 3L, padding = 1L, dtype = f64)
    let norm = new SwitchNorm2d(4L, dtype = f64)
    let relu = Layer.ofFn "relu" torch.nn.functional.relu
    let block = conv >-> norm >-> relu
    // a Sequential of three, not nested
    let children = [ for struct (_, c) in block.named_children () -> c ]
    Assert.Equal(3, children.Length)
    Assert.Same(conv, children[0])
    Assert.Same(norm, children[1])
    let x = randnSeeded 3L [| 2L; 3L; 5L; 5L |] f64
    let expected = torch.nn.functional.relu (norm.forward (conv.forward x))
    assertClose ">->" (tol f64) (block.forward x) expected
    // composing two Sequentials gives one flat Sequential
    let twice = block >-> block
    Assert.Equal(6, Seq.length (twice.named_children ()))
    // and its parameters are the layers' own, once each
    let composed = Layer.compose block (Layer.ofFn "id" id)
    Assert.Equal(Seq.length (block.parameters ()), Seq.length (composed.parameters ()))

[<Fact>]
let ``Norm builders refuse what no normalizer can be, and Norm.layer builds a module of the spec`` () =
    throws<ArgumentException> (fun () -> box (Norm.ofComponents [])) [ "at least one" ]
    throws<ArgumentException> (fun () -> box (Norm.ofComponents [ Instance; Instance ])) [ "once" ]
    throws<ArgumentOutOfRangeException> (fun () -> box (Norm.paper |> Norm.withEps 0.0)) [ "eps" ]
    throws<ArgumentOutOfRangeException> (fun () -> box (Norm.paper |> Norm.withMomentum (Some 1.5))) [ "momentum" ]
    throws<ArgumentNullException> (fun () -> box (Norm.paper |> Norm.across null)) [ "communicator" ]
    let spec = Norm.instanceLayer |> Norm.withEps 1e-3
    Assert.Equal<Component list>([ Instance; Layer ], spec.Components)
    let m = Norm.layer spec 4L :?> SwitchNormNd
    Assert.Equal(1e-3, m.eps)
    Assert.False(m.using_bn)
    // IN + LN trains at batch size 1
    let y = m.forward (torch.randn (1L, 4L, 3L, 3L))
    Assert.Equal<int64[]>([| 1L; 4L; 3L; 3L |], y.shape)
