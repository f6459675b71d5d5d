using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using static TorchSharp.torch;

namespace SwitchNorm.CSharp
{
    /// <summary>
    /// TorchSharp-style factories for Switchable Normalization (Luo et al., "Differentiable Learning-to-Normalize via
    /// Switchable Normalization", ICLR 2019). The parameter lists are those of <c>torch.nn.BatchNorm1d/2d/3d</c>, plus
    /// <c>using_bn</c> and <c>last_gamma</c>, so switching a model over is a rename:
    /// <c>using static SwitchNorm.CSharp.Layers;</c> then <c>SwitchNorm2d(64)</c> where it said <c>BatchNorm2d(64)</c>.
    /// (Not named <c>nn</c>, which would be ambiguous with <c>torch.nn</c> under <c>using static TorchSharp.torch;</c>.)
    /// </summary>
    public static class Layers
    {
        /// <summary>
        /// Switchable Normalization over (N, C) or (N, C, L) input. mean = Σ softmax(mean_weight)ₖ·meanₖ and
        /// var = Σ softmax(var_weight)ₖ·varₖ over [IN, LN, BN]; y = (x − mean) / sqrt(var + eps) · weight + bias.
        /// A (N, C) input counts as (N, C, 1).
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">Running-average factor of the BN statistics, in [0, 1]. Default 0.1; null means a cumulative average.</param>
        /// <param name="affine">Whether to learn a per-channel weight and bias. Default true.</param>
        /// <param name="track_running_stats">Whether BN keeps running statistics for eval. Default true.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in (false: IN and LN only, for batch size 1). Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0 (the last norm of a residual block). Default false.</param>
        /// <param name="switch_kind">The switch: Softmax (the paper, default), Sparsemax, or Sparsestmax at the module's Radius (SSN, CVPR 2019).</param>
        public static SwitchNorm1d SwitchNorm1d(long num_features, double eps = global::SwitchNorm.Defaults.Eps, double? momentum = global::SwitchNorm.Defaults.Momentum, bool affine = true,
            bool track_running_stats = true, Device? device = null, ScalarType? dtype = null, bool using_bn = true, bool last_gamma = false,
            SwitchKind switch_kind = SwitchKind.Softmax)
        {
            Check(nameof(SwitchNorm1d), num_features, eps, momentum);
            var m = new global::SwitchNorm.SwitchNorm1d(num_features, eps, momentum ?? global::SwitchNorm.Defaults.Momentum, affine, track_running_stats, device, dtype, using_bn, last_gamma);
            m.momentum = momentum;
            m.SwitchKind = switch_kind;
            return m;
        }

        /// <summary>
        /// Switchable Normalization over (N, C, H, W) input: a drop-in for <c>torch.nn.BatchNorm2d</c>.
        /// mean = Σ softmax(mean_weight)ₖ·meanₖ and var = Σ softmax(var_weight)ₖ·varₖ over [IN, LN, BN];
        /// y = (x − mean) / sqrt(var + eps) · weight + bias. In eval, BN uses the running statistics; IN and LN use the input.
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">Running-average factor of the BN statistics, in [0, 1]. Default 0.1; null means a cumulative average.</param>
        /// <param name="affine">Whether to learn a per-channel weight and bias. Default true.</param>
        /// <param name="track_running_stats">Whether BN keeps running statistics for eval. Default true.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in (false: IN and LN only, for batch size 1). Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0 (the last norm of a residual block). Default false.</param>
        /// <param name="switch_kind">The switch: Softmax (the paper, default), Sparsemax, or Sparsestmax at the module's Radius (SSN, CVPR 2019).</param>
        public static SwitchNorm2d SwitchNorm2d(long num_features, double eps = global::SwitchNorm.Defaults.Eps, double? momentum = global::SwitchNorm.Defaults.Momentum, bool affine = true,
            bool track_running_stats = true, Device? device = null, ScalarType? dtype = null, bool using_bn = true, bool last_gamma = false,
            SwitchKind switch_kind = SwitchKind.Softmax)
        {
            Check(nameof(SwitchNorm2d), num_features, eps, momentum);
            var m = new global::SwitchNorm.SwitchNorm2d(num_features, eps, momentum ?? global::SwitchNorm.Defaults.Momentum, affine, track_running_stats, device, dtype, using_bn, last_gamma);
            m.momentum = momentum;
            m.SwitchKind = switch_kind;
            return m;
        }

        /// <summary>
        /// Switchable Normalization over (N, C, D, H, W) input: a drop-in for <c>torch.nn.BatchNorm3d</c>.
        /// Same formula and options as <see cref="SwitchNorm2d"/>.
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">Running-average factor of the BN statistics, in [0, 1]. Default 0.1; null means a cumulative average.</param>
        /// <param name="affine">Whether to learn a per-channel weight and bias. Default true.</param>
        /// <param name="track_running_stats">Whether BN keeps running statistics for eval. Default true.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in (false: IN and LN only, for batch size 1). Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0 (the last norm of a residual block). Default false.</param>
        /// <param name="switch_kind">The switch: Softmax (the paper, default), Sparsemax, or Sparsestmax at the module's Radius (SSN, CVPR 2019).</param>
        public static SwitchNorm3d SwitchNorm3d(long num_features, double eps = global::SwitchNorm.Defaults.Eps, double? momentum = global::SwitchNorm.Defaults.Momentum, bool affine = true,
            bool track_running_stats = true, Device? device = null, ScalarType? dtype = null, bool using_bn = true, bool last_gamma = false,
            SwitchKind switch_kind = SwitchKind.Softmax)
        {
            Check(nameof(SwitchNorm3d), num_features, eps, momentum);
            var m = new global::SwitchNorm.SwitchNorm3d(num_features, eps, momentum ?? global::SwitchNorm.Defaults.Momentum, affine, track_running_stats, device, dtype, using_bn, last_gamma);
            m.momentum = momentum;
            m.SwitchKind = switch_kind;
            return m;
        }

        /// <summary>
        /// SwitchNorm1d with the official PyTorch code's semantics (<see cref="global::SwitchNorm.Semantics.Official"/>) and its
        /// constructor's parameters and defaults (switchablenorms/Switchable-Normalization, <c>SwitchNorm1d</c>), so official
        /// checkpoints load (see <see cref="SwitchNormTools.LoadPyTorch"/>) and compute the official numbers. Over (N, C) input; it mixes [LN, BN] (or LN alone without BN), as the official SwitchNorm1d.
        /// Variances are the official ones (unbiased IN rows, LN and BN derived from them; unbiased groups in 1d); the running
        /// statistics follow running = momentum·running + (1 − momentum)·batch with the batch's values as they are, or
        /// accumulate raw sums without a moving average; there is no num_batches_tracked.
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">The official keep factor of the running statistics, in [0, 1]: running = momentum·running + (1 − momentum)·batch. Default 0.997 (the module's momentum property is 1 − this, 0.003).</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average; false: they accumulate raw sums of the batch means and of mean² + var, as the official code does. Default true.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in. Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0 (the last norm of a residual block). Default false.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        public static SwitchNorm1d OfficialSwitchNorm1d(long num_features, double eps = global::SwitchNorm.Defaults.Eps, double momentum = 0.997,
            bool using_moving_average = true, bool using_bn = true, bool last_gamma = false, Device? device = null, ScalarType? dtype = null)
        =>
            global::SwitchNorm.SwitchNorm1d.Official(num_features, eps, momentum, using_moving_average, using_bn, last_gamma, device, dtype);

        /// <summary>
        /// SwitchNorm2d with the official PyTorch code's semantics (<see cref="global::SwitchNorm.Semantics.Official"/>) and its
        /// constructor's parameters and defaults (switchablenorms/Switchable-Normalization, <c>SwitchNorm2d</c>), so official
        /// checkpoints load (see <see cref="SwitchNormTools.LoadPyTorch"/>) and compute the official numbers. Over (N, C, H, W) input; it mixes [IN, LN, BN] (or [IN, LN] without BN).
        /// Variances are the official ones (unbiased IN rows, LN and BN derived from them; unbiased groups in 1d); the running
        /// statistics follow running = momentum·running + (1 − momentum)·batch with the batch's values as they are, or
        /// accumulate raw sums without a moving average; there is no num_batches_tracked.
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">The official keep factor of the running statistics, in [0, 1]: running = momentum·running + (1 − momentum)·batch. Default 0.9 (the module's momentum property is 1 − this, 0.1).</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average; false: they accumulate raw sums of the batch means and of mean² + var, as the official code does. Default true.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in. Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0 (the last norm of a residual block). Default false.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        public static SwitchNorm2d OfficialSwitchNorm2d(long num_features, double eps = global::SwitchNorm.Defaults.Eps, double momentum = 0.9,
            bool using_moving_average = true, bool using_bn = true, bool last_gamma = false, Device? device = null, ScalarType? dtype = null)
        =>
            global::SwitchNorm.SwitchNorm2d.Official(num_features, eps, momentum, using_moving_average, using_bn, last_gamma, device, dtype);

        /// <summary>
        /// SwitchNorm3d with the official PyTorch code's semantics (<see cref="global::SwitchNorm.Semantics.Official"/>) and its
        /// constructor's parameters and defaults (switchablenorms/Switchable-Normalization, <c>SwitchNorm3d</c>), so official
        /// checkpoints load (see <see cref="SwitchNormTools.LoadPyTorch"/>) and compute the official numbers. Over (N, C, D, H, W) input; it mixes [IN, LN, BN] (or [IN, LN] without BN).
        /// Variances are the official ones (unbiased IN rows, LN and BN derived from them; unbiased groups in 1d); the running
        /// statistics follow running = momentum·running + (1 − momentum)·batch with the batch's values as they are, or
        /// accumulate raw sums without a moving average; there is no num_batches_tracked.
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">The official keep factor of the running statistics, in [0, 1]: running = momentum·running + (1 − momentum)·batch. Default 0.997 (the module's momentum property is 1 − this, 0.003).</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average; false: they accumulate raw sums of the batch means and of mean² + var, as the official code does. Default true.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in. Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0 (the last norm of a residual block). Default false.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        public static SwitchNorm3d OfficialSwitchNorm3d(long num_features, double eps = global::SwitchNorm.Defaults.Eps, double momentum = 0.997,
            bool using_moving_average = true, bool using_bn = true, bool last_gamma = false, Device? device = null, ScalarType? dtype = null)
        =>
            global::SwitchNorm.SwitchNorm3d.Official(num_features, eps, momentum, using_moving_average, using_bn, last_gamma, device, dtype);

        /// <summary>
        /// Synchronized Switchable Normalization over (N, C, H, W) input, for data-parallel training: a SwitchNorm2d whose
        /// BN statistics are those of the global batch split across the ranks of <paramref name="communicator"/> (shards
        /// of any sizes, one may be empty). IN and LN stay per sample; the backward allreduces the gradient terms through
        /// the BN statistics; the running statistics update identically on every rank. In training, every rank must call
        /// forward and then backward.
        /// </summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="communicator">The ranks: <c>new InProcessGroup(size).Rank(r)</c> for threads of one process, or
        /// <c>MpiCommunicator.World()</c> under mpirun.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">Running-average factor of the BN statistics. Default 0.1; null means a cumulative average.</param>
        /// <param name="affine">Whether to learn a per-channel weight and bias. Default true.</param>
        /// <param name="track_running_stats">Whether BN keeps running statistics for eval. Default true.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in. Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0. Default false.</param>
        /// <param name="switch_kind">The switch: Softmax (the paper, default), Sparsemax, or Sparsestmax at the module's Radius (SSN, CVPR 2019).</param>
        public static global::SwitchNorm.SyncSwitchNorm2d SyncSwitchNorm2d(long num_features, global::SwitchNorm.ICommunicator communicator,
            double eps = global::SwitchNorm.Defaults.Eps, double? momentum = global::SwitchNorm.Defaults.Momentum, bool affine = true, bool track_running_stats = true, Device? device = null,
            ScalarType? dtype = null, bool using_bn = true, bool last_gamma = false, SwitchKind switch_kind = SwitchKind.Softmax)
        {
            Check(nameof(SyncSwitchNorm2d), num_features, eps, momentum);
            var m = new global::SwitchNorm.SyncSwitchNorm2d(num_features, communicator, eps, momentum ?? global::SwitchNorm.Defaults.Momentum, affine, track_running_stats, device, dtype, using_bn, last_gamma);
            m.momentum = momentum;
            m.SwitchKind = switch_kind;
            return m;
        }

        /// <summary>Synchronized Switchable Normalization over (N, C) or (N, C, L) input; see <see cref="SyncSwitchNorm2d"/>.</summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="communicator">The ranks sharing the BN statistics.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">Running-average factor of the BN statistics. Default 0.1; null means a cumulative average.</param>
        /// <param name="affine">Whether to learn a per-channel weight and bias. Default true.</param>
        /// <param name="track_running_stats">Whether BN keeps running statistics for eval. Default true.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in. Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0. Default false.</param>
        /// <param name="switch_kind">The switch: Softmax (the paper, default), Sparsemax, or Sparsestmax at the module's Radius (SSN, CVPR 2019).</param>
        public static global::SwitchNorm.SyncSwitchNorm1d SyncSwitchNorm1d(long num_features, global::SwitchNorm.ICommunicator communicator,
            double eps = global::SwitchNorm.Defaults.Eps, double? momentum = global::SwitchNorm.Defaults.Momentum, bool affine = true, bool track_running_stats = true, Device? device = null,
            ScalarType? dtype = null, bool using_bn = true, bool last_gamma = false, SwitchKind switch_kind = SwitchKind.Softmax)
        {
            Check(nameof(SyncSwitchNorm1d), num_features, eps, momentum);
            var m = new global::SwitchNorm.SyncSwitchNorm1d(num_features, communicator, eps, momentum ?? global::SwitchNorm.Defaults.Momentum, affine, track_running_stats, device, dtype, using_bn, last_gamma);
            m.momentum = momentum;
            m.SwitchKind = switch_kind;
            return m;
        }

        /// <summary>Synchronized Switchable Normalization over (N, C, D, H, W) input; see <see cref="SyncSwitchNorm2d"/>.</summary>
        /// <param name="num_features">C, the number of channels.</param>
        /// <param name="communicator">The ranks sharing the BN statistics.</param>
        /// <param name="eps">Added to the mixed variance before the square root. Default 1e-5.</param>
        /// <param name="momentum">Running-average factor of the BN statistics. Default 0.1; null means a cumulative average.</param>
        /// <param name="affine">Whether to learn a per-channel weight and bias. Default true.</param>
        /// <param name="track_running_stats">Whether BN keeps running statistics for eval. Default true.</param>
        /// <param name="device">Device of the parameters and buffers. Default CPU.</param>
        /// <param name="dtype">Floating dtype of the parameters and buffers. Default torch's default dtype.</param>
        /// <param name="using_bn">Whether the BN statistic is mixed in. Default true.</param>
        /// <param name="last_gamma">Whether weight starts at 0. Default false.</param>
        /// <param name="switch_kind">The switch: Softmax (the paper, default), Sparsemax, or Sparsestmax at the module's Radius (SSN, CVPR 2019).</param>
        public static global::SwitchNorm.SyncSwitchNorm3d SyncSwitchNorm3d(long num_features, global::SwitchNorm.ICommunicator communicator,
            double eps = global::SwitchNorm.Defaults.Eps, double? momentum = global::SwitchNorm.Defaults.Momentum, bool affine = true, bool track_running_stats = true, Device? device = null,
            ScalarType? dtype = null, bool using_bn = true, bool last_gamma = false, SwitchKind switch_kind = SwitchKind.Softmax)
        {
            Check(nameof(SyncSwitchNorm3d), num_features, eps, momentum);
            var m = new global::SwitchNorm.SyncSwitchNorm3d(num_features, communicator, eps, momentum ?? global::SwitchNorm.Defaults.Momentum, affine, track_running_stats, device, dtype, using_bn, last_gamma);
            m.momentum = momentum;
            m.SwitchKind = switch_kind;
            return m;
        }

        private static void Check(string layer, long num_features, double eps, double? momentum) =>
            global::SwitchNorm.Checks.constructorArgs(layer, num_features, eps, momentum);
    }

    /// <summary>The learned mixture of one switchable normalizer in a model.</summary>
    public sealed class LayerMixture
    {
        internal LayerMixture(string name, IReadOnlyList<string> components, IReadOnlyList<double> mean, IReadOnlyList<double> variance)
        {
            Name = name;
            Components = components;
            Mean = mean;
            Var = variance;
        }

        /// <summary>The module's dotted name in the model ("" for the model itself).</summary>
        public string Name { get; }

        /// <summary>Short names of the mixed statistics, in order: "IN", "LN" and (when BN is used) "BN".</summary>
        public IReadOnlyList<string> Components { get; }

        /// <summary>The mean weights (the layer's switch applied to its logits), one per component; they sum to 1.</summary>
        public IReadOnlyList<double> Mean { get; }

        /// <summary>The variance weights (the layer's switch applied to its logits), one per component; they sum to 1.</summary>
        public IReadOnlyList<double> Var { get; }

        /// <inheritdoc />
        public override string ToString() =>
            $"{(Name.Length == 0 ? "(model)" : Name)}: mean[{string.Join(" ", Components)}] = {string.Join(" ", Mean.Select(v => v.ToString("0.000")))}, " +
            $"var = {string.Join(" ", Var.Select(v => v.ToString("0.000")))}";
    }

    /// <summary>
    /// Model-level tools as extension methods on TorchSharp modules (<c>model.ConvertBatchNorm()</c>,
    /// <c>model.Mixtures()</c>, ...): conversion from BatchNorm, batch-average recalibration, sparse switching, mixtures
    /// and all-or-nothing loading. They can also be called as static methods.
    /// </summary>
    public static class SwitchNormTools
    {
        /// <summary>
        /// Loads a PyTorch file into <paramref name="model"/>, all or nothing: a <c>torch.save</c> zip file (.pt, .pth) holding
        /// a flat state dict or a checkpoint dict with one under <c>state_dict</c> or <c>model</c> (such as the official
        /// training script's {epoch, state_dict, best_prec1, optimizer}), or a .safetensors file. A DataParallel
        /// <c>module.</c> prefix is stripped; the official SwitchNorm shapes ((1, C, 1, 1), (1, C, 1), (1, C)) are mapped
        /// onto the module's [C] when the layer has official semantics (the <see cref="models"/> zoo,
        /// <c>Layers.OfficialSwitchNorm2d</c>); a missing num_batches_tracked keeps its value. Every key, shape and dtype
        /// is checked before anything is written, and every problem is listed in one InvalidDataException. Refused with
        /// a clear message: a legacy (pre-1.6) file, with the one-line re-save recipe; a pickled whole model; an official
        /// checkpoint loaded into layers with default semantics.
        /// </summary>
        /// <param name="model">The model to load into.</param>
        /// <param name="path">The file.</param>
        /// <param name="strict">Whether missing and unexpected keys are errors (num_batches_tracked may always be missing). Default true.</param>
        /// <returns>The model's keys the file lacked and the file's keys the model lacks.</returns>
        public static (IList<string> missing_keys, IList<string> unexpected_keys) LoadPyTorch(this torch.nn.Module model, string path, bool strict = true)
        {
            var r = global::SwitchNorm.FSharp.PyTorch.Load(strict, path, model);
            return (r.MissingKeys.ToList(), r.UnexpectedKeys.ToList());
        }

        /// <summary>
        /// Writes <paramref name="model"/>'s state dict as a file that Python's <c>torch.load</c> reads: .safetensors when the
        /// path ends so, else a <c>torch.save</c> zip file (.pt, .pth) holding a plain dict. With
        /// <see cref="global::SwitchNorm.PyTorchLayout.Official"/> the SwitchNorm tensors take the official shapes, so the file
        /// loads into the official PyTorch modules (its layers must have official semantics).
        /// </summary>
        /// <param name="model">The model to save.</param>
        /// <param name="path">The file to write (replaced when it exists; written to a temporary file first).</param>
        /// <param name="layout">Module (default: the module's own shapes) or Official.</param>
        /// <param name="prefix">Prepended to every key, e.g. "module." as DataParallel writes them. Default none.</param>
        public static void SavePyTorch(this torch.nn.Module model, string path, global::SwitchNorm.PyTorchLayout layout = global::SwitchNorm.PyTorchLayout.Module, string prefix = "") =>
            global::SwitchNorm.FSharp.PyTorch.Save(layout, prefix, path, model);

        /// <summary>
        /// Replaces every BatchNorm1d/2d/3d that <paramref name="model"/>'s forward can reach (children, Sequentials,
        /// ModuleLists, ModuleDicts, fields, at any depth) by the matching SwitchNorm, in place, carrying over options
        /// (affine and track_running_stats included), weight, bias, running statistics, num_batches_tracked and the
        /// train/eval mode. A BatchNorm used in several places becomes one shared SwitchNorm. Anything it cannot do is
        /// refused before anything changes.
        /// </summary>
        /// <param name="model">The module tree to convert.</param>
        /// <param name="init">Starting logits: <see cref="LogitInit.Uniform"/> (the paper) or <see cref="LogitInit.BatchLeaning"/>.</param>
        /// <param name="bn_logit_margin">With BatchLeaning, how much BN's logits exceed the others: BN weight 1/(1 + 2e^−margin). Default 2 (0.787), <c>Defaults.BnLogitMargin</c>: the smallest margin that keeps a trained network's accuracy at conversion while the mixtures still learn (at 8 the softmax is saturated and the switch does not move).</param>
        /// <returns>The converted model (the new layer when the model itself is a BatchNorm), the names of the places that
        /// held a BatchNorm, and how many were replaced.</returns>
        /// <exception cref="InvalidOperationException">A field or container typed for BatchNorm only, or a margin whose
        /// logits are not finite in the layer's dtype; nothing is changed.</exception>
        public static global::SwitchNorm.ConversionResult ConvertBatchNorm(this torch.nn.Module model, LogitInit init = LogitInit.Uniform, double bn_logit_margin = global::SwitchNorm.Defaults.BnLogitMargin) =>
            global::SwitchNorm.FSharp.Conversion.BatchNormToSwitchNorm(init, bn_logit_margin, model);

        /// <summary>
        /// Folding for deployment: puts <paramref name="model"/> in eval mode and replaces every SwitchNorm whose mean and
        /// variance mixtures are both one-hot on the same statistic by the plain layer that computes the same eval output
        /// (BN → BatchNorm with the running statistics, IN → InstanceNorm with the per-channel affine, LN →
        /// GroupNorm(1, C)). Mixed selections stay SwitchNorm; SSN's frozen selections are one-hot by construction.
        /// </summary>
        /// <param name="model">The module tree to fold, in place.</param>
        /// <returns>The model (the plain layer when the model itself is a foldable SwitchNorm) and the folded layers' names.</returns>
        public static global::SwitchNorm.ConversionResult FoldForInference(this torch.nn.Module model) =>
            global::SwitchNorm.FSharp.Folding.ForInference(model);

        /// <summary>
        /// Fuses, in place and for eval, every Conv1d/2d/3d that a Sequential runs right before a BatchNorm (or a
        /// SwitchNorm that selects BN) into the convolution: w·s and (b − running_mean)·s + β with
        /// s = γ / sqrt(running_var + eps); the norm becomes Identity. Puts the model in eval mode.
        /// </summary>
        /// <param name="model">The module tree, in place.</param>
        /// <returns>The model and the names of the norms fused away.</returns>
        public static global::SwitchNorm.ConversionResult FuseConvBatchNorm(this torch.nn.Module model) =>
            global::SwitchNorm.FSharp.Folding.FuseConvBatchNorm(model);

        /// <summary>
        /// Batch-average recalibration: runs <paramref name="model"/> over <paramref name="batches"/> under no_grad and sets
        /// each SwitchNorm's running_mean and running_var to the exact mean and unbiased variance of everything its BN
        /// component saw (merged per-batch moments). Parameters are untouched; the train/eval mode is restored.
        /// </summary>
        /// <returns>The number of batches used.</returns>
        public static int RecalibrateBatchAverage(this torch.nn.Module<Tensor, Tensor> model, IEnumerable<Tensor> batches) =>
            global::SwitchNorm.FSharp.Recalibrate.BatchAverage(model, batches);

        /// <summary>Sets the switch of every SwitchNorm in <paramref name="model"/> (frozen layers keep theirs).</summary>
        /// <returns>The number of layers set.</returns>
        public static int UseSwitch(this torch.nn.Module model, SwitchKind kind) =>
            global::SwitchNorm.FSharp.SparseSwitch.Use(kind, model);

        /// <summary>
        /// The sparsestmax radius schedule: 0 at the start, rising linearly to 1 at <paramref name="ramp_end"/> (a fraction
        /// of training in (0, 1]), then 1.
        /// </summary>
        /// <param name="progress">The fraction of training done, in [0, 1].</param>
        /// <param name="ramp_end">When the radius reaches 1, as a fraction of training. Default 0.8.</param>
        public static double SparsestmaxRadius(double progress, double ramp_end = 0.8) =>
            global::SwitchNorm.FSharp.SparseSwitch.RadiusAt(ramp_end, progress);

        /// <summary>
        /// One step of the sparsestmax schedule: sets <paramref name="radius"/> on every SwitchNorm and freezes each
        /// sparsestmax layer whose mixtures are both one-hot.
        /// </summary>
        /// <returns>The number of frozen layers in the model.</returns>
        public static int StepSparsestmax(this torch.nn.Module model, double radius) =>
            global::SwitchNorm.FSharp.SparseSwitch.Step(radius, model);

        /// <summary>The learned mean and variance mixtures of every SwitchNorm in the model, by module name.</summary>
        public static IReadOnlyList<LayerMixture> Mixtures(this torch.nn.Module model) =>
            global::SwitchNorm.FSharp.Mixture.OfModel(model)
                .Select(m => new LayerMixture(m.Name, m.Components.ToArray(), m.Mean.ToArray(), m.Var.ToArray()))
                .ToArray();

        /// <summary>
        /// Loads a checkpoint written by TorchSharp's <c>Module.save</c> after checking every key: missing, unexpected and
        /// mis-shaped keys are all reported in one <see cref="System.IO.InvalidDataException"/>, and the model is unchanged.
        /// </summary>
        /// <param name="model">The module to load into.</param>
        /// <param name="path">The checkpoint file.</param>
        /// <param name="allow_missing">Whether keys absent from the file may keep their values (e.g. a BatchNorm checkpoint into a converted model).</param>
        public static void LoadCheckpoint(this torch.nn.Module model, string path, bool allow_missing = false) =>
            global::SwitchNorm.FSharp.Checkpoint.Load(allow_missing, path, model);

        /// <summary>
        /// Loads a state dict into <paramref name="model"/> all or nothing: every tensor's shape and dtype must be exactly
        /// the model's (no broadcasting, unlike TorchSharp's <c>load_state_dict</c>, which also writes key by key before
        /// failing), and with <paramref name="strict"/> no key may be missing or unexpected. Every problem is listed in one
        /// <see cref="System.IO.InvalidDataException"/> and nothing is written.
        /// </summary>
        /// <param name="model">The module tree to load into.</param>
        /// <param name="source">The state dict, by key.</param>
        /// <param name="strict">Whether missing and unexpected keys are refused. Default true.</param>
        /// <returns>The missing and the unexpected keys (both empty when strict).</returns>
        public static (IList<string> missing_keys, IList<string> unexpected_keys) LoadStateDict(this torch.nn.Module model,
            IDictionary<string, Tensor> source, bool strict = true)
        {
            var (missing, unexpected) = global::SwitchNorm.FSharp.Checkpoint.LoadStateDict(strict, source, model);
            return (missing.ToList(), unexpected.ToList());
        }
    }

    /// <summary>
    /// The official Switchable Normalization model zoo (switchablenorms/Switchable-Normalization), as
    /// <c>torchvision.models</c> is for TorchSharp: ResNet v1 and v2 of depth 18 to 152 with the official module names
    /// (state-dict keys exactly the official ones, without the DataParallel prefix) and official semantics in every
    /// SwitchNorm layer, so the official checkpoints load with <see cref="SwitchNormTools.LoadPyTorch"/> and compute the
    /// official numbers. Inputs are (N, 3, 224, 224) (the official 7x7 average pooling).
    /// </summary>
#pragma warning disable CS8981 // lower-case on purpose: models.resnetv1sn50(), as torchvision.models.resnet50()
    public static class models
#pragma warning restore CS8981
    {
        /// <summary>The official ResNet-18 v1 with SN (resnetv1sn18).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">Whether each block's last SN weight starts at 0. Default true, as the official ResNetV1SN.</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv1sn18(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = true) =>
            global::SwitchNorm.Zoo.V1(18, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-34 v1 with SN (resnetv1sn34).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">Whether each block's last SN weight starts at 0. Default true, as the official ResNetV1SN.</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv1sn34(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = true) =>
            global::SwitchNorm.Zoo.V1(34, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-50 v1 with SN (resnetv1sn50).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">Whether each block's last SN weight starts at 0. Default true, as the official ResNetV1SN.</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv1sn50(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = true) =>
            global::SwitchNorm.Zoo.V1(50, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-101 v1 with SN (resnetv1sn101).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">Whether each block's last SN weight starts at 0. Default true, as the official ResNetV1SN.</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv1sn101(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = true) =>
            global::SwitchNorm.Zoo.V1(101, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-152 v1 with SN (resnetv1sn152).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">Whether each block's last SN weight starts at 0. Default true, as the official ResNetV1SN.</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv1sn152(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = true) =>
            global::SwitchNorm.Zoo.V1(152, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-18 v2 with SN (resnetv2sn18).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">The official ResNetV2SN has none; must be false (the default).</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv2sn18(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = false) =>
            global::SwitchNorm.Zoo.V2(18, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-34 v2 with SN (resnetv2sn34).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">The official ResNetV2SN has none; must be false (the default).</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv2sn34(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = false) =>
            global::SwitchNorm.Zoo.V2(34, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-50 v2 with SN (resnetv2sn50).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">The official ResNetV2SN has none; must be false (the default).</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv2sn50(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = false) =>
            global::SwitchNorm.Zoo.V2(50, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-101 v2 with SN (resnetv2sn101).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">The official ResNetV2SN has none; must be false (the default).</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv2sn101(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = false) =>
            global::SwitchNorm.Zoo.V2(101, num_classes, using_bn, using_moving_average, last_gamma);

        /// <summary>The official ResNet-152 v2 with SN (resnetv2sn152).</summary>
        /// <param name="num_classes">Classes of the fc layer. Default 1000.</param>
        /// <param name="using_bn">Whether the SN layers mix BN; false gives IN + LN, as the official (8,1) model. Default true.</param>
        /// <param name="using_moving_average">Whether the running statistics are a moving average (false: raw sums). Default true.</param>
        /// <param name="last_gamma">The official ResNetV2SN has none; must be false (the default).</param>
        public static torch.nn.Module<Tensor, Tensor> resnetv2sn152(long num_classes = 1000, bool using_bn = true, bool using_moving_average = true, bool last_gamma = false) =>
            global::SwitchNorm.Zoo.V2(152, num_classes, using_bn, using_moving_average, last_gamma);
    }
}
