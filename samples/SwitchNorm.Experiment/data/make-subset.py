# Makes the embedded subset from Debian's dataset-fashion-mnist package (MIT licence, Zalando Research):
# the first 600 training images of each class (6,000) and the first 200 test images of each class (2,000),
# in the original idx format, gzip level 9 with a zero timestamp so the output is reproducible.
#   apt-get install dataset-fashion-mnist && python3 make-subset.py
import gzip, struct

src = '/usr/share/datasets/fashion-mnist/'


def load(prefix):
    with gzip.open(src + prefix + '-images-idx3-ubyte.gz') as f:
        img = f.read()
    with gzip.open(src + prefix + '-labels-idx1-ubyte.gz') as f:
        lab = f.read()
    return img[16:], lab[8:], struct.unpack('>I', img[4:8])[0]


def subset(prefix, per_class):
    img, lab, n = load(prefix)
    counts, idx = [0] * 10, []
    for i in range(n):
        if counts[lab[i]] < per_class:
            counts[lab[i]] += 1
            idx.append(i)
    m = len(idx)
    images = struct.pack('>IIII', 2051, m, 28, 28) + b''.join(img[i * 784:(i + 1) * 784] for i in idx)
    labels = struct.pack('>II', 2049, m) + bytes(lab[i] for i in idx)
    with gzip.GzipFile(prefix + '-images-idx3-ubyte.gz', 'wb', compresslevel=9, mtime=0) as f:
        f.write(images)
    with gzip.GzipFile(prefix + '-labels-idx1-ubyte.gz', 'wb', compresslevel=9, mtime=0) as f:
        f.write(labels)


subset('train', 600)
subset('t10k', 200)
