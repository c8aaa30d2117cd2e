"""The fast teacher-forcing path: the computation of models.DecoderWithAttention.forward in fewer, larger
operations, with hand-written backward passes. Training uses it (train.py; ``--plain-loop`` for the plain one).

models.py never imports this file: the paper's equations are written there once, plainly, and this file is an
optimisation of them that ``tests/test_fused.py`` holds equal to the plain loop (logits, alphas and every
gradient). Change the model in models.py and that test says whether this path still computes it.

* The embedding's share of the LSTM gates (W_e E y_{t-1} + biases) is one matrix product over every position
  before the loop, and so are the deep output's L_h h_t and L_z z_t after it.
* Inside the loop, h_{t-1} goes through one product for the gate f_beta and attention's W_h together, and
  [z_t; h_{t-1}] through one product for the rest of the LSTM gates (the cell's equations written out).
* Attention's energies use tanh x = 2 sigmoid(2x) - 1 and accumulate their gradient for the projected
  regions in one buffer (:class:`_GradientBuffer`); the weights of the two per-step products get their
  gradients in one product over all steps after the loop (:class:`_DeferredWeightGrads`).
* The context z = alpha @ a reads each image's regions once per step for all its captions
  (:class:`_ImageSlots`), not once per caption. With compiled kernels (``train.py --compile``) the energies
  do the same (:class:`_ImageAttentionEnergies`).
* :class:`FastDropout` draws the CPU's dropout mask from 16-bit random lanes instead of bernoulli_.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from models import DecoderWithAttention


def adam(params: list[torch.Tensor], lr: float, device: torch.device | str) -> torch.optim.Adam:
    """Adam (Kingma & Ba, 2015, as the paper and the tutorial) with PyTorch's fused kernel on the CPU and CUDA:
    one pass per parameter tensor for the whole update, where the default CPU implementation runs about ten
    operations per tensor (the same weights to float32 rounding: tests/test_train.py; speed: docs/benchmarks.md)."""
    return torch.optim.Adam(params, lr=lr, fused=torch.device(device).type in ("cpu", "cuda"))


class FastDropout(nn.Dropout):
    """Inverted dropout (each element zeroed with probability p, the rest scaled by 1 / (1 - p)), as
    nn.Dropout, with a faster mask on the CPU: 16 random bits per element, drawn four at a time as 64-bit
    integers, compared with a threshold (PyTorch's CPU dropout draws its mask with bernoulli_). p is rounded
    to a multiple of 1/65536 and the scale uses the rounded p, so the expectation of every element is still
    exactly x. Elsewhere (CUDA) this is F.dropout. train.py puts it in the decoder's ``dropout`` slot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """:class:`FastDropout` as a function."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    threshold = round(p * 65536) - 32768  # P(bits < threshold) = p rounded to a multiple of 1/65536
    if threshold >= 32768:  # p rounds to 1: everything is dropped
        return x * 0
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold
    return x * (keep * (65536 / (32768 - threshold))).to(x.dtype)


class _GradientBuffer(torch.autograd.Function):
    """Links a training forward's attention steps to ``projected``: its backward runs after every step's (each
    step takes its output, the "anchor", as an input) and hands back the gradient they summed into ``buffer``.

    Without it, each step's slice ``projected[:bt]`` would make autograd allocate, zero, copy and add a full
    N x P x A gradient per step.
    """

    @staticmethod
    def forward(ctx, projected: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        ctx.buffer = buffer
        return projected.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_anchor: torch.Tensor):
        # Hand over a copy and empty the buffer: a second backward through the same graph (retain_graph)
        # then sums afresh instead of adding the first pass's gradient again.
        grad = ctx.buffer.clone()
        ctx.buffer.zero_()
        return grad, None


class _DeferredWeightGrads(torch.autograd.Function):
    """The weight gradients of a training forward's per-step products (:class:`_StepProduct`), each in one
    matrix product over all steps instead of one small product and one accumulation per step.

    Its output (the "anchor") is an input of every step's product, so its backward runs after theirs: they
    hand it their inputs and output gradients (in ``store``), and it returns dW = sum_t g_t^T x_t as
    cat(g)^T cat(x). Per step, the weight gradient would otherwise be a full matrix computed from a
    few rows and added to the running sum.
    """

    @staticmethod
    def forward(ctx, store: list[list[tuple[torch.Tensor, torch.Tensor]]], *weights: torch.Tensor) -> torch.Tensor:
        ctx.store, ctx.dtypes = store, [w.dtype for w in weights]
        return weights[0].new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_anchor: torch.Tensor):
        grads = []
        for pairs, dtype in zip(ctx.store, ctx.dtypes):
            if not pairs:
                grads.append(None)
                continue
            x = torch.cat([x for x, _ in pairs])
            g = torch.cat([g for _, g in pairs])
            if g.dtype == torch.float16:  # CUDA AMP: a sum over thousands of loss-scaled rows can overflow float16
                x, g = x.float(), g.float()
            grads.append((g.t() @ x).to(dtype))
            pairs.clear()  # a second backward through the graph (retain_graph) refills it
        return (None, *grads)


class _StepProduct(torch.autograd.Function):
    """x @ w^T for one step of the recurrence, with ``w`` detached: its gradient is deferred to
    :class:`_DeferredWeightGrads` (``anchor``), which gets this step's input and output gradient in
    ``store[k]``. Backward computes only the input's gradient."""

    @staticmethod
    def forward(ctx, x, w, anchor, store, k: int) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        x = x.to(w.dtype)
        ctx.save_for_backward(x, w)
        ctx.store, ctx.k = store, k
        return x @ w.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
        ctx.store[ctx.k].append((x, grad))
        return (grad @ w).to(ctx.x_dtype), None, None, None, None


class _ImageSlots:
    """Where each caption's row goes in a per-image layout, for the context product of
    :func:`teacher_forcing`.

    Images are renumbered by their longest caption (longest first), so the images still decoding at step t are
    a prefix, like the length-sorted captions. Caption j gets slot ``image * k + r`` (k: the most captions any
    image has; r: j's rank among its image's captions). At step t the alphas of the bt running captions are
    scattered into an images x k x P block, multiplied with those images' regions (each read once), and the
    contexts gathered back.
    """

    def __init__(self, owner: torch.Tensor, decode_lengths: torch.Tensor) -> None:
        device, owner = owner.device, owner.cpu()
        images = int(owner.max()) + 1
        longest = torch.zeros(images, dtype=decode_lengths.dtype).scatter_reduce(0, owner, decode_lengths, "amax")
        self.image_order = longest.argsort(descending=True, stable=True)
        rank_of_image = self.image_order.argsort()
        new_owner = rank_of_image[owner]
        counts = torch.bincount(new_owner, minlength=images)
        self.k = int(counts.max())
        by_image = new_owner.argsort(stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(new_owner)
        rank[by_image] = torch.arange(len(new_owner)) - first[new_owner[by_image]]
        self.slot = (new_owner * self.k + rank).to(device)  # moved once, not at every step
        self.image_order = self.image_order.to(device)
        # images still decoding at step t: those whose longest caption is longer than t
        self.images_at = [int((longest > t).sum()) for t in range(int(decode_lengths.max()))]

    def context(self, alpha: torch.Tensor, encoder_out: torch.Tensor, t: int) -> torch.Tensor:
        """alpha (bt x P) of the first bt captions, regions (images x P x C, in image_order) -> z (bt x C)."""
        bt, p = alpha.shape
        m = self.images_at[t]
        slot = self.slot[:bt]
        block = alpha.new_zeros(m * self.k, p).index_put((slot,), alpha)
        z = torch.bmm(block.view(m, self.k, p).to(encoder_out.dtype), encoder_out[:m])
        return _GatherUniqueRows.apply(z.view(m * self.k, -1), slot)


class _GatherUniqueRows(torch.autograd.Function):
    """x[index] for an index without repeats. Autograd's backward of x[index] adds the gradient rows in with
    index_put(accumulate=True), which runs serially on the CPU because rows may repeat; without repeats the
    rows can simply be written (index_copy_)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.size(0)
        return x[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


# exp(-x) of each half of the energy's argument is clamped to [e^-40, e^40], so that their product stays a
# normal float32 (no inf * 0); this changes sigmoid(x + y) only where a half exceeds 40 in magnitude while the
# sum does not saturate the sigmoid, far outside what a trained attention produces.
_HALF_LIMIT = 40.0


def _sigmoid_factors(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(-x) (clamped, see _HALF_LIMIT) in ``dtype``: sigmoid(x + y) = 1 / (1 + exp(-x) exp(-y)).

    float16 (CUDA AMP) is replaced by float32: its range ends at exp(11.1), so the factors would overflow to
    inf and underflow to 0 inside what attention produces (and 0 * inf is nan). bfloat16 has float32's range.
    """
    return torch.exp(-x.float().clamp(-_HALF_LIMIT, _HALF_LIMIT)).to(_factor_dtype(dtype))


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _energies_one_pass(eh: torch.Tensor, er: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Forward of :class:`_ImageAttentionEnergies` for compiling: s @ w with s = sigmoid(dh2 + projected)
    written as 1 / (1 + eh * er), for m images with k caption slots each, from the factors eh = exp(-dh2)
    (m x k x A, this step's) and er = exp(-projected) (m x P x A, once per training step and image).

    The exponentials leave the m x k x P x A loop, which is a multiply, an add and a reciprocal per element in
    one pass ending in the reduction; s is not stored (the backward recomputes it as cheaply); and each image's
    regions are read once for its k captions. Sums in float32. Returns m x k x P."""
    s = torch.reciprocal(1 + eh.float().unsqueeze(2) * er.float().unsqueeze(1))
    return (s * w.float()).sum(-1).to(er.dtype)


def _energies_one_pass_backward(
    grad: torch.Tensor, eh: torch.Tensor, er: torch.Tensor, w: torch.Tensor, buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`_energies_one_pass`, likewise fusable (grad: m x k x P, zero for empty slots): adds
    d/d(projected), summed over each image's k slots, into ``buffer`` (m x P x A) in place and returns the
    float32 gradient of dh2 and w's gradient per slot (both m x k x A; the caller sums the latter: a sum over
    captions and regions in here compiled to a loop that streamed er once per 32 channels)."""
    g = grad.float().unsqueeze(3)
    s = torch.reciprocal(1 + eh.float().unsqueeze(2) * er.float().unsqueeze(1))
    gs = g * s
    grad_x = gs * w.float() * (1 - s)  # sigmoid'(x) = s (1 - s)
    buffer.add_(grad_x.sum(dim=1))
    return grad_x.sum(dim=2), gs.sum(dim=2)


@functools.cache
def compiled_attention_kernels() -> tuple[Callable, Callable]:
    """torch.compile'd :func:`_energies_one_pass` and its backward (dynamic shapes: the number of running
    captions shrinks every step). Compiling needs a C++ compiler on the CPU (Triton on CUDA) and takes
    tens of seconds on first use; inductor caches the result on disk for later runs."""
    # Inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on every CPU-only
    # machine: true, irrelevant to CPU kernels, and alarming in a training log.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return (
        torch.compile(_energies_one_pass, dynamic=True),
        torch.compile(_energies_one_pass_backward, dynamic=True),
    )


class _AttentionEnergies(torch.autograd.Function):
    """s @ w with s = sigmoid(dh2 + projected[:bt]) (bt x P x A, one row of regions per caption), for training:
    the half-energies of models.Attention.energies in its sigmoid form (e = 2 s @ w + offset). Backward adds
    the gradient for ``projected[:bt]`` into ``buffer`` in place (see :class:`_GradientBuffer`) and uses PyTorch's fused
    sigmoid backward. ``train.py --compile`` uses :class:`_ImageAttentionEnergies` instead."""

    @staticmethod
    def forward(ctx, dh2, w, anchor, projected, bt: int, buffer) -> torch.Tensor:
        s = torch.sigmoid(dh2.to(projected.dtype).unsqueeze(1) + projected[:bt])
        ctx.save_for_backward(s, w)
        ctx.bt, ctx.buffer = bt, buffer
        return s @ w.to(s.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        s, w = ctx.saved_tensors
        grad = grad.to(s.dtype)
        grad_w = (grad.reshape(1, -1) @ s.reshape(-1, s.size(-1))).squeeze(0).to(w.dtype)
        grad_x = torch.ops.aten.sigmoid_backward(grad.unsqueeze(2) * w.to(s.dtype), s)
        ctx.buffer[: ctx.bt] += grad_x
        return grad_x.sum(dim=1), grad_w, None, None, None, None


class _ImageAttentionEnergies(torch.autograd.Function):
    """The same half-energies (bt x P) in the compiled kernels (:func:`compiled_attention_kernels`), with the
    regions kept per image: the bt running captions' exp(-dh2) rows go into their images' slots (m images x
    k slots, :class:`_ImageSlots`), each image's factors exp(-projected) are read once for all its captions,
    and the gradient for the regions is summed per image into ``buffer`` (images x P x A, in the slots' image
    order). Against one row of regions per caption this reads and writes about 1/k of the memory per step;
    empty slots cost arithmetic only (their gradient is zero)."""

    @staticmethod
    def forward(ctx, dh2, w, anchor, factors, slots: _ImageSlots, t: int, buffer, kernels) -> torch.Tensor:
        bt, m, k = dh2.size(0), slots.images_at[t], slots.k
        slot = slots.slot[:bt]
        eh = dh2.new_zeros(m * k, dh2.size(1), dtype=torch.float32)
        eh.index_copy_(0, slot, _sigmoid_factors(dh2, torch.float32))
        eh = eh.view(m, k, -1)
        ctx.save_for_backward(eh, factors, w, slot)
        ctx.buffer, ctx.kernels, ctx.dh2_dtype = buffer, kernels, dh2.dtype
        return kernels[0](eh, factors[:m], w.to(factors.dtype)).view(m * k, -1)[slot]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        eh, factors, w, slot = ctx.saved_tensors
        m, k = eh.shape[:2]
        g = grad.new_zeros(m * k, grad.size(1)).index_copy_(0, slot, grad).view(m, k, -1)
        grad_dh2, grad_w = ctx.kernels[1](g, eh, factors[:m], w.to(factors.dtype), ctx.buffer[:m])
        grad_dh2 = grad_dh2.view(m * k, -1)[slot].to(ctx.dh2_dtype)
        return grad_dh2, grad_w.sum(dim=(0, 1)).to(w.dtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ decoder


class FusedTeacherForcing(nn.Module):
    """The decoder's teacher forcing through :func:`teacher_forcing`, as a module (so that DDP can wrap it):
    call it as the decoder itself. ``compiled`` runs the attention energies in
    :func:`compiled_attention_kernels` (see :func:`compile_kernels`)."""

    def __init__(self, decoder: DecoderWithAttention) -> None:
        super().__init__()
        self.decoder = decoder
        self.compiled = False

    def forward(self, *batch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """models.DecoderWithAttention.forward's arguments and results (encoder_out, captions, lengths[,
        image_index]) -> (logits, targets, alphas)."""
        return teacher_forcing(self.decoder, *batch, compiled=self.compiled)

    def compile_kernels(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Compile :func:`compiled_attention_kernels` now, on small blocks of ``dtype`` (the autocast dtype under
        AMP, else float32), and use them from now on.

        Raises whatever torch.compile raises when it cannot compile (no C++ compiler, no Triton); the module is
        then left as it was.
        """
        a = self.decoder.cfg.attention_dim
        kernels = compiled_attention_kernels()
        for n in (3, 2):  # a second size, so that the dynamic-shape kernels are the ones compiled
            slots = _ImageSlots(torch.arange(n, device=device).repeat(2), torch.arange(2 * n, 0, -1))
            dh2 = torch.zeros(2 * n, a, device=device, dtype=dtype, requires_grad=True)
            w = torch.zeros(a, device=device, requires_grad=True)
            factors = torch.ones(n, 2, a, device=device, dtype=_factor_dtype(dtype))
            buffer = torch.zeros(n, 2, a, device=device)
            e = _ImageAttentionEnergies.apply(dh2, w, w.sum(), factors, slots, 0, buffer, kernels)
            e.float().sum().backward()
        self.compiled = True


def teacher_forcing(
    decoder: DecoderWithAttention,
    encoder_out: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    image_index: torch.Tensor | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """models.DecoderWithAttention.forward (same arguments, same results) by the fast path described above.

    Without autograd (or when the regions need no gradient) it simply runs the plain loop.
    """
    projected = 2 * decoder.attention.project(encoder_out)  # N_img x P x A: doubled for the sigmoid form
    if not (torch.is_grad_enabled() and projected.requires_grad):
        return decoder(encoder_out, captions, lengths, image_index)
    batch = decoder.sort_batch(encoder_out, captions, lengths, image_index)
    logits, alphas = _fused_loop(decoder, encoder_out, projected, batch, compiled)
    return logits, batch.targets, alphas[batch.order.argsort()]


def _step_weights(decoder: DecoderWithAttention, device_type: str):
    """The per-step products' weights, concatenated: W_h = [f_beta; 2 W_h^att] (with its bias) for h_{t-1}
    and W_rec = [W_ih's context columns, W_hh] for [z_t; h_{t-1}]; detached, with their gradient deferred to
    the returned anchor (:class:`_DeferredWeightGrads`) and its ``store``."""
    e, w_ih = decoder.cfg.embed_dim, decoder.lstm.weight_ih
    w_rec = torch.cat([w_ih[:, e:], decoder.lstm.weight_hh], dim=1)
    w_h = torch.cat([decoder.f_beta.weight, 2 * decoder.attention.decoder_att.weight])
    b_h = torch.cat([decoder.f_beta.bias, decoder.f_beta.bias.new_zeros(decoder.cfg.attention_dim)])
    store: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    anchor = _DeferredWeightGrads.apply(store, w_h, w_rec)
    w_h, w_rec = w_h.detach(), w_rec.detach()
    if torch.is_autocast_enabled(device_type):
        # Cast the concatenated weights once, not at every step (autocast caches only parameters' casts).
        low = torch.get_autocast_dtype(device_type)
        w_rec, w_h, b_h = w_rec.to(low), w_h.to(low), b_h.to(low)
    return w_h, b_h, w_rec, anchor, store


def _fused_loop(decoder, encoder_out, projected, batch, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over the length-sorted captions of ``batch`` (models.TeacherBatch); ``projected`` is
    2 W_a a_i per image. Returns the logits (packed, T_total x V) and alphas (N_cap x steps x P, sorted order).

    Packed sequences are time-major: step t's rows are a contiguous block, so per-step results are
    concatenated straight into the packed order the classifier and the targets use.
    """
    decode_lengths, owner, h, c = batch.decode_lengths, batch.owner, batch.h, batch.c
    n, steps, cdim = batch.embeddings.size(0), int(decode_lengths[0]), encoder_out.size(2)
    batch_sizes = (decode_lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(dim=1).tolist()
    packed_emb = pack_padded_sequence(batch.embeddings, decode_lengths, batch_first=True).data  # T_total x E
    lstm = decoder.lstm
    emb_gates = F.linear(packed_emb, lstm.weight_ih[:, : decoder.cfg.embed_dim], lstm.bias_ih + lstm.bias_hh)
    w_h, b_h, w_rec, weights, store = _step_weights(decoder, projected.device.type)
    if torch.is_autocast_enabled(projected.device.type):  # else every step's context product casts its slice
        encoder_out = encoder_out.to(torch.get_autocast_dtype(projected.device.type))
    w = decoder.attention.full_att.weight[0]
    offset = decoder.attention.full_att.bias - w.sum()
    slots = _ImageSlots(owner, decode_lengths)
    kernels = compiled_attention_kernels() if compiled else None
    # Per image in the slots' order (compiled kernels) or per length-sorted caption (eager).
    projected = _GatherUniqueRows.apply(projected, slots.image_order) if kernels else projected[owner]
    buffer = torch.zeros_like(projected, dtype=torch.float32)  # summed over steps: keep float32 under autocast
    anchor = _GradientBuffer.apply(projected, buffer)
    regions = projected.detach()
    factors = _sigmoid_factors(regions, regions.dtype) if kernels else None  # exp(-projected), once
    # Per-step pieces come from one split and go back through one stack: slicing emb_gates[start:start+bt]
    # or writing alphas[:bt, t] would make autograd allocate and add a full-size gradient at every step.
    step_gates = emb_gates.split(batch_sizes)
    encoder_out = encoder_out[slots.image_order]
    hs, zs, step_alphas = [], [], []
    for t, bt in enumerate(batch_sizes):
        h, c = h[:bt], c[:bt]
        hw = _StepProduct.apply(h, w_h, weights, store, 0) + b_h  # bt x (C + A): f_beta(h), 2 W_h h
        if kernels:
            energy = _ImageAttentionEnergies.apply(hw[:, cdim:], w, anchor, factors, slots, t, buffer, kernels)
        else:
            energy = _AttentionEnergies.apply(hw[:, cdim:], w, anchor, regions, bt, buffer)
        alpha = torch.softmax(2 * energy + offset, dim=1)  # bt x P
        z = torch.sigmoid(hw[:, :cdim]) * slots.context(alpha, encoder_out, t)  # bt x C: beta_t z_t
        gates = step_gates[t] + _StepProduct.apply(torch.cat([z, h], dim=1), w_rec, weights, store, 1)  # bt x 4D
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
        zs.append(z)
        step_alphas.append(F.pad(alpha, (0, 0, 0, n - bt)))
    out = torch.cat(hs)  # T_total x D
    if decoder.cfg.deep_output:
        out = torch.tanh(packed_emb + decoder.out_h(out) + decoder.out_z(torch.cat(zs)))  # T_total x E
    return decoder.fc(decoder.dropout(out)), torch.stack(step_alphas, dim=1)
