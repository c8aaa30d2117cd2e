"""Beam search (decoding.py): batched equals one image at a time, beam 1 is greedy, length normalisation,
n-best lists, repeat blocking, and never a special token."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _decoders import features, random_decoder, search, tiny_cfg
from _tiny_model import one_torch_thread

import models
from decoding import block_repeated_bigrams, block_repeated_trigrams, content_word_mask
from models import END_ID, PAD_ID, START_ID, UNK_ID, DecoderWithAttention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():  # small ops: one thread beats two on a busy 2-core machine
        yield


def _reference_greedy(dec: DecoderWithAttention, enc: torch.Tensor, max_len: int):
    """Greedy decoding of one image (1 x P x C), written out step by step without beam_search."""
    with torch.no_grad():
        h, c = dec.init_state(enc)
        projected = dec.attention.project(enc)
        word, tokens, score, alphas = START_ID, [], 0.0, []
        for step in range(max_len):
            z, alpha = dec.attend(h, enc, projected)
            h, c, out = dec.advance(dec.embedding(torch.tensor([word])), h, c, z)
            logp = F.log_softmax(dec.fc(out), dim=1)[0]
            logp[[PAD_ID, START_ID, UNK_ID]] = -math.inf
            if step == 0:
                logp[END_ID] = -math.inf  # min_len=1 (the default): no empty caption
            word = int(logp.argmax())
            score += float(logp[word])
            if word == END_ID:
                break
            tokens.append(word)
            alphas.append(alpha[0])
    return tokens, score, torch.stack(alphas) if alphas else torch.zeros(0, enc.size(1))


def test_beam_size_one_is_greedy() -> None:
    dec = random_decoder()
    enc = features(6)
    batched = search(dec, enc, beam_size=1, max_len=12)
    greedy = search(dec, enc, beam_size=1, max_len=12)
    lengths = set()
    for i in range(6):
        tokens, score, alphas = _reference_greedy(dec, enc[i : i + 1], 12)
        for got in (batched[i], greedy[i]):
            assert got.tokens == tokens
            assert got.score == pytest.approx(score, abs=1e-4)
            torch.testing.assert_close(got.alphas, alphas, atol=1e-5, rtol=1e-5)
        lengths.add(len(tokens))
    assert len(lengths) > 1, "degenerate test: every caption had the same length"


@pytest.mark.parametrize("max_len", [15, 6])
def test_batched_beam_search_equals_one_image_at_a_time(max_len: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images of a batch end at different steps; those that are done leave it (and, with ``max_len`` 6, some
    are cut off unfinished). None of that may change any image's result."""
    dec = random_decoder()
    enc = features(16)
    images_per_step = []
    attend = dec.attend
    monkeypatch.setattr(dec, "attend", lambda h, e, p: images_per_step.append(e.size(0)) or attend(h, e, p))
    monkeypatch.setattr(models, "_CACHE_ELEMENTS", 64)  # attention one image at a time
    batched = search(dec, enc, beam_size=3, max_len=max_len)
    assert len({len(d.tokens) for d in batched}) > 1, "degenerate test: every caption had the same length"
    assert images_per_step[0] == 16 and min(images_per_step) < 16, "no image left the batch"
    if max_len == 6:
        assert any(len(d.tokens) == 6 for d in batched) and any(len(d.tokens) < 6 for d in batched)
    monkeypatch.undo()
    for i in range(16):
        single = search(dec, enc[i : i + 1], beam_size=3, max_len=max_len)[0]
        assert batched[i].tokens == single.tokens
        assert batched[i].score == pytest.approx(single.score, abs=1e-4)
        torch.testing.assert_close(batched[i].alphas, single.alphas, atol=1e-5, rtol=1e-5)
    assert any(d.tokens for d in batched)


def test_beam_search_result_agrees_with_teacher_forcing_on_it() -> None:
    """Re-reading a beam's caption with teacher forcing gives back its score (summed log-probabilities,
    <end> included when it ended) and the attention of every word: the beam kept the right history."""
    dec = random_decoder()
    enc = features(6)
    max_len = 15
    decoded = search(dec, enc, beam_size=4, max_len=max_len)
    assert {len(d.tokens) for d in decoded} - {0}, "degenerate test: only empty captions"
    for i, d in enumerate(decoded):
        ended = len(d.tokens) < max_len
        ids = [START_ID, *d.tokens, *([END_ID] if ended else [])]
        steps = len(ids) - 1
        # forward() counts <end> in the length; a caption cut at max_len has none, so add a dummy last word.
        caption = torch.tensor([ids if ended else [*ids, END_ID]])
        with torch.no_grad():
            logits, targets, alphas = dec(enc[i : i + 1], caption, torch.tensor([caption.size(1)]))
        logp = F.log_softmax(logits[:steps], dim=1).gather(1, targets[:steps, None]).sum()
        assert d.score == pytest.approx(float(logp), abs=1e-4)
        torch.testing.assert_close(d.alphas, alphas[0, : len(d.tokens)], atol=1e-5, rtol=1e-5)


def test_beam_search_alphas_per_word_sum_to_one_and_no_special_tokens() -> None:
    dec = random_decoder(seed=5)
    with torch.no_grad():  # make the non-words the most likely tokens: they must still never be emitted
        dec.fc.bias[PAD_ID] = dec.fc.bias[START_ID] = dec.fc.bias[UNK_ID] = 8.0
    enc = features(4)
    for k in (1, 3):
        decoded = search(dec, enc, beam_size=k, max_len=10)
        assert any(d.tokens for d in decoded), "degenerate test: only empty captions"
        for d in decoded:
            assert not {PAD_ID, START_ID, UNK_ID, END_ID} & set(d.tokens)
            assert d.alphas.shape == (len(d.tokens), 5)
            torch.testing.assert_close(d.alphas.sum(dim=1), torch.ones(len(d.tokens)))
            assert math.isfinite(d.score) and d.score <= 0
    # <unk> is allowed on request, and then greedy picks it: the mask is what kept it out above.
    assert all(UNK_ID in d.tokens for d in search(dec, enc, beam_size=1, max_len=10, allow_unk=True))


def test_beam_search_under_cpu_autocast() -> None:
    """Mixed precision (bfloat16) decoding on the CPU: attention's chunked path must follow the dtype."""
    dec, enc = random_decoder(), features(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = search(dec, enc, beam_size=3, max_len=10)
    assert len(decoded) == 4 and any(d.tokens for d in decoded)
    for d in decoded:
        torch.testing.assert_close(d.alphas.float().sum(dim=1), torch.ones(len(d.tokens)), atol=1e-2, rtol=0)


def test_beam_search_of_no_images_is_empty() -> None:
    assert search(random_decoder(), features(0), beam_size=3) == []


@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_search_returns_a_caption_when_end_never_wins(beam_size: int) -> None:
    dec = random_decoder(seed=7)
    with torch.no_grad():
        dec.fc.bias[END_ID] = -1e9
    results = search(dec, features(3), beam_size=beam_size, max_len=9)
    assert len(results) == 3
    for d in results:
        assert len(d.tokens) == 9 and END_ID not in d.tokens
        assert d.alphas.shape == (9, 5) and math.isfinite(d.score)


def test_length_normalisation_ranks_by_score_over_length_power() -> None:
    """A decoder whose next-word distribution is fixed: p(a) = 0.6, p(<end>) = 0.25, p(b) = 0.15.

    Beam search with 3 beams, worked by hand (log p: a -0.511, <end> -1.386, b -1.897):
      step 1: "a" -0.511, "<end>" -1.386 (finished), "b" -1.897
      step 2: "a a" -1.022, "<end>" -1.386, "a <end>" -1.897 (finished); "a b", "b a" at -2.408 drop out
      later:  the one live beam only gets worse ("a a a" -1.532, "a a a a" -2.043 ...); both finished
              beams stay, and a finished beam beats any unfinished one.
    Final choice between "<end>" (score -1.386, length 1) and "a <end>" (-1.897, length 2):
      p = 0   : -1.386 vs -1.897             -> [] (the empty caption)
      p = 0.5 : -1.386 vs -1.897 / 2**0.5 = -1.341 -> [a]
      p = 1   : -1.386 vs -0.949             -> [a]
      p = 0.4 : -1.386 vs -1.897 / 2**0.4 = -1.438 -> []
    """
    vocab = 6  # <pad> <start> <end> <unk> a b
    a, b = 4, 5
    dec = DecoderWithAttention(tiny_cfg(vocab), encoder_dim=8).eval()
    probs = torch.tensor([0.0, 0.0, 0.25, 0.0, 0.6, 0.15])
    with torch.no_grad():
        dec.fc.weight.zero_()
        dec.fc.bias.copy_(torch.where(probs > 0, probs.log(), torch.tensor(-1e4)))
    enc = torch.randn(2, 5, 8)
    log_end, log_a_end = math.log(0.25), math.log(0.6) + math.log(0.25)
    for p, expected in [(0.0, []), (0.4, []), (0.5, [a]), (1.0, [a])]:
        # min_len=0 lets the empty caption compete, as in this worked example.
        for d in search(dec, enc, beam_size=3, max_len=8, length_penalty=p, min_len=0):
            assert d.tokens == expected, f"length_penalty={p}"
            assert d.score == pytest.approx(log_a_end if expected else log_end, abs=1e-5)
            # The choice is the argmax of score / length**p over the two finished beams.
            best = max([(log_end, []), (log_a_end, [a])], key=lambda s: s[0] / (len(s[1]) + 1) ** p)
            assert d.tokens == best[1]
    assert b not in search(dec, enc, beam_size=1, max_len=8)[0].tokens
    # By default (min_len=1) <end> cannot come first, so the empty caption is never returned.
    for p in (0.0, 0.4):
        assert all(d.tokens == [a] for d in search(dec, enc, beam_size=3, max_len=8, length_penalty=p))


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize("real_words", [0, 1, 2])
def test_tiny_vocabulary_never_emits_special_tokens(beam_size: int, real_words: int) -> None:
    """Issue 9: a word map with no (or fewer than beam_size) real words once decoded as `<pad> <pad> ... <start>`.

    With no real word the caption ends at once (empty); with one or two, every caption uses only them."""
    dec = DecoderWithAttention(tiny_cfg(4 + real_words), encoder_dim=8).eval()
    with torch.no_grad():  # make the non-words the most likely tokens: they must still never be emitted
        dec.fc.bias[PAD_ID] = dec.fc.bias[START_ID] = dec.fc.bias[UNK_ID] = 8.0
    for d in search(dec, features(3), beam_size=beam_size, max_len=6, n_best=beam_size):
        assert set(d.tokens) <= set(range(4, 4 + real_words))
        assert math.isfinite(d.score) and d.alphas.shape == (len(d.tokens), 5)
        if real_words == 0:
            assert d.tokens == []
        for alt in d.alternatives:
            assert set(alt.tokens) <= set(range(4, 4 + real_words)) and math.isfinite(alt.score)


def test_n_best_lists_the_finished_beams_best_first() -> None:
    """The worked example of test_length_normalisation_ranks_by_score_over_length_power: with length penalty 1
    the finished beams are "a <end>" (-1.897 / 2) and "<end>" (-1.386 / 1), in that order."""
    dec = DecoderWithAttention(tiny_cfg(6), encoder_dim=8).eval()
    probs = torch.tensor([0.0, 0.0, 0.25, 0.0, 0.6, 0.15])
    with torch.no_grad():
        dec.fc.weight.zero_()
        dec.fc.bias.copy_(torch.where(probs > 0, probs.log(), torch.tensor(-1e4)))
    log_end, log_a_end = math.log(0.25), math.log(0.6) + math.log(0.25)
    for d in search(dec, torch.randn(2, 5, 8), beam_size=3, max_len=8, length_penalty=1.0, min_len=0, n_best=3):
        assert [alt.tokens for alt in d.alternatives] == [[4], []]  # the unfinished third beam is not listed
        assert [alt.normalised_score for alt in d.alternatives] == pytest.approx([log_a_end / 2, log_end], abs=1e-5)
        assert d.tokens == [4] and d.normalised_score == pytest.approx(log_a_end / 2, abs=1e-5)
    plain = search(dec, torch.randn(2, 5, 8), beam_size=3, max_len=8, length_penalty=1.0, min_len=0)
    assert all(len(d.alternatives) == 1 for d in plain)
    with pytest.raises(ValueError, match="n_best"):
        search(dec, torch.randn(1, 5, 8), beam_size=3, n_best=4)


def test_n_best_does_not_change_the_caption() -> None:
    dec, enc = random_decoder(), features(8)
    one = search(dec, enc, beam_size=4, max_len=12)
    many = search(dec, enc, beam_size=4, max_len=12, n_best=4)
    for a, b in zip(one, many):
        assert a.tokens == b.tokens and a.score == b.score and b.alternatives[0].tokens == b.tokens
        scores = [alt.normalised_score for alt in b.alternatives]
        assert scores == sorted(scores, reverse=True) and len({tuple(x.tokens) for x in b.alternatives}) == len(scores)


def fixed_decoder() -> DecoderWithAttention:
    """A decoder whose next-word distribution is the same at every step: p(a=4) = 0.6, p(b=5) = 0.3, p(<end>) = 0.1."""
    dec = DecoderWithAttention(tiny_cfg(6), encoder_dim=8).eval()
    probs = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.6, 0.3])
    with torch.no_grad():
        dec.fc.weight.zero_()
        dec.fc.bias.copy_(torch.where(probs > 0, probs.log(), torch.tensor(-1e4)))
    return dec


def test_trigram_blocking_on_a_hand_worked_decoder() -> None:
    """A decoder whose next-word distribution is fixed: p(a) = 0.6, p(b) = 0.3, p(<end>) = 0.1.

    Greedy decoding repeats "a" to max_len. With trigram blocking, worked by hand:
      a a a      (no earlier pair equals the last one yet)
      a a a b    (last pair (a, a) occurred at 0: "a" would repeat (a, a, a), so b)
      a a a b a  ((a, b) is new)     a a a b a a  ((b, a) is new)
      then the last pair (a, a) occurred at 0 (followed by a) and 1 (followed by b): both blocked -> <end>.
    """
    a, b = 4, 5
    dec = fixed_decoder()
    enc = torch.randn(3, 5, 8)
    assert [d.tokens for d in search(dec, enc, beam_size=1, max_len=8)] == [[a] * 8] * 3
    for k in (1, 3):
        for d in search(dec, enc, beam_size=k, max_len=8, block_trigrams=True, n_best=k):
            if k == 1:
                assert d.tokens == [a, a, a, b, a, a]
            for alt in d.alternatives:
                trigrams = list(zip(alt.tokens, alt.tokens[1:], alt.tokens[2:]))
                assert len(trigrams) == len(set(trigrams)), alt.tokens


def test_a_word_never_follows_itself_when_doubled_words_are_blocked() -> None:
    """The fixed decoder of the test above (p(a) = 0.6, p(b) = 0.3, p(<end>) = 0.1) says "a a a ..." unblocked;
    with ``block_doubled`` greedy alternates "a b a b ..." (b is the best word that is not the last one)."""
    a, b = 4, 5
    dec = fixed_decoder()
    enc = torch.randn(2, 5, 8)
    assert [d.tokens for d in search(dec, enc, beam_size=1, max_len=6, block_doubled=True)] == [[a, b] * 3] * 2
    for d in search(dec, enc, beam_size=3, max_len=6, block_doubled=True, n_best=3):
        for alt in d.alternatives:
            assert all(x != y for x, y in zip(alt.tokens, alt.tokens[1:])), alt.tokens


def test_block_repeated_trigrams_masks_exactly_the_repeats() -> None:
    seqs = torch.tensor([[7, 8, 9, 7, 8], [7, 8, 7, 8, 7], [4, 5, 6, 7, 8]])
    logp = torch.zeros(3, 12)
    block_repeated_trigrams(logp, seqs)
    blocked = [set(torch.isinf(row).nonzero().flatten().tolist()) - {PAD_ID} for row in logp]
    assert blocked == [{9}, {8}, set()]


def test_bigram_blocking_on_a_hand_worked_decoder() -> None:
    """A fixed next-word distribution: p(dog) = 0.5, p(a) = 0.3, p(runs) = 0.15, p(<end>) = 0.05, where "a" is a
    function word (it may end a repeated bigram) and "dog", "runs" are content words. Worked by hand:
      dog dog        (no bigram yet to repeat)
      dog dog a      ((dog, dog) is held: "dog" is blocked after "dog", "a" is next best)
      dog dog a dog  ((a, dog) is new)
      ... a          (after "dog": (dog, dog) held, so "dog" is blocked; (dog, a) repeats but ends in "a")
      ... a a a a    (after "a": (a, dog) held, so "dog" is blocked; (a, a) ends in a function word)
    """
    dog, a, runs = 4, 5, 6
    word_map = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": dog, "a": a, "runs": runs}
    content = content_word_mask(word_map)
    assert content.tolist() == [False, False, False, False, True, False, True]
    dec = DecoderWithAttention(tiny_cfg(7), encoder_dim=8).eval()
    probs = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.5, 0.3, 0.15])
    with torch.no_grad():
        dec.fc.weight.zero_()
        dec.fc.bias.copy_(torch.where(probs > 0, probs.log(), torch.tensor(-1e4)))
    enc = torch.randn(2, 5, 8)
    assert [d.tokens for d in search(dec, enc, beam_size=1, max_len=8)] == [[dog] * 8] * 2
    [greedy, _] = search(dec, enc, beam_size=1, max_len=8, repeat_words=content)
    assert greedy.tokens == [dog, dog, a, dog, a, a, a, a]
    for d in search(dec, enc, beam_size=3, max_len=8, repeat_words=content, n_best=3):
        for alt in d.alternatives:
            ending_in_content = [(x, y) for x, y in zip(alt.tokens, alt.tokens[1:]) if content[y]]
            assert len(ending_in_content) == len(set(ending_in_content)), alt.tokens


def test_block_repeated_bigrams_masks_exactly_the_content_repeats() -> None:
    content = torch.tensor([False] * 4 + [True, True, False, True, True])  # 6 is a function word
    seqs = torch.tensor([[4, 5, 7, 4], [4, 6, 7, 4], [6, 4, 8, 6], [7, 8, 4, 5]])
    logp = torch.zeros(4, 9)
    block_repeated_bigrams(logp, seqs, content)
    blocked = [set(torch.isinf(row).nonzero().flatten().tolist()) - {PAD_ID} for row in logp]
    assert blocked == [{5}, set(), {4}, set()]
