#!/usr/bin/python3
"""A Python statement, written for this repository, of the official Switchable Normalization modules and ResNets
(switchablenorms/Switchable-Normalization: devkit/ops/switchable_norm.py, imagenet/models/resnet_v{1,2}_sn.py), with
their parameter names, shapes and formulas, for the interop tests against a real PyTorch (Debian's python3-torch).

    official_sn.py fixtures DIR   writes the files the .NET tests load (official layout, nested and flat, legacy, ...)
    official_sn.py check DIR      loads the files the .NET tests wrote and checks them against this code
    official_sn.py resnet50 DIR   writes a nested resnetv1sn50 checkpoint (for bench/official-load-timing.fsx)

The formulas, per the official code: IN mean and *unbiased* variance per (n, c) row; LN and BN means are means of the
IN means, and their variances mean(var_in + mean_in^2) - mean^2 over channels (LN) or samples (BN). The 1d module mixes
[LN, BN] over (N, C), each an unbiased variance of its own group. Running statistics: r = keep*r + (1 - keep)*batch, or
raw sums of mean and mean^2 + var without a moving average; eval uses them as stored.
"""
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class SN(nn.Module):
    """The official SwitchNorm{1,2,3}d, by number of spatial dimensions (1d: none, the (N, C) module)."""

    def __init__(self, dims, c, eps=1e-5, momentum=None, using_moving_average=True, using_bn=True, last_gamma=False):
        super().__init__()
        self.dims, self.eps, self.ma = dims, eps, using_moving_average
        self.using_bn = using_bn if dims != 1 else True
        self.keep = momentum if momentum is not None else (0.9 if dims == 2 else 0.997)
        affine_shape = (1, c) if dims == 1 else (1, c) + (1,) * dims
        self.weight = nn.Parameter(torch.full(affine_shape, 0.0 if last_gamma else 1.0))
        self.bias = nn.Parameter(torch.zeros(affine_shape))
        k = 3 if (self.using_bn and dims != 1) else 2
        self.mean_weight = nn.Parameter(torch.ones(k))
        self.var_weight = nn.Parameter(torch.ones(k))
        if self.using_bn:
            stat_shape = (1, c) if dims == 1 else (1, c, 1)
            self.register_buffer('running_mean', torch.zeros(stat_shape))
            self.register_buffer('running_var', torch.zeros(stat_shape))

    def _track(self, mean_bn, var_bn):
        with torch.no_grad():
            if self.ma:
                self.running_mean.copy_(self.keep * self.running_mean + (1 - self.keep) * mean_bn)
                self.running_var.copy_(self.keep * self.running_var + (1 - self.keep) * var_bn)
            else:
                self.running_mean.add_(mean_bn)
                self.running_var.add_(mean_bn ** 2 + var_bn)

    def forward(self, x):
        wm, wv = self.mean_weight.softmax(0), self.var_weight.softmax(0)
        if self.dims == 1:
            m_ln, v_ln = x.mean(1, keepdim=True), x.var(1, keepdim=True)
            if self.training:
                m_bn, v_bn = x.mean(0, keepdim=True), x.var(0, keepdim=True)
                self._track(m_bn.detach(), v_bn.detach())
            else:
                m_bn, v_bn = self.running_mean, self.running_var
            mu, var = wm[0] * m_ln + wm[1] * m_bn, wv[0] * v_ln + wv[1] * v_bn
            return (x - mu) / (var + self.eps).sqrt() * self.weight + self.bias
        shape = x.shape
        x3 = x.reshape(shape[0], shape[1], -1)
        m_in, v_in = x3.mean(2, keepdim=True), x3.var(2, keepdim=True)
        second = v_in + m_in ** 2
        m_ln = m_in.mean(1, keepdim=True)
        v_ln = second.mean(1, keepdim=True) - m_ln ** 2
        mus, vars_ = [m_in, m_ln], [v_in, v_ln]
        if self.using_bn:
            if self.training:
                m_bn = m_in.mean(0, keepdim=True)
                v_bn = second.mean(0, keepdim=True) - m_bn ** 2
                self._track(m_bn.detach(), v_bn.detach())
            else:
                m_bn, v_bn = self.running_mean, self.running_var
            mus.append(m_bn)
            vars_.append(v_bn)
        mu = sum(w * m for w, m in zip(wm, mus))
        var = sum(w * v for w, v in zip(wv, vars_))
        y = ((x3 - mu) / (var + self.eps).sqrt()).reshape(shape)
        return y * self.weight + self.bias


def sn2d(c, o, last_gamma=False):
    return SN(2, c, using_moving_average=o['ma'], using_bn=o['bn'], last_gamma=last_gamma)


def conv(i, o, k, s=1):
    return nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False)


class V1Block(nn.Module):
    def __init__(self, bottleneck, inp, planes, stride, down, o):
        super().__init__()
        self.bottleneck = bottleneck
        if bottleneck:
            self.conv1, self.sn1 = conv(inp, planes, 1), sn2d(planes, o)
            self.conv2, self.sn2 = conv(planes, planes, 3, stride), sn2d(planes, o)
            self.conv3, self.sn3 = conv(planes, planes * 4, 1), sn2d(planes * 4, o, o['last_gamma'])
        else:
            self.conv1, self.sn1 = conv(inp, planes, 3, stride), sn2d(planes, o)
            self.conv2, self.sn2 = conv(planes, planes, 3), sn2d(planes, o, o['last_gamma'])
        self.downsample = down

    def forward(self, x):
        out = F.relu(self.sn1(self.conv1(x)))
        if self.bottleneck:
            out = self.sn3(self.conv3(F.relu(self.sn2(self.conv2(out)))))
        else:
            out = self.sn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class V2Block(nn.Module):
    def __init__(self, bottleneck, inp, planes, stride, down, o):
        super().__init__()
        self.bottleneck = bottleneck
        if bottleneck:
            self.sn1, self.conv1 = sn2d(inp, o), conv(inp, planes, 1)
            self.sn2, self.conv2 = sn2d(planes, o), conv(planes, planes, 3, stride)
            self.sn3, self.conv3 = sn2d(planes, o), conv(planes, planes * 4, 1)
        else:
            self.sn1, self.conv1 = sn2d(inp, o), conv(inp, planes, 3, stride)
            self.sn2, self.conv2 = sn2d(planes, o), conv(planes, planes, 3)
        self.downsample = down

    def forward(self, x):
        pre = F.relu(self.sn1(x))
        out = self.conv2(F.relu(self.sn2(self.conv1(pre))))
        if self.bottleneck:
            out = self.conv3(F.relu(self.sn3(out)))
        return out + (x if self.downsample is None else self.downsample(pre))


DEPTHS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]),
          101: (True, [3, 4, 23, 3]), 152: (True, [3, 8, 36, 3])}


class ResNetSN(nn.Module):
    def __init__(self, version, depth, num_classes=1000, using_moving_average=True, using_bn=True, last_gamma=None):
        super().__init__()
        bottleneck, layers = DEPTHS[depth]
        o = {'ma': using_moving_average, 'bn': using_bn,
             'last_gamma': (version == 1) if last_gamma is None else last_gamma}
        exp = 4 if bottleneck else 1
        self.version = version
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.sn1 = sn2d(64, o)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inp = 64
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inp != planes * exp:
                c = nn.Conv2d(inp, planes * exp, 1, stride=stride, bias=False)
                down = nn.Sequential(c, sn2d(planes * exp, o)) if version == 1 else c
            block = V1Block if version == 1 else V2Block
            blocks = [block(bottleneck, inp, planes, stride, down, o)]
            inp = planes * exp
            blocks += [block(bottleneck, inp, planes, 1, None, o) for _ in range(1, n)]
            setattr(self, 'layer%d' % (i + 1), nn.Sequential(*blocks))
        if version == 2:
            self.sn_out = sn2d(512 * exp, o)
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.drouput = nn.Dropout(0.5)
        self.fc = nn.Linear(512 * exp, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.sn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.version == 2:
            x = F.relu(self.sn_out(x))
        x = self.avgpool(x).flatten(1)
        return self.fc(self.drouput(x))


LAYER_CASES = [  # name, dims, input shape, using_bn, moving average
    ('1d_ma', 1, (6, 5), True, True),
    ('1d_sums', 1, (6, 5), True, False),
    ('2d_bn_ma', 2, (3, 4, 5, 6), True, True),
    ('2d_bn_sums', 2, (3, 4, 5, 6), True, False),
    ('2d_nobn', 2, (1, 4, 3, 3), False, True),
    ('3d_bn_ma', 3, (2, 3, 2, 3, 4), True, True),
    ('3d_nobn', 3, (2, 3, 2, 3, 4), False, True),
]


def randomize(m, g):
    """Moves every parameter and buffer away from its initial value (and the running variances above zero)."""
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if 'running_var' in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith('weight') and t.dim() > 1 and 'sn' not in name and 'conv' in name:
                t.mul_(1.0)
            elif 'mean_weight' in name or 'var_weight' in name or 'running_mean' in name or 'bias' in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.dim() > 1 and t.shape[0] == 1:  # SN affine weights
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def fixtures(out):
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(2026)
    torch.manual_seed(2026)
    for name, dims, shape, bn, ma in LAYER_CASES:
        m = SN(dims, shape[1], using_bn=bn, using_moving_average=ma)
        randomize(m, g)
        torch.save(m.state_dict(), os.path.join(out, 'layer_%s.pt' % name))
        x = torch.randn(shape, generator=g) * 3 + 2
        m.train()
        y = m(x)
        io = {'x': x, 'y_train': y.detach()}
        if m.using_bn:
            io['running_mean'] = m.running_mean.clone()
            io['running_var'] = m.running_var.clone()
        m.eval()
        io['y_eval'] = m(x).detach()
        torch.save(io, os.path.join(out, 'layer_%s_io.pt' % name))

    x = torch.randn(2, 3, 224, 224, generator=g)
    for version, layout in [(1, 'nested'), (2, 'flat')]:
        net = ResNetSN(version, 18, num_classes=10)
        randomize(net, g)
        net.eval()
        logits = net(x).detach()
        state = {k: v.clone() for k, v in net.state_dict().items()}
        net.train()
        net(x)
        io = {'x': x, 'logits': logits}
        for k, v in net.state_dict().items():
            if 'running' in k:
                io['after.' + k] = v.clone()
        torch.save(io, os.path.join(out, 'resnetv%dsn18_io.pt' % version))
        if layout == 'nested':
            sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            net(x).sum().backward()
            sgd.step()
            ckpt = {'epoch': 3, 'arch': 'resnetv1sn18', 'best_prec1': 12.5, 'optimizer': sgd.state_dict(),
                    'state_dict': {'module.' + k: v for k, v in state.items()}}
            torch.save(ckpt, os.path.join(out, 'resnetv1sn18_nested.pth'))
        else:
            torch.save(state, os.path.join(out, 'resnetv2sn18_flat.pth'))

    for version in (1, 2):
        for depth in (50, 101):
            for bn in (True, False):
                net = ResNetSN(version, depth, using_bn=bn)
                with open(os.path.join(out, 'keys_v%dsn%d%s.txt' % (version, depth, '' if bn else '_nobn')), 'w') as f:
                    for k, v in net.state_dict().items():
                        f.write('%s\t%s\n' % (k, ','.join(str(d) for d in v.shape)))

    small = SN(2, 4)
    torch.save(small.state_dict(), os.path.join(out, 'legacy.pth'), _use_new_zipfile_serialization=False)
    torch.save(small, os.path.join(out, 'whole_model.pth'))
    print('fixtures written to', out)


def resnet50(out):
    """A resnetv1sn50 checkpoint as the official training script writes it, for bench/official-load-timing.fsx."""
    os.makedirs(out, exist_ok=True)
    net = ResNetSN(1, 50)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 224, 224)).sum().backward()
    sgd.step()
    ckpt = {'epoch': 100, 'arch': 'resnetv1sn50', 'best_prec1': 77.49, 'optimizer': sgd.state_dict(),
            'state_dict': {'module.' + k: v for k, v in net.state_dict().items()}}
    torch.save(ckpt, os.path.join(out, 'resnetv1sn50_nested.pth'))


def check(d):
    """Loads what the .NET side wrote (official layout, DataParallel prefix, nested or flat) and compares outputs."""
    failures = 0
    for name in sorted(os.listdir(d)):
        if not name.startswith('dotnet_') or not name.endswith('.pth') or name.endswith('_io.pth'):
            continue
        stem = name[:-4]
        io = torch.load(os.path.join(d, stem + '_io.pth'))
        sd = torch.load(os.path.join(d, name))
        if 'state_dict' in sd:
            sd = sd['state_dict']
        sd = {k[7:] if k.startswith('module.') else k: v for k, v in sd.items()}
        version = 1 if 'v1' in stem else 2
        net = ResNetSN(version, 18, num_classes=io['logits'].shape[1])
        net.load_state_dict(sd, strict=True)
        net.eval()
        with torch.no_grad():
            logits = net(io['x'])
        err = (logits - io['logits']).abs().max().item()
        scale = io['logits'].abs().max().item()
        ok = err <= 1e-4 * (1 + scale)
        failures += 0 if ok else 1
        print('%s: max |python - dotnet| = %.3g (logits up to %.3g): %s' % (stem, err, scale, 'ok' if ok else 'FAIL'))
    if failures:
        sys.exit(1)


if __name__ == '__main__':
    torch.set_num_threads(2)
    {'fixtures': fixtures, 'check': check, 'resnet50': resnet50}[sys.argv[1]](sys.argv[2])
