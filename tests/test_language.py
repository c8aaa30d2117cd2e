"""language.py: the object-aware language model, its training objects and its fusion with beam search."""

from __future__ import annotations

import numpy as np
import torch
from _decoders import features, random_decoder

from decoding import DecodeConfig, beam_search
from detector import LABELS, Detection
from language import (
    N_CATEGORIES,
    ObjectLanguageModel,
    PresenceNoise,
    TextFusion,
    TextModelConfig,
    caption_categories,
    presence,
    training_presence,
    usual_names,
)


def small_model(vocab: int = 12, seed: int = 0) -> ObjectLanguageModel:
    torch.manual_seed(seed)
    return ObjectLanguageModel(TextModelConfig(vocab, embed_dim=8, hidden_dim=16, object_dim=4, dropout=0.0)).eval()


def test_stepping_gives_the_same_distribution_as_the_whole_sentence():
    model = small_model()
    words = torch.tensor([[1, 5, 7, 9], [1, 4, 4, 6]])  # N x T
    objects = torch.rand(2, N_CATEGORIES)
    with torch.no_grad():
        whole = torch.log_softmax(model(words, objects), dim=2)  # N x T x V
        code, state = model.start(objects)
        for t in range(words.size(1)):
            logp, state = model.step(words[:, t], code, state)
            torch.testing.assert_close(logp, whole[:, t])


def test_caption_categories_read_chairs_synonyms():
    assert caption_categories("a man riding a motorbike next to a hot dog stand".split()) == {
        LABELS.index("person"),
        LABELS.index("motorcycle"),
        LABELS.index("hot dog"),
    }
    assert caption_categories("the sky is blue".split()) == set()


def test_presence_keeps_each_categorys_best_confident_score():
    found = [
        [Detection("cat", 0.9, (0, 0, 1, 1)), Detection("cat", 0.5, (0, 0, 1, 1)), Detection("cup", 0.2, (0, 0, 1, 1))],
        [],
    ]
    scores = presence(found, min_score=0.3)
    assert scores.shape == (2, N_CATEGORIES)
    assert scores[0, LABELS.index("cat")] == torch.tensor(0.9)
    assert scores[0, LABELS.index("cup")] == 0  # below min_score: not a find
    assert scores[1].sum() == 0


def test_training_presence_simulates_a_detector():
    rng = np.random.default_rng(0)
    named, others = {LABELS.index("cat")}, {LABELS.index("couch"), LABELS.index("cat")}
    noise = PresenceNoise()
    draws = np.stack([training_presence(named, others, rng, noise) for _ in range(4000)])
    cat, couch = draws[:, LABELS.index("cat")], draws[:, LABELS.index("couch")]
    assert abs((cat > 0).mean() - noise.keep_named) < 0.03
    assert abs((couch > 0).mean() - noise.keep_other) < 0.03
    found = draws[draws > 0]
    assert found.min() >= noise.min_score and found.max() <= 1.0
    extra = (draws > 0).sum(axis=1) - (cat > 0) - (couch > 0)
    assert 0.02 < extra.mean() < 0.08  # about noise.false_find extra categories per caption


class FirstWordFromOutside:
    """An inner hook standing for the detector: the first word is word 5, marked as outside knowledge."""

    def __call__(self, logp, alpha, image, seqs, outside):
        marked = torch.zeros_like(logp, dtype=torch.bool)
        if seqs.size(1) == 0:
            logp = torch.full_like(logp, float("-inf"))
            logp[:, 5] = 0.0
            marked[:, 5] = True
        return logp, marked


def test_the_text_model_speaks_only_after_outside_knowledge_did():
    decoder, enc = random_decoder(), features(3)
    cfg = DecodeConfig(block_bigrams=False)
    model = small_model()
    with torch.no_grad():  # a text model that always says word 7
        model.fc.weight.zero_()
        model.fc.bias.fill_(-20.0)
        model.fc.bias[7] = 20.0
    objects = torch.zeros(3, N_CATEGORIES)
    plain = beam_search(decoder, enc, cfg)
    silent = beam_search(decoder, enc, cfg, hook=TextFusion(model, objects, 5.0))  # nothing from outside yet
    assert [d.tokens for d in silent] == [d.tokens for d in plain]
    assert not any(any(d.outside) for d in silent)
    zero = beam_search(decoder, enc, cfg, hook=TextFusion(model, objects, 0.0, FirstWordFromOutside()))
    spoken = beam_search(decoder, enc, cfg, hook=TextFusion(model, objects, 5.0, FirstWordFromOutside()))
    for z, d in zip(zero, spoken):
        assert z.tokens[0] == d.tokens[0] == 5 and z.outside[0] and d.outside[0]
        assert not any(z.outside[1:])  # weight 0: the captioner's own words after it
        assert d.tokens[1] == 7 and d.outside[1]  # the text model's word, marked as outside knowledge


def test_fusion_follows_reordered_beams():
    """The text model's state is found by each beam's words, so batched search equals one image at a time."""
    decoder, enc, model = random_decoder(), features(4), small_model(seed=3)
    objects = torch.rand(4, N_CATEGORIES)
    cfg = DecodeConfig(beam_size=3, block_bigrams=False)
    together = beam_search(decoder, enc, cfg, hook=TextFusion(model, objects, 1.0))
    for i in range(4):
        alone = beam_search(decoder, enc[i : i + 1], cfg, hook=TextFusion(model, objects[i : i + 1], 1.0))[0]
        assert alone.tokens == together[i].tokens
        assert abs(alone.score - together[i].score) < 1e-4


def test_usual_names_are_what_the_text_calls_one_such_object():
    said = ("a suitcase on the floor", "a pile of luggage", "some luggage here", "a dining table", "a table with food",
            "a table by a window", "a man and a woman", "a man on a bike")  # fmt: skip
    text = [s.split() for s in said]
    names = usual_names(text)
    assert names["suitcase"] == "suitcase"  # "luggage" is said more, but never as "a luggage"
    assert names["dining table"] == "table"
    assert names["bicycle"] == "bike"
    assert "person" not in names  # "a man" is said most, but a detector cannot tell a man from a woman


def test_renormalising_after_a_hook_marks_no_word_as_outside():
    """A hook that removed probability (grounding's "named once") leaves the rest unnormalised; renormalising
    raises every word alike, which is not the text model's doing: nothing is marked."""
    model = small_model()
    fusion = TextFusion(model, torch.zeros(1, N_CATEGORIES), 1.0, inner=lambda lp, *rest: (lp - 3.0, lp < -1e9))
    logp = torch.log_softmax(torch.randn(1, 12), dim=1)
    seqs, flags = torch.tensor([[4, 5]]), torch.zeros(1, 2, dtype=torch.bool)
    fused, marked = fusion(logp, torch.full((1, 4), 0.25), torch.tensor([0]), seqs, flags)
    torch.testing.assert_close(fused, logp)  # no outside word yet: the text model is silent
    assert not marked.any()
