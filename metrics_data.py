"""Word lists for the CHAIR object-hallucination metric (Rohrbach et al., EMNLP 2018), used by metrics.py.

``COCO_SYNONYMS`` maps each of the 80 COCO instance categories (named exactly as in COCO's
``instances_*.json``) to the words that name it in a caption. It follows the synonym list released with the
paper (itself based on Neural Baby Talk's, Lu et al. 2018): "player", "skier" and "chef" name a person,
"puppy" a dog, "sofa" a couch. Words that name several things are left out, as in that list: "glass"
(wine glass, window glass), "bat" (the animal), "glove", "plate", "plant", "light", "sign" and "meter"
count only inside their two-word names ("wine glass", "baseball bat", "potted plant", "traffic light",
"stop sign", "parking meter"). Plurals are derived in metrics.py (``dogs``, ``buses``, ``knives``, ``people``
is listed itself).

``COMPOUNDS`` are the paper's fixes for word pairs whose words would otherwise be read as other objects:
"hot dog" is not a dog (it is a category of its own, in ``COCO_SYNONYMS``), a "baby elephant" is an elephant
rather than a person plus an elephant, a "passenger train" holds no counted passenger, and "home plate" and
"train track" name nothing countable. A value of ``None`` means the words name no COCO object at all.
"""

from __future__ import annotations

# fmt: off
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider",
        "children", "baby", "worker", "passenger", "sister", "biker", "policeman", "cop", "officer", "lady",
        "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother", "father", "gentleman",
        "pitcher", "player", "skier", "snowboarder", "skater", "skateboarder", "foreigner", "caller", "offender",
        "coworker", "trespasser", "patient", "politician", "soldier", "grandchild", "serviceman", "walker",
        "drinker", "doctor", "bicyclist", "thief", "buyer", "teenager", "student", "camper", "driver", "solider",
        "hunter", "shopper", "villager",
    ),
    "bicycle": ("bicycle", "bike", "unicycle", "minibike", "trike"),
    "car": (
        "car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe", "taxicab",
        "limo", "taxi",
    ),
    "motorcycle": ("motorcycle", "scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "airplane", "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane",
        "seaplane",
    ),
    "bus": ("bus", "minibus", "trolley"),
    "train": ("train", "locomotive", "tramway", "caboose"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "boat", "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe", "skiff",
        "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler", "ferryboat",
        "watercraft", "tugboat", "schooner", "barge", "ferry", "sailboard", "paddleboat", "lifeboat", "freighter",
        "steamboat", "riverboat", "battleship", "steamship",
    ),
    "traffic light": ("traffic light", "street light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "pew"),
    "bird": (
        "bird", "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican", "waterfowl",
        "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "osprey", "blackbird", "fowl",
        "shorebird", "woodpecker", "egret", "chickadee", "quail", "bluebird", "kingfisher", "buzzard", "willet",
        "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot", "loon", "gosling", "waterbird", "pheasant",
        "rooster", "sandpiper", "crow", "raven", "turkey", "oriole", "cowbird", "warbler", "magpie", "peacock",
        "cockatiel", "lorikeet", "puffin", "vulture", "condor", "macaw", "peafowl", "cockatoo", "songbird",
    ),
    "cat": ("cat", "kitten", "feline", "tabby"),
    "dog": (
        "dog", "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine", "pitbull",
        "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt", "doggy", "spaniel",
        "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound", "retriever", "brindle", "hound",
        "whippet", "husky",
    ),
    "horse": (
        "horse", "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino", "mustang",
        "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("sheep", "lamb", "ram", "goat", "ewe"),
    "cow": ("cow", "cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison"),
    "elephant": ("elephant",),
    "bear": ("bear", "panda"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack"),
    "umbrella": ("umbrella",),
    "handbag": ("handbag", "wallet", "purse", "briefcase"),
    "tie": ("tie", "bow", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard",),
    "sports ball": ("sports ball", "ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat",),
    "baseball glove": ("baseball glove",),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("tennis racket", "racket"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup",),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife"),
    "spoon": ("spoon",),
    "bowl": ("bowl", "container"),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub", "cheeseburger", "hamburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut", "bagel"),
    "cake": ("cake", "cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("chair", "seat", "stool"),
    "couch": ("couch", "sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("potted plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty"),
    "tv": ("tv", "monitor", "televison", "television"),
    "laptop": ("laptop", "computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": ("mouse",),
    "remote": ("remote",),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "mobile phone", "phone", "cellphone", "telephone", "smartphone", "iphone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stovetop", "stove", "stove top oven"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddybear"),
    "hair drier": ("hair drier", "hairdryer"),
    "toothbrush": ("toothbrush",),
}
# fmt: on

# Animals that "baby" or "adult" may precede, and vehicles that "passenger" may precede (the paper's lists).
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLES = {"jet": "airplane", "train": "train"}
_ANIMAL_CATEGORY = {a: (a if a in COCO_SYNONYMS else None) for a in _ANIMALS}

COMPOUNDS: dict[str, str | None] = {
    **{f"{age} {animal}": category for animal, category in _ANIMAL_CATEGORY.items() for age in ("baby", "adult")},
    **{f"passenger {vehicle}": category for vehicle, category in _VEHICLES.items()},
    "toilet seat": "toilet",
    "home plate": None,
    "train track": None,
}

# Irregular plurals of the words above (regular ones, "dogs", "buses", "ladies", "knives", are derived).
IRREGULAR_PLURALS: dict[str, str] = {
    "person": "persons",  # "people" is a synonym of its own
    "mouse": "mice",
    "goose": "geese",
    "ox": "oxen",
    "calf": "calves",
    "knife": "knives",
    "pocketknife": "pocketknives",
    "child": "children",
    "grandchild": "grandchildren",
}
# Words whose plural is the word itself, or that are plural already.
SAME_PLURAL = frozenset({"sheep", "bison", "buffalo", "cattle", "people", "children", "oxen", "skis", "scissors"})
