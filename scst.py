"""Self-critical sequence training (Rennie et al., CVPR 2017): after cross-entropy, the decoder is tuned to the
metric itself, CIDEr-D, by REINFORCE with a baseline, on captions it draws (models.DecoderWithAttention.sample).

train.py ``--scst --init-from BEST.pt`` runs it; this module is the objective alone, on plain values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from metrics import CiderD, coco_mentions
from models import END_ID, DecoderWithAttention


def scst_objective(
    decoder: DecoderWithAttention,
    scorer: CiderD,
    rev_word_map: Sequence[str],
    device: torch.device | str,
    samples: int = 5,
    max_len: int = 16,
    hallucination_penalty: float = 0.0,
    truths: Sequence[set[str]] = (),
) -> Callable[[tuple], tuple[torch.Tensor, dict[str, float], int]]:
    """Self-critical sequence training (Rennie et al., CVPR 2017) with the "new SCST" baseline.

    For each image, ``samples`` captions (at most ``max_len`` words) are drawn from the model; each is rewarded
    with its CIDEr-D against the image's references, minus the mean reward of the image's other samples (ruotianluo's
    self-critical.pytorch; the paper's baseline is the greedy caption's reward, which costs a decoding pass
    more and measured no better there). The loss is REINFORCE's -(r - b) log p(w), averaged over the drawn
    words. ``<end>`` is appended to candidates and references alike (as ruotianluo does), so a caption's last
    words form n-grams with it: a caption cut off at "... with a" loses reward, the known failure of SCST.

    With ``hallucination_penalty`` = lambda > 0, a caption's reward is CIDEr-D minus lambda per
    mention of a COCO object (CHAIR's categories and synonyms, Rohrbach et al. 2018) that is not in
    ``truths[i]``, the categories image ``i``'s references name: CHAIR computed against the references alone,
    as a reward. CIDEr-D alone pays for a likely object word even when it is wrong, and the model learns to say
    "dog" on photos of cats; the penalty makes a wrong object cost more than leaving it unnamed. (Our choice;
    Rennie et al. reward CIDEr-D only.) Rewards are in CIDEr-D's unit (1.0 = CIDEr 100).
    Batches come from an eval-mode dataset: (features, references as word lists, indices). The returned
    function maps a batch to (loss, sums to accumulate, images in the batch), as train.py's objectives do.
    """
    k, penalty = samples, hallucination_penalty
    words_of = np.asarray(rev_word_map, dtype=object)

    def objective(batch: tuple) -> tuple[torch.Tensor, dict[str, float], int]:
        feats, references, indices = batch
        feats = feats.to(device, non_blocking=True)
        words, log_probs, mask = decoder.sample(feats, k, max_len)  # N*k x T each
        ids, keep = words.cpu().numpy(), mask.cpu().numpy() > 0
        candidates = [[*words_of[row[m & (row != END_ID)]], "<end>"] for row, m in zip(ids, keep)]
        refs = [[[*ref, "<end>"] for ref in image_refs] for image_refs in references]
        rewards = scorer.scores(candidates, refs, np.repeat(np.arange(len(refs)), k)).reshape(-1, k)
        hallucinated = np.zeros_like(rewards)
        if penalty:
            for j, caption in enumerate(candidates):
                truth = truths[indices[j // k]]
                hallucinated.flat[j] = sum(cat not in truth for _, _, cat in coco_mentions(caption[:-1]))
            rewards = rewards - penalty * hallucinated
        baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
        advantage = torch.tensor((rewards - baseline).reshape(-1), dtype=torch.float32, device=device)
        loss = -(advantage.unsqueeze(1) * log_probs.float() * mask).sum() / mask.sum()
        n_words = float(mask.sum())
        sums = {
            "loss": loss.item() * n_words,
            "words": n_words,
            "reward": float(rewards.sum()),
            "hallucinated": float(hallucinated.sum()),
            "captions": ids.shape[0],
        }
        return loss, sums, feats.size(0)

    return objective
