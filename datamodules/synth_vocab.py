"""The synthetic catalog's vocabulary: the hand-written taxonomy and the word tables it is dressed in.

The 24 categories (department, aliases, brands, use, attribute keys and values), which categories
complement each other or do the same job, series names, marketing noise, query fillers and the
keyboard neighbours used for misspellings; and the :class:`Category` records built from them
(:data:`CATEGORIES`, :data:`COMPLEMENTS`, :data:`CLOSE`). See :mod:`datamodules.synth`.
"""

from __future__ import annotations

from dataclasses import dataclass

# name, department, aliases, brands, usage phrase, then "key=value|value; ..." attributes
_TAXONOMY: tuple[tuple[str, str, str, str, str, str], ...] = (
    (
        "cordless drill",
        "tools",
        "drill driver|power drill",
        "Voltara Ridgeway Kestrel Torvik",
        "drilling holes and driving screws",
        "voltage=12V|18V|20V; chuck size=3/8 in|1/2 in; kit=tool only|1 battery kit|2 battery kit; color=yellow|red|black|blue|green",
    ),
    (
        "impact driver",
        "tools",
        "impact drill|impact screwdriver",
        "Voltara Ridgeway Kestrel Torvik",
        "driving long screws and lag bolts",
        "voltage=12V|18V|20V; max torque=1500 in-lbs|1800 in-lbs|2000 in-lbs; kit=tool only|1 battery kit|2 battery kit; color=yellow|red|black|blue",
    ),
    (
        "drill bits",
        "tools",
        "drill bit set|bit set",
        "Kestrel Ironbark Carbyte Ridgeway",
        "drilling wood, metal and masonry",
        "pieces=10-piece|21-piece|29-piece|100-piece; material=cobalt|titanium|black oxide|carbide; shank=hex|round",
    ),
    (
        "drill battery",
        "tools",
        "power tool battery|lithium battery pack",
        "Voltara Ridgeway Kestrel Torvik",
        "powering cordless tools",
        "voltage=12V|18V|20V; capacity=2.0Ah|4.0Ah|5.0Ah|6.0Ah; pack=single|2-pack",
    ),
    (
        "circular saw",
        "tools",
        "skill saw|cordless circular saw",
        "Voltara Ridgeway Ironbark Torvik",
        "cutting lumber and plywood",
        "blade size=6-1/2 in|7-1/4 in; power=15 amp corded|20V cordless; bevel=45 degree|56 degree; color=yellow|red|black|blue",
    ),
    (
        "saw blade",
        "tools",
        "circular saw blade|framing blade",
        "Kestrel Carbyte Ironbark Dentra",
        "ripping and crosscutting wood",
        "diameter=6-1/2 in|7-1/4 in|10 in; teeth=24T|40T|60T; material=carbide|steel",
    ),
    (
        "interior paint",
        "home improvement",
        "wall paint|latex paint",
        "Prismacoat Dunmore Vellum Brightwall",
        "painting interior walls and trim",
        "color=white|gray|navy blue|sage green|beige|black; finish=flat|eggshell|satin|semi-gloss; size=1 qt|1 gal|5 gal",
    ),
    (
        "paint roller",
        "home improvement",
        "roller cover|paint roller kit",
        "Brightwall Rollcraft Dunmore Vellum",
        "rolling paint onto walls and ceilings",
        "nap=3/8 in|1/2 in|3/4 in; width=4 in|9 in|18 in; material=microfiber|woven|foam",
    ),
    (
        "planter",
        "home improvement",
        "flower pot|plant pot",
        "Terrabloom Greenhaven Mossgate Potterly",
        "growing indoor and patio plants",
        "color=white|black|blue|sage green|red|gray; material=ceramic|terracotta|plastic|concrete; diameter=6 in|8 in|10 in|12 in|16 in",
    ),
    (
        "potting soil",
        "home improvement",
        "potting mix|garden soil",
        "Terrabloom Greenhaven Mossgate Loamwell",
        "potting and repotting plants",
        "volume=8 qt|16 qt|1 cu ft|2 cu ft; type=all purpose|cactus mix|orchid mix|organic",
    ),
    (
        "LED bulb",
        "home improvement",
        "LED light bulb|light bulbs",
        "Lumora Brightline Halvek Glowmere",
        "lighting rooms and fixtures",
        "brightness=40W equivalent|60W equivalent|100W equivalent; base=E26|E12|GU10; color temperature=2700K soft white|5000K daylight; pack=4-pack|8-pack|12-pack",
    ),
    (
        "smart bulb",
        "home improvement",
        "wifi light bulb|smart light bulb",
        "Lumora Halvek Glowmere Brightline",
        "app and voice controlled lighting",
        "brightness=60W equivalent|75W equivalent; base=E26|BR30; connectivity=Wi-Fi|Bluetooth|Zigbee; color=tunable white|multicolor",
    ),
    (
        "ceiling fan",
        "home improvement",
        "ceiling fan with light|indoor ceiling fan",
        "Aerwind Halvek Breezely Lumora",
        "cooling and lighting a room",
        "blade span=42 in|52 in|60 in; color=brushed nickel|matte black|white|bronze; control=remote|pull chain|wall control",
    ),
    (
        "table lamp",
        "home & kitchen",
        "bedside lamp|desk lamp",
        "Lumora Glowmere Brightline Halvek",
        "bedside and living room lighting",
        "color=white|black|brass|gray; height=18 in|24 in|28 in; base material=ceramic|metal|wood",
    ),
    (
        "laptop",
        "electronics",
        "notebook computer|laptop computer",
        "Novatek Zentrix Aurion Corvex",
        "work, school and browsing",
        "screen size=13.3 in|14 in|15.6 in|16 in; memory=8GB RAM|16GB RAM|32GB RAM; storage=256GB SSD|512GB SSD|1TB SSD; color=silver|space gray|black|blue",
    ),
    (
        "laptop charger",
        "electronics",
        "laptop power adapter|usb c charger",
        "Novatek Zentrix Voltix Chargewell",
        "charging and powering laptops",
        "wattage=45W|65W|90W|100W; connector=USB-C|barrel 4.5mm; cable length=6 ft|10 ft",
    ),
    (
        "laptop sleeve",
        "electronics",
        "laptop case|laptop bag",
        "Packwell Zentrix Corvex Stowaway",
        "carrying and protecting a laptop",
        "size=13 in|14 in|15.6 in|16 in; color=black|gray|navy|pink; material=neoprene|felt|leather",
    ),
    (
        "headphones",
        "electronics",
        "over ear headphones|bluetooth headphones",
        "Sonique Auralis Echora Quillsound",
        "listening to music and taking calls",
        "style=over-ear|on-ear; connectivity=wireless|wired; noise control=active noise cancelling|passive isolation; color=black|white|silver|midnight blue; battery life=30 hr|40 hr|60 hr",
    ),
    (
        "earbuds",
        "electronics",
        "wireless earbuds|in ear headphones",
        "Sonique Auralis Echora Pipbud",
        "listening on the go",
        "connectivity=wireless|wired; noise control=active noise cancelling|passive isolation; color=black|white|silver|rose gold; battery life=6 hr|8 hr|10 hr",
    ),
    (
        "headphone case",
        "electronics",
        "headphone carrying case|earbuds case",
        "Packwell Stowaway Echora Caseloom",
        "storing and carrying headphones",
        "fits=over-ear headphones|on-ear headphones|earbuds; material=hard shell EVA|silicone|nylon; color=black|gray|blue",
    ),
    (
        "coffee maker",
        "home & kitchen",
        "coffee machine|drip coffee maker",
        "Brewmont Caffio Morningside Kettleby",
        "brewing coffee at home",
        "capacity=4-cup|12-cup|14-cup; type=drip|single serve|pour over; color=black|stainless steel|white|red; controls=programmable|manual",
    ),
    (
        "coffee filters",
        "home & kitchen",
        "paper coffee filters|coffee filter",
        "Brewmont Filtrio Morningside Kettleby",
        "filtering brewed coffee",
        "size=#2 cone|#4 cone|8-12 cup basket; material=white paper|unbleached paper|reusable mesh; count=100 count|200 count|1 reusable",
    ),
    (
        "vacuum cleaner",
        "home & kitchen",
        "upright vacuum|vacuum",
        "Dustrek Cyclona Sweeply Airvane",
        "cleaning carpets and floors",
        "type=upright|canister|stick; power=12 amp corded|20V cordless; filter=HEPA|standard; color=red|gray|purple|blue",
    ),
    (
        "vacuum bags",
        "home & kitchen",
        "vacuum cleaner bags|replacement vacuum bags",
        "Dustrek Cyclona Bagwell Airvane",
        "collecting dust in bagged vacuums",
        "bag type=type A|type C|type Q; count=3-pack|6-pack|10-pack; filter=HEPA|standard",
    ),
)
_COMPLEMENT_PAIRS = (
    ("cordless drill", "drill bits"),
    ("cordless drill", "drill battery"),
    ("impact driver", "drill bits"),
    ("impact driver", "drill battery"),
    ("circular saw", "saw blade"),
    ("circular saw", "drill battery"),
    ("interior paint", "paint roller"),
    ("planter", "potting soil"),
    ("LED bulb", "ceiling fan"),
    ("LED bulb", "table lamp"),
    ("smart bulb", "ceiling fan"),
    ("smart bulb", "table lamp"),
    ("laptop", "laptop charger"),
    ("laptop", "laptop sleeve"),
    ("headphones", "headphone case"),
    ("earbuds", "headphone case"),
    ("coffee maker", "coffee filters"),
    ("vacuum cleaner", "vacuum bags"),
)
_CLOSE_PAIRS = (("cordless drill", "impact driver"), ("headphones", "earbuds"), ("LED bulb", "smart bulb"))
_SERIES = (
    "MaxForce",
    "ProLine",
    "Atlas",
    "Edge",
    "Vortex",
    "Nimbus",
    "Summit",
    "Pulse",
    "Aria",
    "Core",
    "Elite",
    "Flex",
    "Titan",
    "Zephyr",
    "Nova",
    "Orbit",
)
_NOISE = (
    "Pro",
    "Heavy Duty",
    "(2-Pack)",
    "New 2024 Model",
    "Free Shipping",
    "Best Seller",
    "Upgraded",
    "Premium",
    "Value Bundle",
    "Genuine",
    "Professional Grade",
    "Limited Edition",
)
_PITCH = ("Built to last.", "Backed by a 3-year warranty.", "A customer favourite.", "Easy to set up and use.", "")
_FILLERS = ("best", "new", "for home", "2024", "top rated")
_PRE_KEYS = {
    "color",
    "material",
    "style",
    "connectivity",
    "noise control",
    "type",
    "finish",
    "voltage",
    "wattage",
    "brightness",
}
_KEYBOARD = dict(
    zip(
        "qwertyuiopasdfghjklzxcvbnm",
        (
            "wa",
            "qes",
            "wrd",
            "etf",
            "ryg",
            "tuh",
            "yij",
            "uok",
            "ipl",
            "ol",
            "qsz",
            "awdx",
            "sefc",
            "drgv",
            "fthb",
            "gyjn",
            "hukm",
            "jil",
            "kop",
            "zaxs",
            "xcsd",
            "vdf",
            "cbfg",
            "vnhg",
            "bmj",
            "nk",
        ),
    )
)


@dataclass(frozen=True)
class Category:
    name: str
    department: str
    aliases: tuple[str, ...]
    brands: tuple[str, ...]
    attributes: tuple[tuple[str, tuple[str, ...]], ...]
    use: str


CATEGORIES: dict[str, Category] = {
    name: Category(
        name,
        dept,
        tuple(aliases.split("|")),
        tuple(brands.split()),
        tuple((k.strip(), tuple(v.split("|"))) for k, v in (kv.split("=") for kv in attrs.split(";"))),
        use,
    )
    for name, dept, aliases, brands, use, attrs in _TAXONOMY
}
COMPLEMENTS: dict[str, tuple[str, ...]] = {
    c: tuple(sorted({b for a, b in _COMPLEMENT_PAIRS if a == c} | {a for a, b in _COMPLEMENT_PAIRS if b == c}))
    for c in CATEGORIES
}
CLOSE: dict[str, tuple[str, ...]] = {
    c: tuple(sorted({b for a, b in _CLOSE_PAIRS if a == c} | {a for a, b in _CLOSE_PAIRS if b == c}))
    for c in CATEGORIES
}
