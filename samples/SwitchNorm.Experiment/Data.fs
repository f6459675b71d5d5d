/// Fashion-MNIST in the idx format: the subset embedded in this program, or the full set from a directory.
module Data

open System
open System.IO
open System.IO.Compression
open TorchSharp

/// A data file that is missing or not what it claims to be; the message names the file and the problem.
exception DataError of string

/// Images (N, 1, 28, 28) as float32 scaled to [0, 1], labels (N) as int64 in 0 .. 9.
type Split = {
    Images: torch.Tensor
    Labels: torch.Tensor
    Count: int
}

/// The ten classes, in label order.
let classNames = [|
    "T-shirt/top"
    "Trouser"
    "Pullover"
    "Dress"
    "Coat"
    "Sandal"
    "Shirt"
    "Sneaker"
    "Bag"
    "Ankle boot"
|]

let private readAll (name: string) (open': unit -> Stream) =
    try
        use s = open' ()
        use ms = new MemoryStream()

        if name.EndsWith ".gz" then
            use gz = new GZipStream(s, CompressionMode.Decompress)
            gz.CopyTo ms
        else
            s.CopyTo ms

        ms.ToArray()
    with
    | :? InvalidDataException as e -> raise (DataError $"{name}: not a valid gzip file ({e.Message})")
    | :? IOException as e -> raise (DataError $"{name}: cannot be read ({e.Message})")
    | :? UnauthorizedAccessException as e -> raise (DataError $"{name}: cannot be read ({e.Message})")

let private bigEndian (b: byte[]) (at: int) =
    (int b[at] <<< 24)
    ||| (int b[at + 1] <<< 16)
    ||| (int b[at + 2] <<< 8)
    ||| int b[at + 3]

/// Checks an idx file's header and size; returns the item count.
let private header (name: string) (b: byte[]) (magic: int) (dims: int list) =
    let headerBytes = 4 + 4 * (1 + List.length dims)

    if b.Length < headerBytes then
        raise (DataError $"{name}: {b.Length} bytes, too short for an idx header")

    let m = bigEndian b 0

    if m <> magic then
        raise (DataError $"{name}: idx magic number 0x{m:X8}, expected 0x{magic:X8}")

    let n = bigEndian b 4

    dims
    |> List.iteri (fun i d ->
        let got = bigEndian b (8 + 4 * i)

        if got <> d then
            raise (DataError $"{name}: dimension {i + 1} is {got}, expected {d}"))

    let itemBytes = List.fold (*) 1 dims
    let expected = int64 headerBytes + int64 n * int64 itemBytes

    if n < 0 || int64 b.Length <> expected then
        raise (DataError $"{name}: {b.Length} bytes for {n} items, expected {expected}")

    n

/// Parses an image file and its label file into a split, checking headers, sizes and label range.
let parse (imagesName: string) (images: byte[]) (labelsName: string) (labels: byte[]) : Split =
    let n = header imagesName images 0x00000803 [ 28; 28 ]
    let m = header labelsName labels 0x00000801 []

    if n <> m then
        raise (DataError $"{imagesName} holds {n} images but {labelsName} holds {m} labels")

    if n = 0 then
        raise (DataError $"{imagesName}: no images")

    let lab = labels[8..]

    match lab |> Array.tryFindIndex (fun l -> l > 9uy) with
    | Some i -> raise (DataError $"{labelsName}: label {lab[i]} at item {i}, expected 0 to 9")
    | None -> ()

    let pixels = images[16..]

    let x =
        use raw =
            torch.tensor(pixels, dtype = torch.ScalarType.Byte).view (int64 n, 1L, 28L, 28L)

        raw.to_type(torch.ScalarType.Float32).div_ (255.0f.ToScalar())

    {
        Images = x
        Labels = torch.tensor (lab |> Array.map int64)
        Count = n
    }

let private files prefix =
    $"{prefix}-images-idx3-ubyte", $"{prefix}-labels-idx1-ubyte"

/// The subset embedded in this program: 6,000 training and 2,000 test images, class-balanced.
let embedded () =
    let asm = Reflection.Assembly.GetExecutingAssembly()

    let load (name: string) =
        readAll name (fun () ->
            match asm.GetManifestResourceStream $"fashion/{name}" with
            | null -> raise (DataError $"{name}: not embedded in this build")
            | s -> s)

    let split prefix =
        let i, l = files prefix
        parse $"{i}.gz (embedded)" (load $"{i}.gz") $"{l}.gz (embedded)" (load $"{l}.gz")

    split "train", split "t10k"

/// The four idx files from a directory, each either gzip-compressed (.gz) or plain.
let fromDirectory (dir: string) =
    if not (Directory.Exists dir) then
        raise (DataError $"data directory {dir} does not exist")

    let find (stem: string) =
        [ stem + ".gz"; stem ]
        |> List.map (fun f -> Path.Combine(dir, f))
        |> List.tryFind File.Exists
        |> Option.defaultWith (fun () ->
            raise (DataError $"{dir}: neither {stem}.gz nor {stem} found (expected the four Fashion-MNIST idx files)"))

    let split prefix =
        let i, l = files prefix
        let ip, lp = find i, find l
        parse ip (readAll ip (fun () -> File.OpenRead ip)) lp (readAll lp (fun () -> File.OpenRead lp))

    split "train", split "t10k"

/// The first n images of a split (a smaller training set for a quicker run).
let take (n: int) (s: Split) : Split = {
    Images = s.Images.narrow(0L, 0L, int64 n).clone ()
    Labels = s.Labels.narrow(0L, 0L, int64 n).clone ()
    Count = n
}
